"""Cosmos Predict (``CosmosTransformer3DModel``): latent (B, C, F, H, W), patch (pt, ph, pw) from the config
(Cosmos 1.0: (1, 2, 2)), token grid (F/pt, H/ph, W/pw) in (T, H, W) raster order (``CosmosPatchEmbed``);
self-attention ``transformer_blocks.*.attn1`` over video only (``attn2`` is text / image-context
cross-attention and stays dense). The condition and padding masks are extra input *channels*, not tokens."""

from __future__ import annotations

from ._common import (
    LARGE_VIDEO_DEFAULTS,
    GridInfo,
    Preset,
    patched_video_grid,
    shapes_key,
    text_len,
)

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    grid = patched_video_grid(model, args)
    text = args.get("encoder_hidden_states")
    if isinstance(text, tuple):  # Cosmos 2.5: (text_context, img_context), both cross-attention only
        text = text[0]
    return GridInfo(grid, text_len({"encoder_hidden_states": text}))


def _grid_key(args: dict):
    text = args.get("encoder_hidden_states")
    if isinstance(text, tuple):
        return None  # read every call
    return shapes_key(args)


PRESETS = (
    Preset(
        "CosmosTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # attn2: cross-attention (text, image context)
        text_position="none",
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published setting wired in: the GNA paper (arXiv:2504.16922) evaluates Cosmos-7B, but its
        # configuration table could not be retrieved offline; these are dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="Cosmos Predict 1 / 2 / 2.5 text/video-to-world; self-attention transformer_blocks.*.attn1 (video only)",
        hub_words=((r"cosmos", None),),
    ),
)
