"""The settings of a fine-tuning run (:class:`FinetuneConfig`) and their checks, made before anything loads."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .._util import is_int, is_number, portable_path
from ..checkpoints.finetuned import RUN_FILE
from ..methods import SLA, VSA, Dense, Method, registered_methods
from ..plans.per_head import PerHead
from ..plans.sparse_plan import PlanMethod, SparsePlan
from . import data as data_mod

__all__ = ["FinetuneConfig", "validate_config", "finetune_methods", "RUN_FILE", "LOG_FILE"]

MODES = ("distill", "data")
MIXED_PRECISION = ("no", "fp16", "bf16")
LOG_FILE = "finetune_log.json"
CKPT_DIR = "checkpoints"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_CACHED_PROMPTS = 256
# Default samples per optimizer step in distill mode (see FinetuneConfig, "Samples per step").
DISTILL_SAMPLES_PER_STEP = 8
MAX_COUNT = 2 ** 31 - 1  # the most steps, samples per micro-batch or micro-batches per step a run takes

# Settings that name files or folders: recorded relative to the output folder (FinetuneConfig.settings).
_PATHS = ("output", "data", "prompts", "eval_data")
# Settings that may change between a run and its resumption (they do not change the trajectory). Not eval_batches:
# the run's start and end held-out losses are over those batches, and the start was measured before the resumption.
# (gradient checkpointing recomputes what it dropped, the same values: a run out of memory resumes with it)
_RESUMABLE = {"steps", "checkpoint_every", "log_every", "resume", "overwrite", "output", "checkpoints_total_limit",
              "progress", "plan_path", "gradient_checkpointing"}


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the CLI maps its options onto these fields 1:1).

    Args:
        model: ``"tiny-wan"``, a local Diffusers folder, a hub id, or an already
            loaded pipeline object (its transformer is modified in place).
        method: a :class:`~dit_accel.Method` config (SLA, Radial, Tile, GNA or VSA); or None with ``plan``.
        output: output folder (weights, checkpoints, log).
        plan: a calibrated :class:`~dit_accel.SparsePlan` (or the path of its JSON) to train under instead
            of ``method`` (exactly one of the two); see the module docstring.
        mode: ``"distill"`` (dense teacher, ``prompts`` file) or ``"data"`` (``data`` folder).
        steps: total optimizer steps. lr: AdamW learning rate (constant after
            ``lr_warmup_steps`` linear warmup).
        rank, alpha: LoRA rank and alpha (``alpha=None`` -> ``rank``).
        target_modules: module names (suffixes) that get LoRA adapters.
        prompts: text file, one prompt per line (distill mode).
        data: caption folder with ``metadata.jsonl`` (data mode; optional in
            distill mode, where it supplies clean latents and prompts).
        batch_size: samples per process per micro-batch. frames, height, width: pixel shape.
        gradient_accumulation_steps: micro-batches averaged into one optimizer step
            (samples per step = batch_size x this x processes; memory stays that of one micro-batch).
            ``None`` (default): distill mode accumulates until a step holds at least
            ``DISTILL_SAMPLES_PER_STEP`` (8) samples, data mode uses 1 (see "Samples per step" below).
        seed: seeds LoRA init, noise, timesteps, prompt choice and data order.
        checkpoint_every: checkpoint each K steps (0: only the final step).
        resume: continue from the last checkpoint in ``output``.
        overwrite: delete ``output`` contents when it holds another run.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (frozen weights in
            that dtype, trainable ones in fp32, forward under autocast). ``None`` (default): what
            ``accelerate launch --mixed_precision`` (or its config) says, else ``"no"``; resolved by
            :func:`validate_config` and recorded.
        gradient_checkpointing: recompute transformer blocks in backward.
        log_every: progress-bar/log print interval in steps.
        sla_lr_scale: learning rate of the SLA projections relative to ``lr``.
        eval_batches: fixed held-out batches whose loss is measured before the
            first and after the last step (``eval_loss_start``/``eval_loss_end``; 0 disables).
        eval_data: with ``data``: a caption folder of clips kept out of training, which the held-out batches
            are drawn from. Without it they are drawn from ``data`` at noise levels and timesteps of their own:
            the loss then says how well the run fits its clips, not how it does on others.
        vsa_decay_steps: ``--method vsa`` only: the optimizer steps over which the sparsity rises from 0
            (dense) to the method's target, FastVideo's VSA sparsity decay (see :func:`vsa_sparsity_at`).
            ``None``: a quarter of ``steps``, written into the run record, which a resumed run keeps.
            0: the target from the first step.
        vsa_decay_interval: the sparsity rises in stairs of this many steps (FastVideo's
            ``VSA_decay_interval_steps``; default 1, a rise each step).
        cp: ``(ulysses, ring)`` degrees of context parallelism over all launched processes: every
            process sees the same samples and holds a share of each sequence (no data parallelism).

    Samples per step (measured on tiny-wan, SLA(topk=0.5), distill, 10 steps): the mean
    gradient over many samples is stable (two disjoint 48-sample means agree at cosine 0.88),
    but each sample's gradient points along it with a random sign (pairwise cosine 0.00 +- 0.03),
    so one-sample steps mostly fit that sample: at batch 1 no learning rate from 1e-5 to 2e-3
    lowered the held-out loss (x1.00 to x1.16), while 16 samples per step at lr 1e-3 lowered it
    5-8% on each of 4 seeds. Long runs average the noise out either way.
    """

    model: Any
    method: Optional[Method] = None
    output: Optional[str] = None
    mode: str = "distill"
    steps: int = 1000
    lr: float = 1e-4
    rank: int = 16
    alpha: Optional[float] = None
    target_modules: Tuple[str, ...] = DEFAULT_TARGETS
    prompts: Optional[str] = None
    data: Optional[str] = None
    batch_size: int = 1
    gradient_accumulation_steps: Optional[int] = None
    frames: int = 81
    height: int = 480
    width: int = 832
    seed: int = 0
    checkpoint_every: int = 0
    checkpoints_total_limit: int = 2
    resume: bool = False
    overwrite: bool = False
    mixed_precision: Optional[str] = None
    gradient_checkpointing: bool = False
    log_every: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = 0
    max_sequence_length: int = 512
    backend: str = "auto"
    dense_layers: Optional[Sequence[int]] = None
    eval_batches: int = 2
    sla_lr_scale: float = 1.0
    progress: bool = True
    cp: Optional[Tuple[int, int]] = None
    plan: Any = None
    vsa_decay_steps: Optional[int] = None
    vsa_decay_interval: int = 1
    eval_data: Optional[str] = None

    def sparse_plan(self) -> Optional[SparsePlan]:
        """``plan`` as a :class:`SparsePlan` (read from its file when a path), or None."""
        if self.plan is None or isinstance(self.plan, SparsePlan):
            return self.plan
        if not isinstance(self.plan, (str, Path)):
            raise ValueError(f"plan={self.plan!r} is invalid: a dit_accel.SparsePlan or the path of its JSON "
                             "(dit-accel calibrate --out)")
        cached = self.__dict__.get("_loaded_plan")  # read once per path: the run uses the plan it validated
        if cached is None or cached[0] != str(self.plan):
            try:
                cached = (str(self.plan), SparsePlan.load(self.plan))
            except ValueError as err:
                raise ValueError(f"--plan {self.plan}: {err}") from None
            self.__dict__["_loaded_plan"] = cached
        return cached[1]

    def settings(self) -> Dict[str, Any]:
        """JSON-able settings (the method as its dict, the model as its name, a plan as its content hash
        and, as ``plan_path``, where it was read from). The files and folders of the run (``output``, ``data``,
        ``prompts``, ``plan_path``) are named as :func:`~dit_accel._util.portable_path` names them from the output
        folder: never an absolute path of the machine that trained (the records travel with the weights)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "method":
                v = v.to_dict() if isinstance(v, Method) else v
            elif f.name == "plan":
                plan = self.sparse_plan()
                v = plan.content_hash() if plan is not None else None
                out["plan_path"] = self.portable(self.plan) if isinstance(self.plan, (str, Path)) else None
            elif f.name == "model" and not isinstance(v, str):
                v = f"<{type(v).__name__} object>"
            elif f.name in _PATHS and isinstance(v, (str, Path)):
                v = self.portable(v)
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return json.loads(json.dumps(out))

    def portable(self, path) -> str:
        """``path`` as the run's records name it (relative to the output folder, or ``dit_accel/...``)."""
        return portable_path(path, self.output or ".")


