"""Tiny Motif-Video: the bare ``"motif"`` transformer (``MotifVideoTransformer3DModel``), token grid
(4, 8, 8) after the 2x2 patch, joint [video, text] with a text padding mask."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    p, pt = cfg.patch_size, cfg.patch_size_t
    return dict(hidden_states=rnd(batch, cfg.in_channels, f * pt, h * p, w * p), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "motif", "MotifVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
             rope_axes_dim=(4, 6, 6)),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
