"""Tiny Chroma: the bare ``"chroma"`` transformer (double- and single-stream blocks, FLUX.1-style ids)."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=img_ids,
                txt_ids=torch.zeros(text, 3), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "chroma", "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
             approximator_hidden_dim=32, approximator_layers=1),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
