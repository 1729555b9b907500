"""Tiny ConsisID: the bare ``"consisid"`` transformer (``ConsisIDTransformer3DModel``, face branch off),
token grid (4, 8, 8) after the 2x2 patch, text first in the joint sequence."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, f, cfg.in_channels, h * p, w * p), timestep=t.long(),
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "consisid", "ConsisIDTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
             text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=4, patch_size=2,
             max_text_seq_length=8, is_train_face=False),
        grid=(4, 8, 8), text=8, inputs=_inputs,
    ),
)
