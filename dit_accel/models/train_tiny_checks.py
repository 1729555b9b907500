"""What a training run of :mod:`dit_accel.models.train_tiny` can take, checked before anything is built or written:
its output folder, its clip shape, and the command line's one-line usage errors."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..atomic_files import is_temp_name
from .tiny_shapes import TINY_SHAPES_DEFAULTS

__all__ = ["checked_out_dir", "checked_shape", "checked_numbers", "usage_error", "flag_words"]


def checked_out_dir(out_dir, init=None) -> Path:
    """``out_dir`` as a Path; ValueError (before anything is built or written) for a missing one, one inside the
    installed package (its shipped models), the ``init`` folder itself, or a folder holding files that are not a
    saved pipeline (a run replaces its output folder whole)."""
    import dit_accel

    if out_dir is None or not str(out_dir).strip():
        raise ValueError("out_dir (--out) is required: the folder the trained pipeline is saved to (a new folder)")
    out, package = Path(out_dir), Path(dit_accel.__file__).resolve().parent
    full = Path(os.path.abspath(out)).resolve()
    if full == package or package in full.parents:
        raise ValueError(f"--out {str(out)!r} is inside the installed dit_accel package ({package}), whose shipped "
                         "models a run would overwrite; train into a new folder outside the package")
    if init and Path(os.path.abspath(init)).resolve() == full:
        raise ValueError("--init and --out are the same folder: checkpoints would overwrite the starting weights")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder; choose a new folder")
    held = [p.name for p in out.iterdir() if not is_temp_name(p)] if out.is_dir() else []
    if held and not (out / "model_index.json").is_file():
        raise ValueError(f"--out {str(out)!r} holds {len(held)} file(s) that are not a saved pipeline (e.g. "
                         f"{sorted(held)[0]!r}; no model_index.json), and a run replaces its folder whole; choose an "
                         "empty or new folder")
    return out


def checked_shape(frames, size, object_canvas, local_pull):
    """``(frames, canvas side)`` of a run, defaults filled in; ValueError (before anything is written) for a clip
    length, canvas, object canvas or pull direction the codec or the loss cannot take."""
    frames = TINY_SHAPES_DEFAULTS["num_frames"] if frames is None else frames
    if frames < 3 or frames % 2 != 1:
        raise ValueError(f"frames must be odd and at least 3 (the pixel codec pairs frames), got {frames}")
    if size is not None and (size < 16 or size % 16):
        raise ValueError(f"size must be a multiple of 16 (the codec halves it, the patch halves it again), got {size}")
    if local_pull not in ("sparse", "both"):
        raise ValueError(f"local_pull must be 'sparse' or 'both', got {local_pull!r}")
    canvas = size or TINY_SHAPES_DEFAULTS["height"]
    if object_canvas is not None and not 8 <= object_canvas <= canvas:
        raise ValueError(f"object_canvas must be from 8 to the canvas side {canvas}, got {object_canvas}")
    return frames, canvas


#: ``{setting: (whole number?, least, most, least excluded?, most excluded?, what it is)}`` of the numbers a run takes.
_NUMBERS = {
    "steps": (True, 1, None, False, False, "the training steps"),
    "batch_size": (True, 1, None, False, False, "clips per step"),
    "lr": (False, 0.0, None, True, False, "the peak learning rate"),
    "warmup": (True, 0, None, False, False, "the learning-rate warm-up steps"),
    "short_fraction": (False, 0.0, 1.0, False, False, "the share of steps on short clips"),
    "ema_decay": (False, 0.0, 1.0, False, True, "the weight of the moving average's past; 1 would never move"),
    "save_every": (True, 0, None, False, False, "steps between checkpoints, 0 for none"),
    "time_limit": (False, 0.0, None, False, False, "seconds (0: save the starting weights), or unset for no limit"),
    "local_weight": (False, 0.0, None, False, False, "the weight of the --local term"),
    "locality_weight": (False, 0.0, None, False, False, "the weight of the --locality term"),
    "locality_queries": (True, 1, None, False, False, "queries sampled per attention call"),
}


def checked_numbers(**values) -> None:
    """ValueError, before anything is built or written, for a number of a run out of its range (a step count below 1,
    an EMA decay of 1 or more, a NaN weight): each would fail part way, or train and save a model silently wrong."""
    for name, value in values.items():
        whole, low, high, low_open, high_open, what = _NUMBERS[name]
        if value is None and name == "time_limit":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(value, int) or (not whole and math.isfinite(value)))
        if not number or value < low or (low_open and value == low) or (high is not None and (
                value > high or (high_open and value == high))):
            span = (f"({low}, " if low_open else f"[{low}, ") + (f"{high}{')' if high_open else ']'}" if high is not None
                                                                  else "inf)")
            raise ValueError(f"{name} must be {'a whole number' if whole else 'a number'} in {span} ({what}), "
                             f"got {value!r}")


def usage_error(parser, message: str) -> None:
    """Exit 2 with one line on stderr: what is wrong and what is allowed (no usage block, no traceback)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def flag_words(message: str) -> str:
    """train()'s messages with its keyword names as the command line spells them (``object_canvas`` ->
    ``--object-canvas``)."""
    return re.sub(r"\b(frames|size|object_canvas|local_max_noise|heads|precision|noise_levels|local_pull|"
                  + "|".join(_NUMBERS) + r")\b(?= must| is)",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)
