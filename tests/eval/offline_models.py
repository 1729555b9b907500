"""Small offline stand-ins for the eval metrics' networks (no downloaded weights): a conv feature
extractor for FID and a random tiny CLIP with a tokenizer built in code."""

import torch
from torch import nn


class TinyFeatures(nn.Module):
    """Fixed random conv features: enough to tell distributions apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.num_features = 32

    def forward(self, x):
        return self.net(x)


def tiny_clip():
    """A random CLIPModel from a tiny config and a word-level tokenizer built in code (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]"] + "a red green blue cat dog car house video of the".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=8, bos_token_id=0,
                         eos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=8),
        projection_dim=8)
    torch.manual_seed(0)
    return CLIPModel(config).eval(), tokenizer
