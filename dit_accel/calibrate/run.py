"""``calibrate``: capture, score, search, verify, write (the steps of ``dit-accel calibrate``)."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._util import format_time, is_bool
from ..methods import Dense
from ..plans.model_config import model_config
from ..plans.plan_json import stamp_quality
from ..plans.sparse_plan import SparsePlan, prompts_hash
from .budget import (_GROUNDTRUTH_CHECKS, VerifiedRuns, _describe, groundtruth_close, groundtruth_kept,
                     groundtruth_scores, passes_budget, search_budget, warmup_search)
from .candidates import sparse_candidates
from .costs import CostModel, MeasuredCostModel
from .generation import call_as_run, check_steps_run, encoded_repeat, generate_videos, takes_one_prompt
from .generation import step_timesteps as _step_timesteps
from .probes import probe_layer_weights, probe_step_weights
from .replay import DenseReplay, PassCounter, dense_prefix, pipeline_transformers
from .report import (OUTPUT_FILES, check_outputs, recover_outputs, under_home,  # noqa: F401  (importable here)
                     write_outputs)
from .sampling import QKVSampler, step_buckets
from .scoring import score_candidates
from .search import Assignment, SearchSpace, UniformAssignment, uniform_options
from .settings import (BUDGET_RULES, COST_TERMS, GROUNDTRUTH_MODELS, GROUNDTRUTH_RULES,  # noqa: F401  (also from here)
                       MIN_VIDEOS, SENSITIVITY, CalibrationSettings, add_quality_options, check_step_borders)

__all__ = ["CalibrationSettings", "calibrate", "generate_videos", "search_budget", "passes_budget", "BUDGET_RULES",
           "GROUNDTRUTH_RULES", "groundtruth_kept", "probe_step_weights", "probe_layer_weights",
           "SENSITIVITY", "split_jobs", "groundtruth_close", "groundtruth_scores",
           "add_quality_options"]


class _Progress:
    """One progress bar for the whole calibration (stderr), its description naming the stage."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="step", dynamic_ncols=True, leave=True)

    def stage(self, name: str, units: int) -> None:
        if self.bar is not None:
            self.bar.set_description(name)
            self.bar.total += units
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _psnr(video, ref) -> float:
    """Mean per-frame PSNR of one video against its reference."""
    from ..eval.metrics import psnr_per_frame

    return float(psnr_per_frame(video, ref).mean())


def _psnr_ssim(videos, refs, per_video: bool = False):
    """Mean PSNR and SSIM of ``videos`` against ``refs`` (and the PSNR of each video with ``per_video``)."""
    from ..eval.metrics import ssim_per_frame

    psnr = [_psnr(v, r) for v, r in zip(videos, refs)]
    ssim = [float(ssim_per_frame(v, r).mean()) for v, r in zip(videos, refs)]
    if per_video:
        return float(np.mean(psnr)), float(np.mean(ssim)), psnr
    return float(np.mean(psnr)), float(np.mean(ssim))


def split_jobs(prompts: Sequence[str], seeds: Sequence[int], validate: Optional[int] = None,
               extend_seeds: bool = True) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]], List[str]]:
    """``(search jobs, validation jobs, notes)``: the (prompt, seed) videos the search runs on, and those the
    chosen plan is verified on before it is written, which share no prompt with the search set.

    ``validate``: validation prompts (None: a third of the prompts, at least 2; 0: no validation set). They are
    spread evenly over the list, so a list ordered by colour or shape gives both sets some of each. With
    too few prompts to spare them (fewer than ``validate + 1``) the validation set is every prompt on new seeds.
    ``extend_seeds``: when the search set has fewer than :data:`MIN_VIDEOS` videos, seeds are added (up to 4
    per prompt; the validation prompts get the same seeds), since a plan searched on a few videos overfits them.
    """
    prompts, seeds, notes = list(prompts), list(seeds), []
    n = len(prompts)
    if validate == 0:
        notes.append("--validate 0: no validation set; the plan is checked on the prompts it was searched on only")
        return [(p, s) for s in seeds for p in prompts], [], notes
    if validate is None:
        validate = max(2, round(n / 3))
    if validate < n:
        held = sorted({min(n - 1, int((i + 0.5) * n / validate)) for i in range(validate)})
        search_prompts = [p for i, p in enumerate(prompts) if i not in held]
        val_prompts = [prompts[i] for i in held]
        if extend_seeds and len(search_prompts) * len(seeds) < MIN_VIDEOS:
            want = min(4, math.ceil(MIN_VIDEOS / len(search_prompts)))
            added = [max(seeds) + 1 + i for i in range(max(0, want - len(seeds)))]
            if added:
                notes.append(f"{len(search_prompts)} search prompt(s) x {len(seeds)} seed(s) are few: added seeds "
                             f"{','.join(map(str, added))} (each prompt {len(seeds) + len(added)} times)")
                seeds = seeds + added
        notes.append(f"validation set: {len(val_prompts)} of {n} prompts held out of the search "
                     f"(--validate {validate}), x {len(seeds)} seed(s)")
        return ([(p, s) for s in seeds for p in search_prompts], [(p, s) for s in seeds for p in val_prompts],
                notes)
    search = [(p, s) for s in seeds for p in prompts]
    if extend_seeds and len(search) < MIN_VIDEOS:
        added = [max(seeds) + 1 + i for i in range(min(4, math.ceil(MIN_VIDEOS / n)) - len(seeds))]
        if added:
            notes.append(f"{n} prompt(s) x {len(seeds)} seed(s) are few: added seeds {','.join(map(str, added))}")
            seeds = seeds + added
            search = [(p, s) for s in seeds for p in prompts]
    val_seeds = [max(seeds) + 1 + i for i in range(max(1, math.ceil(validate / n)))]
    notes.append(f"{n} prompt(s) cannot spare {validate} for validation: the validation set is every prompt on new "
                 f"seeds {','.join(map(str, val_seeds))}")
    return search, [(p, s) for s in val_seeds for p in prompts], notes


