"""Tiny DiT (``DiTTransformer2DModel``): the bare ``"dit"`` transformer, image grid (10, 10) after the 2x2 patch
(square: the model unpatchifies its output as a square); class-conditional, no text."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _dit(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    if h != w:  # (the model itself failed: "shape '[-1, 5, 5, 2, 2, 8]' is invalid for input of size 2240")
        raise ValueError(f"grid={tuple(grid)!r} is invalid for tiny 'dit': DiTTransformer2DModel unpatchifies its "
                         "output as a square, so give a square grid (H == W), e.g. (10, 10)")
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t.long(),
                class_labels=torch.arange(batch) * 7 % cfg.num_embeds_ada_norm, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "dit", "DiTTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             sample_size=20, patch_size=2, num_embeds_ada_norm=10),
        grid=(10, 10), text=7, inputs=_dit,
    ),
)
