"""ConsisID (``ConsisIDTransformer3DModel``, a CogVideoX 1.0 descendant): latent (B, F, C, H, W) (frames
before channels), token grid (F, H/p, W/p); joint attention [text, video] in ``transformer_blocks.*.attn1``.
The identity (face) conditioning enters through ``perceiver_cross_attention`` modules (cross-attention
from video to face tokens, separate from the joint sequence): they stay dense."""

from __future__ import annotations

from ._common import RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, text_len, video_latent

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args, "(B, F, C, H, W)")  # frames before channels
    p, pt = model.config.patch_size, getattr(model.config, "patch_size_t", None) or 1
    grid = (split_patch(x.shape[1], pt, "frames"), split_patch(x.shape[3], p, "height"),
            split_patch(x.shape[4], p, "width"))
    return GridInfo(grid, text_len(args))


PRESETS = (
    Preset(
        "ConsisIDTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # perceiver_cross_attention (face tokens): dense
        text_position="first",
        grid_dims=3,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        # No published sparse-attention setting for ConsisID is known: dit_accel defaults (CogVideoX's).
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (1, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="ConsisID identity-preserving T2V; joint attention [text, video], face tokens in separate cross-attention",
        hub_words=((r"consis-?id", None),),
    ),
)
