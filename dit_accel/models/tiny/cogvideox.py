"""Tiny CogVideoX: the bare ``"cogvideox"`` transformer (latent frames before channels, text first)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    return dict(hidden_states=rnd(batch, f, cfg.in_channels, 2 * h, 2 * w), timestep=t.long(),
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "cogvideox", "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
             text_embed_dim=16, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8),
        grid=(4, 8, 8), text=8, inputs=_inputs,
    ),
)
