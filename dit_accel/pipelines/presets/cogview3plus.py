"""CogView3-Plus (``CogView3PlusTransformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p) in raster
order; joint self-attention ``transformer_blocks.*.attn1`` over [text, image] (text first, no mask).
``CogVideoXAttnProcessor2_0`` ends in ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, Preset, latent_grid_2d, shapes_key

__all__ = ["PRESETS"]


PRESETS = (
    Preset(
        "CogView3PlusTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        grid_dims=2,
        read_grid=latent_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for CogView3-Plus
        notes="CogView3-Plus; joint attention [text, image], 2-D grid (H, W)",
        hub_words=((r"cogview-?3", None),),
    ),
)
