"""LTX-Video (``LTXVideoTransformer3DModel``): latents packed (B, N, C) by the pipeline; the token grid
comes from the ``num_frames``/``height``/``width`` kwargs (latent sizes, before or after the patch);
self-attention ``transformer_blocks.*.attn1``."""

from __future__ import annotations

from typing import Optional

from ._common import RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, tensor_arg, text_len

__all__ = ["PRESETS"]

_DIMS = ("num_frames", "height", "width")


def _grid_key(args: dict) -> Optional[tuple]:
    """What :func:`_grid` reads: two tensor shapes and the latent sizes."""
    key = shapes_key(args)
    dims = tuple(args.get(k) for k in _DIMS)
    return None if key is None or not all(type(d) is int for d in dims) else key + dims


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C): the pipeline packs latents before the call
    dims = [args.get(k) for k in _DIMS]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError("dit_accel: LTX-Video transformer needs integer num_frames, height and width arguments "
                         "(latent sizes) to know the token grid; call it the way LTXPipeline does")
    pt, p = model.config.patch_size_t, model.config.patch_size
    grid = tuple(int(d) for d in dims)
    if grid[0] * grid[1] * grid[2] != x.shape[1]:  # sizes given before patchify
        grid = (split_patch(grid[0], pt, "frames"), split_patch(grid[1], p, "height"),
                split_patch(grid[2], p, "width"))
    if grid[0] * grid[1] * grid[2] != x.shape[1]:
        raise ValueError(f"dit_accel: LTX-Video num_frames/height/width {tuple(dims)} do not match the "
                         f"{x.shape[1]} packed tokens of hidden_states")
    return GridInfo(grid, text_len(args))


PRESETS = (
    Preset(
        "LTXVideoTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # attn2 is cross-attention
        text_position="none",
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.35.0",
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (2, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="LTX-Video; self-attention transformer_blocks.*.attn1 on packed tokens",
        hub_words=((r"ltx", None),),
        refused_pipelines={
            "LTXConditionPipeline": (
                "it calls the transformer with video_coords (per-token positions of its conditioning frames and "
                "the video) and no num_frames/height/width, and its token count changes with the conditions, so "
                "the token grid the sparse patterns need is unknown. Use LTXPipeline or LTXImageToVideoPipeline"),
        },
    ),
)
