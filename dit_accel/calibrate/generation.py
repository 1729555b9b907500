"""The pipeline calls of a calibration: the videos of ``(prompt, seed)`` jobs, batched where the pipeline takes
a list of prompts, one per call where it takes one."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .replay import DenseReplay

__all__ = ["generate_videos", "takes_one_prompt", "ONE_PROMPT_PIPELINES", "step_timesteps", "check_steps_run",
           "encoded_repeat"]


def _uint8(frames) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype == np.uint8:
        return arr
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)  # a candidate's NaN: black, a failing score
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_videos(pipe, jobs: Sequence[Tuple[str, int]], call_kwargs: dict, batch_size: int,
                    on_step: Optional[Callable[[], None]] = None,
                    replay: Optional[DenseReplay] = None, reference: bool = False,
                    after_call: Optional[Callable[[], None]] = None) -> List[np.ndarray]:
    """uint8 videos ``[F, H, W, 3]`` of every ``(prompt, seed)``, ``batch_size`` per pipeline call; the noise of a
    sample depends on its seed only. ``replay``: told each call's jobs (it records or gives back their
    transformer outputs, :mod:`.replay`). ``reference``: the dense videos every plan is scored against, which
    must be finite (a candidate's NaN becomes black frames that fail the budget; the reference's would be the
    target). ``after_call``: called after each pipeline call (the dense run checks the steps it ran there)."""
    videos = []
    one = takes_one_prompt(pipe)
    callback = _takes(pipe, "callback_on_step_end")
    for i in range(0, len(jobs), 1 if one else batch_size):
        chunk = jobs[i:i + (1 if one else batch_size)]
        if replay is not None:
            replay.begin(chunk)

        def tick(_pipe, _i, _t, kwargs):
            if on_step is not None:
                on_step()
            return kwargs

        prompts = [p for p, _ in chunk]
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        with torch.no_grad():  # (a one-prompt pipeline: one str and its generator; the same noise as a list of one)
            out = pipe(prompt=prompts[0] if one else prompts, generator=generators[0] if one else generators,
                       output_type="np", **({"callback_on_step_end": tick} if callback else {}), **call_kwargs)
        if not callback and on_step is not None:  # (the progress bar counts steps: the call's, at its end)
            for _ in range(int(call_kwargs.get("num_inference_steps") or 0)):
                on_step()
        frames = getattr(out, "frames", None)
        frames = frames if frames is not None else out.images
        if reference:
            _check_finite(frames, chunk)
        videos.extend(_uint8(f) for f in frames)
        if after_call is not None:
            after_call()
    return videos


def step_timesteps(scheduler) -> Optional[List[float]]:
    """The timestep of each denoising step of the last run (``finetune --plan`` maps a training noise level
    to the plan's step through them), or None when the scheduler keeps none."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or not len(timesteps):
        return None
    order = max(int(getattr(scheduler, "order", 1) or 1), 1)
    return [float(t) for t in timesteps[::order]]


def check_steps_run(pipe, steps: int) -> None:
    """ValueError when ``pipe``'s last call ran another number of denoising steps than ``steps`` (its scheduler's
    timesteps; tiny-minimax-h3 runs N - 1 for N): a plan names the steps the transformer runs. Checked after the
    dense run's first pipeline call (before: after the whole dense run, a video per call on such a pipeline)."""
    timesteps = step_timesteps(pipe.scheduler)
    if timesteps and len(timesteps) != steps:
        raise ValueError(f"--steps {steps}: {type(pipe).__name__} ran {len(timesteps)} denoising step(s) per "
                         f"video (its scheduler's timesteps), not {steps}: a plan names the steps the transformer "
                         "runs, and calibrate runs num_inference_steps = --steps, so it cannot calibrate this "
                         "pipeline's schedule; run it with a method config instead (e.g. generate --method tile)")


def _takes(pipe, name: str) -> bool:
    """Whether ``pipe``'s ``__call__`` takes the keyword ``name`` (or any keyword)."""
    import inspect

    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


#: Pipelines that refuse a list of prompts although their ``__call__`` says ``Union[str, List[str]]`` (Diffusers'
#: check_inputs: "Passing a list of prompts is not yet supported").
ONE_PROMPT_PIPELINES = ("WanVACEPipeline",)


def takes_one_prompt(pipe) -> bool:
    """Whether ``pipe`` generates one prompt per call (a ``str`` prompt only): :data:`ONE_PROMPT_PIPELINES`, or a
    ``__call__`` whose ``prompt`` is annotated ``str`` alone (tiny-minimax-h3). Calibration then calls it once per
    video (before: the first dense call failed with the pipeline's refusal of a list, after the model loaded)."""
    import inspect

    if type(pipe).__name__ in ONE_PROMPT_PIPELINES:
        return True
    try:
        prompt = inspect.signature(type(pipe).__call__).parameters.get("prompt")
    except (TypeError, ValueError):
        return False
    return prompt is not None and prompt.annotation in (str, "str")


def _check_finite(frames, chunk) -> None:
    """ValueError when the dense reference videos hold NaN or inf (cast to uint8 they were black frames, the
    target every plan was calibrated against)."""
    for frame, (prompt, seed) in zip(frames, chunk):
        arr = np.asarray(frame)
        bad = 0 if arr.dtype == np.uint8 else int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ValueError(f"the dense run returned {bad} NaN or inf value(s) for prompt {prompt!r}, seed {seed} "
                             "(e.g. a half-precision overflow): there is no reference to calibrate against; try "
                             "--dtype float32")


def encoded_repeat(pipe, prompts: Sequence[str], call_kwargs: dict) -> Optional[str]:
    """Why two of ``prompts`` are one video (None when none are): the same in every token the pipeline's tokenizers
    encode (the one ``max_sequence_length`` applies to, the last of ``tokenizer_3``, ``tokenizer_2``,
    ``tokenizer``, cuts there; the others at their ``model_max_length``), so they sat on both sides of the
    validation split and the search counted one video twice, without a word (tiny-shapes encodes 15 tokens)."""
    import inspect

    names = [n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if callable(getattr(pipe, n, None))]
    params = inspect.signature(pipe.__call__).parameters
    length = call_kwargs.get("max_sequence_length", getattr(params.get("max_sequence_length"), "default", None))
    if not names or not isinstance(length, int) or isinstance(length, bool) or "max_sequence_length" not in params:
        return None
    seen = {}
    for prompt in prompts:
        key = []
        for name in names:
            tokenizer = getattr(pipe, name)
            cut = length if name == names[-1] else getattr(tokenizer, "model_max_length", None)
            try:
                ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
                special = int(tokenizer.num_special_tokens_to_add())
            except Exception:  # (a tokenizer of another kind: nothing known)
                return None
            key.append(tuple(ids[:max(0, cut - special)] if isinstance(cut, int) and cut < 1_000_000 else ids))
        if tuple(key) in seen:
            return (f"prompts {seen[tuple(key)]!r} and {prompt!r} are the same in their first {length - special} "
                    f"tokens, all that {type(pipe).__name__} encodes (max_sequence_length {length}): they are one "
                    "video, and each prompt must be given once; make them differ earlier, or raise "
                    "--max-sequence-length")
        seen[tuple(key)] = prompt
    return None


def call_as_run(call_kwargs: dict, videos: Sequence[np.ndarray], log: Optional[Callable[[str], object]] = None) -> dict:
    """``call_kwargs`` with the frame count the pipeline made (``videos``' ``[F, H, W, 3]``) where it differs from the
    asked one: Diffusers' Wan pipelines round ``num_frames`` to ``4k+1`` (``--frames 2`` runs 1 frame), as generate
    lets them. Before, a plan's ``provenance.call`` claimed the asked count, which never ran."""
    asked = call_kwargs.get("num_frames")
    ran = int(np.shape(videos[0])[0]) if videos and np.ndim(videos[0]) == 4 else None
    if asked is None or ran is None or ran == asked or abs(ran - asked) >= 8:  # (past a VAE's rounding: a pipeline
        return call_kwargs  # whose output is not num_frames frames, a FramePack's sections: its own count stays)
    if log is not None:
        log(f"note: --frames {asked}: the pipeline made {ran} frames (it rounds the count to one its VAE takes); "
            f"the plan records {ran}, pass --frames {ran} to run at its size")
    return {**call_kwargs, "num_frames": ran}
