"""FLUX.2 (``Flux2Transformer2DModel``): latents packed (B, N, C), one token per 2x2 latent patch; position
ids ``(t, h, w, l)``; joint attention [text, image] over a 2-D grid (H, W) read from ``img_ids``.

Reference images (FLUX.2 editing) are appended after the generated image's tokens at other ``t`` offsets:
the joint sequence is [text, image, references]. The image is the grid (its leading run of one ``t``); the
reference tokens sit in mid-sequence after it and keep exact (dense) rows and columns, like the text
(``GridInfo.num_after``). Calls with a reference-image KV cache (``kv_cache_mode``) are refused."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, leading_raster

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    if args.get("kv_cache_mode") is not None:
        raise ValueError("dit_accel: FLUX.2 calls with a reference-image KV cache (kv_cache_mode) carry reference "
                         "tokens beside the image grid, which dit_accel cannot place; use the dense model")
    return leading_raster(args, "FLUX.2 image")  # (B, N, C) latents; reference images at another t


PRESETS = (
    Preset(
        "Flux2Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for FLUX.2
        notes="FLUX.2 image model; joint attention [text, image, reference images], 2-D grid (H, W) from "
              "img_ids; reference-image tokens (editing) exact like text",
        hub_words=((r"flux[._-]?2", None),),
    ),
)
