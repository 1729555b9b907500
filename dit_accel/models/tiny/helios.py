"""Tiny Helios: the bare ``"helios"`` transformer (``HeliosTransformer3DModel``), token grid (4, 8, 8) after the
1x2x2 patch, called like its pipeline with a packed history ahead of the chunk: 2 short frames (128 tokens),
2 mid frames (16 tokens at 2x compression) and 4 long frames (4 tokens at 4x): 148 history tokens."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS", "history_inputs"]


def history_inputs(cfg, grid, batch, rnd, frames=(2, 2, 4)) -> dict:
    """The packed-history kwargs of a call (latents at the chunk's latent size, frame indices before it)."""
    import torch

    _, h, w = grid
    _, ph, pw = cfg.patch_size
    out, start = {}, 0
    for scale, n in zip(("long", "mid", "short"), frames[::-1]):
        out[f"latents_history_{scale}"] = rnd(batch, cfg.in_channels, n, h * ph, w * pw)
        out[f"indices_latents_history_{scale}"] = torch.arange(start, start + n).expand(batch, n)
        start += n
    return out


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    import torch

    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    x = rnd(batch, cfg.in_channels, f * pt, h * ph, w * pw)
    history = history_inputs(cfg, grid, batch, rnd)
    start = int(history["indices_latents_history_short"].max()) + 1
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=rnd(batch, text, cfg.text_dim),
                indices_hidden_states=torch.arange(start, start + f).expand(batch, f), **history, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "helios", "HeliosTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6)),
        grid=(4, 8, 8), text=6, inputs=_inputs,
    ),
)
