"""MiniMax-H3 (``MiniMaxH3Transformer3DModel``; Pika H3 Flex reuses it): one packed sequence of text,
conditioning media, audio and video rows, with full joint self-attention ``transformer_blocks.*.attn`` (there
is no cross-attention). The caller places the rows with ``text_indices``/``audio_indices``/``video_indices``
and gives every row ``(t, h, w)`` rotary coordinates (``position_ids``).

Every layout Diffusers' modular MiniMax-H3 pipeline builds is ``[text | conditioning blocks | target audio |
target video]``: the generated video is the trailing block of video rows, one latent frame after another, each
frame a row-major ``(H, W)`` raster (patch (1, 2, 2)). That block is the sparse grid; everything before it
(text, keyframe/reference video and audio rows, the target soundtrack) runs densely, like text placed first, so
audio self-attention and audio<->video attention stay dense. The grid is read from ``position_ids`` (one time
per frame, one spatial raster repeated per frame); a call whose trailing video rows are not such a grid, or do
not follow audio rows (a conditioning clip could then not be told from the target), is refused at the call.
The text refiner's attention (``token_refiner``, text only) is not wrapped. Under context parallelism
Diffusers splits the packed sequence contiguously (``Preset.split_whole``): Ulysses works, Ring is refused."""

from __future__ import annotations

import torch

from ._common import LARGE_VIDEO_DEFAULTS, GridInfo, Preset, tensor_arg

__all__ = ["PRESETS", "H3_DEFAULTS"]

# The shape of the sparse attention runtimes ship for MiniMax-H3 (nothing is published by its authors): the first
# steps dense, the target video in tiles of 64 tokens (one latent frame's 8x8 patch raster, one kernel block), a
# window of 3x3x3 tiles, and every row and column of the prefix (text, keyframe/reference and audio rows) exact,
# which the layout above gives every method. Tile comes first: it is what `generate` runs without --method.
H3_DEFAULTS = {
    "tile": {"method": {"tile": (1, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 10}},
    **{k: v for k, v in LARGE_VIDEO_DEFAULTS.items() if k != "tile"},
}


def _refuse(why: str):
    raise ValueError(f"dit_accel: {why}; dit_accel cannot place the target video of this MiniMax-H3 call as one "
                     "token grid: use the dense model")


def _strictly_increasing(x: torch.Tensor) -> bool:
    return x.numel() < 2 or bool((x[1:] > x[:-1]).all())


def _raster(pos: torch.Tensor, n: int):
    """``(F, H, W)`` of the ``n`` trailing rows' ``(t, h, w)`` coordinates, or a refusal."""
    t, spatial = pos[:, 0], pos[:, 1:]
    frames = 1 + int((t[1:] != t[:-1]).sum())
    hw = n // frames
    if frames * hw != n:
        _refuse(f"its {n} target video rows do not split into {frames} frames of equal size")
    t = t.reshape(frames, hw)
    if not bool((t == t[:, :1]).all()) or not _strictly_increasing(t[:, 0]):
        _refuse("the time coordinates of its target video rows are not one increasing time per frame")
    spatial = spatial.reshape(frames, hw, 2)
    if not bool((spatial == spatial[:1]).all()):
        _refuse("its target video frames do not share one spatial grid")
    rows, cols = spatial[0, :, 0], spatial[0, :, 1]
    w = int((rows == rows[0]).sum())
    h = hw // w
    if h * w != hw:
        _refuse(f"a frame of {hw} rows is not a raster of rows of {w}")
    rows, cols = rows.reshape(h, w), cols.reshape(h, w)
    if not (bool((rows == rows[:, :1]).all()) and bool((cols == cols[:1]).all())
            and _strictly_increasing(rows[:, 0]) and _strictly_increasing(cols[0])):
        _refuse("a target video frame is not a row-major (H, W) raster")
    return frames, h, w


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, video rows, C * prod(patch)): conditioning rows, then target rows
    pos = tensor_arg(args, "position_ids")  # (S, 3)
    video, audio = tensor_arg(args, "video_indices").long(), tensor_arg(args, "audio_indices").long()
    s = pos.shape[0]
    if video.dim() != 1 or video.numel() != x.shape[1] or video.numel() == 0:
        _refuse(f"video_indices of shape {tuple(video.shape)} do not address the {x.shape[1]} rows of hidden_states")
    # The target video: the trailing run of video rows that ends the sequence.
    tail = video.flip(0) == torch.arange(s - 1, s - 1 - video.numel(), -1, device=video.device)
    n = int(tail.long().cumprod(0).sum())
    if n == 0:
        _refuse("its packed sequence does not end with video rows")
    if n == s or not bool((audio == s - n - 1).any()):
        _refuse("its trailing video rows do not follow the target audio rows, so conditioning video rows cannot be "
                "told from the generated ones")
    return GridInfo(_raster(pos[s - n:], n), s - n)


PRESETS = (
    Preset(
        "MiniMaxH3Transformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn",),  # not token_refiner.*.attn (text only)
        text_position="first",  # text, conditioning rows and audio: one dense prefix before the target video
        grid_dims=3,
        read_grid=_grid,
        grid_key=None,  # the grid is read from position_ids: read every call
        min_diffusers="0.42.1",
        defaults=dict(H3_DEFAULTS),
        notes="MiniMax-H3 audio-video (packed sequence); joint self-attention transformer_blocks.*.attn; target "
              "video grid sparse, text/conditioning/audio rows dense",
        hub_words=((r"minimax-?h3", None), (r"pika-?h3", None)),
        split_whole=True,  # its _cp_plan splits the packed sequence contiguously (Ulysses only)
        ring_unwrapped="text refiner",
    ),
)
