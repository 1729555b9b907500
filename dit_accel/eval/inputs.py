"""The checks of what a generation runs on, shared by :class:`~dit_accel.eval.runner.EvalSettings` and
:class:`~dit_accel.calibrate.CalibrationSettings`: the prompts, the seeds, the sizes, the device and the dtype,
made before a model loads. Each raises ValueError naming the setting (as its ``dit-accel`` flag), what is allowed
and what to do."""

from __future__ import annotations

import math
from collections import Counter

from .._util import device_error, is_int, is_number, seed_error

__all__ = ["check_generation_settings", "check_generation_numbers", "plain_values"]

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
        raise ValueError(f"--seeds {seeds!r} is invalid: give at least one integer seed, e.g. --seeds 0,1 "
                         "(seeds=[0, 1] from Python)")
    not_int = [s for s in seeds if not is_int(s)]
    problem = seed_error(list(seeds), "--seeds") if not not_int else f"--seeds must be integers; got {not_int[0]!r}"
    if problem:
        raise ValueError(problem)
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed ({','.join(map(str, seeds))}): each seed once (a repeated seed "
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


def check_generation_numbers(sizes: dict, guidance_scale, seeds) -> None:
    """The numbers of a generation, as the ``dit-accel`` commands and the settings' checks both take them:
    ``sizes`` (setting name -> None or an integer >= 1: None is the model's default), ``guidance_scale`` (None or a
    finite number >= 0) and ``seeds`` (distinct integers in [0, 2**63)); ValueError naming the first bad one by
    its flag."""
    for name, value in sizes.items():
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"{_flag(name)} must be an integer >= 1 (unset: the model's default); got {value!r}")
    if guidance_scale is not None and not (is_number(guidance_scale) and math.isfinite(guidance_scale)
                                           and guidance_scale >= 0):
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (unset: the model's default); "
                         f"got {guidance_scale!r}")
    _check_seeds(seeds)


def plain_values(settings) -> None:
    """numpy scalars (and a 1-D array, or a list or tuple of them) in ``settings``' fields made Python ones, in
    place. Before: they passed the checks (numpy integers are integers) and failed after the model loaded, a seed in
    ``torch.Generator().manual_seed`` ("an integer is required"), ``steps=np.int64(4)`` in the dense cache key's
    JSON ("Object of type int64 is not JSON serializable")."""
    import dataclasses

    import numpy as np

    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray) and value.ndim == 1:
            return value.tolist()
        if isinstance(value, (list, tuple)) and any(isinstance(v, np.generic) for v in value):
            return type(value)(v.item() if isinstance(v, np.generic) else v for v in value)
        return value

    for f in dataclasses.fields(settings):
        setattr(settings, f.name, plain(getattr(settings, f.name)))


def check_generation_settings(settings) -> None:
    """``settings``' prompts, its numbers (:func:`check_generation_numbers`: ``frames``, ``height``, ``width``,
    ``steps``, ``max_sequence_length``, ``guidance_scale``, ``seeds``), device and dtype; ValueError naming the
    first bad one. numpy values in its fields are made Python ones first (:func:`plain_values`)."""
    plain_values(settings)
    _check_prompts(settings.prompts)
    check_generation_numbers({name: getattr(settings, name) for name in _SIZES}, settings.guidance_scale,
                             settings.seeds)
    _check_device_and_dtype(settings.device, settings.dtype)
