"""Procedural training clips: one coloured shape moving in a straight line.

Every clip shows a single square or circle of one of four colours sliding left,
right, up or down over a plain grey background. The prompt of a clip follows
exactly the grammar ``"a {colour} {shape} moving {direction}"``, e.g.
``"a red circle moving left"``; :data:`PROMPTS` lists all 32 of them.

Only the start position is random (drawn from ``seed``); everything else is fixed
and scaled to the canvas, so every size works:

- size: side (square) or diameter (circle) of :data:`SIZE` of the shorter canvas side;
- travel: :data:`TRAVEL` of the canvas extent along the motion axis, at constant
  speed from the first to the last frame; the object never leaves the canvas;
- background: plain grey :data:`BACKGROUND` (no hue, so the object is the only
  saturated region: :mod:`dit_accel.eval.groundtruth` relies on it).

A tiny model learns a few fixed factors (colour, shape, direction) plus a position
far faster than it would also learn random sizes, speeds and backgrounds.

Edges are anti-aliased (coverage of a one-pixel ramp), positions are sub-pixel.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["COLOURS", "SHAPES", "DIRECTIONS", "PROMPTS", "SIZE", "TRAVEL", "BACKGROUND", "make_prompt",
           "render_clip", "render_batch"]

# Saturated RGB in [0, 1]; hues ~4 deg (red), ~53 (yellow), ~126 (green), ~225 (blue): far apart.
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.18),
    "blue": (0.12, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("square", "circle")
# Unit motion (dx, dy) in image coordinates: x to the right, y downwards.
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SIZE = 0.40  # object side / diameter, fraction of the shorter canvas side
TRAVEL = 0.30  # distance covered from the first to the last frame, fraction of the canvas extent
BACKGROUND = 0.30  # grey level


def make_prompt(colour: str, shape: str, direction: str) -> str:
    """The prompt of a clip, e.g. ``make_prompt("red", "circle", "left") == "a red circle moving left"``."""
    return f"a {colour} {shape} moving {direction}"


PROMPTS = [make_prompt(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def render_clip(colour: str, shape: str, direction: str, seed: int = 0, frames: int = 7, height: int = 48,
                width: int = 48) -> np.ndarray:
    """Render one clip as float32 frames ``[frames, height, width, 3]`` in [0, 1].

    The same arguments always give the same clip; the seed picks the start position.

    Example::

        video = render_clip("red", "circle", "left", seed=3)   # (7, 48, 48, 3)
    """
    for value, allowed, what in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"), (direction, DIRECTIONS, "direction")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {list(allowed)}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):  # (before: "x" raw, 2.7 taken as 2)
        raise ValueError(f"seed={seed!r} is invalid: the start position's random seed, an int")
    generator = torch.Generator().manual_seed(int(seed))
    ids = [torch.tensor([list(table).index(value)]) for value, table in
           ((colour, COLOURS), (shape, SHAPES), (direction, DIRECTIONS))]
    return render_batch(*ids, generator=generator, frames=frames, height=height, width=width)[0].numpy()


def render_batch(colour_ids: torch.Tensor, shape_ids: torch.Tensor, direction_ids: torch.Tensor, *,
                 generator: torch.Generator, frames: int, height: int, width: int,
                 object_canvas: int = None) -> torch.Tensor:
    """Render a batch of clips at once (the training data path): float32 ``[B, frames, H, W, 3]`` in [0, 1].

    Args:
        colour_ids, shape_ids, direction_ids: int tensors ``[B]`` indexing
            ``list(COLOURS)``, :data:`SHAPES` and ``list(DIRECTIONS)``.
        generator: CPU generator of the start positions.
        object_canvas: the square canvas side whose :data:`SIZE` and :data:`TRAVEL` fractions give the object's
            size and travel in pixels (default: this canvas, so everything scales with it). ``object_canvas=48``
            on a 128x128 canvas draws the 48x48 clip's object and motion anywhere on the larger canvas.

    Example::

        g = torch.Generator().manual_seed(0)
        x = render_batch(torch.tensor([0, 3]), torch.tensor([1, 0]), torch.tensor([2, 2]),
                         generator=g, frames=7, height=48, width=48)   # (2, 7, 48, 48, 3)
    """
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # (before: a raw torch TypeError)
            raise ValueError(f"{name}={value!r} is invalid: a whole number (frames >= 2, height and width >= 8)")
    if frames < 2 or height < 8 or width < 8:
        raise ValueError(f"need at least 2 frames and an 8x8 canvas, got frames={frames}, {height}x{width}")
    if object_canvas is not None and not 8 <= object_canvas <= min(height, width):
        raise ValueError(f"object_canvas={object_canvas} must be from 8 to the canvas's shorter side "
                         f"{min(height, width)}")
    n = colour_ids.shape[0]
    extent = (float(object_canvas),) * 2 if object_canvas else (float(width), float(height))
    size = SIZE * min(extent)
    motion = torch.tensor(list(DIRECTIONS.values()))[direction_ids]  # [B, 2]
    travel = TRAVEL * torch.tensor(extent) * motion.abs()  # [B, 2]: zero across the motion
    # Start uniform over the positions whose whole path keeps the object one pixel inside the canvas.
    room = torch.tensor([float(width), float(height)]) - 2 - size - travel  # [B, 2]
    start = 1 + size / 2 + room * torch.rand(n, 2, generator=generator) + travel * (motion < 0)
    progress = torch.linspace(0.0, 1.0, frames)  # [F]
    cx = start[:, 0:1] + travel[:, 0:1] * motion[:, 0:1].sign() * progress  # [B, F]
    cy = start[:, 1:2] + travel[:, 1:2] * motion[:, 1:2].sign() * progress
    # Pixel centres, offsets from the object centre: [B, F, H, W].
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    dx = xs.view(1, 1, 1, width) - cx[:, :, None, None]
    dy = ys.view(1, 1, height, 1) - cy[:, :, None, None]
    circle = torch.sqrt(dx * dx + dy * dy)
    square = torch.maximum(dx.abs(), dy.abs())
    is_circle = (shape_ids == SHAPES.index("circle")).view(n, 1, 1, 1)
    distance = torch.where(is_circle, circle, square)
    alpha = (size / 2 - distance + 0.5).clamp(0.0, 1.0)[..., None]  # [B, F, H, W, 1]
    colour = torch.tensor(list(COLOURS.values()))[colour_ids].view(n, 1, 1, 1, 3)
    return (alpha * colour + (1 - alpha) * BACKGROUND).float()