def vsa_sparsity_at(step: int, target: float, decay_steps: int, interval: int = 1) -> float:
    """The VSA sparsity optimizer step ``step`` (0-based) trains at: FastVideo's staircase decay from dense to
    ``target``. It rises by ``target * interval / decay_steps`` every ``interval`` steps (FastVideo's
    ``VSA_decay_rate`` per ``VSA_decay_interval_steps``), so step 0 runs dense (sparsity 0) and steps from
    ``decay_steps`` on run ``target``; ``decay_steps=0`` runs ``target`` throughout."""
    if decay_steps <= 0 or step >= decay_steps:
        return float(target)
    stairs = (step // interval) * interval
    return min(float(target), float(target) * stairs / decay_steps)


def default_vsa_decay_steps(steps: int) -> int:
    """``vsa_decay_steps`` when not given: a quarter of the run (at least 1 step of dense start)."""
    return max(1, steps // 4)


def finetune_methods() -> Tuple[str, ...]:
    """Names of the registered methods that can be fine-tuned (``register_method(..., finetunable=True)``)."""
    return tuple(name for name, entry in registered_methods().items() if entry.finetunable)


def launched_mixed_precision() -> str:
    """The precision ``accelerate launch --mixed_precision`` (or its config file) asked for, passed on as
    ``ACCELERATE_MIXED_PRECISION``; "no" when not launched so. ValueError for one fine-tuning does not train in."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if launched in ("",) + MIXED_PRECISION:
        return launched or "no"
    raise ValueError(f"accelerate launch --mixed_precision {launched} (ACCELERATE_MIXED_PRECISION) is not one "
                     "finetune trains in: choose no, fp16 or bf16 there, or pass --mixed-precision no|fp16|bf16 "
                     "(mixed_precision=).")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_config(config: FinetuneConfig) -> None:
    """Check the settings that need no model (types, ranges, files); ValueError naming the option."""
    c = config
    if isinstance(c.method, (SparsePlan, PlanMethod)):
        raise ValueError("method= is a calibrated plan: pass it as plan= (dit-accel finetune --plan PLAN.json).")
    _require(not (c.method is not None and c.plan is not None),
             "--plan and --method exclude each other: the plan names the method of every layer, head and step; "
             "drop --method (and its options), or drop --plan to train one method everywhere.")
    if c.plan is not None:
        _require(c.dense_layers is None, "--dense-layers does not combine with --plan: the plan's entries say "
                                         "which layers run dense; calibrate a plan with them, or drop --dense-layers.")
        _check_plan_methods(c.sparse_plan())
    else:
        _require(isinstance(c.method, Method) and c.method.name in finetune_methods(),
                 f"method={c.method!r} is invalid: fine-tuning supports {list(finetune_methods())} configs "
                 "(e.g. dit_accel.SLA(topk=0.05)), or pass a calibrated plan (--plan PLAN.json).")
    _plain_numbers(c)
    if c.mixed_precision is None:  # (before: "no", which overrode `accelerate launch --mixed_precision bf16`)
        c.mixed_precision = launched_mixed_precision()
    _check_model(c)
    _check_vsa_options(c)
    _check_sequences(c)
    _require(c.mode in MODES, f"--mode {c.mode!r} is invalid: choose one of {list(MODES)}.")
    for name in ("steps", "rank", "batch_size", "frames", "height", "width", "max_sequence_length"):
        v = getattr(c, name)
        _require(is_int(v) and v > 0, f"--{name.replace('_', '-')} {v!r} is invalid: must be a positive integer.")
    _check_geometry(c)
    _require(c.gradient_accumulation_steps is None or (
        is_int(c.gradient_accumulation_steps) and c.gradient_accumulation_steps > 0),
        f"--gradient-accumulation-steps {c.gradient_accumulation_steps!r} is invalid: must be a positive integer "
        "(or unset for the mode's default).")
    # (before: past 2**63 torch refused the sizes, past 2**64 the loss's divisor, in a raw TypeError or OverflowError
    # once the model had loaded)
    for name in ("steps", "batch_size", "gradient_accumulation_steps"):
        v = getattr(c, name)
        _require(v is None or v <= MAX_COUNT, f"--{name.replace('_', '-')} {v} is invalid: must be at most "
                                              f"{MAX_COUNT} (2**31 - 1); samples per step = --batch-size x "
                                              "--gradient-accumulation-steps x processes.")
    for name in ("checkpoint_every", "lr_warmup_steps", "seed", "checkpoints_total_limit", "eval_batches"):
        v = getattr(c, name)
        _require(is_int(v) and v >= 0, f"--{name.replace('_', '-')} {v!r} is invalid: must be an integer >= 0.")
    # (torch's generators take 64 bits: a larger seed failed after the model loaded, as "Overflow when unpacking long
    # long", naming no option)
    _require(c.seed < 2 ** 64, f"--seed {c.seed} is invalid: must be an integer from 0 to 2**64 - 1 "
                               f"({2 ** 64 - 1}), the seeds torch's generators take.")
    _require(is_int(c.log_every) and c.log_every > 0, f"--log-every {c.log_every!r} must be a positive integer.")
    _require(is_number(c.lr) and math.isfinite(c.lr) and c.lr > 0, f"--lr {c.lr!r} must be a positive number.")
    for name, what in (("weight_decay", "AdamW's decoupled weight decay; default 0"),
                       ("max_grad_norm", "the gradient norm clipped to; 0 disables clipping; default 1.0")):
        v = getattr(c, name)
        _require(is_number(v) and math.isfinite(v) and v >= 0,
                 f"--{name.replace('_', '-')} {v!r} is invalid: must be a number >= 0 ({what}).")
    # (an infinite alpha or scale would pass "> 0" and show up only as a diverged run blamed on --lr)
    _require(c.alpha is None or (is_number(c.alpha) and math.isfinite(c.alpha) and c.alpha > 0),
             f"--alpha {c.alpha!r} must be a finite positive number (default: the rank).")
    _require(is_number(c.sla_lr_scale) and math.isfinite(c.sla_lr_scale) and c.sla_lr_scale > 0,
             f"--sla-lr-scale {c.sla_lr_scale!r} must be a finite positive number.")
    # (before: ignored without a word where no SLA projection trains)
    _require(c.sla_lr_scale == 1.0 or _runs_sla(c),
             f"--sla-lr-scale {c.sla_lr_scale:g} applies to the SLA projections, which only --method sla (or a "
             f"--plan with SLA heads) trains; {_method_label(c)} has none. Drop --sla-lr-scale.")
    _require(c.mixed_precision in MIXED_PRECISION,
             f"--mixed-precision {c.mixed_precision!r} is invalid: choose one of {list(MIXED_PRECISION)}.")
    targets = tuple(c.target_modules) if not isinstance(c.target_modules, str) else tuple(c.target_modules.split(","))
    _require(bool(targets) and all(isinstance(t, str) and t.strip() for t in targets),
             f"--target-modules {c.target_modules!r} must name at least one module, e.g. to_q,to_k,to_v,to_out.0.")
    _check_switches(c)
    _require(not (c.resume and c.overwrite), "--resume and --overwrite exclude each other: continue a run or replace it.")
    _require(c.output is not None and str(c.output).strip() != "", "--output is required: the folder for weights and logs.")
    for name in ("output", "data", "eval_data"):  # (an int or a list failed later in pathlib, or named a folder "5";
        v = getattr(c, name)          # data.read_prompts)
        _require(v is None or isinstance(v, (str, os.PathLike)),
                 f"--{name.replace('_', '-')} {v!r} is invalid: expected a path (str or pathlib.Path).")
    for name in ("data", "eval_data", "prompts"):  # (before: "" was Path("") = ".", the current folder: --data ""
        v, flag = getattr(c, name), f"--{name.replace('_', '-')}"  # trained on whatever its metadata.jsonl named)
        _require(not (isinstance(v, str) and not v.strip()), f"{flag} {v!r} is empty: give the path of "
                 + ("a text file with one prompt per line" if name == "prompts" else
                    "a folder with metadata.jsonl and images/videos") + f", or leave {flag} out.")
    _check_eval_data(c)
    _warn_schedules(c)
    # (before: --prompts was ignored without a word when --data was given; the run used the captions)
    _require(c.data is None or c.prompts is None,
             "--prompts and --data exclude each other: with --data the prompts are its captions (metadata.jsonl), so "
             "--prompts would be ignored. Drop --prompts, or drop --data to distill on --prompts with random latents.")
    if c.mode == "distill" and c.data is None:
        data_mod.read_prompts(c.prompts)


def _check_eval_data(c: FinetuneConfig) -> None:
    """``eval_data``: other clips than ``data``'s, for held-out batches that exist."""
    if c.eval_data is None:
        return
    _require(c.data is not None, f"--eval-data {c.eval_data} needs --data: it holds the clips kept out of training "
                                 "from a caption folder (without --data the held-out batches are random latents "
                                 "with their own prompts already). Drop --eval-data, or train on --data.")
    _require(is_int(c.eval_batches) and c.eval_batches > 0,
             f"--eval-data {c.eval_data} is unused with --eval-batches {c.eval_batches}: give --eval-batches 1 or "
             "more, or drop --eval-data.")
    same = os.path.isdir(c.data) and os.path.isdir(c.eval_data) and os.path.samefile(c.data, c.eval_data)
    _require(not same, f"--eval-data {c.eval_data} is --data itself: the held-out loss would be measured on the "
                       "training clips. Give a folder of other clips, or drop --eval-data (held-out noise on --data).")


def _warn_schedules(c: FinetuneConfig) -> None:
    """A warning when the learning-rate warmup or VSA's sparsity decay outlasts the run (before: without a word, the
    run ended below --lr, or below the sparsity its weights folder names). Not refused: a run trained in sessions
    (--resume with more --steps) continues the schedule."""
    from .._util import DitAccelWarning

    late = []
    if c.lr_warmup_steps > c.steps:
        late.append(f"--lr-warmup-steps {c.lr_warmup_steps} is past --steps {c.steps}: the last step trains at "
                    f"{c.steps / c.lr_warmup_steps:.0%} of --lr")
    if isinstance(c.method, VSA) and not c.__dict__.get("_vsa_decay_default") and c.vsa_decay_steps > c.steps:
        late.append(f"--vsa-decay-steps {c.vsa_decay_steps} is past --steps {c.steps}: the last step trains at "
                    f"{vsa_sparsity_at(c.steps - 1, 1.0, c.vsa_decay_steps, c.vsa_decay_interval):.0%} of the "
                    "target sparsity, which the weights folder names")
    import warnings

    said = c.__dict__.setdefault("_warnings", [])  # (the run's log lists them: --quiet keeps them off the terminal)
    if isinstance(c.method, VSA) and c.vsa_decay_steps and 1 < c.vsa_decay_interval >= c.vsa_decay_steps:
        # (before: without a word, a decay with no stair in it)
        said.append(f"dit_accel: --vsa-decay-interval {c.vsa_decay_interval} is not below --vsa-decay-steps "
                    f"{c.vsa_decay_steps}: steps 1 to {c.vsa_decay_steps} train dense (sparsity 0) and the next jumps "
                    "to the target, with no stair between. Lower --vsa-decay-interval (default 1), or give "
                    "--vsa-decay-steps 0 to train at the target from the start.")
        warnings.warn(said[-1], DitAccelWarning, stacklevel=3)
    if late:
        said.append(f"dit_accel: {'; '.join(late)}. Shorten the schedule, or raise --steps (a --resume with more "
                    "--steps continues it).")
        warnings.warn(said[-1], DitAccelWarning, stacklevel=3)


def _check_switches(c: FinetuneConfig) -> None:
    """The on/off settings are True or False (numpy's made so by :func:`_plain_numbers`), and ``backend`` one of
    apply()'s. Before: a string was truthy, so ``overwrite="no"`` (a config read from text) replaced the run in the
    output folder and ``resume="false"`` resumed, and a backend that is no backend was refused only once the model had
    loaded."""
    from ..pipelines.apply_checks import BACKENDS

    for name in ("resume", "overwrite", "gradient_checkpointing", "progress"):
        v = getattr(c, name)
        _require(isinstance(v, bool), f"{name}={v!r} is invalid: True or False.")
    _require(isinstance(c.backend, str) and c.backend in BACKENDS,
             f"--backend {c.backend!r} is invalid: choose one of {', '.join(BACKENDS)}.")


def _check_model(c: FinetuneConfig) -> None:
    """``model``: a name or path (a pathlib.Path becomes its string, as the loader takes it), or a pipeline with a
    ``transformer``. Before: None, a number or a Path failed after set-up with AttributeError "'PosixPath' object has
    no attribute 'to'", and a bare transformer was refused as a model that "has NoneType"."""
    if isinstance(c.model, os.PathLike):
        c.model = os.fspath(c.model)
    if isinstance(c.model, str):
        _check_family(c)
        return
    if getattr(c.model, "transformer", None) is not None:
        _check_pipe_dtype(c)
        return
    if hasattr(c.model, "components"):
        what = f"a {type(c.model).__name__} without a transformer (fine-tuning adapts a DiT pipeline's transformer)"
    elif hasattr(c.model, "forward"):
        what = (f"a {type(c.model).__name__}, a transformer without its pipeline (the run needs the pipeline's text "
                "encoder, VAE and scheduler too)")
    else:
        what = f"{c.model!r}"[:80]
    raise ValueError(f"model= is {what}: pass a pipeline that holds the transformer (e.g. WanPipeline.from_pretrained"
                     "(...)), an embedded model name (e.g. \"tiny-wan\"), a local Diffusers folder or a hub id.")


def _check_pipe_dtype(c: FinetuneConfig) -> None:
    """A pipeline passed in with a 16-bit transformer under ``mixed_precision="no"``, which trains in float32 and casts
    nothing (before: the first forward failed with a raw RuntimeError "Input type (float) and bias type
    (c10::BFloat16) should be the same", as with ``WanPipeline.from_pretrained(..., torch_dtype=torch.bfloat16)``)."""
    import torch

    if c.mixed_precision != "no" or not isinstance(c.model.transformer, torch.nn.Module):
        return
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtype = next((p.dtype for p in c.model.transformer.parameters() if p.dtype in half), None)
    if dtype is not None:
        raise ValueError(f"model=: the pipeline's transformer holds {dtype} weights, and mixed_precision='no' trains in "
                         f"float32 (nothing is cast): pass mixed_precision='{half[dtype]}' (--mixed-precision "
                         f"{half[dtype]}), or cast the pipeline to float32 first (pipe.to(torch.float32)).")


def _check_family(c: FinetuneConfig) -> None:
    """A model whose transformer the trainer cannot call (or, with ``--data``, encode clips for), refused before
    it loads, as it would be once loaded (before: after minutes of loading a real model). Only where the class is
    known for sure (a tiny or embedded model, a folder or a cached snapshot: their model_index.json), not guessed
    from a hub id's words."""
    from ..models.loading import ModelLoadError, model_folder, resolve_model_kind
    from ..pipelines.presets import model_family
    from .model_io import family_error

    try:
        if resolve_model_kind(c.model) != "tiny" and model_folder(c.model) is None:
            return
        class_name = model_family(c.model)[0]
    except (ValueError, ModelLoadError):
        return  # (the loader names what is wrong with the model)
    problem = family_error(class_name, c.mode, c.data, c.cp)
    if problem is not None:
        raise ValueError(f"--model {c.model}: {problem}")


def _check_geometry(c: FinetuneConfig) -> None:
    """``--frames``/``--height``/``--width`` that the model's VAE factors and patch size refuse, and a
    ``--max-sequence-length`` past its tokenizers', read from its folder's configs before it loads, as the trainer
    refuses them once loaded (before: after minutes of loading a real model). Models built in code (tiny ones) and
    uncached hub ids are checked once they load."""
    from ..models.loading import ModelLoadError, early_text_length_error, model_folder, resolve_model_kind
    from ..pipelines.presets import model_family
    from .model_io import geometry_error

    if not isinstance(c.model, str):
        return
    try:
        folder = model_folder(c.model) if resolve_model_kind(c.model) != "tiny" else None
        class_name = model_family(c.model)[0] if folder is not None else None
    except (ValueError, ModelLoadError):
        return
    problem = (class_name and geometry_error(folder, class_name, c.frames, c.height, c.width)) or (
        folder is not None and early_text_length_error(c.model, c.max_sequence_length))
    if problem:
        raise ValueError(problem)


def _plain_numbers(c: FinetuneConfig) -> None:
    """numpy bools, integers and floats become Python ones: the checks below name them otherwise as "not an integer"
    (or not True or False) and the run record (JSON) cannot hold them."""
    import numpy as np

    for f in fields(c):
        v = getattr(c, f.name)
        if isinstance(v, np.bool_):
            setattr(c, f.name, bool(v))
        elif isinstance(v, np.integer):
            setattr(c, f.name, int(v))
        elif isinstance(v, np.floating):
            setattr(c, f.name, float(v))


def _int_list(value, what: str, minimum: int):
    """``value`` (a list or tuple of integers, numpy ones too) as a tuple of Python ints >= ``minimum``."""
    import numpy as np

    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    _require(items is not None and all(is_int(v) and v >= minimum for v in items), what)
    return tuple(int(v) for v in items)


def _check_sequences(c: FinetuneConfig) -> None:
    """``target_modules``, ``dense_layers`` and ``cp``: the kinds the CLI's parser makes, numpy ones accepted."""
    _require(isinstance(c.target_modules, (str, list, tuple)),
             f"--target-modules {c.target_modules!r} is invalid: a comma-separated string or a list of module "
             "names, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'].")
    # One spelling, the CLI's: "to_q, to_k" trained no " to_k" (refused as "did you mean to_k?"), and a run recorded
    # with the string could not be resumed with the list (or from the CLI).
    names = target_names(c.target_modules)
    if names and all(isinstance(t, str) and t for t in names):  # (else refused below, as given)
        c.target_modules = tuple(dict.fromkeys(names))  # a name given twice adapts its layers once
    if c.dense_layers is not None:
        what = f"--dense-layers {c.dense_layers!r} is invalid: N >= 0 (the first N layers) or a list of layer " \
               "indices >= 0, e.g. [0, 1]."
        if is_int(c.dense_layers):  # as apply(dense_layers=N)
            _require(c.dense_layers >= 0, what)
            c.dense_layers = list(range(c.dense_layers))
        else:
            c.dense_layers = sorted(set(_int_list(c.dense_layers, what, 0)))  # (one spelling: 1,0 is 0,1)
    if c.cp is not None:
        cp = _int_list(c.cp, f"--cp {c.cp!r} is invalid: (ulysses, ring), two positive integers, e.g. (2, 1).", 1)
        _require(len(cp) == 2, f"--cp {c.cp!r} is invalid: (ulysses, ring), two positive integers, e.g. (2, 1).")
        c.cp = cp


def target_names(targets) -> Tuple:
    """``--target-modules`` as a tuple of names without surrounding spaces (a string split at its commas, empty
    pieces dropped, as the CLI does)."""
    if isinstance(targets, str):
        return tuple(t.strip() for t in targets.split(",") if t.strip())
    return tuple(t.strip() if isinstance(t, str) else t for t in targets)


def _check_vsa_options(c: FinetuneConfig) -> None:
    """The VSA decay settings: only with ``--method vsa``; a default decay length resolved (and recorded)."""
    vsa = isinstance(c.method, VSA)
    if not vsa:
        _require(c.vsa_decay_steps is None and c.vsa_decay_interval == 1,
                 "--vsa-decay-steps and --vsa-decay-interval apply to --method vsa only; drop them.")
        return
    _require(isinstance(c.vsa_decay_interval, int) and not isinstance(c.vsa_decay_interval, bool)
             and c.vsa_decay_interval > 0,
             f"--vsa-decay-interval {c.vsa_decay_interval!r} is invalid: must be a positive integer (steps per rise "
             "of the sparsity; default 1).")
    if c.vsa_decay_steps is None:
        if isinstance(c.steps, int) and c.steps > 0:
            c.vsa_decay_steps = default_vsa_decay_steps(c.steps)
            c.__dict__["_vsa_decay_default"] = True  # a resumed run keeps the recorded length (checkpoints.py)
        return
    _require(isinstance(c.vsa_decay_steps, int) and not isinstance(c.vsa_decay_steps, bool)
             and c.vsa_decay_steps >= 0,
             f"--vsa-decay-steps {c.vsa_decay_steps!r} is invalid: must be an integer >= 0 (steps from dense to the "
             "target sparsity; 0: the target from the start; default a quarter of --steps).")


def _runs_sla(c: FinetuneConfig) -> bool:
    """Whether the run trains SLA projections: under SLA, or a plan with SLA heads."""
    plan = c.sparse_plan()
    methods = plan.methods() if plan is not None else [c.method]
    inner = [m for method in methods for m in (method.methods if isinstance(method, PerHead) else (method,))]
    return any(isinstance(m, SLA) for m in inner)


def _check_plan_methods(plan: SparsePlan) -> None:
    """Every method a plan runs must be fine-tunable (or dense)."""
    allowed = finetune_methods()
    for method in plan.methods():
        inner = method.methods if isinstance(method, PerHead) else (method,)
        bad = sorted({m.name for m in inner if not isinstance(m, Dense) and (m.name not in allowed or isinstance(m, VSA))})
        if bad:
            raise ValueError(f"--plan runs {bad}, which cannot be fine-tuned; fine-tuning supports {list(allowed)} "
                             "(and dense; VSA only as --method vsa, not in a plan). Calibrate with --methods limited "
                             "to those.")


def _method_label(config: FinetuneConfig) -> str:
    """How error messages and the progress bar name what the student runs."""
    return f"--plan {config.plan}" if isinstance(config.plan, (str, Path)) else (
        "the plan" if config.plan is not None else f"--method {config.method.name}")
