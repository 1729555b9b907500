"""Tiny Qwen-Image 2.1: the bare ``"qwenimage21"`` transformer (single-stream blocks, block-causal attention,
a text padding mask). Text-to-image calls: ``img_mask`` marks the target image's slots (2x2 latent tokens
each) after the prompt, so the grid's token count must be a multiple of 4."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    if (h * w) % 4:
        raise ValueError(f"tiny Qwen-Image 2.1: grid {grid} has {h * w} tokens, not a multiple of 4 (2x2 slots)")
    img_mask = torch.cat([torch.zeros(batch, text, dtype=torch.bool), torch.ones(batch, h * w // 4, dtype=torch.bool)],
                         dim=1)
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.context_in_dim), encoder_hidden_states_mask=mask.bool(),
                img_shapes=[[(1, h, w)]] * batch, img_mask=img_mask, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "qwenimage21", "QwenImage21Transformer2DModel",
        dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
        grid=(10, 12), text=7, inputs=_inputs,
    ),
)
