"""Tiny Allegro: the bare ``"allegro"`` transformer (``AllegroTransformer3DModel``), token grid (4, 8, 8)
after the per-frame 2x2 patch (no rotary embedding passed: the pipeline computes it outside the model)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, f, h * p, w * p), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.caption_channels), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "allegro", "AllegroTransformer3DModel",
        dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4,
             out_channels=4, num_layers=2, cross_attention_dim=32, caption_channels=16, sample_height=16,
             sample_width=16, sample_frames=4),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
