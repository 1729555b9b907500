"""PixArt-alpha / PixArt-Sigma (``PixArtTransformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p) in
raster order (``PatchEmbed``); self-attention ``transformer_blocks.*.attn1`` over the image tokens only (the
text reaches the image through ``attn2``, cross-attention, which stays dense). The simplest layout: no text in
the sparse call. ``AttnProcessor2_0`` ends in ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, Preset, image_only_grid_2d, shapes_key

__all__ = ["PRESETS"]

PRESETS = (
    Preset(
        "PixArtTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="none",
        grid_dims=2,
        read_grid=image_only_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for PixArt
        notes="PixArt-alpha / PixArt-Sigma; self-attention transformer_blocks.*.attn1 over the image only "
              "(text by cross-attention, dense)",
        hub_words=((r"pixart", None),),
    ),
)
