"""Tiny Kandinsky 5: the bare ``"kandinsky5"`` transformer (``Kandinsky5Transformer3DModel``), channels-last
latent, token grid (4, 8, 8) after the 1x2x2 patch; video self-attention, text by cross-attention."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    import torch

    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, f * pt, h * ph, w * pw, cfg.in_visual_dim),
                encoder_hidden_states=rnd(batch, text, cfg.in_text_dim), timestep=t,
                pooled_projections=rnd(batch, cfg.in_text_dim2),
                visual_rope_pos=(torch.arange(f), torch.arange(h), torch.arange(w)), text_rope_pos=torch.arange(text),
                return_dict=True)  # its tuple return is the bare tensor: [0] would be the first sample


TRANSFORMERS = (
    TinyTransformer(
        "kandinsky5", "Kandinsky5Transformer3DModel",
        dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
        grid=(4, 8, 8), text=6, inputs=_inputs,
    ),
)
