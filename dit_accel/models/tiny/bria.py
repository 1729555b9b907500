"""Tiny Bria 3.x (``BriaTransformer2DModel``): the bare ``"bria"`` transformer, packed latents with (t, h, w)
position ids on a (10, 13) grid; joint [text, image]."""

from __future__ import annotations

from ._common import TinyTransformer, flux_image_inputs

__all__ = ["TRANSFORMERS"]

GRID = (10, 13)


TRANSFORMERS = (
    TinyTransformer(
        "bria", "BriaTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[4, 6, 6]),
        grid=GRID, text=7, inputs=flux_image_inputs,
    ),
)
