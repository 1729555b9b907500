"""Tiny SD3: the bare ``"sd3"`` transformer (SD3.5-style: a dual-attention block, then a context-pre-only one)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim),
                pooled_projections=rnd(batch, cfg.pooled_projection_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "sd3", "SD3Transformer2DModel",
        dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
             pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
