"""Tiny ChronoEdit: the bare ``"chronoedit"`` transformer, with a CLIP-like image embedding that joins the
text in cross-attention (``encoder_hidden_states_image``)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, f * pt, h * ph, w * pw), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_dim),
                encoder_hidden_states_image=rnd(batch, 5, cfg.image_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "chronoedit", "ChronoEditTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64, image_dim=8,
             added_kv_proj_dim=24),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
