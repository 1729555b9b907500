"""Tiny LongCat-Image (``LongCatImageTransformer2DModel``): the bare ``"longcat_image"`` transformer, packed
latents with (modality, h, w) position ids as its pipeline builds them (the image at modality 1, offset past
the text positions) on a (10, 13) grid; joint [text, image]."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS", "image_ids"]

GRID = (10, 13)


def image_ids(h: int, w: int, modality: int, start: int) -> torch.Tensor:
    """``(h * w, 3)`` position ids of one image: (modality, start + row, start + col), as the pipelines lay them."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(rows, modality), rows + start, cols + start], -1).reshape(-1, 3).float()


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    txt_ids = torch.stack([torch.zeros(text), torch.arange(text), torch.arange(text)], -1)
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=image_ids(h, w, 1, text),
                txt_ids=txt_ids, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "longcat_image", "LongCatImageTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6]),
        grid=GRID, text=7, inputs=_inputs,
    ),
)
