"""What a calibration runs and may spend: :class:`CalibrationSettings` (the flags of ``dit-accel calibrate``), the
choices its flags allow, and the quality flags shared with the evidence script (:func:`add_quality_options`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..eval.runner import generation_kwargs
from ..models.tiny_shapes import SHAPES_MODELS
from .candidates import METHODS
from .costs import COST_SOURCES, CostModel

__all__ = ["CalibrationSettings", "add_quality_options", "BUDGET_RULES", "GROUNDTRUTH_RULES", "SENSITIVITY",
           "MIN_VIDEOS", "GROUNDTRUTH_MODELS", "COST_TERMS", "SEARCHES", "ALLOCATION_ONLY", "SAMPLE_ONLY", "unread_by_warmup",
           "warmup_refusal"]

#: How ``min_psnr`` is checked on the calibration videos: every video (``worst``, the default) or their mean.
BUDGET_RULES = ("worst", "mean")
#: ``--groundtruth``: the ground-truth checks of the calibration videos (models with a checker: tiny-shapes) are
#: reported (``report``, the default) or a verified plan must keep them no worse than dense's (``require``). On
#: 4-8 tiny-shapes videos the shape check flips on a video or two even for plans above 30 dB, so ``require``
#: there ends at a plan that is sparse in the last step only (BENCHMARKS.md section 11).
GROUNDTRUTH_RULES = ("report", "require")
#: ``--sensitivity``: ``probe`` measures how much a unit of attention error in each step bucket and layer group
#: moves the final output (one generation each: :func:`~.probes.probe_step_weights`, :func:`~.probes.probe_layer_weights`);
#: ``uniform`` counts every step and layer the same.
SENSITIVITY = ("probe", "uniform")
#: ``--search``: ``allocation`` chooses a candidate per (step bucket, layer, head) from scored attention errors
#: (:class:`~.search.SearchSpace`, bisected on verified runs); ``warmup`` a dense warm-up, then one candidate
#: everywhere, bisecting each candidate's warm-up on verified runs only, then bridging the last dense step with a
#: wider candidate where one passes (:func:`~.budget.warmup_search`: no scoring, no probes, a fraction of the cost).
SEARCHES = ("allocation", "warmup")
#: Fewer calibration videos than this get a note: the search overfits them (BENCHMARKS.md section 11).
MIN_VIDEOS = 8
#: Models whose videos have a ground-truth checker (:mod:`dit_accel.eval.groundtruth`).
GROUNDTRUTH_MODELS = tuple(SHAPES_MODELS)
#: ``--cost-terms``: the cost model's terms (:class:`~.costs.CostModel`), or ``auto`` (see :func:`~.run.search_space`).
COST_TERMS = ("auto",) + CostModel.TERMS


@dataclass
class CalibrationSettings:
    """What a calibration runs and what it may spend (the flags of ``dit-accel calibrate``).

    Budget: ``min_psnr`` (dB of the final output against dense, same seeds) and/or ``max_layer_error``
    (relative L2 of each layer's attention output against dense); at least one.

    ``budget_on``: ``"worst"`` (default) holds ``min_psnr`` on every calibration video, ``"mean"`` on their
    mean: a mean of dB values can be carried by the videos a plan barely changes while it breaks others.
    Neither rule closes a held-out gap on its own: picking the cheapest passing plan out of several verified on
    the same few videos overfits them, which is why a plan is validated on prompts its search never saw.
    """

    model: str
    prompts: List[str]
    seeds: List[int] = field(default_factory=lambda: [0])
    min_psnr: Optional[float] = None
    max_layer_error: Optional[float] = None
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    max_sequence_length: Optional[int] = None
    device: str = "cpu"
    dtype: str = "float32"
    phases: int = 3
    warmup: Tuple[int, ...] = (1, 2)
    cooldown: Tuple[int, ...] = (1,)
    candidates: str = "default"
    methods: Tuple[str, ...] = METHODS
    tile: Optional[Tuple[int, ...]] = None
    samples_per_bucket: int = 2
    max_sample_mb: float = 512.0
    capture_dir: Optional[str] = None
    arch: str = "h100"
    kernel: str = "current"
    cost_terms: str = "auto"
    costs: str = "model"
    search_iters: int = 6
    batch_size: int = 8
    backend: str = "auto"
    budget_on: str = "worst"
    groundtruth: str = "report"
    sensitivity: str = "probe"
    layer_groups: int = 4
    validate: Optional[int] = None
    extend_seeds: bool = True
    uniform_options: int = 3
    probe_videos: int = 4
    baseline: bool = True
    replay_mb: float = 1024.0
    search: str = "allocation"

    def gates_groundtruth(self) -> bool:
        """Whether a verified plan must keep the calibration videos' ground truth (``groundtruth``)."""
        return self.groundtruth == "require"

    def groundtruth_prompt_error(self) -> Optional[str]:
        """Why the ground-truth checker cannot judge these prompts (one outside its grammar), None when it can or
        the model has no checker: known before the model loads, not after the dense run."""
        if self.model not in GROUNDTRUTH_MODELS:
            return None
        from ..eval.groundtruth import parse_prompt

        for prompt in self.prompts:
            try:
                parse_prompt(prompt)
            except ValueError as err:
                return str(err)
        return None

    def scores_groundtruth(self) -> bool:
        """Whether the videos are judged against their prompts (a model with a checker, every prompt in its grammar)."""
        return self.model in GROUNDTRUTH_MODELS and self.groundtruth_prompt_error() is None

    def check(self) -> None:
        if self.min_psnr is None and self.max_layer_error is None:
            raise ValueError("give a budget: --min-psnr DB (final output vs dense) and/or --max-layer-error E "
                             "(relative L2 of each layer's attention)")
        if not self.prompts:
            raise ValueError("no calibration prompts: pass --prompts FILE (one per line)")
        from .._util import is_number

        # (a string such as "0.1" was a TypeError from ">", naming no setting)
        if self.max_layer_error is not None and not (is_number(self.max_layer_error) and self.max_layer_error > 0):
            raise ValueError(f"--max-layer-error must be a finite number > 0 (relative L2, e.g. 0.1); got "
                             f"{self.max_layer_error!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"--search {self.search!r} is invalid: choose one of {list(SEARCHES)}")
        if self.search == "warmup" and (self.min_psnr is None or self.max_layer_error is not None):
            raise ValueError("--search warmup verifies whole plans against --min-psnr and scores no per-layer "
                             "attention errors: give --min-psnr without --max-layer-error (or use --search "
                             "allocation)")
        if self.search == "warmup":
            _check_warmup_options(self)
        if self.cost_terms not in COST_TERMS:
            raise ValueError(f"--cost-terms {self.cost_terms!r} is invalid: choose one of {list(COST_TERMS)}")
        if self.costs not in COST_SOURCES:
            raise ValueError(f"--costs {self.costs!r} is invalid: choose one of {list(COST_SOURCES)}")
        defaults = CalibrationSettings.__dataclass_fields__
        given = [f"--{name.replace('_', '-')} {getattr(self, name)}" for name in ("arch", "kernel", "cost_terms")
                 if self.costs == "measured" and getattr(self, name) != defaults[name].default]
        if given:  # (the cost model's settings: with measured costs they changed nothing, without a word)
            raise ValueError(f"{', '.join(given)} {'prices' if len(given) == 1 else 'price'} the cost model, which "
                             "--costs measured does not use (it times each candidate on --device): drop "
                             + ("it" if len(given) == 1 else "them") + ", or use --costs model")
        if self.budget_on not in BUDGET_RULES:
            raise ValueError(f"--budget-on {self.budget_on!r} is invalid: choose one of {list(BUDGET_RULES)}")
        if self.sensitivity not in SENSITIVITY:
            raise ValueError(f"--sensitivity {self.sensitivity!r} is invalid: choose one of {list(SENSITIVITY)}")
        if self.groundtruth not in GROUNDTRUTH_RULES:
            raise ValueError(f"--groundtruth {self.groundtruth!r} is invalid: choose one of {list(GROUNDTRUTH_RULES)}")
        if self.groundtruth == "require" and self.model not in GROUNDTRUTH_MODELS:
            raise ValueError(f"--groundtruth require: {self.model!r} has no ground-truth checker (only "
                             f"{', '.join(GROUNDTRUTH_MODELS)} has); use --groundtruth report")
        if self.groundtruth == "require" and self.groundtruth_prompt_error():
            raise ValueError(f"--groundtruth require: {self.groundtruth_prompt_error()}; write every prompt as "
                             "'a COLOUR SHAPE moving DIRECTION' (e.g. 'a red circle moving left'), or use "
                             "--groundtruth report")
        _check_counts(self)
        _check_run_inputs(self)

    def call_kwargs(self, pipe=None) -> dict:
        """The pipeline call's size, steps and text settings; with ``pipe``, those its ``__call__`` takes. An image
        pipeline takes no ``num_frames``: a one-frame size (an image model's default) is left out, and a setting the
        pipeline does not take is refused by its flag (before: FluxPipeline.__call__'s TypeError "unexpected keyword
        argument 'num_frames'" after the model loaded, for every tiny image model)."""
        wanted = generation_kwargs(self)
        if pipe is None:
            return wanted
        takes = generation_kwargs(self, pipe)
        extra = [k for k, v in wanted.items() if k not in takes and not (k == "num_frames" and v == 1)]
        if extra:
            flags = {"num_frames": "frames", "num_inference_steps": "steps"}
            given = ", ".join(f"--{flags.get(k, k).replace('_', '-')} {wanted[k]}" for k in extra)
            raise ValueError(f"{given}: {type(pipe).__name__} takes no {', '.join(extra)}"
                             + (" (it makes images)" if "num_frames" in extra else "") + "; drop "
                             + ("it" if len(extra) == 1 else "them"))
        return takes


#: What ``search="warmup"`` does not read: the allocation search's options and (without ``capture_dir``) the q/k/v
#: sample's step buckets and size (the CLI refuses the same flags).
ALLOCATION_ONLY = ("search_iters", "uniform_options", "probe_videos", "sensitivity", "layer_groups")
SAMPLE_ONLY = ("phases", "warmup", "cooldown", "samples_per_bucket", "max_sample_mb")


def unread_by_warmup(capture: bool) -> Tuple[str, ...]:
    """The settings ``search="warmup"`` does not read (with ``capture``, the sample's are read: they size it)."""
    return ALLOCATION_ONLY + (() if capture else SAMPLE_ONLY)


def warmup_refusal(changed: Dict[str, object]) -> Optional[str]:
    """The one-line refusal of ``--search warmup`` given settings it does not read (``{setting: value}``, those set to
    other values than their defaults; the CLI's flags and the API's settings alike), or None for none."""
    if not changed:
        return None
    flags = {"warmup": "warmup-candidates", "cooldown": "cooldown-candidates"}

    def shown(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else f"{value:g}" \
            if isinstance(value, float) else str(value)

    given = [f"--{flags.get(name, name.replace('_', '-'))} {shown(value)}" for name, value in changed.items()]
    return (f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --search warmup (no scoring, no "
            "probes, every warm-up length tried, no q/k/v sample without --capture): drop "
            + ("it" if len(given) == 1 else "them") + ", or use --search allocation")


def _check_warmup_options(settings: CalibrationSettings) -> None:
    """``search="warmup"`` with a setting it does not read at another value than its default: refused by name (it
    would change nothing; before, the calibration ran as if it had not been given)."""
    fields = CalibrationSettings.__dataclass_fields__
    values = {name: getattr(settings, name) for name in unread_by_warmup(settings.capture_dir is not None)}
    changed = {name: value for name, value in values.items()
               if (tuple(value) if isinstance(value, list) else value) != fields[name].default}
    message = warmup_refusal(changed)
    if message is not None:
        raise ValueError(message)


#: The counts of a calibration and their least values: whole numbers, as the CLI's flags parse them (a 2.5 or a
#: fraction such as validate=0.3 was a TypeError from range() after the model had loaded, a str one from "<").
_COUNTS = (("phases", 1), ("samples_per_bucket", 1), ("search_iters", 0), ("batch_size", 1), ("layer_groups", 0),
           ("validate", 0), ("uniform_options", 0), ("probe_videos", 1))


def _check_counts(settings: CalibrationSettings) -> None:
    """Every count of :data:`_COUNTS` a whole number at or above its least value (``validate`` also None: a third of
    the prompts), ``replay_mb`` a finite number >= 0."""
    from .._util import is_int, is_number

    for name, least in _COUNTS:
        value = getattr(settings, name)
        if name == "validate" and value is None:
            continue
        if not (is_int(value) and value >= least):
            meaning = {"layer_groups": " (0: no layer probes)", "validate": " (0: no validation set)"}.get(name, "")
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= {least}{meaning}; got {value!r}")
    replay = settings.replay_mb
    if not (is_number(replay) and math.isfinite(replay) and replay >= 0):
        raise ValueError(f"--replay-mb must be a finite number of MiB >= 0 (0: off); got {replay!r}")


def _check_run_inputs(settings: CalibrationSettings) -> None:
    """What ``dit-accel calibrate`` checks before the model loads, checked for the Python API too: else a bad
    value ran the dense generation first (a method, arch, kernel or tile refused minutes later, an empty seed list
    a bare ``max()`` error), or ran to a wrong answer (a NaN or 500 dB budget: a dense plan; a repeated prompt or
    seed: the same video counted twice, on both sides of the validation split)."""
    from .._util import is_int, is_number
    from ..eval.inputs import check_generation_settings
    from ..eval.metrics import PSNR_CAP
    from ..kernels.cost import constants
    from ..pipelines.apply_checks import BACKENDS
    from .candidates import CALIBRATABLE, GRIDS, check_candidate_tile

    check_generation_settings(settings)
    _check_distinct_texts(settings.prompts)
    psnr = settings.min_psnr
    if psnr is not None and not (is_number(psnr) and 0 < psnr <= PSNR_CAP):
        raise ValueError(f"--min-psnr must be a number of dB in (0, {PSNR_CAP:g}], e.g. 30; got {psnr!r}")
    error = settings.max_layer_error
    if error is not None and not (is_number(error) and math.isfinite(error)):
        raise ValueError(f"--max-layer-error must be a finite number > 0 (relative L2, e.g. 0.1); got {error!r}")
    for name in ("warmup", "cooldown"):
        values = getattr(settings, name)
        if not isinstance(values, (list, tuple)) or not all(is_int(v) and v >= 0 for v in values):
            raise ValueError(f"--{name}-candidates must be step counts >= 0, e.g. (1, 2); got {values!r}")
    if not (is_number(settings.max_sample_mb) and math.isfinite(settings.max_sample_mb) and settings.max_sample_mb > 0):
        raise ValueError(f"--max-sample-mb must be a finite number of MiB > 0; got {settings.max_sample_mb!r}")
    if settings.candidates not in GRIDS:
        raise ValueError(f"--candidates {settings.candidates!r} is invalid: choose one of {list(GRIDS)}")
    methods = settings.methods
    if isinstance(methods, str) or not methods or any(m not in CALIBRATABLE for m in methods):
        raise ValueError(f"--methods {methods!r} is invalid: a list of methods from {', '.join(CALIBRATABLE)}, "
                         "e.g. ('tile', 'sla')")
    try:
        constants(settings.arch, settings.kernel)
    except ValueError as exc:
        raise ValueError(f"--arch {settings.arch} --kernel {settings.kernel}: {exc}") from None
    if settings.backend not in BACKENDS:
        raise ValueError(f"--backend {settings.backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    _check_tile(settings, check_candidate_tile)
    _check_switches_and_capture(settings)
    check_step_borders(settings)


def _check_distinct_texts(prompts) -> None:
    """Prompts that differ in their spacing only (``"a red circle"``, ``"a red  circle "``) refused as repeats: the
    text encoders' tokenizers drop the extra spaces, so they are one video, which could sit on both sides of the
    validation split (before: the validation set then held a search video, and the search counted it twice)."""
    seen: Dict[str, str] = {}
    for prompt in prompts:
        key = " ".join(prompt.split())
        if key in seen:
            raise ValueError(f"prompts {seen[key]!r} and {prompt!r} differ in their spaces only, which the text "
                             "encoder drops: they are one prompt, and each prompt must be given once; remove one")
        seen[key] = prompt


def check_step_borders(settings: CalibrationSettings) -> None:
    """``warmup`` and ``cooldown`` candidates shorter than ``steps`` (once known: a tiny model's default fills it
    in). Before, one at or past the step count was dropped without a word (``--warmup-candidates 15`` on 12
    steps: no 15-step warm-up was searched, and none could be)."""
    steps, defaults = settings.steps, CalibrationSettings.__dataclass_fields__
    if not isinstance(steps, int) or isinstance(steps, bool):
        return
    for name, what in (("warmup", "dense warm-up"), ("cooldown", "last-steps phase")):
        values = getattr(settings, name)
        if tuple(values) == defaults[name].default:  # (the defaults fit any step count they can)
            continue
        long = [v for v in values if v >= steps]
        if long:
            raise ValueError(f"--{name}-candidates {','.join(map(str, values))}: a {what} must be shorter than the "
                             f"{steps} steps the plan is calibrated for (--steps); give lengths below {steps}"
                             + (" (all the steps dense is the dense plan, always a choice)" if name == "warmup"
                                else ""))


def _check_switches_and_capture(settings: CalibrationSettings) -> None:
    """``extend_seeds`` and ``baseline`` True or False (a string such as "no" is truthy: it ran the baseline, or
    added seeds, without a word), and ``capture_dir`` a folder that holds no other run's captures (before: a file
    was a FileExistsError in the middle of the dense run, and another run's captures were silently mixed in; the
    CLI refused both)."""
    from .._util import is_bool

    for name in ("extend_seeds", "baseline"):
        value = getattr(settings, name)
        if not is_bool(value):
            raise ValueError(f"{name}={value!r} is invalid: True or False")
    capture = settings.capture_dir
    if capture is None:
        return
    import os

    if not isinstance(capture, (str, os.PathLike)) or not str(os.fspath(capture)).strip():
        raise ValueError(f"--capture {capture!r} is invalid: pass a folder path for the q/k/v captures")
    if os.path.exists(capture):  # (check_capture_dir creates the folder: only one that exists is checked here)
        from ..pipelines.capture import check_capture_dir

        check_capture_dir(capture)


def grid_dims(model) -> Optional[int]:
    """The number of dimensions of ``model``'s token grid where its preset says (a cached hub snapshot read as a
    folder is), before it loads; else None."""
    from ..pipelines.presets import PRESETS, model_family

    try:
        class_name, _ = model_family(model)
    except ValueError:
        return None  # not known before loading: candidate_grid checks the tile against the grid
    preset = PRESETS.get(class_name)
    return None if preset is None else preset.grid_dims


def _check_tile(settings: CalibrationSettings, check_candidate_tile) -> None:
    """``tile``: sizes >= 1, as many as the model's token grid has dimensions where its preset says; and ``methods``
    not only video ones (Radial, VSA) on an image model, where they have no candidate (before: the calibration
    ran to a dense plan and wrote it)."""
    from .candidates import VIDEO_ONLY

    dims = grid_dims(settings.model)
    if dims == 2 and set(settings.methods) <= set(VIDEO_ONLY):
        raise ValueError(f"--methods {','.join(settings.methods)}: {settings.model} makes images (token grid H, W), "
                         f"and {', '.join(settings.methods)} {'has' if len(settings.methods) == 1 else 'have'} "
                         "candidates on video grids (T, H, W) only: the plan could only be dense. Pass other "
                         "--methods, e.g. tile,sla")
    if settings.tile is None:
        return
    try:
        tile = check_candidate_tile(settings.tile)
    except (ValueError, TypeError):
        raise ValueError(f"--tile {settings.tile!r} is invalid: one size >= 1 per grid dimension, e.g. (1, 8, 8)") \
            from None
    if dims is not None and len(tile) != dims:
        raise ValueError(f"--tile {tile} has {len(tile)} sizes, but the token grid of {settings.model} has {dims} "
                         f"dimensions: give {dims} sizes, {'T,H,W' if dims == 3 else 'H,W'}")


def add_quality_options(parser) -> None:
    """The flags of how a plan's quality is judged and weighed, shared by ``dit-accel calibrate`` and the evidence
    script: ``--budget-on``, ``--sensitivity``, ``--layer-groups``, ``--groundtruth``."""
    parser.add_argument("--budget-on", choices=BUDGET_RULES, default="worst",
                        help="--min-psnr holds on every calibration video (worst, default: the margin a held-out set "
                             "needs) or on their mean; the validation videos are held to the same rule")
    parser.add_argument("--sensitivity", choices=SENSITIVITY, default="probe",
                        help="probe (default): weigh each step bucket's and layer group's attention error by how much "
                             "it moves the final output, measured with one generation per bucket and per layer group; "
                             "uniform: every step and layer counts the same")
    parser.add_argument("--layer-groups", type=int, default=4, metavar="N",
                        help="contiguous layer groups the sensitivity probe measures apart (default 4; 0: none)")
    parser.add_argument("--groundtruth", choices=GROUNDTRUTH_RULES, default="report",
                        help="tiny-shapes: report the calibration videos' ground-truth checks (default), or require "
                             "a plan to keep colour, shape, motion and consistency no worse than dense's")
