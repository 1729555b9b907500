"""Tiny Qwen-Image: the bare ``"qwenimage"`` transformer (dual-stream blocks, text padding mask)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), encoder_hidden_states_mask=mask,
                img_shapes=[[(1, h, w)]] * batch, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "qwenimage", "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
