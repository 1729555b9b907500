"""Tiny Ovis-Image (``OvisImageTransformer2DModel``): the bare ``"ovis_image"`` transformer, packed latents with
(0, h, w) position ids on a (10, 13) grid; joint [text, image]."""

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
        "ovis_image", "OvisImageTransformer2DModel",
        dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
