"""CogView4 (``CogView4Transformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p); joint
self-attention ``transformer_blocks.*.attn1`` over [text, image] (text first).

A call with ``attention_mask`` (batched prompts of different lengths) gets a full (S, S) float mask from
the processor, which is not a key padding mask: those calls run dense (with a warning)."""

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
        "CogView4Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        read_grid=latent_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for CogView4
        notes="CogView4; joint attention [text, image], 2-D grid (H, W); calls with attention_mask run dense",
        hub_words=((r"cogview-?4", None),),
    ),
)
