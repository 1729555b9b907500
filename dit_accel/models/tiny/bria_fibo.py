"""Tiny Bria FIBO (``BriaFiboTransformer2DModel``): the bare ``"bria_fibo"`` transformer, packed latents with
(t, h, w) position ids on a (10, 13) grid, one text-encoder layer per block; joint [text, image]. A padded prompt
(``text_valid``) passes the pipeline's bool key-padding mask (B, 1, 1, S) in ``joint_attention_kwargs``."""

from __future__ import annotations

import torch

from ._common import TinyTransformer, image_ids

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    img_ids = image_ids(grid)
    layers = [rnd(batch, text, cfg.text_encoder_dim) for _ in range(cfg.num_layers + cfg.num_single_layers)]
    kwargs = dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t,
                  encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), text_encoder_layers=layers,
                  img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False)
    keys = torch.cat([mask.bool(), torch.ones(batch, h * w, dtype=torch.bool)], 1)
    if not keys.all():  # as the pipeline: a mask only where a prompt is padded
        kwargs["joint_attention_kwargs"] = {"attention_mask": keys[:, None, None, :]}
    return kwargs


TRANSFORMERS = (
    TinyTransformer(
        "bria_fibo", "BriaFiboTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[4, 6, 6], text_encoder_dim=16),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
