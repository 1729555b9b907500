"""What every tiny-model module uses: the two entry types (:class:`TinyTransformer`,
:class:`TinyPipeline`) and the tokenizers built in code. It imports nothing of the tiny registry, so the
family modules and ``__init__`` both build on it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["TinyTransformer", "TinyPipeline", "byte_tokenizer", "t5_tokenizer", "tiny_t5_settings",
           "tiny_wan_parts", "image_ids", "flux_image_inputs", "WAN_Z_DIM", "TINY_WAN_TRANSFORMER",
           "tiny_image_vae", "four_axis_image_inputs", "TINY_WAN_CALL", "TINY_WAN_METHODS", "TINY_IMAGE_CALL",
           "TINY_IMAGE_METHODS"]

# (model config, grid, batch, text tokens, rnd(*shape), timesteps (B,), text mask (B, text)) -> forward kwargs
InputsBuilder = Callable[[Any, Tuple[int, ...], int, int, Callable[..., torch.Tensor], torch.Tensor, torch.Tensor],
                         Dict[str, Any]]


@dataclass(frozen=True)
class TinyTransformer:
    """A bare tiny transformer of one Diffusers class, for tests and the overhead bench.

    Attributes:
        name: the short name tests parametrize over (``"wan"``, ``"flux"``).
        class_name: the Diffusers transformer class (the one the preset is for).
        config: its constructor kwargs: a few thousand parameters.
        grid: the default token grid after patchify (big enough for 64-token blocks to skip work).
        text: the default number of text tokens.
        inputs: builds the forward kwargs whose latent gives a token grid (see :data:`InputsBuilder`);
            it draws every random tensor from ``rnd``, in a fixed order.
        tune: ``(model) -> None`` run on the built model (no grad), for a class whose random tiny weights
            would hide attention (AuraFlow's small adaLN gates); None: nothing.
    """

    name: str
    class_name: str
    config: Dict[str, Any]
    grid: Tuple[int, ...]
    text: int
    inputs: InputsBuilder
    tune: Optional[Callable[[Any], None]] = None


# Call settings and grid-sized method settings shared by the tiny pipelines of one shape (read only).
# Video, the Wan lineage: 17 frames at 128x128 -> grid (5, 8, 8), one 64-token block per frame.
TINY_WAN_CALL = {"num_frames": 17, "height": 128, "width": 128, "num_inference_steps": 4, "max_sequence_length": 64}
TINY_WAN_METHODS = {
    "tile": {"tile": (1, 8, 8), "window": (3, 1, 1)},  # 3 of 5 frames per query frame
    "gna": {"kernel_size": (3, 6, 6)},
    "radial": {"block_size": 64, "decay": 1.0, "sink_frames": (0,)},
    "sla": {"topk": 0.4},  # 2 of 5 key blocks
}
# Image: 64x64 -> grid (16, 16), four 8x8 tiles.
TINY_IMAGE_CALL = {"num_frames": 1, "height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 64}
TINY_IMAGE_METHODS = {
    "tile": {"tile": (8, 8), "window": (1, 1)},
    # A stride-1 window visits all four 64-token blocks of a 16x16 grid (density 1.0);
    # stride = kernel = tile is GNA's blocked special case: perfectly block-sparse, 1 of 4.
    "gna": {"kernel_size": (8, 8), "stride": (8, 8)},
    "sla": {"topk": 0.5},
}


@dataclass(frozen=True)
class TinyPipeline:
    """A tiny random-weight Diffusers pipeline, built in code (``--model tiny-<family>``).

    Attributes:
        name: the ``--model`` name (``"tiny-wan"``); it must contain one of the preset's ``hub_words``.
        summary: one line for ``dit-accel info``.
        build: ``(seed) -> pipeline`` (seeded after its imports; the caller forks the RNG).
        defaults: suggested call settings (``num_frames``, ``height``, ``width``, ``num_inference_steps``,
            ``max_sequence_length``): small enough for a 2-core CPU, big enough for sparsity.
        method_defaults: per method name, config fields sized to the grid of :attr:`defaults`.
        requires: packages the Diffusers pipeline needs to run (not to build), checked by ``load_pipeline``:
            SkyReels-V2 and Wan VACE clean every prompt with ftfy and fail with a bare ``NameError`` without it.
    """

    name: str
    summary: str
    build: Callable[[int], Any]
    defaults: Dict[str, int]
    method_defaults: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    requires: Tuple[str, ...] = ()


# ----------------------------------------------------------------------------- call arguments
def image_ids(grid) -> torch.Tensor:
    """FLUX.1's position ids of a ``(H, W)`` image: ``(H * W, 3)`` float rows ``(0, row, column)`` in raster order."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def flux_image_inputs(cfg, grid, batch, text, rnd, t, mask):
    """Call arguments of FLUX.1-layout transformers without a pooled projection (Bria 3.x, Ovis-Image): packed
    ``(B, N, C)`` latents, :func:`image_ids`, zero text ids."""
    h, w = grid
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=image_ids(grid),
                txt_ids=torch.zeros(text, 3), return_dict=False)


