"""Kandinsky 5 (``Kandinsky5Transformer3DModel``): latent (B, F, H, W, C) channels last, patch
``config.patch_size`` (pt, ph, pw), token grid (F/pt, H/ph, W/pw) in (T, H, W) raster order
(``fractal_flatten`` without ``to_fractal``); self-attention ``visual_transformer_blocks.*.self_attention`` over
video only (``cross_attention`` is text cross-attention, ``text_transformer_blocks`` text only: both dense).
Calls with ``sparse_params`` (checkpoints with ``attention_type="nabla"``) are refused: they run the model's own
NABLA sparse attention on a block-permuted ("fractal") token order."""

from __future__ import annotations

from ._common import LARGE_VIDEO_DEFAULTS, GridInfo, Preset, channels_last_grid

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    if args.get("sparse_params") is not None:
        raise ValueError("dit_accel: this Kandinsky 5 call passes sparse_params (a checkpoint with "
                         "attention_type='nabla'): the model already runs its own NABLA sparse attention on a "
                         "block-permuted token order, which dit_accel cannot compose with. Run it as it is, or load "
                         "the transformer with attention_type='regular' (the pipeline then passes no sparse_params) "
                         "and apply dit_accel to that")
    return GridInfo(channels_last_grid(model, args), 0)


def _grid_key(args: dict):
    x = args.get("hidden_states")
    return x.shape if hasattr(x, "shape") and args.get("sparse_params") is None else None


PRESETS = (
    Preset(
        "Kandinsky5Transformer3DModel",
        attention=(r"visual_transformer_blocks\.\d+\.self_attention",),
        text_position="none",
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published GNA/Tile/Radial/SLA setting for Kandinsky 5 is known; the model's authors ship their own
        # NABLA sparse attention (attention_type="nabla"), which these calls refuse. dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="Kandinsky 5 T2V/I2V/T2I; self-attention visual_transformer_blocks.*.self_attention (video only); "
              "calls with the model's own NABLA sparse_params refused",
        hub_words=((r"kandinsky-?5", None),),
    ),
)
