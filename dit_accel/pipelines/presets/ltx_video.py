"""LTX-Video (``LTXVideoTransformer3DModel``): latents packed (B, N, C) by the pipeline; self-attention
``transformer_blocks.*.attn1``. The token grid comes from the ``num_frames``/``height``/``width`` kwargs (latent
sizes, before or after the patch: ``LTXPipeline``, ``LTXImageToVideoPipeline``) or, without them, from
``video_coords`` (B, 3, N) (``LTXConditionPipeline``): the video is the trailing T x H x W raster of the sequence,
and the conditioning tokens that pipeline prepends (``[extra conditioning frames, video]``, for multi-frame
conditions or conditions at other frames) run exact, like text placed first. Plain calls have no tokens
before the grid, so ``text_position="first"`` changes nothing for them. Context parallelism splits
``[conditioning | video]`` contiguously (``Preset.split_whole``) and runs the cross-attention under its own Ring,
which fails on the native backend: Ulysses works, Ring is refused (``Preset.ring_unwrapped``)."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, tensor_arg

__all__ = ["PRESETS"]

_DIMS = ("num_frames", "height", "width")


def _grid_key(args: dict) -> Optional[tuple]:
    """What :func:`_grid` reads: two tensor shapes and the latent sizes (calls with positions only: None)."""
    key = shapes_key(args)
    dims = tuple(args.get(k) for k in _DIMS)
    return None if key is None or not all(type(d) is int for d in dims) else key + dims


def _not_raster(what: str) -> ValueError:
    return ValueError(f"dit_accel: LTX-Video video_coords {what}: they are not [conditioning frames, a T x H x W "
                      "raster video] as LTXConditionPipeline lays them out; use the dense model")


def _coords_grid(n: int, coords) -> GridInfo:
    """The grid of a call that places its ``n`` tokens by ``video_coords`` ``(B, 3, n)`` (time, row, column)
    alone. The video is the trailing raster: its last frame is the trailing run of one time whose (row, column)
    increase row-major, an H x W raster (each row one row coordinate, every row the same column coordinates);
    frames before it with the same (row, column) block and strictly earlier times extend it to T frames. The
    tokens before the video (``LTXConditionPipeline``'s extra conditioning frames) must be whole frames of the
    same spatial raster; they run exact. Only equality and order of the coordinates are used, never their units
    (the pipeline scales time by the VAE's stride and 1/frame_rate, space by the VAE's). One host copy per call."""
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[1] != 3 or coords.shape[2] != n:
        raise ValueError(f"dit_accel: LTX-Video video_coords of shape {tuple(getattr(coords, 'shape', ()))} do not "
                         f"place the {n} tokens of hidden_states as (B, 3, N); pass num_frames/height/width")
    c = coords.detach().to("cpu")
    if n == 0 or not bool((c == c[:1]).all()):
        raise _not_raster("differ between the samples of the batch" if n else "are empty")
    t, h, w = c[0]
    step = (h[1:] > h[:-1]) | ((h[1:] == h[:-1]) & (w[1:] > w[:-1]))  # row-major order between neighbours
    cut = (~(step & (t[:-1] == t[-1]))).nonzero()
    start = int(cut[-1, 0]) + 1 if cut.numel() else 0  # the last frame: tokens [start, n)
    hw = n - start
    width = int((h[start:] == h[-1]).sum())
    frame = c[0, 1:, start:]
    if hw % width or not (bool((frame[0].reshape(-1, width) == frame[0].reshape(-1, width)[:, :1]).all())
                          and bool((frame[1].reshape(-1, width) == frame[1, :width]).all())):
        raise _not_raster(f"of the last {hw} tokens do not form one row-major H x W raster")
    blocks = c[0, :, n % hw:].reshape(3, -1, hw)  # whole frames, counted back from the end
    same = (blocks[0] == blocks[0, :, :1]).all(1) & (blocks[1:] == frame[:, None]).all(2).all(0)
    times = blocks[0, :, 0]
    later = torch.cat([times[:-1] < times[1:], torch.ones(1, dtype=torch.bool)])
    bad = (~(same & later)).nonzero()
    frames = blocks.shape[1] - (int(bad[-1, 0]) + 1 if bad.numel() else 0)
    extra = n - frames * hw
    if n % hw or not bool(same.all()):
        raise _not_raster(f"of the {extra} tokens before the {frames} x {hw // width} x {width} video are not "
                          "whole frames of its spatial raster")
    return GridInfo((frames, hw // width, width), extra)


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C): the pipeline packs latents before the call
    dims = [args.get(k) for k in _DIMS]
    if all(d is None for d in dims) and args.get("video_coords") is not None:  # LTXConditionPipeline's call
        return _coords_grid(int(x.shape[1]), args["video_coords"])
    if not all(isinstance(d, int) for d in dims):
        raise ValueError("dit_accel: LTX-Video transformer needs integer num_frames, height and width arguments "
                         "(latent sizes), or video_coords alone, to know the token grid; call it the way "
                         "LTXPipeline or LTXConditionPipeline does")
    pt, p = model.config.patch_size_t, model.config.patch_size
    grid = tuple(int(d) for d in dims)
    if grid[0] * grid[1] * grid[2] != x.shape[1]:  # sizes given before patchify
        grid = (split_patch(grid[0], pt, "frames"), split_patch(grid[1], p, "height"),
                split_patch(grid[2], p, "width"))
    if grid[0] * grid[1] * grid[2] != x.shape[1]:
        raise ValueError(f"dit_accel: LTX-Video num_frames/height/width {tuple(dims)} do not match the "
                         f"{x.shape[1]} packed tokens of hidden_states")
    return GridInfo(grid, 0)  # self-attention over the video alone: no token before the grid


PRESETS = (
    Preset(
        "LTXVideoTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # attn2 is cross-attention
        text_position="first",  # LTXConditionPipeline's prepended conditioning tokens run exact (plain calls: none)
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.35.0",
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (2, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="LTX-Video; self-attention transformer_blocks.*.attn1 on packed tokens; LTXConditionPipeline's "
              "prepended conditioning tokens dense",
        hub_words=((r"ltx", None),),
        split_whole=True,  # its _cp_plan splits [conditioning | video] contiguously (Ulysses; Ring refuses them)
        ring_unwrapped="cross-attention",  # its _cp_plan splits the text too
    ),
)
