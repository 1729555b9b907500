"""Tiny LTX-Video: the bare ``"ltx"`` transformer (packed latents; the grid rides in num_frames/height/width)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    return dict(hidden_states=rnd(batch, f * h * w, cfg.in_channels), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.caption_channels),
                encoder_attention_mask=mask, num_frames=f, height=h, width=w, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "ltx", "LTXVideoTransformer3DModel",
        dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
             attention_head_dim=12, cross_attention_dim=24, num_layers=2, caption_channels=16),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
