"""Tiny Lumina-Image 2.0: the bare ``"lumina2"`` transformer (caption and image refiners, joint layers)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, h * p, w * p), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.cap_feat_dim), encoder_attention_mask=mask.bool(),
                return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "lumina2", "Lumina2Transformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
             num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
             axes_lens=(64, 32, 32), cap_feat_dim=16),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