def four_axis_image_inputs(cfg, grid, batch, text, rnd, t, mask):
    """Call arguments of FLUX.2 / FLUX.3: packed (B, N, C) latents and 4-axis (t, h, w, l) position ids."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols, zeros], -1).reshape(-1, 4)  # (t, h, w, l)
    txt_ids = torch.stack([torch.zeros(text), torch.zeros(text), torch.zeros(text), torch.arange(text)], -1)
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=img_ids,
                txt_ids=txt_ids.long(), return_dict=False)


def byte_tokenizer(*, bos: str | None, eos: str, pad: str, unk: str, model_max_length: int):
    """A byte-level tokenizer without merges: every UTF-8 byte is one token.

    It accepts arbitrary text, supports padding/truncation/attention masks and
    decoding, and is built from code alone (no vocabulary file).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([pad, eos, unk] + ([bos] if bos else [])))  # CLIP: pad is eos
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}  # contiguous ids: len(tokenizer) is the vocab size
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if bos:
        template = f"{bos} $A {eos}"
        special_ids = [(bos, vocab[bos]), (eos, vocab[eos])]
    else:
        template = f"$A {eos}"
        special_ids = [(eos, vocab[eos])]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special_ids)
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        model_max_length=model_max_length,
        padding_side="right",
        **kwargs,
    )


def t5_tokenizer():
    return byte_tokenizer(bos=None, eos="</s>", pad="<pad>", unk="<unk>", model_max_length=512)


def tiny_t5_settings(tokenizer) -> dict:
    """Config of the tiny (U)T5 text encoders (Wan uses UMT5, FLUX T5: same fields)."""
    return dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- shared Wan components
WAN_Z_DIM = 4  # latent channels of the tiny Wan VAE


def tiny_wan_parts(seed: int) -> dict:
    """The tokenizer, UMT5 encoder and VAE of tiny-wan, seeded here: the Wan lineage (SkyReels-V2, Wan VACE)
    takes the same components, drawn in the same order (tiny-wan's weights stay what they were)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**tiny_t5_settings(tokenizer))).eval()
    vae = AutoencoderKLWan(
        base_dim=4,  # conv3d is slow on CPU; the decoder dominates the smoke-run time
        z_dim=WAN_Z_DIM,
        dim_mult=[1, 1, 1, 1],  # 3 downsamples: 8x spatial, like the real Wan VAE
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 4x temporal
        latents_mean=[0.0] * WAN_Z_DIM,
        latents_std=[1.0] * WAN_Z_DIM,
    ).eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)


# The transformer of tiny-wan; SkyReels-V2 and Wan VACE take the same fields (VACE adds its control stream).
TINY_WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=WAN_Z_DIM,
                            out_channels=WAN_Z_DIM, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


# ----------------------------------------------------------------------------- shared image components
def tiny_image_vae(latent_channels: int = 4):
    """The AutoencoderKL of tiny-flux (tiny-sd3, tiny-chroma take it too): one downsample, 2x, so 64x64
    gives a 32x32 latent; it draws from the global generator (the builder seeds before)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