def _hardest_first(pipe, jobs, dense_videos, order: Sequence[int], call_kwargs: dict, settings, bar,
                   stop_below: Optional[float], replay: Optional[DenseReplay] = None
                   ) -> Tuple[List[Optional[np.ndarray]], bool]:
    """The videos of ``jobs`` under the applied plan (``[video or None]`` in job order) and whether the run
    stopped early: with ``stop_below`` (a worst-video budget) the hardest quarter of the videos (``order``:
    the worst first, as the last complete verified run ranked them) goes first, and a video under the budget
    ends the run there, since the plan has then failed whatever the other videos give."""
    made: List[Optional[np.ndarray]] = [None] * len(jobs)
    first = max(1, math.ceil(len(jobs) / 4)) if stop_below is not None else len(jobs)
    head, rest = list(order[:first]), list(order[first:])
    for part in (head, rest):
        if not part:
            continue
        videos = generate_videos(pipe, [jobs[i] for i in part], call_kwargs, settings.batch_size, bar.update,
                                 replay=replay)
        for i, video in zip(part, videos):
            made[i] = video
        if (part is head and rest and stop_below is not None
                and min(_psnr(made[i], dense_videos[i]) for i in head) < stop_below):
            return made, True
    return made, False


def _validate(pipe, settings: CalibrationSettings, space: SearchSpace, verify, best: dict, trace: List[dict],
              val_jobs, call_kwargs: dict, bar, log, *, calls_per_step: int = 1, layers: int = 0
              ) -> Tuple[dict, dict]:
    """The plan to write and the validation record: ``best`` if it meets the budget on the validation videos
    (``min_psnr`` under ``settings.budget_on``, the search's rule: on the worst one, or on their mean; on tiny-shapes
    ground truth no worse than dense's beyond chance:
    :func:`groundtruth_close`), else the
    next denser plan that passed the search, validated in order of cost (``--search warmup``: first the chosen
    candidate one dense step longer at a time, :func:`_longer_warmups`), else the dense plan (exact).

    With ``settings.baseline`` the record also holds ``baseline``: uniform SLA at no less modelled cost than the
    written plan (:func:`~.search.uniform_options` over the SLA candidates: of each candidate's warm-up nearest
    the plan's cost from above, the nearest) on the same validation videos: what the calibration bought over
    the simplest alternative given at least the same budget, on videos neither was chosen on."""
    import dit_accel

    chunks = math.ceil(len(val_jobs) / settings.batch_size)
    bar.stage("validation: dense", chunks * settings.steps)
    replay = _new_replay(pipe, settings) if layers else None  # layers: the model's attention layers
    t = time.perf_counter()
    with dit_accel.apply(pipe, Dense(), backend=settings.backend), \
            replay.recording(pipeline_transformers(pipe), len(val_jobs)) if replay else contextlib.nullcontext():
        dense_videos = generate_videos(pipe, val_jobs, call_kwargs, settings.batch_size, bar.update, replay=replay)
    dense_per_video = (time.perf_counter() - t) / len(val_jobs)

    def generate(plan: SparsePlan):
        replayed, dense_steps = _replayed(pipe, replay, plan, layers, settings.steps)
        with dit_accel.apply(pipe, plan, backend=settings.backend), replayed:
            return generate_videos(pipe, val_jobs, call_kwargs, settings.batch_size, bar.update,
                                   replay=replay if dense_steps else None)
    prompts = [p for p, _ in val_jobs]
    dense_gt = groundtruth_scores(dense_videos, prompts) if settings.scores_groundtruth() else None
    tried = []
    checked: Dict[int, dict] = {}

    def check(record: dict) -> dict:
        bar.stage(f"validating plan {len(tried) + 1}", chunks * settings.steps)
        videos = generate(record["assignment"].to_plan({}))
        psnr, ssim, per_video = _psnr_ssim(videos, dense_videos, per_video=True)
        out = {"lam": record["lam"], "label": record.get("label"), "modelled_ms": record["modelled_ms"], "psnr": psnr,
               "psnr_worst": min(per_video), "psnr_videos": per_video, "ssim": ssim,
               "search": {"psnr": record["psnr"], "psnr_worst": record["psnr_worst"]}}
        checked[id(record)] = out
        ok = passes_budget(per_video, settings.min_psnr, settings.budget_on)
        if dense_gt is not None:
            out["groundtruth"] = groundtruth_scores(videos, prompts)
            out["groundtruth_ok"] = groundtruth_close(out["groundtruth"], dense_gt)
            ok = ok and out["groundtruth_ok"]
        out["passes"] = ok
        tried.append(out)
        return out

    chosen = best
    if not math.isinf(best["lam"]) and not check(best)["passes"]:
        chosen = _fall_back(best, settings, space, verify, trace, check)
        log(f"note: the plan chosen on the search videos failed on the validation videos "
            f"(mean {tried[0]['psnr']:.2f} dB, worst {tried[0]['psnr_worst']:.2f}" + ("" if dense_gt is None else
                                                        f", ground truth kept: {tried[0]['groundtruth_ok']}") +
            "); falling back to the next denser plan: "
            + ("the dense plan (exact)" if math.isinf(chosen["lam"]) else
               f"{format_time(chosen['modelled_ms'] / 1e3, '/sample')} "
               f"{f'timed on {settings.device}' if settings.costs == 'measured' else 'modelled'}, validation videos "
               f"{tried[-1]['psnr']:.2f} dB "
               f"(worst {tried[-1]['psnr_worst']:.2f})"))
    record = {"videos": len(val_jobs), "prompts": sorted({p for p, _ in val_jobs}), "seeds": sorted({s for _, s in val_jobs}),
              "dense_groundtruth": dense_gt, "tried": tried, "fell_back": chosen is not best,
              "dense_seconds_per_video": dense_per_video,
              "final": checked.get(id(chosen)), "baseline": None}
    if settings.baseline and space is not None and space.sla:
        record["baseline"] = _baseline(space, chosen, calls_per_step, generate, dense_videos,
                                       lambda videos: None if dense_gt is None else groundtruth_scores(videos, prompts),
                                       lambda: bar.stage("validation: uniform SLA baseline", chunks * settings.steps))
    return chosen, record


