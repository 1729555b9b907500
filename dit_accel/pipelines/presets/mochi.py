"""Mochi 1 (``MochiTransformer3DModel``): latent (B, C, F, H, W), no temporal patch, token grid
(F, H/p, W/p); joint attention [video, valid text], one SDPA call per sample."""

from __future__ import annotations

from ._common import RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, text_len, video_latent

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args)  # (B, C, F, H, W); no temporal patch
    p = model.config.patch_size
    grid = (x.shape[2], split_patch(x.shape[3], p, "height"), split_patch(x.shape[4], p, "width"))
    return GridInfo(grid, text_len(args))


PRESETS = (
    Preset(
        "MochiTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="last",
        grid_dims=3,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.35.0",
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (2, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="Mochi 1; joint attention [video, valid text], one SDPA call per sample",
        hub_words=((r"mochi", None),),
    ),
)
