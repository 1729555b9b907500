"""Quality-vs-speed evaluation: dense baseline plus methods, same prompts and seeds.

:func:`run_eval` drives ``dit-accel eval``. For every (prompt, seed) the dense
baseline (the unpatched pipeline) is generated once and cached on disk, keyed by
a hash of model + settings + prompt + seed, so later runs reuse it. Each method
then runs through :func:`dit_accel.apply` with the same settings, and the
outputs are scored against the dense ones (see :mod:`dit_accel.eval.report`
for the files written). When every prompt follows the ``tiny-shapes`` grammar
("a {colour} {shape} moving {direction}"), every row, dense included, is also
scored against the prompt itself with :mod:`dit_accel.eval.groundtruth`
(``row["groundtruth"]``: colour, shape, motion, consistency and all-correct
accuracies); the Pareto plot then uses that as its quality axis.

Example::

    from dit_accel.eval.runner import EvalSettings, MethodSpec, run_eval
    settings = EvalSettings(model="tiny-wan", prompts=["a cat"], seeds=[0], frames=9, height=64, width=64, steps=2)
    results = run_eval(settings, [MethodSpec.parse("gna", {"kernel_size": (3, 4, 4)})], "out/")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._util import load_average, to_jsonable, versions
from ..methods import METHOD_ALIASES, Dense, Method, canonical_method_name, method_from_name, registered_methods
from ..models.tiny import is_tiny_model, model_label
from ..models.tiny_shapes import shapes_model
from .metrics import mean_or_none, paired_metrics
from .runner_checks import RESERVED_LABELS, check_apply_options as _check_apply_options, check_dense_shapes, \
    check_run_arguments, read_config as _read_config
from .timing import StageTimer, median_times, times_problem, timing_device

__all__ = ["EvalSettings", "generation_kwargs", "MethodSpec", "load_method_specs", "run_eval", "dense_cache_key",
           "model_fingerprint", "APPLY_KEYS"]

# Keys of a method config entry that go to dit_accel.apply() rather than the method.
APPLY_KEYS = ("dense_steps", "dense_last_steps", "dense_layers", "layer_methods", "backend", "weights")


@dataclass
class EvalSettings:
    """Everything that defines a generation (part of the dense cache key)."""

    model: str
    prompts: List[str]
    seeds: List[int] = field(default_factory=lambda: [0])
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    max_sequence_length: Optional[int] = None
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 1
    warmup: int = 1  # untimed generations per row before timing (lazy init, caches, CUDA autotune)

    def call_kwargs(self, pipe) -> dict:
        return generation_kwargs(self, pipe)

    def with_tiny_defaults(self) -> "EvalSettings":
        """These settings, a model shipped with dit_accel taking its grid-sized smoke-run sizes where they are unset
        (as ``dit-accel generate`` does): the pipeline's own (Wan's 81x480x832, 50 steps) run for hours on a CPU."""
        from ..models.tiny import TINY_DEFAULTS, is_embedded_model

        if not isinstance(self.model, str) or not is_embedded_model(self.model):
            return self
        suggested = TINY_DEFAULTS.get(self.model, {})
        keys = {"frames": "num_frames", "height": "height", "width": "width", "steps": "num_inference_steps",
                "guidance_scale": "guidance_scale", "max_sequence_length": "max_sequence_length"}
        return dataclasses.replace(self, **{f: suggested.get(k) for f, k in keys.items()
                                            if getattr(self, f) is None and suggested.get(k) is not None})

    def check(self) -> None:
        """ValueError naming the first bad setting (:func:`~.inputs.check_generation_settings`, ``repeats`` >= 1,
        ``warmup`` >= 0); :func:`run_eval` calls it before anything loads or is written."""
        from .._util import is_int
        from .inputs import check_generation_settings

        check_generation_settings(self)
        for name, least in (("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not (is_int(value) and value >= least):
                raise ValueError(f"--{name} must be an integer >= {least}; got {value!r}")


def generation_kwargs(settings, pipe=None) -> dict:
    """The pipeline call arguments that ``settings`` sets (its ``frames``, ``height``, ``width``, ``steps``,
    ``guidance_scale`` and ``max_sequence_length``; None: the pipeline's default), only those ``pipe``'s
    ``__call__`` takes when a pipeline is given."""
    wanted = {"num_frames": settings.frames, "height": settings.height, "width": settings.width,
              "num_inference_steps": settings.steps, "guidance_scale": settings.guidance_scale,
              "max_sequence_length": settings.max_sequence_length}
    params = None if pipe is None else inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in wanted.items() if v is not None and (params is None or k in params)}


@dataclass
class MethodSpec:
    """One row of the report: a method config, the apply() options and a label."""

    label: str
    method: Method
    apply_kwargs: Dict[str, object] = field(default_factory=dict)
    explicit: bool = True  # asked for by name (else one of the default methods: skipped where it does not fit)
    cache: Optional[object] = None  # a dit_accel.pipelines.caches.CacheSpec stacked with the method (--cache, --stacks)

    @classmethod
    def parse(cls, name: str, options: Optional[dict] = None, label: Optional[str] = None, *,
              source: str = "--method-config", explicit: bool = True) -> "MethodSpec":
        """ValueError naming ``source``, the method and the offending key for unknown options or values."""
        _check_names([name], source)
        name = canonical_method_name(name)
        if not isinstance(options, (dict, type(None))):
            raise ValueError(f"{source}: {name}: expected a mapping of options, got {options!r}")
        options = dict(options or {})
        options.pop("method", None)
        given = options.pop("label", None)
        given = label if given is None else given
        if given is not None and not (isinstance(given, str) and given.strip()):  # (YAML reads label: 1 as an int)
            raise ValueError(f"{source}: {name}: label={given!r} is invalid: expected a non-empty text such as "
                             f"'{name}-small' (in YAML, quote a number: label: '1')")
        label = given or name
        apply_kwargs = {k: options.pop(k) for k in APPLY_KEYS if k in options}
        _check_apply_options(apply_kwargs, f"{source}: {name}")
        entry = registered_methods()[name]
        valid = [f.name for f in dataclasses.fields(entry.cls) if f.init] + list(entry.cls.RECORD_KEYS)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"{source}: {name} has no option {unknown[0]!r}; valid options: "
                             f"{', '.join(valid + list(APPLY_KEYS)) or 'none'}")
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        try:
            method = method_from_name(name, **options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: {name}: {err}") from None
        return cls(label, method, apply_kwargs, explicit)

    def describe(self) -> dict:
        out = {"label": self.label, **self.method.ran_dict(), **self.apply_kwargs}
        if self.cache is not None:
            out["cache"] = self.cache.describe()
        return out


def _check_names(names, source: str) -> None:
    known = registered_methods()
    for name in names:
        if canonical_method_name(name) not in known:
            raise ValueError(f"{source}: unknown method {name!r}; valid methods: {', '.join(sorted(known))} "
                             f"(aliases: {', '.join(f'{a} = {n}' for a, n in METHOD_ALIASES.items())})")


def load_method_specs(methods: Optional[Sequence[str]], config_path: Optional[str] = None, *,
                      include_dense: bool = False, defaults: Optional[Dict[str, dict]] = None,
                      explicit: bool = True) -> List[MethodSpec]:
    """Method rows from ``--methods`` names and an optional ``--method-config`` file.

    The file (JSON or YAML) maps a method name to its options, or to a list of
    option dicts to compare several configs of one method; or it is a list of
    entries ``{"method": name, "label": ..., **options}``. Options named in
    :data:`APPLY_KEYS` (``dense_steps``...) go to ``dit_accel.apply``. Names in
    ``methods`` without a config entry use the method's defaults; with
    ``methods`` given, config entries of other methods are ignored. ``dense`` is
    the eval baseline itself and gets no spec unless ``include_dense`` (or the entry has
    options or a label of its own: a row of dense with them, e.g. ``weights``); the other rows
    are labelled apart from the baseline's (a ' added).
    ``defaults`` (``{name: options}``, e.g. the tiny models' grid-sized settings)
    replaces the method's own defaults for names without a config entry. ``explicit=False``
    marks the rows as the default list (:func:`run_eval` skips the ones the model cannot run).
    Unknown method names, unknown options and invalid values raise ValueError naming them.
    """
    entries: List[tuple] = []
    source = f"--method-config {config_path}"
    if config_path:
        cfg = _read_config(config_path)
        if isinstance(cfg, dict):
            _check_names([str(name) for name in cfg], source)
            for name, value in cfg.items():
                if value == []:  # (no config at all: the row would vanish, or run the defaults, without a word)
                    raise ValueError(f"{source}: {name}: an empty list of configs; give at least one mapping of "
                                     "options ({} for the method's defaults)")
                for i, opts in enumerate(value if isinstance(value, list) else [value or {}]):
                    label = name if not isinstance(value, list) or len(value) == 1 else f"{name}#{i}"
                    entries.append((name, opts, label))
        elif isinstance(cfg, list):
            for opts in cfg:
                if not isinstance(opts, dict) or "method" not in opts:
                    raise ValueError(f"--method-config {config_path}: list entries need a 'method' key; got {opts!r}")
                _check_names([str(opts["method"])], source)
                entries.append((opts["method"], opts, opts.get("label")))
        else:
            raise ValueError(f"--method-config {config_path}: expected a mapping or a list, got {type(cfg).__name__}")
    names = [canonical_method_name(m) for m in methods if m.strip()] if methods else None
    if names is not None:
        _check_names(names, "--methods")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # (it ran again as a second row "tile'", as if another config)
            given = [m.strip() for m in methods if m.strip() and canonical_method_name(m) == twice[0]]
            raise ValueError(f"--methods names {twice[0]} more than once ({', '.join(given)}); name each method "
                             "once (--method-config gives one method several configs)")
        entries = [e for e in entries if canonical_method_name(e[0]) in names]
        configured = {canonical_method_name(e[0]) for e in entries}
        entries += [(n, dict((defaults or {}).get(n, {})), n) for n in names if n not in configured]
    specs, seen = [], set(() if include_dense else RESERVED_LABELS)
    for name, opts, label in entries:
        if canonical_method_name(name) == "dense" and not include_dense and (not opts or isinstance(opts, dict) and (
                opts.get("label") in (None, "dense") and not set(opts) - {"method", "label"})):
            continue  # the baseline row (a dense entry with options or its own label is a row: dense with weights=)
        spec = MethodSpec.parse(name, opts, label, source=source if config_path else "--methods",
                                explicit=explicit)
        while spec.label in seen:
            spec.label += "'"
        seen.add(spec.label)
        specs.append(spec)
    return specs


def dense_cache_key(settings: EvalSettings, prompt: str, seed: int, *, model_sha256: str = "",
                    pipeline: str = "") -> str:
    """The dense cache entry of one sample: a hash of everything that decides the dense video.

    ``model_sha256`` is the content of the weights (:func:`model_fingerprint`), so changing the files of a
    local model folder changes the key; ``pipeline`` is the pipeline class. The generation settings, dtype,
    device (the GPU's name: the entry's dense times are compared with this run's) and the versions of torch, Diffusers, Transformers and dit_accel are part of it too. The model's
    name is part of it unless its files were hashed (``"files:..."``, configs included): the same folder
    under another path then shares its entries.
    """
    from .. import __version__

    name = None if model_sha256.startswith("files:") else settings.model
    blob = json.dumps({"model": name, "model_sha256": model_sha256, "pipeline": pipeline,
                       "frames": settings.frames, "height": settings.height,
                       "width": settings.width, "steps": settings.steps, "guidance": settings.guidance_scale,
                       "max_sequence_length": settings.max_sequence_length, "dtype": settings.dtype,
                       "device": timing_device(settings.device), "prompt": prompt, "seed": int(seed),
                       "versions": {**versions(("torch", "diffusers", "transformers")), "dit_accel": __version__}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_HASH_MEMO = "model_hashes.json"


def model_fingerprint(model, pipe, cache_dir: Optional[Path] = None, log=print) -> str:
    """sha256 of a model's weights (``"files:<hex>"`` or ``"state:<hex>"``, see
    :func:`dit_accel.models.loading.model_fingerprint`); file hashes are memoised in ``cache_dir``."""
    from ..models.loading import model_fingerprint as fingerprint

    memo = Path(cache_dir) / _HASH_MEMO if cache_dir is not None else None
    return fingerprint(model, pipe, memo=memo, warn=log)


def _read_dense_entry(path: Path):
    """``(frames, times, cold)`` of a dense cache file (``cold``: timed as a run's first generation without a warm-up);
    ValueError (BadFileError) naming it when it is damaged."""
    from ..atomic_files import BadFileError

    expected = "a dense cache entry: frames uint8 [F, H, W, 3] and times (JSON)"
    try:
        with np.load(path, allow_pickle=False) as data:
            frames, times = np.asarray(data["frames"]), json.loads(str(data["times"]))
            cold = bool(data["cold"]) if "cold" in data.files else False
    except Exception as err:  # BadZipFile, EOFError, KeyError, ValueError, ...: a damaged entry
        raise BadFileError(path, f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:100]})",
                           expected) from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape \
            or not isinstance(times, dict):
        raise BadFileError(path, f"holds frames {frames.dtype} {tuple(frames.shape)} and times "
                                 f"{type(times).__name__}", expected)
    if times_problem(times):  # (else median_times' error, or a None or NaN time in the speedups, after every row)
        raise BadFileError(path, f"holds {times_problem(times)}", expected)
    return frames, times, cold


def _check_entry_size(path: Path, frames: np.ndarray, settings: EvalSettings) -> None:
    """BadFileError naming the cache entry when its frames are not of the size this run asks for (a file
    replaced or copied in): the entry is then dropped and generated again, not blamed on a method later."""
    from ..atomic_files import BadFileError

    want = (settings.height, settings.width)
    got = tuple(frames.shape[1:3])
    if any(w is not None and w != g for w, g in zip(want, got)):
        raise BadFileError(path, f"holds frames of {got[0]}x{got[1]}, but this run makes "
                                 f"{settings.height}x{settings.width}",
                           "an entry of this run's size (the file was replaced or copied in)")


# ----------------------------------------------------------------- generation
def _frames_of(output) -> np.ndarray:
    """Pipeline output (output_type='np') -> uint8 [F, H, W, 3]."""
    frames = getattr(output, "frames", None)
    if frames is None:
        frames = getattr(output, "images")
    arr = np.asarray(frames[0] if not isinstance(frames, np.ndarray) or frames.ndim == 5 else frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:  # cast to uint8 they would be black pixels, scored as if the model had drawn them
            raise ValueError(f"the pipeline returned {bad} NaN or inf value(s) in {arr.size} (frames "
                             f"{tuple(arr.shape)}), e.g. a half-precision overflow; try --dtype float32 or another method config")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def _generate(pipe, timer: StageTimer, settings: EvalSettings, prompt: str, seed: int) -> tuple:
    generator = torch.Generator("cpu").manual_seed(int(seed))  # CPU generator: same noise on any device
    timer.start()
    with torch.no_grad():
        out = pipe(prompt, generator=generator, output_type="np", **settings.call_kwargs(pipe))
    times = timer.stop()
    return _frames_of(out), times


def _timed_runs(pipe, timer, settings, samples, progress, done=None) -> tuple:
    """Generate every sample once (timed), plus warm-up and extra timing repeats of the first; ``done(i, video,
    times)`` is called as each sample is made (the dense cache keeps it then)."""
    warmup = settings.warmup
    prompt0, seed0 = samples[0]
    for _ in range(warmup):
        _generate(pipe, timer, settings, prompt0, seed0)
    videos, runs = [], []
    for i, (prompt, seed) in enumerate(samples):
        video, times = _generate(pipe, timer, settings, prompt, seed)
        videos.append(video)
        runs.append(times)
        progress.update(1)
        if done is not None:
            done(i, video, times)
    for _ in range(max(settings.repeats - 1, 0)):
        runs.append(_generate(pipe, timer, settings, prompt0, seed0)[1])
    return videos, runs


def _summary_density(handle) -> tuple:
    """``(mean visited density, summary, per-layer stats)`` of a finished run."""
    summary, stats = handle.summary(), handle.stats()
    density = summary["mean_density"]
    if density is None and summary.get("sparse_calls") == 0 and summary.get("dense_calls"):
        density = 1.0  # the plan resolved to dense attention on this grid (window covers it all)
    return density, summary, stats


# ------------------------------------------------------------------ the run
def _dense_row(pipe, timer, settings: EvalSettings, samples, cache_dir: Path, log,
               desc: str = "dense", prefix: str = "dense", model_sha256: Optional[str] = None) -> Tuple[dict, int]:
    """The dense baseline row, from the cache where it has the sample; ``(row, samples generated)``.

    The cache is keyed by the content of the model's weights (see :func:`dense_cache_key`); an entry that
    cannot be read (truncated, wrong structure) is dropped with a warning and generated again, and one timed cold
    (a ``--warmup 0`` run's first generation) is generated again by a run with warm-up. Entries are written whole
    (temporary file, then a rename) as each sample is made: a killed eval keeps those it finished.
    """
    from ..atomic_files import atomic_write, remove_stale_temps
    from .report import ProgressLine, progress_bar

    remove_stale_temps(cache_dir)  # entries killed evals left half-written: each may be as large as a video
    model_sha256 = model_sha256 or model_fingerprint(settings.model, pipe, cache_dir, log)
    pipeline = type(pipe).__name__
    videos, sample_times, runs, missing = [None] * len(samples), [None] * len(samples), [], []
    with progress_bar(log, total=len(samples), desc=desc, unit="video") as bar:
        for i, (prompt, seed) in enumerate(samples):
            key = dense_cache_key(settings, prompt, seed, model_sha256=model_sha256, pipeline=pipeline)
            path = cache_dir / f"{prefix}_{key}.npz"
            if path.exists():
                try:
                    videos[i], times, cold = _read_dense_entry(path)
                    _check_entry_size(path, videos[i], settings)
                except ValueError as err:
                    log(f"warning: dense cache entry dropped, generating it again: {err}")
                    path.unlink(missing_ok=True)
                    missing.append((i, path))
                    continue
                if cold and settings.warmup:  # (its start-up costs made every speedup against it too large)
                    log(ProgressLine(f"{desc}: {path.name} was timed without a warm-up (--warmup 0); generated "
                                     "again for this run's times"))
                    missing.append((i, path))
                    continue
                runs.append(times)
                sample_times[i] = times
                bar.update(1)
            else:
                missing.append((i, path))
        if missing:  # one warm-up for all uncached samples, then each is generated and cached
            def keep(j, video, times):  # (cached as made: else a failure at the last sample lost every one before)
                i, path = missing[j]
                videos[i], sample_times[i] = video, times
                atomic_write(path, lambda tmp: np.savez_compressed(tmp, frames=video, times=json.dumps(times),
                                                                   cold=settings.warmup == 0 and j == 0))

            runs.extend(_timed_runs(pipe, timer, settings, [samples[i] for i, _ in missing], bar, keep)[1])
    log(ProgressLine(f"{desc}: {len(missing)} generated, {len(samples) - len(missing)} from cache ({cache_dir})"))
    row = {"label": "dense", "config": {"method": "dense", "label": "dense"}, "videos": videos,
           "times": median_times(runs), "sample_times": sample_times, "density": 1.0, "summary": {}, "stats": []}
    return row, len(missing)


def _cache_context(pipe, cache, steps):
    """The stack's cache enabled on the pipeline (after dit_accel.apply), or nothing."""
    if cache is None:
        return contextlib.nullcontext()
    from ..pipelines.caches import enable_cache

    return enable_cache(pipe, cache, steps)


def _method_rows(pipe, timer, settings: EvalSettings, samples, specs: Sequence[MethodSpec], log) -> List[dict]:
    """One row per method spec; a config that fails is reported in its row, not raised."""
    import dit_accel
    from .report import progress_bar

    rows = []
    with progress_bar(log, total=len(samples) * len(specs), desc="methods", unit="video") as bar:
        for spec in specs:
            bar.set_postfix_str(spec.label)
            done = bar.n
            row = {"label": spec.label, "config": spec.describe()}
            try:
                with dit_accel.apply(pipe, spec.method, **spec.apply_kwargs) as handle, \
                        _cache_context(pipe, spec.cache, settings.steps) as ran_cache:
                    handle.fuse_lora()  # a weights= row runs as generate does: its LoRA folded in, restored after
                    videos, runs = _timed_runs(pipe, timer, settings, samples, bar)
                    row["density"], row["summary"], row["stats"] = _summary_density(handle)
                if getattr(ran_cache, "filled", None):  # what the cache ran with beyond its options (pab's skips)
                    row["config"]["cache"] = {**row["config"]["cache"], **ran_cache.filled}
                row.update(videos=videos, times=median_times(runs), sample_times=runs[:len(samples)])
            except Exception as exc:  # one bad config must not sink the report
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{spec.label}: failed: {row['error']}")
                bar.update(done + len(samples) - bar.n)
            rows.append(row)
    return rows


class _Scorers:
    """The metric networks that are available here (LPIPS, CLIP, FID features), and why others are skipped."""

    def __init__(self, settings: EvalSettings, *, lpips: bool, clip_model, clip_scorer, fid_weights, fid_feature,
                 real_dir, frame_size):
        from .clip import CLIP_ENV, create_clip_scorer
        from .fid import FID_ENV, create_fid_feature
        from .metrics import LPIPSScorer

        # skipped: every metric not computed; warnings: those asked for (--fid-weights, --real, --clip-model)
        self.device, self.skipped, self.warnings, self.frame_size = settings.device, [], [], tuple(frame_size)
        self.lpips = self._keep(LPIPSScorer.create(device=self.device, frame_size=frame_size)) if lpips else None
        # (asked for, by --clip-model or the variable, and not loaded: a warning, as FID's, not only a skip line)
        self.clip = clip_scorer or self._keep(create_clip_scorer(clip_model, device=self.device),
                                              bool(clip_model or os.environ.get(CLIP_ENV)))
        self.fid_asked = bool(fid_feature is not None or fid_weights or os.environ.get(FID_ENV) or real_dir)
        self.fid = fid_feature or self._keep(create_fid_feature(fid_weights, device=self.device), self.fid_asked)
        self.real = None  # the --real folder; its features are computed once (at the first row), then kept
        self._references = {}  # id of a reference set -> (the set, its FidReference)
        if real_dir:
            from .fid import FrameFolder

            try:
                self.real = FrameFolder(real_dir, frame_size)
            except (ValueError, OSError) as exc:
                self._skip(f"FID vs --real skipped: {exc}", True)
            if self.fid is None:
                self._skip("FID vs --real skipped: no FID feature extractor (see the FID line)", True)

    def _skip(self, line: str, warn: bool = False) -> None:
        self.skipped.append(line)
        if warn:
            self.warnings.append(line)

    def _keep(self, made, warn: bool = False):
        value, why = made
        if why:
            self._skip(why, warn)
        return value

    def _fid(self, a, b) -> Optional[float]:
        """FID of ``a`` against the reference ``b`` (the dense row's videos or ``--real``), whose features are
        computed at its first use and kept for the other rows."""
        from .fid import FidReference

        try:
            kept = self._references.get(id(b))
            if kept is None or kept[0] is not b:
                kept = self._references[id(b)] = (b, FidReference(b, self.fid, device=self.device))
            return kept[1].distance(a)
        except (ValueError, OSError, RuntimeError, TypeError) as exc:  # fewer than 2 images a set; a --real image
            # unreadable by now; a network built for other sizes (its RuntimeError lost every row's generations)
            self._skip(f"FID skipped: {exc}" if isinstance(exc, (ValueError, OSError)) else
                       f"FID skipped: the feature network failed on {self.frame_size[0]}x{self.frame_size[1]} frames "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); give --fid-weights a network "
                       "that takes frames of this size", self.fid_asked)
            return None

    def score(self, row: dict, dense: dict, samples) -> None:
        """Quality of ``row`` against the dense row, and its speedups, written into ``row``."""
        per_sample = [paired_metrics(v, d, self.lpips) for v, d in zip(row["videos"], dense["videos"])]
        row["samples"] = [{"prompt": p, "seed": s, **m} for (p, s), m in zip(samples, per_sample)]
        for sample, times in zip(row["samples"], row.get("sample_times") or []):
            sample["time_transformer"], sample["time_total"] = (times or {}).get("transformer"), \
                (times or {}).get("total")
        for key in ("psnr", "ssim", "lpips"):
            row[key] = mean_or_none([m.get(key) for m in per_sample])
        if row["videos"] and row["videos"][0].shape[0] > 1:  # videos: the temporal check beside fidelity
            from .temporal import temporal_report

            for sample, video, ref in zip(row["samples"], row["videos"], dense["videos"]):
                sample["temporal"] = temporal_report(video, ref)
            temporal = [sample["temporal"] for sample in row["samples"]]
            row["temporal"] = {
                "motion": mean_or_none([t["motion"] for t in temporal]),
                "motion_ratio": mean_or_none([t["motion_ratio"] for t in temporal]),
                "temporal_error": mean_or_none([t["temporal_error"] for t in temporal]),
                "frozen": sum(t["frozen"] for t in temporal) / len(temporal),
                "looping": sum(t["loop_period"] is not None for t in temporal) / len(temporal)}
        if self.clip is not None:  # per video (the paired statistics need them); equal frame counts: same mean
            for sample, video, (prompt, _) in zip(row["samples"], row["videos"], samples):
                sample["clip"] = self.clip(video, prompt)
            row["clip"] = mean_or_none([sample["clip"] for sample in row["samples"]])
        if self.fid is not None:
            row["fid_dense"] = self._fid(row["videos"], dense["videos"])
            if self.real is not None:
                row["fid_real"] = self._fid(row["videos"], self.real)
        t, dense_t = row["times"] or {}, dense["times"] or {}
        for stage, key in (("transformer", "speedup_transformer"), ("total", "speedup_e2e")):
            if t.get(stage) and dense_t.get(stage):
                row[key] = dense_t[stage] / t[stage]


def _floor_rows(pipe, timer, settings: EvalSettings, samples, dense: dict, cache_dir: Path, backend: str,
                log, model_sha256: Optional[str] = None) -> List[dict]:
    """The dense-vs-dense floor rows (see :mod:`dit_accel.eval.floor`): another seed pairing, and dense
    attention through another backend (``backend``: auto, sdpa-math, dit_accel.kernels.dense or none)."""
    from .floor import DENSE_TRITON, SDPA_MATH, dense_backend, pick_floor_backend
    from .report import progress_bar

    by_prompt: Dict[str, List[int]] = {}
    for i, (prompt, _) in enumerate(samples):
        by_prompt.setdefault(prompt, []).append(i)
    config = {"method": "dense", "label": "dense~seed"}
    if all(len(ix) >= 2 for ix in by_prompt.values()):  # each prompt's seeds rotated by one: nothing to generate
        other = [0] * len(samples)
        for ix in by_prompt.values():
            for k, i in enumerate(ix):
                other[i] = ix[(k + 1) % len(ix)]
        seed_row = {"videos": [dense["videos"][j] for j in other], "times": dense["times"],
                    "sample_times": [dense["sample_times"][j] for j in other]}
        config["pairing"] = "each prompt's seeds rotated by one (seed i against seed i+1)"
    else:
        shifted = [(prompt, seed + 1) for prompt, seed in samples]
        # cached beside the baseline under their own prefix: dense_*.npz stays the baseline's samples
        seed_row, _ = _dense_row(pipe, timer, settings, shifted, cache_dir, log, desc="dense~seed",
                                 prefix="floor_dense", model_sha256=model_sha256)
        config["pairing"] = "seed + 1 against seed (one seed per prompt)"
    seed_row.update(label="dense~seed", floor="seed", config=config, density=1.0, summary={}, stats=[])
    rows = [{k: v for k, v in seed_row.items()}]
    if backend == "none":
        return rows
    note = None
    if backend == "auto":
        backend, note = pick_floor_backend(settings.device)
    label = "dense~" + {DENSE_TRITON: "triton", SDPA_MATH: "sdpa-math"}.get(backend, backend)
    row = {"label": label, "floor": "backend", "config": {"method": "dense", "label": label, "backend": backend},
           "density": 1.0, "summary": {}, "stats": []}
    if note:
        row["note"] = note
    counts: Dict[str, int] = {}
    try:
        with progress_bar(log, total=len(samples), desc=label, unit="video") as bar, dense_backend(backend, counts):
            videos, runs = _timed_runs(pipe, timer, settings, samples, bar)
        row.update(videos=videos, times=median_times(runs), sample_times=runs[:len(samples)], backend_calls=counts)
    except Exception as exc:  # the floor row reports its failure; the methods still run
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{label}: failed: {row['error']}")
    rows.append(row)
    return rows


def _fitting(specs: Sequence[MethodSpec], pipe, log) -> List[MethodSpec]:
    """The specs the pipeline can run: on an image model (no time axis), methods that need one are dropped
    from the default list with a note, and refused (ValueError) when asked for by name."""
    if "num_frames" in inspect.signature(pipe.__call__).parameters:
        return list(specs)
    kept = []
    for spec in specs:
        try:
            spec.method.plan((16, 16))
        except ValueError as err:
            if spec.explicit:
                raise ValueError(f"{spec.label}: {type(pipe).__name__} makes images, and {err}") from None
            log(f"{spec.label}: skipped ({type(pipe).__name__} makes images: {err})")
            continue
        kept.append(spec)
    return kept


#: The report files of one eval run, written as one unit (:func:`dit_accel.atomic_files.commit_files`).
REPORT_FILES = ("results.json", "report.md", "pareto.png", "grid.png")


def _write_results(out_dir: Path, results: dict, rows: List[dict]) -> None:
    from ..atomic_files import commit_files, commit_journal, json_text
    from . import report

    shown = [r for r in rows if "videos" in r]
    commit_files({out_dir / "results.json": json_text(results),
                  out_dir / "report.md": lambda tmp: report.write_report(results, tmp),
                  out_dir / "pareto.png": lambda tmp: report.plot_pareto(results, tmp),
                  out_dir / "grid.png": lambda tmp: report.frame_grid([r["label"] for r in shown],
                                                                      [r["videos"][0] for r in shown], tmp)},
                 commit_journal(out_dir / "results.json"))


def _check_reach(pipe, settings: EvalSettings) -> None:
    """ValueError where the sizes go past the model's rotary table, or the text length past its tokenizer
    (:func:`~dit_accel.models.loading.rope_reach_error`, :func:`~dit_accel.models.loading.text_length_error`)."""
    from ..models.loading import rope_reach_error, text_length_error

    problem = rope_reach_error(pipe, settings.call_kwargs(pipe)) or text_length_error(pipe,
                                                                                       settings.max_sequence_length)
    if problem:
        raise ValueError(problem)


def _check_inputs(settings: EvalSettings, fid_weights, real_dir, fid_feature, clip_model, clip_scorer) -> None:
    """ValueError before anything loads or is written: the settings, and a FID, ``--real`` or CLIP input that
    cannot be what the user meant (:func:`~.fid.fid_inputs_error`, :func:`~.clip.clip_inputs_error`)."""
    from .clip import clip_inputs_error
    from .fid import fid_inputs_error

    problem = fid_inputs_error(fid_weights, real_dir, weights=fid_feature is None) or (
        clip_inputs_error(clip_model) if clip_scorer is None else None)
    if problem:
        raise ValueError(problem)
    if isinstance(settings.prompts, (list, tuple)) and not settings.prompts:
        raise ValueError("no prompts: EvalSettings.prompts is empty; pass --prompts FILE (one prompt per line) or "
                         "--prompt TEXT")
    settings.check()


def run_eval(settings: EvalSettings, specs: Sequence[MethodSpec], out_dir, *, cache_dir=None,
             clip_model: Optional[str] = None, fid_weights: Optional[str] = None, fid_feature=None,
             clip_scorer=None, real_dir: Optional[str] = None, lpips: bool = True, capture: Optional[str] = None,
             pipe=None, log=print, floor_backend: str = "auto", prompt_file: Optional[str] = None) -> dict:
    """Run the dense baseline and every method, score them, write the report files.

    Args:
        settings: prompts, seeds and generation settings shared by all rows.
        specs: method rows (see :func:`load_method_specs`).
        out_dir: where results.json, report.md, pareto.png and grid.png go.
        cache_dir: dense output cache (default ``out_dir/cache``).
        clip_model / clip_scorer: CLIP model path or id, or a ready
            :class:`~dit_accel.eval.clip.ClipScorer`.
        fid_weights / fid_feature: FID Inception weights spec, or an ``nn.Module``.
        real_dir: folder of real images/frames for a second FID column.
        capture: also save the dense run's q/k/v there (``apply(pipe, Dense(), capture=DIR)``)
            for ``dit-accel bench fidelity``.
        pipe: a ready pipeline (else loaded from ``settings.model``).
        floor_backend: the dense-vs-dense floor's other backend (``auto``, ``sdpa-math``,
            ``dit_accel.kernels.dense``, or ``none`` for the seed floor only; see :mod:`.floor`).
        prompt_file: the file the prompts came from (its sha256 goes into the provenance).

    Returns the results dict also written to ``results.json``. A ``fid_weights`` or ``real_dir`` path that is not
    there, or a ``clip_model`` path that is not a model folder, raises ValueError before anything is loaded or
    written.
    """
    import dit_accel

    check_run_arguments(settings, specs, out_dir, EvalSettings, MethodSpec)
    _check_inputs(settings, fid_weights, real_dir, fid_feature, clip_model, clip_scorer)
    settings = settings.with_tiny_defaults()  # (from Python: the pipeline's own sizes ran for hours on a CPU)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..atomic_files import commit_journal, recover

    recover(commit_journal(out_dir / "results.json"), [out_dir])  # a killed run's report set, finished or swept
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    samples = [(p, int(s)) for p in settings.prompts for s in settings.seeds]

    if pipe is None:
        from ..models.loading import load_pipeline

        pipe = load_pipeline(settings.model, device=settings.device, dtype=getattr(torch, settings.dtype))
    _check_reach(pipe, settings)
    pipe.set_progress_bar_config(disable=True)
    specs = _fitting(specs, pipe, log)
    model_sha256 = model_fingerprint(settings.model, pipe, cache_dir, log)  # (the cache key; --compare reads it)
    with StageTimer(pipe, settings.device) as timer:
        dense, generated = _dense_row(pipe, timer, settings, samples, cache_dir, log, model_sha256=model_sha256)
        if capture:
            with dit_accel.apply(pipe, Dense(), capture=capture):
                _generate(pipe, timer, settings, *samples[0])
        floors = _floor_rows(pipe, timer, settings, samples, dense, cache_dir, floor_backend, log, model_sha256)
        rows = [dense] + floors + _method_rows(pipe, timer, settings, samples, specs, log)
    key = lambda i: dense_cache_key(settings, *samples[i], model_sha256=model_sha256,  # noqa: E731
                                    pipeline=type(pipe).__name__)
    check_dense_shapes(dense["videos"], [v for r in rows[1:] if r.get("floor") != "seed" for v in r.get("videos", ())],
                       lambda i: cache_dir / f"dense_{key(i)}.npz")

    scorers = _Scorers(settings, lpips=lpips, clip_model=clip_model, clip_scorer=clip_scorer, fid_weights=fid_weights,
                       fid_feature=fid_feature, real_dir=real_dir, frame_size=dense["videos"][0].shape[1:3])
    for line in scorers.skipped:
        log(line)
    for row in rows:
        if "videos" in row:
            scorers.score(row, dense, samples)
    groundtruth = _score_groundtruth(rows, samples, settings.model, log)
    from .provenance import backends_used, provenance
    from .stats import analyse

    analyse(rows)
    for row in rows[1:]:
        if "videos" in row:
            row["backends_used"] = (
                {"dense_backend": row["config"].get("backend", "sdpa"), "calls": row.get("backend_calls")}
                if row.get("floor") else backends_used(row.get("summary"), row.get("stats")))
    results = {
        "settings": asdict(settings), "versions": {**versions(("torch", "triton", "diffusers", "transformers",
                                                                 "torchmetrics")), "load_average": load_average()},
        "provenance": {**provenance(settings.prompts, settings.seeds, settings.device, prompt_file=prompt_file,
                                    run=[s.describe() for s in specs]), "model_sha256": model_sha256},
        "methods": [s.describe() for s in specs], "dense_generated": generated,
        "dense_cached": len(samples) - generated, "cache_dir": str(cache_dir),
        "dense_times_from_cache": generated < len(samples), "skipped": sorted(set(scorers.skipped)),
        "capture": capture, "groundtruth": groundtruth,
        "rows": [{k: v for k, v in r.items() if k != "videos"} for r in rows],
        "warnings": sorted({w for r in rows for w in (r.get("summary") or {}).get("warnings", [])}
                           | set(scorers.warnings)),
    }
    if is_tiny_model(settings.model):
        results["note"] = "tiny model with RANDOM weights: numbers check the pipeline, not quality"
    elif shapes_model(settings.model) is not None:
        results["note"] = (f"{model_label(settings.model)}: the ground-truth columns judge each video against its "
                           "prompt; PSNR/SSIM only measure the distance to dense")
    results = to_jsonable(results)
    _write_results(out_dir, results, rows)
    return results


def _score_groundtruth(rows: List[dict], samples, model: str, log) -> Optional[dict]:
    """Ground-truth accuracies of every row (``row["groundtruth"]``, per sample ``groundtruth_ok``) when every
    prompt follows the tiny-shapes grammar; the description of the metric, or None (with a note for
    tiny-shapes) otherwise."""
    from .groundtruth import parse_prompt, score_many, score_video

    try:
        for prompt, _ in samples:
            parse_prompt(prompt)
    except ValueError as err:
        if shapes_model(model) is not None:
            log(f"ground-truth metric skipped: {err}")
        return None
    prompts = [p for p, _ in samples]
    for row in rows:
        if "videos" not in row:
            continue
        row["groundtruth"] = score_many(row["videos"], prompts)
        for sample, video, prompt in zip(row["samples"], row["videos"], prompts):
            score = score_video(video, prompt)
            sample["groundtruth_ok"] = {k: bool(score[k]) for k in ("colour_ok", "shape_ok", "motion_ok", "consistent",
                                                                     "all_ok")}
    return {"metric": "dit_accel.eval.groundtruth: fraction of videos whose object has the prompt's colour, shape "
                      "and direction of motion, and is one object of stable size in every frame ('all': every "
                      "criterion at once)", "criteria": ["colour", "shape", "motion", "consistency", "all"]}
