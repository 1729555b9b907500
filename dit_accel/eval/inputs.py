"""The checks of what a generation runs on, shared by :class:`~dit_accel.eval.runner.EvalSettings` and
:class:`~dit_accel.calibrate.CalibrationSettings`: the prompts, the seeds, the sizes, the device and the dtype,
made before a model loads. Each raises ValueError naming the setting (as its ``dit-accel`` flag), what is allowed
and what to do."""

from __future__ import annotations

import math
from collections import Counter

from .._util import device_error, is_int, is_number

__all__ = ["check_generation_settings"]

_SIZES = ("frames", "height", "width", "steps", "max_sequence_length")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_prompts(prompts) -> None:
    """A list of distinct non-empty texts: a str would run one video per character, and a repeated prompt (with
    the same seeds) repeats its videos, which the statistics then count twice."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts={prompts!r} is invalid: give a list of prompts, e.g. [{prompts!r}] "
                         "(--prompts FILE: one prompt per line)")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompts holds {bad[0]!r}: every prompt must be a non-empty text")
    repeated = [p for p, n in Counter(prompts).items() if n > 1]
    if repeated:
        raise ValueError(f"prompts repeat {repeated[0]!r}: each prompt once (a repeated prompt repeats its videos, "
                         "which are then counted twice); remove the repeated lines, or add --seeds for more videos")


def _check_seeds(seeds) -> None:
    import numpy as np

    if isinstance(seeds, np.ndarray) and seeds.ndim == 1:
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"--seeds {seeds!r} is invalid: give a list of at least one integer seed, e.g. [0, 1]")
    bad = [s for s in seeds if not is_int(s) or not 0 <= s < 2**63]
    if bad:
        raise ValueError(f"--seeds must be integers >= 0 (and < 2**63); got {bad[0]!r}")
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed ({', '.join(map(str, seeds))}): each seed once (a repeated seed "
                         "repeats its videos, which are then counted twice)")


def _check_device_and_dtype(device, dtype) -> None:
    import torch

    error = device_error(device)
    if error is not None:
        raise ValueError(error)
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype) \
            or not getattr(torch, dtype).is_floating_point:
        raise ValueError(f"--dtype {dtype!r} is invalid: choose a torch floating dtype such as float32, bfloat16 "
                         "or float16")


def check_generation_settings(settings) -> None:
    """``settings``' prompts, seeds, sizes (``frames``, ``height``, ``width``, ``steps``,
    ``max_sequence_length``: None or an integer >= 1), ``guidance_scale`` (None or a finite number >= 0), device
    and dtype; ValueError naming the first bad one."""
    _check_prompts(settings.prompts)
    _check_seeds(settings.seeds)
    for name in _SIZES:
        value = getattr(settings, name)
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"{_flag(name)} must be an integer >= 1 (or None: the model's default); got {value!r}")
    scale = settings.guidance_scale
    if scale is not None and not (is_number(scale) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (or None: the model's default); "
                         f"got {scale!r}")
    _check_device_and_dtype(settings.device, settings.dtype)
