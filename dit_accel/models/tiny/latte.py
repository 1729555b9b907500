"""Tiny Latte: the bare ``"latte"`` transformer (``LatteTransformer3DModel``): 3 frames, spatial grid
(16, 16) after the 2x2 patch (the grid dit_accel sees: the spatial blocks attend per frame)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

_FRAMES = 3


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, _FRAMES, h * p, w * p), timestep=t.long(),
                encoder_hidden_states=rnd(batch, text, cfg.caption_channels), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "latte", "LatteTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
             cross_attention_dim=32, sample_size=16, patch_size=2, activation_fn="gelu-approximate",
             num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
             norm_eps=1e-6, caption_channels=16, video_length=_FRAMES),
        grid=(16, 16), text=7, inputs=_inputs,
    ),
)
