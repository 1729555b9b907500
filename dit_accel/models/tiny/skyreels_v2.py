"""Tiny SkyReels-V2: the bare ``"skyreels_v2"`` transformer (Wan layout, one frame per block)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, f * pt, h * ph, w * pw), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "skyreels_v2", "SkyReelsV2Transformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