def _fall_back(best: dict, settings: CalibrationSettings, space: SearchSpace, verify, trace: List[dict], check) -> dict:
    """The plan written when ``best`` failed validation: the first denser plan of the search that passes
    ``check`` (``--search warmup``: first ``best`` one dense step longer at a time), in order of cost, each
    content checked once; else the dense plan (exact)."""
    denser = sorted((r for r in trace if r.get("passes") and r["modelled_ms"] > best["modelled_ms"]
                     and not math.isinf(r["lam"])), key=lambda r: r["modelled_ms"])
    if settings.search == "warmup":  # one more dense step at a time first
        denser = itertools.chain(_longer_warmups(best, settings, verify, trace), denser)

    def content(record: dict) -> str:
        return record["assignment"].to_plan({}).content_hash()

    seen = {content(best)}
    for record in denser:
        if content(record) in seen:
            continue
        seen.add(content(record))
        if check(record)["passes"]:
            return record
    dense = verify(space.assign(math.inf), math.inf)
    dense["passes"] = True
    return dense


def _baseline(space: SearchSpace, chosen: dict, calls_per_step: int, generate, dense_videos, groundtruth, stage):
    """The uniform SLA baseline of the validation record (None when no option costs as much as ``chosen``):
    of the options at no less modelled cost, the nearest (the least predicted error on a tie), its videos
    scored against ``dense_videos``."""
    options = uniform_options(space, chosen["modelled_ms"], calls_per_step, len(space.sla), kinds=("sla",),
                              side="above")
    if not options:
        return None
    option = min(options, key=lambda o: (o.cost_per_sample(calls_per_step), o.predicted_error()))
    stage()
    videos = generate(option.to_plan({}))
    psnr, ssim, per_video = _psnr_ssim(videos, dense_videos, per_video=True)
    return {"label": _describe(option, math.nan), "method": option.method(0, 0).to_dict(), "dense_steps": option.warmup,
            "modelled_ms": option.cost_per_sample(calls_per_step) * 1e3, "psnr": psnr, "psnr_worst": min(per_video),
            "ssim": ssim, "groundtruth": groundtruth(videos)}


def _longer_warmups(best: dict, settings: CalibrationSettings, verify, trace: List[dict]):
    """The records of the chosen plan's candidate at each longer warm-up that pass on the search videos, shortest
    first, each verified there (and added to ``trace``) only when reached: ``--search warmup``'s bisection verified
    only the warm-ups it visited, and a plan that fails validation should fall back one dense step at a time."""
    chosen: UniformAssignment = best["assignment"]
    run = VerifiedRuns(verify, settings.min_psnr, settings.budget_on, trace)
    for warmup in range(chosen.warmup + 1, chosen.steps):
        record = run(UniformAssignment(chosen.space, chosen.candidate, warmup), math.nan)
        if record["passes"]:
            yield record


def _quality_record(best: dict, search_videos: int, validation: Optional[dict], assignment: Assignment,
                    calls_per_step: int, priced: str = "modelled") -> dict:
    """What a plan's provenance says of its quality (``generate`` prints it): the search and validation figures
    against dense, the uniform SLA baseline at no less modelled cost on the validation videos, and the modelled
    attention time of the plan and of dense (``priced``: ``"modelled"``, the GPU cost model, or ``"timed on
    DEVICE"``, ``--costs measured``; the ``*_modelled_ms`` keys hold either)."""
    def figures(record: Optional[dict], videos: int) -> Optional[dict]:
        if record is None:
            return None
        return {"videos": videos, "psnr": record["psnr"], "psnr_worst": record["psnr_worst"],
                "groundtruth": record.get("groundtruth")}

    out = {"plan": best.get("label"), "modelled_ms": assignment.cost_per_sample(calls_per_step) * 1e3,
           "dense_modelled_ms": assignment.dense_cost_per_sample(calls_per_step) * 1e3,
           "priced": priced, "search": figures(best, search_videos)}
    if validation is not None:
        out["validation"] = figures(validation.get("final"), validation["videos"])
        out["validation_prompts"] = validation["prompts"]
        base = validation.get("baseline")
        if base is not None:
            out["baseline"] = {k: base[k] for k in ("label", "method", "dense_steps", "modelled_ms", "psnr",
                                                    "psnr_worst", "groundtruth")}
    return out


def _attention_ms(handle) -> Optional[float]:
    times = [r["time_ms"] for r in handle.stats() if r.get("time_ms") is not None]
    return float(sum(times)) if times else None


def _new_replay(pipe, settings: CalibrationSettings) -> Optional[DenseReplay]:
    """A :class:`~.replay.DenseReplay` for a dense run of ``pipe``; None with ``replay_mb`` 0 or no transformer."""
    if not settings.replay_mb or not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        return None
    return DenseReplay(int(settings.replay_mb * 2**20))


