"""Tiny HunyuanImage 2.1: the bare ``"hunyuanimage"`` transformer (double- and single-stream blocks, text mask)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, ph * h, pw * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "hunyuanimage", "HunyuanImageTransformer2DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(8, 8)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
