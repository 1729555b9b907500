"""Which step of which schedule a ComfyUI model call samples, as Diffusers numbers the steps.

ComfyUI hands a model call its sigma and the sampler's sigmas (``transformer_options``), not the step: the step is
read from the sampler's frames on the stack, in one walk per model call (:func:`walk`):

- the sampler's loop index (k-diffusion's ``for i in trange(len(sigmas) - 1)``);
- ``comfy.samplers.KSampler.sample`` above it, whose steps, ``denoise`` and ``start_step`` place a part of a schedule
  (``denoise`` < 1, KSamplerAdvanced's start/end steps) in the schedule it was cut from;
- else the ``CFGGuider`` (SamplerCustom, SamplerCustomAdvanced), whose sigmas may be a piece of a schedule cut by
  nodes (BasicScheduler's ``denoise``, SplitSigmas, SplitSigmasDenoise): the piece is looked for in the schedules
  of ComfyUI's schedulers for the model (:class:`Places`), once per sampling run.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["StepOf", "Places", "step_of", "UNLOOPED"]

# Frames between a diffusion-model call and the sampler function that made it (ComfyUI's wrapper executors, CFG
# guider, sampling_function, calc_cond_batch, apply_model: about 25 in ComfyUI 0.3.64), with room for more wrappers.
_SAMPLER_DEPTH = 64
# Frames between a diffusion-model call and ComfyUI's KSampler.sample above the sampler function (comfy.samplers'
# sample, CFGGuider's sample, outer_sample, inner_sample and their wrapper executors: about 40 in 0.3.64).
_KSAMPLER_DEPTH = 128
# The longest schedule a custom sampler's piece of sigmas is looked for in (each length costs one schedule of each
# of ComfyUI's schedulers; up to 100: about 1 s on a CPU core, once per sampling run, only where steps matter).
SEARCH_STEPS = 100
# k-diffusion's samplers without a loop over the sigmas, by the function ComfyUI's KSAMPLER calls: they integrate from
# sigma_max down to the last step's sigma (sigmas[-2], as sigmas[-1] is 0) and make no call below it
UNLOOPED = {"sample_dpm_fast": "dpm_fast", "sample_dpm_adaptive": "dpm_adaptive"}


class StepOf(NamedTuple):
    """A model call's step in the whole schedule (``step`` of ``total``), its sigma, the first step of the part its
    sampler runs, and ``placed``: False for a custom sampler's piece of sigmas that could not be placed in a whole
    schedule (then counted as one)."""

    step: Optional[int]
    total: Optional[int]
    sigma: Optional[float]
    first: int = 0
    placed: bool = True
    sampler: Optional[str] = None  # a sampler of UNLOOPED, by its ComfyUI name
    custom: bool = False  # a custom sampler's call (SamplerCustom, SamplerCustomAdvanced: a CFGGuider, no KSampler)


class _Stack(NamedTuple):
    step: Optional[int]  # the sampler's loop index
    ksampler: Optional[tuple]  # (comfy.samplers.KSampler, start_step) of KSampler.sample
    guider: object  # the CFGGuider running the sampler (custom samplers)
    sampler: Optional[str] = None  # a sampler of UNLOOPED


def walk(frame, total: int) -> _Stack:
    """One walk up the stack from ``frame``: the innermost sampler loop index ``i`` in ``[0, total)`` beside a
    ``sigmas`` tensor of ``total + 1`` entries (the schedule ComfyUI's KSAMPLER hands it), the CFGGuider's
    ``inner_sample`` and the ``KSampler.sample`` above them (the walk ends there)."""
    samplers = sys.modules.get("comfy.samplers")
    ksampler, guider_class = getattr(samplers, "KSampler", None), getattr(samplers, "CFGGuider", None)
    step = guider = unlooped = None
    for depth in range(_KSAMPLER_DEPTH):
        if frame is None:
            break
        code = frame.f_code
        names = code.co_varnames
        if step is None and guider is None and depth < _SAMPLER_DEPTH and "i" in names and "sigmas" in names:
            local = frame.f_locals
            i, sigmas = local.get("i"), local.get("sigmas")
            if (isinstance(sigmas, torch.Tensor) and sigmas.numel() == total + 1 and isinstance(i, int)
                    and not isinstance(i, bool) and 0 <= i < total):
                step = i
        name = code.co_name
        if unlooped is None and step is None and guider is None:
            unlooped = UNLOOPED.get(name)
        if name == "sample" and "start_step" in names and "self" in names and ksampler is not None:
            local = frame.f_locals
            if isinstance(local.get("self"), ksampler):
                return _Stack(step, (local["self"], local.get("start_step")), guider, unlooped)
        elif name == "inner_sample" and guider is None and "self" in names and guider_class is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, guider_class):
                guider = owner
        frame = frame.f_back
    return _Stack(step, None, guider, unlooped)


def step_of(transformer_options: dict, frame=None, places: Optional["Places"] = None, search: bool = True) -> StepOf:
    """The :class:`StepOf` of a sampler's model call; Nones outside a sampler.

    ComfyUI's samplers put the schedule (``sample_sigmas``, falling, its last entry where sampling ends) and the
    call's sigma (``sigmas``) in ``transformer_options``. The step is the sampler's own: the index of its loop over
    those sigmas, so every call one step makes counts as that step, Heun's at the next step's sigma and a midpoint
    below it too, as Diffusers' ``step_index // order`` counts them. A sampler without such a loop (``dpm_fast``,
    ``uni_pc``): step ``i`` is the call at ``sample_sigmas[i]``, and a call between two entries belongs to the step
    whose interval holds it. A sampler that runs part of a schedule counts the steps of the whole schedule from
    ``first``, the part's first step, as Diffusers counts them: a KSampler's part read from its frame; a custom
    sampler's piece looked for (``search``; else counted as a whole schedule). ``places`` keeps both for the
    sampling run (one per patch; None: a new one).
    """
    sigma = transformer_options.get("sigmas")
    if not isinstance(sigma, torch.Tensor) or sigma.numel() == 0:
        return StepOf(None, None, None)
    value = float(sigma.reshape(-1)[0])  # one host sync per model call, not per attention call
    sigmas = transformer_options.get("sample_sigmas")
    if not isinstance(sigmas, torch.Tensor) or sigmas.numel() < 2:
        return StepOf(None, None, value)
    total = sigmas.numel() - 1
    stack = walk(frame, total)
    places = Places() if places is None else places
    if stack.ksampler is not None:
        offset, full, placed = places.part(*stack.ksampler, sigmas, total)
    elif stack.guider is not None and search:
        offset, full, placed = places.place(stack.guider, sigmas, total)
    else:
        offset, full, placed = 0, total, True
    step = stack.step
    if step is None:
        column = places.column(sigmas)
        at_or_above = (column[:total] >= value * (1 - 1e-4)).nonzero()
        step = int(at_or_above[-1, 0]) if at_or_above.numel() else 0
    custom = stack.ksampler is None and stack.guider is not None
    return StepOf(offset + step, full, value, offset, placed, stack.sampler, custom)


def _part_of(ksampler, start_step, sigmas: torch.Tensor, total: int) -> Tuple[int, int]:
    """``(offset, full total)`` of a ``comfy.samplers.KSampler``'s part: its ``sigmas`` are the last ``steps + 1`` of
    ``int(steps / denoise) + 1`` (all of them at ``denoise`` 1), the sampler's a slice of those from ``start_step``;
    ``(0, total)`` where the sampler's sigmas are not that slice (a KSampler handed its own)."""
    steps, denoise, own = getattr(ksampler, "steps", None), getattr(ksampler, "denoise", None), ksampler.sigmas
    if not isinstance(steps, int) or steps < 1 or not isinstance(own, torch.Tensor) or own.numel() != steps + 1:
        return 0, total
    full = steps if denoise is None or denoise > 0.9999 else int(steps / denoise)
    start = start_step if isinstance(start_step, int) and 0 <= start_step < steps else 0
    if start + total > steps or full < steps:
        return 0, total
    # (the sigmas the sampler got are this slice, unless the KSampler was handed its own: its last may be 0)
    if not torch.allclose(sigmas.detach().reshape(-1)[:total].double().cpu(),
                          own.detach().reshape(-1)[start:start + total].double().cpu()):
        return 0, total
    return full - steps + start, full


