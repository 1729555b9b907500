"""Tiny AnyFlow: the bare ``"anyflow"`` transformer (``AnyFlowTransformer3DModel``, Wan 2.1 layout with a dual
timestep embedding), called like ``AnyFlowPipeline`` calls it: frames-first latents ``(B, F, C, H, W)`` and
per-frame source and target timesteps ``(B, F)``. AnyFlow-FAR is refused by its preset: no tiny model."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    frames = f * pt
    timestep = t[:, None].expand(batch, frames).contiguous()
    return dict(hidden_states=rnd(batch, frames, cfg.in_channels, h * ph, w * pw), timestep=timestep,
                r_timestep=timestep * 0.5, encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "anyflow", "AnyFlowTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
