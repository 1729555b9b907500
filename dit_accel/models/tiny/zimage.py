"""Tiny Z-Image: the bare ``"zimage"`` transformer (image and caption refiners, joint layers; list inputs).

Its default text is 40 tokens, so that a sample with 3 valid tokens pads its caption to a different length
(32 vs 64) and the joint layers get a key mask."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.all_patch_size[0]
    x = [rnd(cfg.in_channels, 1, h * p, w * p) for _ in range(batch)]
    caps = [rnd(text, cfg.cap_feat_dim)[:int(mask[b].sum())] for b in range(batch)]
    return dict(x=x, t=t / 1000, cap_feats=caps, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "zimage", "ZImageTransformer2DModel",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
             n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32]),
        grid=(10, 13), text=40, inputs=_inputs,
    ),
)
