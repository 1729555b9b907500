"""Tiny ERNIE-Image (``ErnieImageTransformer2DModel``): the bare ``"ernie_image"`` transformer, image grid (10, 13)
(patch 1, as the released model), padded text ``text_bth`` with its ``text_lens`` (from the text mask); single-stream
[image, text]."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _ernie(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                text_bth=rnd(batch, text, cfg.text_in_dim), text_lens=mask.sum(1), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "ernie_image", "ErnieImageTransformer2DModel",
        dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4, out_channels=4,
             patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6)),
        grid=(10, 13), text=7, inputs=_ernie,
    ),
)
