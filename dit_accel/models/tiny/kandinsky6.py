"""Tiny Kandinsky 6: the bare ``"kandinsky6"`` transformer (``Kandinsky6Transformer3DModel``), channels-last
latent, token grid (4, 8, 8) after the 1x2x2 patch, with a 10-step audio stream beside the video (its own
self-attention and the video<->audio cross-attentions run too)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

AUDIO = 10  # audio latent steps


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, f * pt, h * ph, w * pw, cfg.in_visual_dim),
                encoder_hidden_states=rnd(batch, text, cfg.in_text_dim), pooled_projections=rnd(batch, cfg.in_text_dim2),
                timestep=t, audio_hidden_states=rnd(batch, AUDIO, cfg.in_audio_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "kandinsky6", "Kandinsky6Transformer3DModel",
        dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
             in_audio_dim=4, out_audio_dim=4, ca_rope=True, cross_gates=True),
        grid=(4, 8, 8), text=6, inputs=_inputs,
    ),
)
