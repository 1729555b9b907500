"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): latent (B, F, C, H, W) (frames before
channels), token grid (F/patch_size_t or F, H/p, W/p); joint attention [text, video]."""

from __future__ import annotations

from ._common import RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, text_len, video_latent

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args, "(B, F, C, H, W)")  # frames before channels
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    # (frames were floored: CogVideoX 1.5's 3 latent frames read as 1, refused for the kernel, not the frames)
    grid = (split_patch(x.shape[1], pt, "frames"), split_patch(x.shape[3], p, "height"),
            split_patch(x.shape[4], p, "width"))
    return GridInfo(grid, text_len(args))


PRESETS = (
    Preset(
        "CogVideoXTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        grid_dims=3,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.35.0",
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (1, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="CogVideoX 1.0 / 1.5; joint attention [text, video], processor calls SDPA directly",
        hub_words=((r"cogvideo", None),),
    ),
)
