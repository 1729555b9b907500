"""ChronoEdit (``ChronoEditTransformer3DModel``): Wan's layout: latent (B, C, F, H, W), patch (pt, ph, pw),
self-attention ``blocks.*.attn1`` over video only (the input image is a latent frame; its CLIP embedding
joins the text in cross-attention, which stays dense)."""

from __future__ import annotations

from ._common import (
    RADIAL_VIDEO,
    SLA_DEFAULT,
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
        read_grid=latent_grid_3d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults={  # dit_accel defaults (Wan 2.1's): no setting was published for ChronoEdit
            "tile": {"method": {"tile": (6, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
            "gna": {"method": {"kernel_size": (7, 16, 16)}, "apply": {"dense_steps": 15}},
            "sla": SLA_DEFAULT,
            "radial": RADIAL_VIDEO,
        },
        notes="ChronoEdit (Wan-based image editing); self-attention blocks.*.attn1 (video only)",
        hub_words=((r"chronoedit", None),),
    ),
)