class Places:
    """Where a custom sampler's sigmas sit in a whole schedule, kept for the sampling run (its ``sample_sigmas``
    tensor and the model's sampling object): a whole schedule runs from the model's ``sigma_max`` to 0; a piece
    (BasicScheduler's ``denoise`` < 1, SplitSigmas, SplitSigmasDenoise) is a run of consecutive entries of the
    schedule one of ComfyUI's schedulers makes for the model at some step count (the shortest that holds it, up to
    :data:`SEARCH_STEPS`)."""

    def __init__(self):
        self._seen = None  # (sample_sigmas, model_sampling, (offset, full, placed))
        self._part = None  # (sample_sigmas, KSampler, start_step, (offset, full, True))
        self._column = None  # (sample_sigmas, its fp64 CPU copy)

    def column(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The sampler's sigmas in fp64 on the CPU (one copy per sampling run, not per call)."""
        seen = self._column
        if seen is None or seen[0] is not sigmas:
            seen = self._column = (sigmas, sigmas.detach().reshape(-1).double().cpu())
        return seen[1]

    def part(self, ksampler, start_step, sigmas: torch.Tensor, total: int) -> Tuple[int, int, bool]:
        """:func:`_part_of`, kept for the sampling run (its check costs more than the walk up the stack)."""
        seen = self._part
        if seen is not None and seen[0] is sigmas and seen[1] is ksampler and seen[2] == start_step:
            return seen[3]
        found = (*_part_of(ksampler, start_step, sigmas, total), True)
        self._part = (sigmas, ksampler, start_step, found)
        return found

    def place(self, guider, sigmas: torch.Tensor, total: int) -> Tuple[int, int, bool]:
        """``(offset, full, placed)`` of the sigmas a CFGGuider samples, for its model's sampling object (with the
        object patches of ModelSamplingSD3 and the like) at the time of the run."""
        get = getattr(getattr(guider, "model_patcher", None), "get_model_object", None)
        try:
            sampling = get("model_sampling") if callable(get) else None
        except (AttributeError, KeyError):
            sampling = None
        seen = self._seen
        if seen is not None and seen[0] is sigmas and seen[1] is sampling:
            return seen[2]
        found = _place(sampling, sigmas.detach().reshape(-1).double().cpu(), total)
        self._seen = (sigmas, sampling, found)
        return found


def _place(sampling, piece: torch.Tensor, total: int) -> Tuple[int, int, bool]:
    """``(offset, full, placed)`` of a custom sampler's sigmas ``piece`` (fp64, CPU): see :class:`Places`. A piece
    that two step counts of the scheduler that makes it place differently (the ``simple`` scheduler's first 2 steps
    at 69 and 70 steps: the same sigmas of the model's 1000) is not placed; nor one of 1 or 2 steps that two
    schedulers place differently (costlier: every scheduler at every step count)."""
    samplers = sys.modules.get("comfy.samplers")
    top = getattr(sampling, "sigma_max", None)
    if top is not None and float(piece[-1]) == 0 and float(piece[0]) >= float(top) * (1 - 1e-4):
        return 0, total, True  # from sigma_max to 0: a whole schedule
    names, calculate = getattr(samplers, "SCHEDULER_NAMES", None), getattr(samplers, "calculate_sigmas", None)
    if sampling is None or not names or calculate is None:
        return 0, total, False
    found = scheduler = None
    short = piece.numel() <= 3  # (1 or 2 steps: other schedulers may pick the same few of the model's sigmas)
    for steps in range(total, SEARCH_STEPS + 1):
        for name in names if scheduler is None or short else (scheduler,):
            place = _slice_of(calculate, sampling, name, steps, piece)
            if place is None or place == found:
                continue
            if found is not None:
                return 0, total, False  # placed two ways
            found, scheduler = place, name
    return (*found, True) if found is not None else (0, total, False)


def _slice_of(calculate, sampling, name: str, steps: int, piece: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(first step, steps)`` of ``piece`` in scheduler ``name``'s schedule at ``steps`` (its own length: ComfyUI's
    ``ddim_uniform`` makes one schedule for several step counts), or None where it is no run of that schedule."""
    try:
        schedule = calculate(sampling, name, steps).detach().reshape(-1).double().cpu()
    except Exception:  # noqa: BLE001 (a scheduler that cannot make this length for this model)
        return None
    if schedule.numel() < piece.numel():
        return None
    windows = schedule.unfold(0, piece.numel(), 1)
    match = ((windows - piece).abs() <= 1e-6 + 1e-5 * piece.abs()).all(dim=1).nonzero()
    return (int(match[0, 0]), schedule.numel() - 1) if match.numel() else None
