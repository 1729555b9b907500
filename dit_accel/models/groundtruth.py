"""Ground-truth quality of videos of a coloured shape moving, judged from the frames and the prompt alone.

For prompts of the grammar ``"a {colour} {shape} moving {direction}"`` (the
``tiny-shapes`` model, :mod:`dit_accel.models.clips`) a video is checked on
four criteria, with no learned model and nothing downloaded:

- colour: the majority hue of the object's pixels is the prompt's colour;
- shape: the object fills its bounding box like a square (~1.0) or a circle
  (pi/4 ~ 0.785); the median over frames is compared with :data:`FILL_THRESHOLD`;
- motion: the object's centroid moves along the prompt's direction, by at least
  :data:`MIN_TRAVEL` of the canvas (a static object fails), and at most
  :data:`MAX_DRIFT_DEGREES` off it (a diagonal drift, such as as far up as right,
  fails and is reported as e.g. ``"up-right"``);
- consistency: exactly one object in every frame and a stable area (largest /
  smallest at most :data:`MAX_AREA_RATIO`).

The object is the saturated part of the frame (saturation ``max(rgb) - min(rgb)``
above :data:`SATURATION_THRESHOLD`): the clips' backgrounds are grey. Objects are
4-connected components of at least :data:`MIN_AREA` of the frame; smaller specks
are ignored as noise.

Example::

    from dit_accel.models.groundtruth import score_video, score_many
    score_video(frames, "a red circle moving left")["motion_ok"]
    score_many(videos, prompts)   # {"colour": 1.0, "shape": 0.9, "motion": 0.95, ...}
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["parse_prompt", "score_video", "score_many", "SATURATION_THRESHOLD", "FILL_THRESHOLD", "MIN_TRAVEL",
           "MAX_DRIFT_DEGREES", "MIN_AREA", "MAX_AREA_RATIO"]

SATURATION_THRESHOLD = 0.3  # grey backgrounds are ~0, the clip colours 0.65-0.85
FILL_THRESHOLD = 0.88  # between a circle's pi/4 and a square's 1 (pixelated shapes land near both)
MIN_TRAVEL = 0.08  # of the canvas extent; the clips travel 25-35 %
# The clips move along one axis; a sample drifting further off it than this (in canvas fractions) moves in
# another direction. 30 degrees: the perpendicular travel is at most tan(30) = 0.58 of the travel along it.
MAX_DRIFT_DEGREES = 30.0
MIN_AREA = 0.004  # of the frame (9 pixels at 48x48): smaller components are noise, not objects
MAX_AREA_RATIO = 1.5

# Hues in degrees of the clip palette (kept here so the metric does not import the clip renderer).
_HUES = {"red": 4.0, "yellow": 53.0, "green": 126.0, "blue": 225.0}
_SHAPES = ("square", "circle")
_DIRECTIONS = ("left", "right", "up", "down")
_PROMPT = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*\.?\s*$", re.IGNORECASE)


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """``"a red circle moving left"`` -> ``("red", "circle", "left")``.

    Raises:
        ValueError: the prompt does not follow ``"a {colour} {shape} moving {direction}"``
            with a known colour, shape and direction.
    """
    match = _PROMPT.match(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"prompt {prompt!r} does not follow 'a {{colour}} {{shape}} moving {{direction}}'")
    colour, shape, direction = (w.lower() for w in match.groups())
    for value, allowed, what in ((colour, _HUES, "colour"), (shape, _SHAPES, "shape"), (direction, _DIRECTIONS, "direction")):
        if value not in allowed:
            raise ValueError(f"prompt {prompt!r}: unknown {what} {value!r}; known: {', '.join(allowed)}")
    return colour, shape, direction


def score_video(frames, prompt: str) -> dict:
    """Judge one video against its prompt.

    Args:
        frames: ``[F, H, W, 3]`` RGB frames: float in [0, 1] (a pipeline's
            ``output_type="np"``), uint8, or a list of PIL images.
        prompt: ``"a {colour} {shape} moving {direction}"``.

    Returns:
        ``colour_ok``, ``shape_ok``, ``motion_ok``, ``consistent`` and ``all_ok``
        (booleans) with the evidence: ``colour``, ``shape`` and ``direction`` as
        detected (``None`` when there is no object; direction ``"static"`` below
        the minimum travel), ``fill_ratio``, ``displacement`` (dx, dy) in pixels,
        ``objects_per_frame`` and ``area_ratio``.

    Example::

        from dit_accel.models.clips import render_clip
        score_video(render_clip("red", "circle", "left"), "a red circle moving left")["all_ok"]   # True
    """
    colour, shape, direction = parse_prompt(prompt)
    video = _as_float_frames(frames)
    rgb_max, rgb_min = video.max(axis=-1), video.min(axis=-1)
    mask = (rgb_max - rgb_min) > SATURATION_THRESHOLD
    labels = _components(mask)
    min_area = max(1, int(round(MIN_AREA * mask.shape[1] * mask.shape[2])))

    objects_per_frame, main = [], []  # main: the largest component of each frame (or None)
    for frame_labels in labels:
        ids, areas = np.unique(frame_labels[frame_labels > 0], return_counts=True)
        keep = areas >= min_area
        objects_per_frame.append(int(keep.sum()))
        main.append(frame_labels == ids[np.argmax(areas)] if keep.any() else None)

    found = [m for m in main if m is not None]
    result = {"colour": None, "shape": None, "direction": None, "fill_ratio": None, "displacement": None,
              "objects_per_frame": objects_per_frame, "area_ratio": None}
    if found:
        present = [i for i, m in enumerate(main) if m is not None]
        result["colour"] = _dominant_colour(video[present][np.stack(found)])  # the objects' pixels [N, 3]
        result["fill_ratio"] = float(np.median([_fill_ratio(m) for m in found]))
        result["shape"] = "square" if result["fill_ratio"] > FILL_THRESHOLD else "circle"
        result["direction"], result["displacement"] = _direction(main, mask.shape[1:])
        areas = [int(m.sum()) for m in found]
        result["area_ratio"] = max(areas) / min(areas)
    result["colour_ok"] = result["colour"] == colour
    result["shape_ok"] = result["shape"] == shape
    result["motion_ok"] = result["direction"] == direction
    result["consistent"] = all(n == 1 for n in objects_per_frame) and (result["area_ratio"] or np.inf) <= MAX_AREA_RATIO
    result["all_ok"] = result["colour_ok"] and result["shape_ok"] and result["motion_ok"] and result["consistent"]
    return result


def score_many(videos, prompts) -> dict:
    """Accuracies in [0, 1] over many videos: ``colour``, ``shape``, ``motion``,
    ``consistency`` and ``all`` (every criterion right), plus ``n``.

    Example::

        score_many([video1, video2], ["a red circle moving left", "a blue square moving up"])
    """
    videos, prompts = list(videos), list(prompts)
    if len(videos) != len(prompts) or not videos:
        raise ValueError(f"need as many prompts as videos (and at least one): {len(videos)} videos, {len(prompts)} prompts")
    scores = [score_video(v, p) for v, p in zip(videos, prompts)]
    keys = {"colour": "colour_ok", "shape": "shape_ok", "motion": "motion_ok", "consistency": "consistent", "all": "all_ok"}
    out = {name: float(np.mean([s[key] for s in scores])) for name, key in keys.items()}
    out["n"] = len(scores)
    return out


# ----------------------------------------------------------------------------- helpers
def _numpy(frames):
    """``frames`` as numpy: a torch tensor of any dtype, device and grad state as its CPU values (bfloat16 frames, a
    CUDA tensor and one that requires grad raised numpy's raw TypeError or RuntimeError)."""
    import torch

    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        return (frames.float() if frames.is_floating_point() else frames).numpy()
    return np.asarray(frames)


def _as_float_frames(frames) -> np.ndarray:
    if isinstance(frames, (list, tuple)):
        frames = np.stack([_numpy(f) for f in frames])
    video = _numpy(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {video.shape}")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    if video.dtype.kind not in "fiu":
        raise ValueError(f"frames are of dtype {video.dtype}; expected floats in [0, 1] (a pipeline's "
                         "output_type='np') or uint8")
    video = video.astype(np.float32)
    low, high = (float(video.min()), float(video.max())) if video.size else (0.0, 0.0)
    # (before: frames in [0, 255] or [-1, 1] were scored as [0, 1] ones: the grey background's noise became
    # objects, a dark object none, and the scores were wrong without a word; NaN frames are scored as found)
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"frames hold values from {low:g} to {high:g}; expected floats in [0, 1] (a pipeline's "
                         "output_type='np'): divide [0, 255] frames by 255, map [-1, 1] ones by (x + 1) / 2, or pass "
                         "uint8")
    return video


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of every frame of ``mask [F, H, W]`` (0 = background).

    A label is the flat index + 1 of a pixel of the component. Each round every
    pixel takes the largest label among itself and its neighbours, then the label
    stored at the pixel its label names (pointer jumping, so rounds grow with the
    log of the object size rather than its diameter).
    """
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = labels.copy()
        grown[:, 1:, :] = np.maximum(grown[:, 1:, :], labels[:, :-1, :])
        grown[:, :-1, :] = np.maximum(grown[:, :-1, :], labels[:, 1:, :])
        grown[:, :, 1:] = np.maximum(grown[:, :, 1:], labels[:, :, :-1])
        grown[:, :, :-1] = np.maximum(grown[:, :, :-1], labels[:, :, 1:])
        grown = np.where(mask, grown, 0)
        grown = np.where(mask, grown.ravel()[np.maximum(grown, 1) - 1], 0)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _dominant_colour(pixels: np.ndarray) -> str:
    """Majority palette colour of ``pixels [N, 3]`` by nearest hue."""
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0
    names = list(_HUES)
    ref = np.array([_HUES[n] for n in names])
    gap = np.abs(hue[:, None] - ref[None, :]) % 360.0
    nearest = np.argmin(np.minimum(gap, 360.0 - gap), axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def _fill_ratio(mask: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return float(mask.sum() / box)


def _direction(main: list, frame_shape: tuple) -> tuple[str, tuple[float, float]]:
    """Direction of the object's centroid over the frames where it was found (least-squares slope)."""
    found = [(i, np.nonzero(m)) for i, m in enumerate(main) if m is not None]
    if len(found) < 2:
        return "static", (0.0, 0.0)
    t = np.array([i for i, _ in found], dtype=np.float64)
    xs = np.array([cols.mean() for _, (rows, cols) in found])
    ys = np.array([rows.mean() for _, (rows, cols) in found])
    dx = float(np.polyfit(t, xs, 1)[0] * (t[-1] - t[0]))
    dy = float(np.polyfit(t, ys, 1)[0] * (t[-1] - t[0]))
    height, width = frame_shape
    x, y = abs(dx) / width, abs(dy) / height  # canvas fractions
    horizontal = "right" if dx > 0 else "left"
    vertical = "down" if dy > 0 else "up"
    along, across, name = (x, y, horizontal) if x >= y else (y, x, vertical)
    if along < MIN_TRAVEL:
        return "static", (dx, dy)
    if np.degrees(np.arctan2(across, along)) > MAX_DRIFT_DEGREES:
        return f"{vertical}-{horizontal}", (dx, dy)
    return name, (dx, dy)
