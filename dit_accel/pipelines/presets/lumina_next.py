"""Lumina-Next (``LuminaNextDiT2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p) in raster order
(``LuminaPatchEmbed``); self-attention ``layers.*.attn1`` over the image tokens only (the caption reaches the
image through the gated ``attn2`` cross-attention, which stays dense). ``LuminaAttnProcessor2_0`` passes SDPA
the image mask (all ones for one image size) expanded to (B, heads, S, S) and its proportional softmax scale:
the mask is read by one query row (``Preset.square_mask``), the scale is kept."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, Preset, image_only_grid_2d, shapes_key

__all__ = ["PRESETS"]

PRESETS = (
    Preset(
        "LuminaNextDiT2DModel",
        attention=(r"layers\.\d+\.attn1",),
        text_position="none",
        grid_dims=2,
        read_grid=image_only_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for Lumina-Next
        notes="Lumina-Next; self-attention layers.*.attn1 over the image only (caption by gated cross-attention, "
              "dense)",
        square_mask=True,  # its (B, heads, S, S) image mask: a key mask expanded over queries and heads
        hub_words=((r"lumina-?next", None),),
    ),
)
