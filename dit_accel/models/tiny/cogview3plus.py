"""Tiny CogView3-Plus (``CogView3PlusTransformer2DModel``): the bare ``"cogview3plus"`` transformer, image grid
(10, 13) after the 2x2 patch; joint [text, image]."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

GRID = (10, 13)


def _cogview3plus(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    size = torch.tensor([[8.0 * p * h, 8.0 * p * w]] * batch)
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "cogview3plus", "CogView3PlusTransformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2, out_channels=4,
             text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=32),
        grid=GRID, text=7, inputs=_cogview3plus,
    ),
)
