"""HunyuanDiT (``HunyuanDiT2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p) in raster order; self-
attention ``blocks.*.attn1`` over the image tokens only (CLIP and T5 text reach the image through ``attn2``,
cross-attention, which stays dense). ``HunyuanAttnProcessor2_0`` ends in ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, Preset, image_only_grid_2d, shapes_key

__all__ = ["PRESETS"]

PRESETS = (
    Preset(
        "HunyuanDiT2DModel",
        attention=(r"blocks\.\d+\.attn1",),
        text_position="none",
        grid_dims=2,
        read_grid=image_only_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for HunyuanDiT
        notes="HunyuanDiT; self-attention blocks.*.attn1 over the image only (CLIP + T5 text by cross-attention, "
              "dense)",
        hub_words=((r"hunyuan-?dit", None),),
    ),
)
