"""Temporal checks of generated videos: frame-to-frame consistency and a frozen / looping detector.

Sparse attention over long videos can freeze motion (or repeat a short loop) while every frame
still scores well against dense. These checks look along time:

- :func:`motion`: the mean absolute change between consecutive frames, per step ``[F - 1]``
  (in [0, 1] units).
- :func:`temporal_error`: how differently a video changes from frame to frame than its reference:
  the mean of ``|(x[t+1] - x[t]) - (r[t+1] - r[t])|``.
- :func:`is_frozen`: the median consecutive change is below :data:`FROZEN_LEVEL` (under half a
  grey level of 255).
- :func:`loop_period`: the smallest lag ``p >= 2`` such that every frame equals the frame ``p``
  earlier (within a tolerance well under the video's own motion), with at least two such repeats;
  None for a video that does not loop.
- :func:`temporal_report`: all of the above for one video against its dense reference.

Example::

    >>> temporal_report(video, dense_video)
    {'motion': 0.031, 'motion_ratio': 0.98, 'temporal_error': 0.004, 'frozen': False, 'loop_period': None}
"""

from __future__ import annotations

from typing import Optional

import torch

from .metrics import _check_pair, to_frames

__all__ = ["FROZEN_LEVEL", "motion", "temporal_error", "is_frozen", "loop_period", "temporal_report"]

FROZEN_LEVEL = 0.5 / 255  # median consecutive change below half a grey level: the video does not move
_LOOP_FRACTION = 0.2  # a repeat is closer than this fraction of the video's own frame-to-frame change


def motion(video) -> torch.Tensor:
    """Mean absolute change between consecutive frames, ``[F - 1]`` (empty for one frame)."""
    x = to_frames(video)
    return (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3))


def temporal_error(video, reference) -> float:
    """Mean ``|(x[t+1] - x[t]) - (r[t+1] - r[t])|``: 0 when the video changes exactly as the reference does."""
    x, r = to_frames(video), to_frames(reference)
    _check_pair(x, r)  # (before: "frame shapes differ", without which differs or what to do)
    if x.shape[0] < 2:
        return 0.0
    return float(((x[1:] - x[:-1]) - (r[1:] - r[:-1])).abs().mean())


def is_frozen(video, level: float = FROZEN_LEVEL) -> bool:
    """True when the median change between consecutive frames is below ``level`` (a still video)."""
    m = motion(video)
    # torch.median of an even count is the lower middle value: a video still for one step and moving the next
    # (3 frames) read as still. The median is the mean of the two middle values.
    return bool(m.numel()) and float(m.double().quantile(0.5)) < level


def loop_period(video) -> Optional[int]:
    """The smallest period ``p >= 2`` the video repeats with (every frame equal to the one ``p`` earlier, within
    a fifth of its mean frame-to-frame change, at least two repeats seen), or None (not looping, or frozen)."""
    x = to_frames(video)
    frames = x.shape[0]
    if frames < 4 or is_frozen(x):
        return None
    step = float(motion(x).mean())
    for p in range(2, frames - 1):  # frames - p >= 2 repeats
        distance = float((x[p:] - x[:-p]).abs().mean(dim=(1, 2, 3)).max())
        if distance < max(FROZEN_LEVEL, _LOOP_FRACTION * step):
            return p
    return None


def temporal_report(video, reference=None) -> dict:
    """``motion`` (mean consecutive change), ``frozen``, ``loop_period``; with a reference also
    ``motion_ratio`` (this video's motion over the reference's; None when the reference is still) and
    ``temporal_error``."""
    m = motion(video)
    out = {"motion": float(m.mean()) if m.numel() else 0.0, "frozen": is_frozen(video),
           "loop_period": loop_period(video)}
    if reference is not None:
        ref = float(motion(reference).mean()) if to_frames(reference).shape[0] > 1 else 0.0
        out["motion_ratio"] = out["motion"] / ref if ref > 0 else None
        out["temporal_error"] = temporal_error(video, reference)
    return out
