"""Allegro (``AllegroTransformer3DModel``): latent (B, C, F, H, W), every frame patchified by a 2-D
``PatchEmbed`` (patch p = ``patch_size``; ``patch_size_t`` is not applied by the embedding), token grid
(F, H/p, W/p) in (T, H, W) raster order; self-attention ``transformer_blocks.*.attn1`` over video only
(``attn2`` is text cross-attention and stays dense)."""

from __future__ import annotations

from ._common import (
    LARGE_VIDEO_DEFAULTS,
    GridInfo,
    Preset,
    shapes_key,
    split_patch,
    text_len,
    video_latent,
)

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args)  # (B, C, F, H, W)
    p = model.config.patch_size
    grid = (int(x.shape[2]), split_patch(x.shape[3], p, "height"), split_patch(x.shape[4], p, "width"))
    if grid == (1, 1, 1):  # (the model squeezes the token axis of a 1-token sequence: a bare unpacking error)
        raise ValueError(f"dit_accel: this Allegro latent of shape {tuple(x.shape)} is one token (grid {grid}), "
                         "which AllegroTransformer3DModel cannot run (it squeezes a 1-token sequence away, dense "
                         f"too): give a latent of at least 2 tokens (height or width {2 * p} or more)")
    return GridInfo(grid, text_len(args))


PRESETS = (
    Preset(
        "AllegroTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # attn2: cross-attention
        text_position="none",
        grid_dims=3,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        # No published setting of a sparse method for Allegro is known: dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="Allegro T2V; self-attention transformer_blocks.*.attn1 (video only)",
        hub_words=((r"allegro", None),),
    ),
)
