"""Tiny Mochi: the bare ``"mochi"`` transformer (one SDPA call per sample, text padding mask)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "mochi", "MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
             in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=8),
        grid=(4, 8, 8), text=8, inputs=_inputs,
    ),
)