def _replayed(pipe, replay: Optional[DenseReplay], plan: SparsePlan, layers: int, steps: int):
    """``(context, dense steps)``: around a generation under ``plan``, the context gives back the dense run's
    transformer outputs for the plan's leading dense steps (:mod:`.replay`); a null context where there are none
    or nothing was recorded."""
    per_step = None if replay is None or not replay.enabled else replay.calls_per_step(steps)
    # Only the steps kept for every video are read (before: the plan's whole dense prefix was counted as read, and
    # its dense-run time added to the measured time of steps computed again, under a small --replay-mb).
    dense_steps = min(dense_prefix(plan, steps, layers), replay.kept_calls() // per_step) if per_step else 0
    if not dense_steps:
        return contextlib.nullcontext(), 0
    return replay.replaying(pipeline_transformers(pipe), dense_steps * per_step), dense_steps


def search_space(candidates, errors, grid, head_dim: int, layers: int, buckets, heads: int,
                 settings: CalibrationSettings) -> Tuple[SearchSpace, Optional[str]]:
    """The search space priced by ``settings.cost_terms``, and a note when ``auto`` chose for the user.

    ``auto``: the full modelled GPU time (per call, per CTA, per tile), unless under it no assignment is
    cheaper than dense even with error free (on small grids the per-call and per-CTA terms outweigh any
    tile saved: tiny-shapes' 576 tokens): the full model then answers "dense" whatever the budget, so the
    search prices the visited tiles only (the work that grows with the grid, and what sparsity removes at
    the sizes it is for), and says so.
    """
    def build(terms: str) -> SearchSpace:
        costs = CostModel(grid, head_dim, arch=settings.arch, kernel=settings.kernel, terms=terms)
        block = [c for c in candidates if c.kind == "block_sparse"]
        full = costs.full_head(block[0].method.plan(grid)) if block else costs.dense_head()
        return SearchSpace(candidates, errors, costs, layers, buckets, heads, full)

    if settings.costs == "measured":
        costs = MeasuredCostModel(grid, head_dim, candidates, heads, device=settings.device,
                                  dtype=getattr(torch, settings.dtype), backend=settings.backend)
        space = SearchSpace(candidates, errors, costs, layers, buckets, heads, costs.dense_head())
        return space, None if space.sparse_pays() else costs.dense_wins_note(settings.backend)
    if settings.cost_terms != "auto":
        return build(settings.cost_terms), None
    space = build("full")
    if space.sparse_pays():
        return space, None
    note = (f"--cost-terms auto: at token grid {tuple(grid)} ({math.prod(grid)} tokens) the full modelled GPU time "
            f"({space.costs.constants.name}) makes dense attention cheaper than every sparse candidate, so it would "
            "give a dense plan whatever the budget; the search prices visited tiles only (--cost-terms tiles), the "
            "work sparsity removes at larger grids. Pass --cost-terms full for the full model's answer.")
    return build("tiles"), note


def _fill_model_defaults(settings: CalibrationSettings) -> None:
    """The model's suggested size and steps for every setting the user left unset (tiny models only)."""
    from ..models.tiny import TINY_DEFAULTS

    suggested = TINY_DEFAULTS.get(settings.model, {})  # the shapes models' defaults included
    for key, name in (("num_frames", "frames"), ("height", "height"), ("width", "width"),
                      ("num_inference_steps", "steps"), ("guidance_scale", "guidance_scale"),
                      ("max_sequence_length", "max_sequence_length")):
        if getattr(settings, name) is None and key in suggested:
            setattr(settings, name, suggested[key])
    if settings.steps is None:
        raise ValueError("--steps is needed for this model (the denoising steps the plan is calibrated for)")
    check_step_borders(settings)


def _calibration_jobs(settings: CalibrationSettings, log) -> Tuple[list, list]:
    """The search videos and the held-out validation videos, ``(prompt, seed)`` each, with their notes logged."""
    jobs, val_jobs, split_notes = split_jobs(settings.prompts, settings.seeds, settings.validate,
                                             settings.extend_seeds)
    for note in split_notes:
        log(f"note: {note}")
    if len(jobs) < MIN_VIDEOS:
        log(f"note: {len(jobs)} calibration video(s) (prompts x seeds); with fewer than {MIN_VIDEOS} the cheapest plan "
            "that passes on them tends to fail on new prompts (on tiny-shapes, 4 videos searched without validation "
            "or uniform plans gave a plan 2.9 dB below the best uniform method at its cost on held-out prompts, 8 "
            "videos one 0.9 dB above it: BENCHMARKS.md section 11); pass more prompts or --seeds")
    return jobs, val_jobs


@dataclass
class _DenseRun:
    """What the sampled dense run of step 1 leaves: the q/k/v sample, the videos every plan is compared with,
    and the model's shape."""

    sampler: QKVSampler
    buckets: list
    layers: int
    videos: list
    attention_ms: Optional[float]
    transformer: object
    timesteps: list
    replay: Optional[DenseReplay]  # the dense run's transformer outputs (None: --replay-mb 0)
    heads: int
    head_dim: int
    grid: tuple
    passes_per_step: Optional[int] = None  # transformer passes per video and step, as counted (None: not known)


def _dense_run(pipe, settings: CalibrationSettings, jobs, call_kwargs: dict, bar) -> _DenseRun:
    """Step 1: the dense model once on the search videos, sampling q/k/v per (layer, step bucket) (``--search
    warmup`` scores nothing, so it keeps no sample unless ``--capture-dir`` asks for them on disk)."""
    import dit_accel

    chunks = math.ceil(len(jobs) / settings.batch_size)
    buckets = step_buckets(settings.steps, settings.phases, settings.warmup, settings.cooldown)
    keep = settings.search != "warmup" or settings.capture_dir is not None
    sampler = QKVSampler(buckets, per_bucket=settings.samples_per_bucket,
                         max_bytes=int(settings.max_sample_mb * 2**20) if keep else 0, folder=settings.capture_dir)
    bar.stage("dense run (sampling q/k/v)" if keep else "dense run", chunks * settings.steps)
    replay = _new_replay(pipe, settings)
    handle = dit_accel.apply(pipe, Dense(), capture=sampler, timing=True, backend=settings.backend)
    passes = PassCounter()
    try:
        # A plan applies to each transformer of the pipeline by layer index (Wan 2.2's two experts: 2 x 40 layers,
        # a plan of 40); before, the layers of every transformer were counted into one plan, which apply() refused
        # at the first verified plan ("the plan is for 80 attention layers; this model has 40").
        layers = len(handle.layers) // max(1, len(handle.transformers))
        sampler.set_layers(layers)
        with replay.recording(pipeline_transformers(pipe), len(jobs)) if replay else contextlib.nullcontext(), \
                passes.counting(handle.transformers):
            dense_videos = generate_videos(pipe, jobs, call_kwargs, settings.batch_size, bar.update, replay=replay,
                                           reference=True, after_call=lambda: check_steps_run(pipe, settings.steps))
        dense_ms = _attention_ms(handle)
        transformer = handle.transformer
        timesteps = _step_timesteps(pipe.scheduler)
    finally:
        handle.remove()
    if sampler.grid is None:
        raise ValueError(f"{settings.model}: no self-attention call was sampled; is it a supported video/image DiT?")
    if len(handle.transformers) > 1 and sampler.layers_seen * len(handle.transformers) != len(handle.layers):
        raise ValueError(f"{settings.model}: its {len(handle.transformers)} transformers have different numbers of "
                         f"attention layers ({len(handle.layers)} in all), and a plan names layers by their index in "
                         "each: calibrate cannot make one plan for them; run it with a method config instead")
    return _DenseRun(sampler, buckets, layers, dense_videos, dense_ms, transformer, timesteps, replay,
                     heads=sampler.heads, head_dim=sampler.head_dim, grid=sampler.grid,
                     passes_per_step=passes.per_step(len(jobs), settings.steps))


class _Verifier:
    """Step 4 as the search calls it: ``verifier(assignment, lam)`` runs a plan end to end on the search videos
    (the hardest first, stopping at the first one under a worst-video budget) and returns its record. A plan
    reached twice (the same content hash) runs once."""

    def __init__(self, pipe, settings: CalibrationSettings, jobs, dense: _DenseRun, call_kwargs: dict, bar,
                 calls_per_step: int):
        self.pipe, self.settings, self.jobs, self.dense_videos = pipe, settings, jobs, dense.videos
        self.dense = dense
        self.call_kwargs, self.bar, self.calls_per_step = call_kwargs, bar, calls_per_step
        self.verified: Dict[tuple, dict] = {}
        self.hardest: List[int] = list(range(len(jobs)))  # video order, worst first after a complete verified run
        self.early = settings.min_psnr is not None and settings.budget_on == "worst" and len(jobs) > 1
        self.score_groundtruth = None
        self.dense_groundtruth = None
        if settings.scores_groundtruth():
            from ..eval.groundtruth import score_many

            def score_groundtruth(videos, prompts=None):
                return score_many(videos, prompts if prompts is not None else [p for p, _ in jobs])

            self.score_groundtruth = score_groundtruth
            self.dense_groundtruth = score_groundtruth(dense.videos)

    def __call__(self, assignment: Assignment, lam: float) -> dict:
        plan = assignment.to_plan({})
        key = plan.content_hash()  # the same plan reached another way (a uniform option) is not rerun
        if key not in self.verified:
            self.verified[key] = self._run(plan, assignment, lam)
            repeat = None
        else:
            repeat = self.verified[key]["first_label"]
        return dict(self.verified[key], lam=lam, assignment=assignment, label=_describe(assignment, lam),
                    repeat_of=repeat, modelled_ms=assignment.cost_per_sample(self.calls_per_step) * 1e3)

    def _run(self, plan: SparsePlan, assignment: Assignment, lam: float) -> dict:
        import dit_accel

        settings, jobs, dense_videos = self.settings, self.jobs, self.dense_videos
        chunks = math.ceil(len(jobs) / settings.batch_size)
        self.bar.stage(f"verifying plan {len(self.verified) + 1}", chunks * settings.steps)
        replayed, dense_steps = _replayed(self.pipe, self.dense.replay, plan, self.dense.layers, settings.steps)
        with dit_accel.apply(self.pipe, plan, timing=True, backend=settings.backend) as h, replayed:
            made, stopped = _hardest_first(self.pipe, jobs, dense_videos, self.hardest, self.call_kwargs, settings,
                                           self.bar, stop_below=settings.min_psnr if self.early else None,
                                           replay=self.dense.replay if dense_steps else None)
            measured = None if stopped else _attention_ms(h)
        if measured is not None and dense_steps:  # the replayed steps' attention, as the dense run timed it
            measured += (self.dense.attention_ms or 0.0) * dense_steps / settings.steps
        done = [i for i in range(len(jobs)) if made[i] is not None]
        psnr, ssim, psnr_done = _psnr_ssim([made[i] for i in done], [dense_videos[i] for i in done], per_video=True)
        per_video: List[Optional[float]] = [None] * len(jobs)
        for i, value in zip(done, psnr_done):
            per_video[i] = value
        record = {"psnr": psnr, "ssim": ssim, "psnr_videos": per_video,
                  "psnr_worst": min(per_video[i] for i in done), "attention_ms": measured,
                  "videos": made, "stopped_early": stopped, "videos_made": len(done), "replayed_steps": dense_steps,
                  "first_label": _describe(assignment, lam)}
        if not stopped:
            self.hardest[:] = sorted(range(len(jobs)), key=lambda i: per_video[i])
        if self.score_groundtruth is not None:
            gt = self.score_groundtruth([made[i] for i in done], [jobs[i][0] for i in done])
            record["groundtruth"] = gt
            if settings.gates_groundtruth():
                record["groundtruth_ok"] = groundtruth_kept(gt, self.dense_groundtruth)
        return record


def _probe_sensitivity(pipe, settings: CalibrationSettings, space: SearchSpace, jobs, dense: _DenseRun,
                       call_kwargs: dict, bar) -> Tuple[Optional[List[float]], Optional[List[float]]]:
    """Step 3a (``--sensitivity probe``): the step and layer weights of :mod:`.probes`, set on ``space`` too."""
    import dit_accel

    # The probes measure a ratio (output error per unit of attention error), averaged over the videos:
    # a few videos, one per prompt first (jobs are seed-major), measure it as well as all of them.
    probe_jobs = jobs[:settings.probe_videos]
    reference = np.stack([v.astype(np.float32) / 255.0 for v in dense.videos[:len(probe_jobs)]])
    probes_run: List[float] = []

    def probe(plan: SparsePlan) -> float:
        bar.stage(f"sensitivity probe {len(probes_run) + 1}",
                  math.ceil(len(probe_jobs) / settings.batch_size) * settings.steps)
        replayed, dense_steps = _replayed(pipe, dense.replay, plan, dense.layers, settings.steps)
        with dit_accel.apply(pipe, plan, backend=settings.backend), replayed:
            videos = generate_videos(pipe, probe_jobs, call_kwargs, settings.batch_size, bar.update,
                                     replay=dense.replay if dense_steps else None)
        mse = float(np.mean((np.stack([v.astype(np.float32) / 255.0 for v in videos]) - reference) ** 2))
        probes_run.append(mse)
        return mse

    layer_weights = None
    step_weights = probe_step_weights(space, probe)
    space.bucket_weights = step_weights
    if settings.layer_groups:
        layer_weights = probe_layer_weights(space, probe, settings.layer_groups)
        space.layer_weights = layer_weights
    return step_weights, layer_weights


def _budget_and_objective(settings: CalibrationSettings, costs) -> Tuple[dict, str]:
    """The budget and the objective as the plan's provenance and the report state them."""
    budget = {k: v for k, v in (("min_psnr", settings.min_psnr), ("max_layer_error", settings.max_layer_error))
              if v is not None}
    if settings.min_psnr is not None:
        budget["min_psnr_on"] = "every calibration video" if settings.budget_on == "worst" else "the mean"
    if settings.gates_groundtruth():
        budget["groundtruth"] = "no check (" + ", ".join(_GROUNDTRUTH_CHECKS) + ") worse than dense's"
    priced = (f"measured attention time (on {settings.device})" if settings.costs == "measured" else
              f"modelled attention time ({costs.constants.name}, terms={costs.terms})")
    how = ("per-(layer, bucket) Lagrangian allocation of the squared relative attention error"
           if settings.search == "allocation" else
           "a dense warm-up then one candidate on every head, the warm-up bisected per candidate on verified runs, "
           "its last dense step bridged by a wider candidate where one passes")
    objective = f"least {priced} per generation, {how}"
    return budget, objective


def _result(settings: CalibrationSettings, out, dense: _DenseRun, space: SearchSpace, terms_note, candidates,
            best: dict, trace: List[dict], plan: SparsePlan, budget: dict, objective: str, groundtruth,
            validation, jobs, weights, calls_per_step: int) -> dict:
    """What ``calibration.json`` holds (``seconds`` and ``cost_vs_dense`` are added when the run ends)."""
    costs, assignment = space.costs, best["assignment"]
    sampler = dense.sampler
    step_weights, layer_weights = weights
    return {
        "settings": {**asdict(settings), "heads": dense.heads, "layers": dense.layers, "grid": list(dense.grid),
                     "passes_per_step": calls_per_step},
        "plan_path": str(out), "plan_summary": {"phases": len(plan.phases), "lines": plan.summary()},
        "budget": budget or "none", "objective": objective, "cost_model": costs.describe(),
        "cost_terms_note": terms_note,
        "candidates": [{"label": c.label, "kind": c.kind, "density": c.density,
                        "head_cost_us": costs.head(c) * 1e6} for c in candidates],
        "buckets": [list(b) for b in dense.buckets],
        "step_weights": step_weights, "layer_weights": layer_weights,
        "samples": {"steps": sorted(sampler.steps), "rows": sampler.rows, "per_bucket": sampler.per_bucket,
                    "megabytes": round(sampler.bytes / 2**20, 1)},
        "dense": {"attention_ms": dense.attention_ms,
                  "modelled_ms": assignment.dense_cost_per_sample(calls_per_step) * 1e3},
        "final": {"psnr": best["psnr"], "psnr_worst": best["psnr_worst"], "psnr_videos": best["psnr_videos"],
                  "ssim": best["ssim"], "attention_ms": best["attention_ms"],
                  "modelled_ms": best["modelled_ms"], "lam": best["lam"], "warmup_steps": assignment.warmup_steps(),
                  "max_layer_error": assignment.max_layer_error()},
        "trace": [{"lam": r["lam"], "plan": r.get("label"), "modelled_ms": r["modelled_ms"], "psnr": r["psnr"],
                   "psnr_worst": r["psnr_worst"], "groundtruth": r.get("groundtruth"), "passes": r["passes"],
                   "videos_made": r.get("videos_made"), "stopped_early": r.get("stopped_early", False),
                   "replayed_steps": r.get("replayed_steps", 0),
                   "repeat_of": r.get("repeat_of")}
                  for r in trace],
        "chosen": best.get("label"),
        "phase_tables": assignment.phase_tables(), "groundtruth": groundtruth, "validation": validation,
        "search_videos": len(jobs), "search_seeds": _search_seeds(jobs),
        "prompts_sha256": prompts_hash(settings.prompts),
    }


def _search_seeds(jobs) -> List[int]:
    """The seeds the search videos ran on, in order: the given ones and those :func:`split_jobs` added (before,
    a plan's provenance named the given seeds only: ``[0]`` for a search on seeds 0-3)."""
    return list(dict.fromkeys(s for _, s in jobs))


def _add_seconds(result: dict, seconds: Dict[str, float], validation: Optional[dict], videos: int) -> None:
    """The time each step took, and (with validation, which times a dense video) the whole run's cost in dense
    generations."""
    result["seconds"] = seconds
    dense_per_video = (validation or {}).get("dense_seconds_per_video")
    if dense_per_video:
        result["cost_vs_dense"] = {"dense_generation_s": dense_per_video * videos, "videos": videos,
                                   "ratio": seconds["total"] / (dense_per_video * videos),
                                   "per_video_ratio": seconds["total"] / dense_per_video}


def _search(pipe, settings: CalibrationSettings, space: SearchSpace, verify, jobs, dense, call_kwargs: dict, bar,
            seconds: Dict[str, float]):
    """``(best, trace, sensitivity weights)`` of the search over plans verified end to end: ``--search warmup``'s,
    or the allocation search under the budget (after the sensitivity probes, timed into ``seconds``, with
    ``--sensitivity probe``)."""
    calls_per_step = verify.calls_per_step
    if settings.search == "warmup":
        best, trace = warmup_search(space, verify, min_psnr=settings.min_psnr, rule=settings.budget_on,
                                    calls_per_step=calls_per_step)
        return best, trace, (None, None)
    weights = (None, None)
    if settings.sensitivity == "probe":
        t_probe = time.perf_counter()
        weights = _probe_sensitivity(pipe, settings, space, jobs, dense, call_kwargs, bar)
        seconds["sensitivity probes"] = time.perf_counter() - t_probe
    best, trace = search_budget(space, verify, min_psnr=settings.min_psnr, max_layer_error=settings.max_layer_error,
                                rule=settings.budget_on, iters=settings.search_iters,
                                uniform=settings.uniform_options, calls_per_step=calls_per_step)
    return best, trace, weights


def _checked_call(settings, log, progress=True) -> Callable[[str], None]:
    """:func:`calibrate`'s ``settings``, ``log`` and ``progress`` checked before anything loads; the log to write
    notes to."""
    if not is_bool(progress):  # (a string such as "no" is truthy: the bar was drawn, without a word)
        raise TypeError(f"progress={progress!r} is invalid: expected True or False (whether to draw a progress bar)")
    if not isinstance(settings, CalibrationSettings):  # (a dict: AttributeError 'dict' object has no attribute 'check')
        raise TypeError(f"settings must be a CalibrationSettings; got {type(settings).__name__}: build one, e.g. "
                        "CalibrationSettings('tiny-shapes', prompts, min_psnr=30)")
    if log is None:  # no notes wanted (before: TypeError 'NoneType' object is not callable, after the model loaded)
        return lambda message: None
    if not callable(log):
        raise TypeError(f"log={log!r} is invalid: a function taking one line of text (default print), or None for "
                        "no notes")
    return log


def _loaded(settings: CalibrationSettings, log):
    """``(pipeline, its call's keyword arguments, settings)`` of a calibration, checked against the loaded
    pipeline; a pipeline of one prompt per call gets settings of batch size 1 (a copy: the caller's stay)."""
    from ..models.loading import load_pipeline, rope_reach_error, text_length_error

    pipe = load_pipeline(settings.model, device=settings.device, dtype=getattr(torch, settings.dtype))
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = settings.call_kwargs(pipe)  # (those the pipeline takes: an image pipeline has no num_frames)
    if takes_one_prompt(pipe) and settings.batch_size > 1:
        log(f"note: {type(pipe).__name__} takes one prompt per call: --batch-size {settings.batch_size} becomes 1")
        settings = replace(settings, batch_size=1)
    problem = (rope_reach_error(pipe, call_kwargs) or text_length_error(pipe, call_kwargs.get("max_sequence_length"))
               or encoded_repeat(pipe, settings.prompts, call_kwargs))
    if problem:
        raise ValueError(problem)
    return pipe, call_kwargs, settings


def calibrate(settings: CalibrationSettings, out, *, report_dir=None, progress: bool = True,
              log: Optional[Callable[[str], None]] = print) -> dict:
    """Calibrate a :class:`~dit_accel.SparsePlan` for ``settings.model`` and write it to ``out``.

    1. runs the dense model once on the prompts x seeds, keeping a bounded sample of q/k/v per
       (layer, step bucket) in memory (:class:`~.sampling.QKVSampler`);
    2. scores every candidate (:func:`~.candidates.candidate_grid`) per layer, bucket and head against
       the dense attention output (:func:`~.scoring.score_candidates`);
    3. searches the plan of least modelled attention time (:mod:`dit_accel.kernels.cost`) under the
       budget (:class:`~.search.SearchSpace`; ``min_psnr`` by bisection on verified runs); with
       ``search="warmup"`` steps 2 and 3 are :func:`~.budget.warmup_search` instead (no scoring, no probes);
    4. verifies the plan end to end against dense with the same seeds (PSNR/SSIM, ground truth on
       tiny-shapes, measured and modelled attention time);
    5. validates it on the held-out videos of :func:`split_jobs` (:func:`_validate`: the next denser plan
       that passed the search when it misses the budget there);
    6. writes the plan, ``report.md``, ``heatmap.png`` and ``calibration.json`` as one unit
       (:func:`write_outputs`), after finishing or sweeping what a killed run left (:func:`recover_outputs`).

    ``log``: where the notes go, one line each (default ``print``; None: nowhere).
    Returns the result dict that ``calibration.json`` holds.
    """
    log = _checked_call(settings, log, progress)
    # (a copy: the model's defaults are filled in below, before into the caller's settings; ~ as save reads it)
    settings = replace(settings, capture_dir=under_home(settings.capture_dir))
    settings.check()
    # (before: a folder or a clash was found when the plan was written, at the end)
    check_outputs(out, report_dir, settings.capture_dir)
    out, report_dir = Path(under_home(out)), under_home(report_dir)
    report_dir = Path(report_dir) if report_dir is not None else out.with_name(out.stem + "_report")
    recover_outputs(out, report_dir)
    seconds: Dict[str, float] = {}
    t0 = time.perf_counter()
    _fill_model_defaults(settings)
    pipe, call_kwargs, settings = _loaded(settings, log)
    jobs, val_jobs = _calibration_jobs(settings, log)
    if settings.groundtruth_prompt_error():  # --groundtruth report: the PSNR budget alone, said
        log(f"note: ground truth not reported: {settings.groundtruth_prompt_error()}")
    bar = _Progress(progress)
    try:
        # 1. the dense run, sampled
        dense = _dense_run(pipe, settings, jobs, call_kwargs, bar)
        seconds["dense run"] = time.perf_counter() - t0
        # 2. candidates, scored
        t = time.perf_counter()
        candidates = sparse_candidates(dense.grid, size=settings.candidates, methods=settings.methods,
                                       tile=settings.tile, log=log)
        errors = {}  # --search warmup verifies whole plans only: nothing to score
        if settings.search == "allocation":
            bar.stage("scoring candidates", dense.layers * len(dense.buckets) * len(candidates))
            errors = score_candidates(dense.sampler, candidates, dense.layers, backend=settings.backend,
                                      progress=bar.update)
            seconds["scoring"] = time.perf_counter() - t
        # 3. the search, over plans verified end to end (4.)
        t = time.perf_counter()
        space, terms_note = search_space(candidates, errors, dense.grid, dense.head_dim, dense.layers, dense.buckets,
                                         dense.heads, settings)
        if terms_note:
            log(f"note: {terms_note}")
        calls_per_step = dense.passes_per_step or (2 if (settings.guidance_scale or 0) > 1 else 1)
        verify = _Verifier(pipe, settings, jobs, dense, call_kwargs, bar, calls_per_step)
        best, trace, weights = _search(pipe, settings, space, verify, jobs, dense, call_kwargs, bar, seconds)
        space.bound_note(settings.max_layer_error, log)  # (the layers no candidate fits under it: dense, said)
        seconds["search and verification"] = time.perf_counter() - t - seconds.get("sensitivity probes", 0.0)
        # 5. validation: the chosen plan on videos the search never saw; else the next denser passing plan
        validation = None
        if val_jobs:
            t = time.perf_counter()
            best, validation = _validate(pipe, settings, space, verify, best, trace, val_jobs, call_kwargs, bar, log,
                                         calls_per_step=calls_per_step, layers=dense.layers)
            seconds["validation"] = time.perf_counter() - t
        assignment: Assignment = best["assignment"]
        # 6. ground truth, provenance, outputs
        groundtruth = None
        if verify.score_groundtruth is not None:
            groundtruth = {"dense": verify.dense_groundtruth,
                           "plan": best.get("groundtruth") or verify.score_groundtruth(best["videos"]),
                           "required": settings.gates_groundtruth()}
        budget, objective = _budget_and_objective(settings, space.costs)
        provenance = SparsePlan.provenance_now(
            model_class=type(dense.transformer).__name__, model_id=settings.model, grids=[list(dense.grid)],
            head_dim=dense.head_dim,  # (what info --plan and generate price the plan's shares with, as calibrate did)
            model_config=model_config(dense.transformer),
            prompts_sha256=prompts_hash(settings.prompts), seeds=_search_seeds(jobs), budget=budget,
            objective=objective, steps=settings.steps, timesteps=dense.timesteps,
            call=call_as_run(call_kwargs, dense.videos, log),
            candidates=[c.label for c in candidates], cost_model=space.costs.describe(),
            quality=_quality_record(best, len(jobs), validation, assignment, calls_per_step,
                                    f"timed on {settings.device}" if settings.costs == "measured" else "modelled"))
        plan = stamp_quality(assignment.to_plan(provenance))  # (load drops the record once the plan is edited)
        result = _result(settings, out, dense, space, terms_note, candidates, best, trace, plan, budget, objective,
                         groundtruth, validation, jobs, weights, calls_per_step)
        seconds["total"] = time.perf_counter() - t0
        _add_seconds(result, seconds, validation, len(jobs) + len(val_jobs))
        densities = {c.label: c.density for c in candidates}
        densities.update({"dense": 1.0, "dense*": 1.0})
        write_outputs(out, report_dir, plan, result, densities)
        result["report_dir"] = str(report_dir)
        return result
    finally:
        bar.close()
