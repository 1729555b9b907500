"""Tiny EasyAnimate: the bare ``"easyanimate"`` transformer (``EasyAnimateTransformer3DModel``), token grid
(4, 8, 8) after the per-frame 2x2 patch; one MMDiT block then one single-stream block, joint [text + T5, video]."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

_T5 = 3  # T5 tokens after the `text` tokens of the first encoder


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, f, h * p, w * p), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim),
                encoder_hidden_states_t5=rnd(batch, _T5, cfg.text_embed_dim_t5), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "easyanimate", "EasyAnimateTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, num_layers=2,
             mmdit_layers=1, time_embed_dim=16, text_embed_dim=16, text_embed_dim_t5=12),
        grid=(4, 8, 8), text=6, inputs=_inputs,
    ),
)
