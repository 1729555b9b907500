"""Tiny PRX (``PRXTransformer2DModel``): the bare ``"prx"`` transformer, a (B, 4, 20, 26) latent in 2x2 patches
(grid (10, 13)) and the text mask; the image's queries against [text, image] keys."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.context_in_dim), attention_mask=mask.bool(),
                return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "prx", "PRXTransformer2DModel",
        dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
             axes_dim=[8, 8]),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
