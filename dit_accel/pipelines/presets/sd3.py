"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p);
joint attention ``transformer_blocks.*.attn`` over [image, text] (text last) and, in SD3.5's dual-attention
blocks, self-attention ``attn2`` over the image only."""

from __future__ import annotations

from ._common import (
    IMAGE_DEFAULTS,
    Preset,
    latent_grid_2d,
    shapes_key,
)

__all__ = ["PRESETS"]


PRESETS = (
    Preset(
        "SD3Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"transformer_blocks\.\d+\.attn2"),
        text_position="last",
        grid_dims=2,
        read_grid=latent_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for SD3
        notes="Stable Diffusion 3 / 3.5; joint attention [image, text] (+ SD3.5 image self-attention attn2), "
              "2-D grid (H, W)",
        hub_words=((r"stable-diffusion-3|sd3", None),),
    ),
)
