"""Tiny Wan VACE: the bare ``"wan_vace"`` transformer. Its call carries one leading reference frame (as the
VACE pipeline builds it: zero reactive latent and mask in the control stream) before the token grid."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    refs = pt  # one reference frame of tokens
    x = rnd(batch, cfg.in_channels, refs + f * pt, h * ph, w * pw)
    control = rnd(batch, cfg.vace_in_channels, refs + f * pt, h * ph, w * pw)
    control[:, cfg.in_channels:, :refs] = 0  # a reference frame: zero reactive latent and mask
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=rnd(batch, text, cfg.text_dim),
                control_hidden_states=control, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "wan_vace", "WanVACETransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64, vace_layers=[0],
             vace_in_channels=12),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
