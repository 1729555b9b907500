"""Tiny CogView4: the ``tiny-cogview4`` pipeline and the bare ``"cogview4"`` transformer (joint [text, image]
attention, 2-D RoPE).

tiny-cogview4: a 2-layer GLM text encoder (byte tokenizer; the pipeline left-pads the prompt to a multiple of
16 tokens), 64x64 -> latent 32x32 (VAE 2x) -> patch 2 -> image grid (16, 16) = 256 image tokens, text first.
"""

from __future__ import annotations

import torch

from ._common import TINY_IMAGE_CALL, TINY_IMAGE_METHODS, TinyPipeline, TinyTransformer, byte_tokenizer, tiny_image_vae

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", unk="<|unk|>",
                               model_max_length=1024)
    text_encoder = GlmModel(GlmConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    latent_channels = 4
    vae = tiny_image_vae(latent_channels)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=latent_channels, out_channels=latent_channels, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32,
        sample_size=32, rope_axes_dim=(32, 32),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear",
    )
    return CogView4Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=scheduler)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    size = torch.tensor([[8.0 * p * h, 8.0 * p * w]] * batch)
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2), return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-cogview4",
        summary="CogView4Pipeline with a 2-layer CogView4Transformer2DModel (joint text-image attention), tiny "
        "AutoencoderKL and GLM encoder; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_IMAGE_CALL,
        method_defaults=TINY_IMAGE_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "cogview4", "CogView4Transformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=32,
             rope_axes_dim=(32, 32)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
