"""Tiny GLM-Image (``GlmImageTransformer2DModel``): the bare ``"glm_image"`` transformer, image grid (10, 13) after
the 2x2 patch, one prior token per image token; joint [glyph text, image] as in a text-to-image call (no kv_caches,
no attention_mask, as ``GlmImagePipeline`` calls it)."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _glm(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    prior = (torch.arange(h * w) % cfg.prior_vq_quantizer_codebook_size).expand(batch, -1)
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w),
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), prior_token_id=prior,
                prior_token_drop=torch.zeros(batch, h * w, dtype=torch.bool), timestep=t,
                target_size=torch.tensor([[8.0 * p * h, 8.0 * p * w]]).expand(batch, -1),
                crop_coords=torch.zeros(batch, 2), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "glm_image", "GlmImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             text_embed_dim=16, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=32),
        grid=(10, 13), text=7, inputs=_glm,
    ),
)
