"""Chroma (``ChromaTransformer2DModel``): FLUX.1-style, latents packed (B, N, C) in 2x2 patches; the grid is
the rows x cols of ``img_ids``; joint attention [text, image] (text first).

Chroma's pipeline passes ``attention_mask`` (text padding), which the blocks turn into a full (S, S) mask,
not a key padding mask: such calls run dense (with a warning); calls without it are sparse."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    h, w = raster_ids(tensor_arg(args, "img_ids"), x.shape[1], "Chroma image")
    return GridInfo((h, w), text_len(args))


PRESETS = (
    Preset(
        "ChromaTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Chroma
        notes="Chroma; joint attention [text, image], 2-D grid from img_ids; calls with attention_mask run dense",
        hub_words=((r"chroma", None),),
    ),
)
