"""Tiny FLUX.3: the bare ``"flux3"`` transformer (per-mode and joint single blocks, 4-axis position ids)."""

from __future__ import annotations

from ._common import TinyTransformer, four_axis_image_inputs

__all__ = ["TRANSFORMERS"]


TRANSFORMERS = (
    TinyTransformer(
        "flux3", "Flux3Transformer2DModel",
        dict(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, mlp_ratio=2.0,
             axes_dims_rope=(4, 4, 4, 4)),
        grid=(10, 13), text=7, inputs=four_axis_image_inputs,
    ),
)
