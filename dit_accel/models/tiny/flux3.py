"""Tiny FLUX.3: the bare ``"flux3"`` transformer (per-mode and joint single blocks, 4-axis position ids)."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols, zeros], -1).reshape(-1, 4)  # (t, h, w, l)
    txt_ids = torch.stack([torch.zeros(text), torch.zeros(text), torch.zeros(text), torch.arange(text)], -1)
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=img_ids,
                txt_ids=txt_ids.long(), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "flux3", "Flux3Transformer2DModel",
        dict(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, mlp_ratio=2.0,
             axes_dims_rope=(4, 4, 4, 4)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
