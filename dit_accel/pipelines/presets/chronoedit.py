"""ChronoEdit (``ChronoEditTransformer3DModel``): Wan's layout: latent (B, C, F, H, W), patch (pt, ph, pw),
self-attention ``blocks.*.attn1`` over video only (the input image is a latent frame; its CLIP embedding
joins the text in cross-attention, which stays dense)."""

from __future__ import annotations

from ._common import (
    RADIAL_VIDEO,
    WAN_DEFAULTS,
    Preset,
    latent_grid_3d,
    shapes_key,
)

__all__ = ["PRESETS"]


PRESETS = (
    Preset(
        "ChronoEditTransformer3DModel",
        attention=(r"blocks\.\d+\.attn1",),
        text_position="none",
        grid_dims=3,
        read_grid=latent_grid_3d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults={**WAN_DEFAULTS, "radial": RADIAL_VIDEO},  # Wan 2.1's: nothing published for ChronoEdit
        notes="ChronoEdit (Wan-based image editing); self-attention blocks.*.attn1 (video only)",
        hub_words=((r"chronoedit", None),),
    ),
)
