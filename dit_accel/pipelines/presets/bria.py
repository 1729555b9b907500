"""Bria 3.x (``BriaTransformer2DModel``, FLUX.1's layout): latents packed (B, N, C), one token per 2x2 latent
patch; position ids ``img_ids`` (t, h, w); joint attention [text, image] in the double- and single-stream blocks
(``transformer_blocks.*.attn``, ``single_transformer_blocks.*.attn``) over a 2-D grid read from ``img_ids``.
``BriaAttnProcessor`` calls Diffusers' dispatcher, whose native backend ends in SDPA."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    h, w = raster_ids(tensor_arg(args, "img_ids"), x.shape[1], "Bria image")
    return GridInfo((h, w), text_len(args))


PRESETS = (
    Preset(
        "BriaTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Bria
        notes="Bria 3.x; joint attention [text, image], 2-D grid (H, W) from img_ids",
        # not FIBO's ids ("briaai/FIBO", "briaai/Fibo-2.0-dev"): other classes (bria_fibo.py, bria_fibo2.py)
        hub_words=((r"bria(?!ai/fibo)", None),),
    ),
)
