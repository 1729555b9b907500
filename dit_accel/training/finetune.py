"""Fine-tuning a sparse-attention student: LoRA (+ SLA projections) with accelerate and peft.

Two modes:

- ``distill`` (no dataset, how SLA was tuned): the dense model is the teacher.
  Each step draws clean latents (standard normal, or VAE latents of ``data``
  when given), a noise level ``sigma`` and a prompt; the student (the model
  under ``dit_accel.apply(method)`` with trainable LoRA) and the teacher (the
  same transformer with the LoRA disabled and dit_accel's processors swapped
  out, under ``no_grad``) see the same noisy latents, timesteps and prompt
  embeddings; loss = MSE(student output, teacher output).
- ``data``: a caption folder (see :mod:`dit_accel.training.data`) encoded with
  the pipeline's VAE; flow-matching loss MSE(prediction, noise - latents).

Under a calibrated plan (``plan=``, ``dit-accel finetune --plan PLAN.json``) the student runs the
plan instead of one method: each sample's noise level is mapped to the denoising step whose
timestep is nearest in the plan's schedule (the timesteps ``dit-accel calibrate`` recorded, else
the pipeline's scheduler at the plan's step count), and the transformer runs the plan at that step
(``handle.set_step``), so every (layer, head, step) trains under the method it will run. LoRA goes
on every wrapped layer; SLA projections exist, and train, only on the layers where the plan runs SLA
heads. The weights folder records the plan (``load_method(DIR)`` gives it back) and its content
hash; ``resume`` refuses a plan with another hash.

Everything random in a step comes from a generator seeded with ``(seed, step,
rank)``, data order from ``(seed, epoch)``, and checkpoints hold the trainable
tensors, the optimizer state and the loss history, so a run that is stopped and
resumed ends bit-identical to an uninterrupted one.

Example::

    from dit_accel import SLA
    from dit_accel.training import FinetuneConfig, finetune

    result = finetune(FinetuneConfig(model="tiny-wan", method=SLA(topk=0.2), output="out",
                                     prompts="prompts.txt", steps=200, lr=5e-4, rank=8,
                                     frames=17, height=128, width=128, max_sequence_length=32))
    print(result["eval_loss_start"], result["eval_loss_end"])   # held-out student-teacher MSE
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..atomic_files import (BadFileError, atomic_folder, atomic_write_json, cache_root, check_hashes, crash_point,
                   file_hashes, is_temp_name, load_safetensors, read_json, remove_stale_temps)
from .._util import DitAccelWarning, versions
from ..methods import SLA, Dense, Method, Radial, registered_methods
from ..per_head import PerHead
from ..sparse_plan import PlanMethod, SparsePlan
from ..weights import LORA_FILE, METHOD_FILE, SLA_FILE, save_trained_weights, sla_state_dict
from . import data as data_mod
from .model_io import ModelIO, model_io_for, take

__all__ = ["FinetuneConfig", "finetune", "validate_config", "finetune_methods", "RUN_FILE", "LOG_FILE"]
MODES = ("distill", "data")
MIXED_PRECISION = ("no", "fp16", "bf16")
RUN_FILE = "finetune_run.json"
LOG_FILE = "finetune_log.json"
CKPT_DIR = "checkpoints"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_CACHED_PROMPTS = 256
# Default samples per optimizer step in distill mode (see FinetuneConfig, "Samples per step").
DISTILL_SAMPLES_PER_STEP = 8

# Settings that may change between a run and its resumption (they do not change the trajectory).
_RESUMABLE = {"steps", "checkpoint_every", "log_every", "resume", "overwrite", "output", "checkpoints_total_limit",
              "progress", "eval_batches", "plan_path"}


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the CLI maps its options onto these fields 1:1).

    Args:
        model: ``"tiny-wan"``, a local Diffusers folder, a hub id, or an already
            loaded pipeline object (its transformer is modified in place).
        method: a :class:`~dit_accel.Method` config (SLA, Radial, Tile or GNA); or None with ``plan``.
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
            that dtype, trainable ones in fp32, forward under autocast).
        gradient_checkpointing: recompute transformer blocks in backward.
        log_every: progress-bar/log print interval in steps.
        sla_lr_scale: learning rate of the SLA projections relative to ``lr``.
        eval_batches: fixed held-out batches whose loss is measured before the
            first and after the last step (``eval_loss_start``/``eval_loss_end``; 0 disables).
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
    mixed_precision: str = "no"
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
        and, as ``plan_path``, where it was read from)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "method":
                v = v.to_dict() if isinstance(v, Method) else v
            elif f.name == "plan":
                plan = self.sparse_plan()
                v = plan.content_hash() if plan is not None else None
                out["plan_path"] = str(self.plan) if isinstance(self.plan, (str, Path)) else None
            elif f.name == "model" and not isinstance(v, str):
                v = f"<{type(v).__name__} object>"
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return json.loads(json.dumps(out))


def finetune_methods() -> Tuple[str, ...]:
    """Names of the registered methods that can be fine-tuned (``register_method(..., finetunable=True)``)."""
    return tuple(name for name, entry in registered_methods().items() if entry.finetunable)


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
    _require(c.mode in MODES, f"--mode {c.mode!r} is invalid: choose one of {list(MODES)}.")
    for name in ("steps", "rank", "batch_size", "frames", "height", "width", "max_sequence_length"):
        v = getattr(c, name)
        _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"--{name.replace('_', '-')} {v!r} is invalid: must be a positive integer.")
    _require(c.gradient_accumulation_steps is None or (
        isinstance(c.gradient_accumulation_steps, int) and not isinstance(c.gradient_accumulation_steps, bool)
        and c.gradient_accumulation_steps > 0),
        f"--gradient-accumulation-steps {c.gradient_accumulation_steps!r} is invalid: must be a positive integer "
        "(or unset for the mode's default).")
    for name in ("checkpoint_every", "lr_warmup_steps", "seed", "checkpoints_total_limit", "eval_batches"):
        v = getattr(c, name)
        _require(isinstance(v, int) and v >= 0, f"--{name.replace('_', '-')} {v!r} is invalid: must be an integer >= 0.")
    _require(isinstance(c.log_every, int) and c.log_every > 0, f"--log-every {c.log_every!r} must be a positive integer.")
    _require(isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0, f"--lr {c.lr!r} must be a positive number.")
    _require(c.alpha is None or (isinstance(c.alpha, (int, float)) and c.alpha > 0),
             f"--alpha {c.alpha!r} must be a positive number (default: the rank).")
    _require(isinstance(c.sla_lr_scale, (int, float)) and c.sla_lr_scale > 0,
             f"--sla-lr-scale {c.sla_lr_scale!r} must be a positive number.")
    _require(c.mixed_precision in MIXED_PRECISION,
             f"--mixed-precision {c.mixed_precision!r} is invalid: choose one of {list(MIXED_PRECISION)}.")
    targets = tuple(c.target_modules) if not isinstance(c.target_modules, str) else tuple(c.target_modules.split(","))
    _require(bool(targets) and all(isinstance(t, str) and t.strip() for t in targets),
             f"--target-modules {c.target_modules!r} must name at least one module, e.g. to_q,to_k,to_v,to_out.0.")
    _require(not (c.resume and c.overwrite), "--resume and --overwrite exclude each other: continue a run or replace it.")
    _require(c.output is not None and str(c.output).strip() != "", "--output is required: the folder for weights and logs.")
    if c.mode == "distill" and c.data is None:
        data_mod.read_prompts(c.prompts)


def _check_plan_methods(plan: SparsePlan) -> None:
    """Every method a plan runs must be fine-tunable (or dense)."""
    allowed = finetune_methods()
    for method in plan.methods():
        inner = method.methods if isinstance(method, PerHead) else (method,)
        bad = sorted({m.name for m in inner if not isinstance(m, Dense) and m.name not in allowed})
        if bad:
            raise ValueError(f"--plan runs {bad}, which cannot be fine-tuned; fine-tuning supports {list(allowed)} "
                             "(and dense). Calibrate with --methods limited to those.")


def _method_label(config: FinetuneConfig) -> str:
    """How error messages and the progress bar name what the student runs."""
    return f"--plan {config.plan}" if isinstance(config.plan, (str, Path)) else (
        "the plan" if config.plan is not None else f"--method {config.method.name}")


def _run_record(config: FinetuneConfig, world: int) -> dict:
    """What identifies a run (written to RUN_FILE): the settings, the number of processes and the sha256 of
    the contents of the inputs (the prompts file or the caption folder) and of the model's files (a local,
    embedded or cached hub model; None for a model built in code or passed as an object): a path alone does
    not say what it holds."""
    from ..models.loading import model_fingerprint

    model = config.model if isinstance(config.model, str) else None
    return {**config.settings(), "num_processes": world,
            "inputs_sha256": data_mod.inputs_digest(config.prompts, config.data),
            "model_sha256": model_fingerprint(model, memo=cache_root() / "model_hashes.json",
                                              warn=lambda m: print(m, file=sys.stderr))}


# What a run writes in its output folder: --overwrite removes these and nothing else.
_RUN_OUTPUTS = (RUN_FILE, LOG_FILE, METHOD_FILE, LORA_FILE, SLA_FILE)


def _run_outputs(out: Path) -> List[Path]:
    """The files and folders of ``out`` that a fine-tuning run wrote (checkpoint folders, temporaries)."""
    found = [out / n for n in _RUN_OUTPUTS if (out / n).is_file()]
    found += [p for p in out.iterdir() if is_temp_name(p)]
    root = out / CKPT_DIR
    if root.is_dir() and not root.is_symlink():
        found += [p for p in root.iterdir() if p.is_dir() and (p.name.startswith("step-") or is_temp_name(p))]
    return found


def _describe(paths: Sequence[Path], limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in paths)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_output(config: FinetuneConfig, world: int) -> Tuple[Path, list]:
    """Refuse an output folder that holds something else, unless --resume (same run) or --overwrite.

    A run resumed with another number of processes would see other data and noise per step and end
    elsewhere than the uninterrupted run, so it is refused like any other changed setting.

    Reads only: every process checks at start, and nothing is written until every other
    input check has passed (see :func:`_init_output`), so a rejected run leaves no trace.
    """
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} exists and is not a folder.")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise ValueError(f"--output {str(out)!r} cannot be created: {str(parent)!r} is "
                         f"{'not a folder' if not parent.is_dir() else 'not writable'}; choose another folder.")
    contents = [p for p in out.iterdir() if not is_temp_name(p)] if out.is_dir() else []
    run_file = out / RUN_FILE
    if contents and not run_file.is_file():
        raise ValueError(
            f"--output {str(out)!r} holds {len(contents)} file(s) that are not a fine-tuning run ({_describe(contents)}; "
            f"no {RUN_FILE}); choose an empty or new folder. Nothing there is deleted"
            + (", not even with --overwrite." if config.overwrite else "."))
    if contents and not config.overwrite:
        previous = read_json(run_file, expected="the run record `dit-accel finetune` writes (a JSON object of settings)")
        if not config.resume:
            steps = _checkpoints(out)
            done = f", checkpoints up to step {_step_of(steps[-1])}" if steps else ", no checkpoint yet"
            raise ValueError(
                f"--output {str(out)!r} already holds another fine-tuning run ({previous.get('steps', '?')} steps "
                f"asked{done}); pass --resume to continue that run, --overwrite to replace it (only the files a run "
                "writes are removed), or choose an empty folder."
            )
        previous.setdefault("num_processes", 1)  # run files of 0.1 had no process count (single process)
        current = _run_record(config, world)
        for key in ("inputs_sha256", "model_sha256"):  # run files written before these were hashed
            if key not in previous:
                current.pop(key)
        diff = sorted(k for k in set(previous) | set(current)
                      if k not in _RESUMABLE and previous.get(k) != current.get(k))
        if diff:
            changed = {"inputs_sha256": f"the contents of {'--data' if config.data else '--prompts'} changed",
                       "model_sha256": f"the files of --model {config.settings()['model']} changed",
                       "plan": "the plan's content changed (content hash "
                               f"{str(previous.get('plan'))[:12]} -> {str(current.get('plan'))[:12]})"}
            detail = ", ".join(changed.get(k) or f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in diff[:4])
            raise ValueError(f"--resume: {str(out)!r} holds a different run ({detail}); "
                             "use the same settings and inputs, another --output, or --overwrite.")
    return out, contents


def _init_output(config: FinetuneConfig, accelerator, out: Path, contents: list) -> None:
    """Main process: clear (--overwrite) and write the run file; all processes wait for it."""
    run_file = out / RUN_FILE
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if contents and config.overwrite:  # only what a run wrote (the folder holds a run: see _check_output)
            # The run file goes last (it is replaced below): killed half-way, the folder is still a run that
            # --overwrite may clear, never a heap of files that no run claims.
            for p in _run_outputs(out):
                if p.name != RUN_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    crash_point()
            with contextlib.suppress(OSError):
                (out / CKPT_DIR).rmdir()  # only when empty
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            atomic_write_json(run_file, _run_record(config, accelerator.num_processes))
        except OSError as e:
            raise ValueError(f"--output {str(out)!r} cannot be written: {e.strerror or e}; choose another "
                             "folder.") from None
    accelerator.wait_for_everyone()


def _check_method_fits(method: Method, io: ModelIO, config: FinetuneConfig) -> Tuple[int, ...]:
    """Token grid for the chosen shape; ValueError when the method cannot run on it."""
    io.check_geometry(config.frames, config.height, config.width)
    grid = io.token_grid(config.frames, config.height, config.width)
    try:
        method.plan(grid)  # the same validation apply() runs at the first call
    except (ValueError, TypeError) as e:
        raise ValueError(f"--method {method.name} does not fit this model at {config.frames}x{config.height}x"
                         f"{config.width} (token grid {grid}): {e}") from None
    if isinstance(method, Radial) and grid[0] < 3:
        raise ValueError(f"--method radial needs at least 3 latent frames to be sparse; token grid {grid} has "
                         f"{grid[0]}. Use more --frames (e.g. {io.vae_scale_temporal * 4 + 1}).")
    return grid


def _check_plan_fits(plan: SparsePlan, io: ModelIO, config: FinetuneConfig, transformer) -> Tuple[int, ...]:
    """Token grid for the chosen shape; ValueError when the plan was calibrated for another model class or
    token grid, or one of its methods cannot run on this grid."""
    io.check_geometry(config.frames, config.height, config.width)
    grid = io.token_grid(config.frames, config.height, config.width)
    prov = plan.provenance
    ours = type(transformer).__name__
    if prov.get("model_class") and prov["model_class"] != ours:
        raise ValueError(f"--plan {config.plan} was calibrated for a {prov['model_class']} "
                         f"({prov.get('model_id', 'unknown model')}); this model's transformer is a {ours}: "
                         f"calibrate a plan for it (dit-accel calibrate --model {config.settings()['model']} ...).")
    grids = [tuple(g) for g in prov.get("grids") or ()]
    if grids and tuple(grid) not in grids:
        call = prov.get("call") or {}
        size = (f" (--frames {call['num_frames']} --height {call['height']} --width {call['width']})"
                if {"num_frames", "height", "width"} <= set(call) else "")
        raise ValueError(f"--plan {config.plan} was calibrated on token grid {grids[0]}{size}; this run trains at "
                         f"{config.frames}x{config.height}x{config.width}, token grid {tuple(grid)}. Train at the "
                         "plan's size, or calibrate a plan at this size.")
    for method in plan.methods():
        if isinstance(method, Dense):
            continue
        try:
            method.plan(grid)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--plan {config.plan}: {method!r} does not fit this model at token grid {grid}: "
                             f"{e}") from None
    return grid


def _plan_timesteps(plan: SparsePlan, pipe) -> Optional[List[float]]:
    """The timestep of each denoising step the plan was calibrated for, or None when the plan runs the same
    methods at every step. From the plan's provenance (``timesteps``, recorded by ``dit-accel calibrate``),
    else the pipeline's scheduler set to the plan's ``steps``."""
    phases = plan.phases
    if len(phases) == 1 and phases[0].start == 0 and phases[0].stop is None:
        return None
    prov = plan.provenance
    if isinstance(prov.get("timesteps"), list) and prov["timesteps"]:
        return [float(t) for t in prov["timesteps"]]
    steps = prov.get("steps")
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(steps, int) or steps < 1 or scheduler is None:
        raise ValueError("the plan changes per denoising step but does not say which steps it was calibrated for "
                         "(its provenance has neither \"timesteps\" nor \"steps\"); calibrate it with dit-accel "
                         "calibrate, or add \"steps\": N to its provenance.")
    import copy

    scheduler = copy.deepcopy(scheduler)
    try:
        scheduler.set_timesteps(steps)
    except (TypeError, ValueError) as err:  # schedulers whose timesteps need the pipeline (dynamic shifting)
        raise ValueError(f"the plan changes per denoising step and records no timesteps; {type(scheduler).__name__}"
                         f".set_timesteps({steps}) failed ({err}). Calibrate the plan again (dit-accel calibrate "
                         "records the timesteps).") from None
    order = max(int(getattr(scheduler, "order", 1) or 1), 1)
    return [float(t) for t in scheduler.timesteps[::order]]


def _load_pipe(config: FinetuneConfig, device, dtype):
    if not isinstance(config.model, str):
        return config.model.to(device=device, dtype=dtype) if dtype != torch.float32 else config.model.to(device)
    from ..models.loading import load_pipeline

    return load_pipeline(config.model, device=device, dtype=dtype, seed=0)


def _save_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _checkpoints(out: Path) -> List[Path]:
    """Complete checkpoint folders (renamed into place whole), oldest first."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / "state.json").is_file()]
    return sorted(found, key=_step_of)


_CKPT_FILES = ("trainable.safetensors", "optimizer.pt")


def _save_checkpoint(out: Path, step: int, params: Dict[str, nn.Parameter], optimizer, scaler, losses, limit: int):
    """One checkpoint folder, built under a temporary name and renamed into place; its state.json records
    the sha256 of the other files (checked on resume)."""
    from safetensors.torch import save_file

    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    with atomic_folder(root / f"step-{step:06d}") as tmp:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
        crash_point()
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": _save_rng()}, tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "loss": losses, "sha256": file_hashes(tmp, _CKPT_FILES)},
                          indent=None)
    if limit > 0:
        for old in _checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(path: Path, params: Dict[str, nn.Parameter]) -> Tuple[dict, Dict[str, torch.Tensor], dict]:
    """``(state, tensors, optimizer blob)`` of a checkpoint folder, every file checked; BadFileError naming the
    bad file otherwise. Nothing is loaded into the run here."""
    state_path = path / "state.json"
    expected = 'the checkpoint state `dit-accel finetune` writes: {"step": N, "loss": [...], "sha256": {...}}'
    state = read_json(state_path, expected=expected)
    step, losses = state.get("step"), state.get("loss")
    if not (isinstance(step, int) and step == _step_of(path) and isinstance(losses, list) and len(losses) >= step
            and all(isinstance(x, (int, float)) for x in losses)):
        raise BadFileError(state_path, f"holds step {step!r} and {type(losses).__name__} loss for folder {path.name}",
                           expected)
    if "sha256" in state:
        check_hashes(path, state["sha256"], state_path)
    tensors = load_safetensors(path / "trainable.safetensors", expected="the checkpoint's trainable tensors")
    if set(tensors) != set(params):
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters "
                         f"({len(tensors)} saved, {len(params)} now); use --overwrite to start again.")
    for k, p in params.items():
        if tensors[k].shape != p.shape:
            raise BadFileError(path / "trainable.safetensors", f"{k} has shape {tuple(tensors[k].shape)}",
                               f"shape {tuple(p.shape)} (this run's parameter)")
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # pickle and zip errors come in many types
        raise BadFileError(path / "optimizer.pt", f"cannot be read ({type(err).__name__}: "
                                                  f"{' '.join(str(err).split())[:120]})",
                           "the optimizer state torch.save wrote") from None
    if not isinstance(blob, dict) or not {"optimizer", "rng"} <= set(blob):
        raise BadFileError(path / "optimizer.pt", f"holds {type(blob).__name__} without optimizer and rng state",
                           "{'optimizer': ..., 'scaler': ..., 'rng': ...}")
    return state, tensors, blob


def _load_checkpoint(path: Path, params: Dict[str, nn.Parameter], optimizer, scaler) -> Tuple[int, List[float]]:
    state, tensors, blob = _read_checkpoint(path, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler") is not None:
        scaler.load_state_dict(blob["scaler"])
    _load_rng(blob["rng"])
    return int(state["step"]), list(state["loss"])


def _sync_grads(params: Sequence[nn.Parameter], accelerator, reduction: str = "mean") -> None:
    """Combine gradients over processes in one flat all-reduce (no DDP wrapper: the SLA projections live
    outside the transformer's module tree and the teacher shares its weights). Data parallelism averages;
    context parallelism sums (each process holds the gradient through its own share of the tokens)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction=reduction)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _read_inputs(config: FinetuneConfig):
    """``(prompts, dataset)``: the prompt list (distill without data) or the caption folder, checked."""
    if config.data is not None:
        dataset = data_mod.CaptionDataset(config.data, frames=config.frames, height=config.height, width=config.width)
        data_mod.check_batchable(dataset, config.batch_size)
        return None, dataset
    if config.mode == "data":
        data_mod.CaptionDataset(None, frames=1, height=1, width=1)  # raises the "--data is required" error
    return data_mod.read_prompts(config.prompts), None


def _accelerator(config: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # cpu=True on machines without CUDA: with several launched processes (torchrun / `accelerate launch
    # --multi_gpu`) accelerate then runs MULTI_CPU over gloo instead of silently training N separate copies.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # accelerate keeps one process-global state; a second finetune() call in the same process (other
    # mixed precision) must be able to configure it again. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=use_cpu)


class _Trainer:
    """One run's live objects and its steps: batches, the loss, held-out evaluation, one optimizer step."""

    def __init__(self, config: FinetuneConfig, accelerator, prompts, dataset):
        self.config, self.accelerator, self.dataset = config, accelerator, dataset
        self.device = accelerator.device
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            config.mixed_precision]
        # Under context parallelism every process trains on the same samples: one data-parallel rank.
        self.rank, self.world = (0, 1) if config.cp else (accelerator.process_index, accelerator.num_processes)
        self.pipe = _load_pipe(config, self.device, self.weight_dtype)
        self.io = model_io_for(self.pipe, max_sequence_length=config.max_sequence_length)
        if config.mode == "data" and not self.io.data_mode:
            raise ValueError(f"--mode data supports Wan models only ({self.io.family} needs its own VAE encoding); "
                             "use --mode distill (the dense model is the teacher, no data needed).")
        if config.cp and self.io.family != "Wan":
            raise ValueError(f"--cp: context-parallel fine-tuning is tested on Wan only, not {self.io.family}; "
                             "run it on one process.")
        self.transformer = self.pipe.transformer
        self.plan = config.sparse_plan()
        self.method = config.method if self.plan is None else self.plan.as_method()
        if self.plan is None:
            self.grid = _check_method_fits(config.method, self.io, config)
            self.plan_timesteps = None
        else:
            self.grid = _check_plan_fits(self.plan, self.io, config, self.transformer)
            self.plan_timesteps = _plan_timesteps(self.plan, self.pipe)
        self._prepare_text(prompts)
        self._install_student()
        self.accum = config.gradient_accumulation_steps or (
            math.ceil(DISTILL_SAMPLES_PER_STEP / (config.batch_size * self.world)) if config.mode == "distill" else 1)
        self.samples_per_step = config.batch_size * self.accum * self.world

    # ------------------------------------------------------------- set-up
    def _prepare_text(self, prompts) -> None:
        # Up to _CACHED_PROMPTS texts are embedded once and the text encoder leaves the device; more
        # (a large caption set) are embedded per batch so memory does not grow with the dataset.
        self.texts = sorted(set(self.dataset.captions)) if self.dataset is not None else prompts
        self.text_index = {t: i for i, t in enumerate(self.texts)}
        self.embeds = None
        if len(self.texts) <= _CACHED_PROMPTS:
            self.embeds = self.io.encode_prompts(self.texts, self.device, self.weight_dtype)
            if getattr(self.pipe, "text_encoder", None) is not None:
                self.pipe.text_encoder.to("cpu")
        if self.dataset is None and getattr(self.pipe, "vae", None) is not None:
            self.pipe.vae.to("cpu")

    def _install_student(self) -> None:
        """dit_accel on the transformer, LoRA adapters, the trainable parameters and the optimizer."""
        import dit_accel
        from peft import LoraConfig

        config, transformer = self.config, self.transformer
        transformer.requires_grad_(False)
        apply_kwargs = {"backend": config.backend}
        if config.dense_layers is not None:
            apply_kwargs["dense_layers"] = list(config.dense_layers)
        self.dense_layers = apply_kwargs.get("dense_layers")
        self.handle = dit_accel.apply(transformer, self.method, **apply_kwargs)
        targets = tuple(config.target_modules.split(",")) if isinstance(config.target_modules, str) else tuple(
            config.target_modules)
        self.lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha if config.alpha is not None else
                                      config.rank, init_lora_weights=True, target_modules=list(targets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # LoRA A init draws from the global generator
            try:
                transformer.add_adapter(self.lora_config)
            except ValueError as e:
                raise ValueError(f"--target-modules {','.join(targets)}: {e}") from None
        self.projections = self.handle.sla_projections()
        if self.plan is not None and any(self.plan.runs_sla(i) for i in range(len(self.handle.layers))) \
                and not self.projections:
            raise ValueError(f"{_method_label(config)}: the plan runs SLA heads but dit_accel.apply created no SLA "
                             "projections for this model.")
        if isinstance(config.method, SLA) and not self.projections:
            raise ValueError("--method sla: dit_accel.apply created no SLA projections for this model.")
        self.params = _trainable(transformer, self.projections, targets)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if config.cp:
            self._enable_parallelism()
        transformer.train()
        groups = [{"params": [p for k, p in self.params.items() if k.startswith("transformer.")], "lr_scale": 1.0}]
        sla = [p for k, p in self.params.items() if k.startswith("sla.")]
        if sla:
            groups.append({"params": sla, "lr_scale": config.sla_lr_scale})
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.scaler = getattr(self.accelerator, "scaler", None)

    def _enable_parallelism(self) -> None:
        from diffusers import ContextParallelConfig

        from ..pipelines.parallel import enable_context_parallel

        (ulysses, ring), processes = self.config.cp, self.accelerator.num_processes
        if ulysses * ring != processes:
            raise ValueError(f"--cp ulysses={ulysses},ring={ring} needs {ulysses * ring} processes; "
                             f"{processes} were launched")
        enable_context_parallel(self.transformer, ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))

    # ------------------------------------------------------------- batches and losses
    def batch(self, step: int, held_out: bool = False):
        """Noisy latents, timesteps, prompt embeddings and flow target of micro-batch ``step``.

        ``step`` counts micro-batches (optimizer step * accum + micro), so accum=1 keeps the streams of
        plain steps. Held-out batches (eval loss) use their own streams: rank-independent, disjoint
        from training.
        """
        config = self.config
        seed = config.seed + (0x5EED if held_out else 0)
        rank, world = (0, 1) if held_out else (self.rank, self.world)
        g = data_mod.step_generator(seed, step, rank)
        sigma = torch.rand(config.batch_size, generator=g)
        if self.dataset is not None:
            idx = data_mod.sample_indices(len(self.dataset), seed=seed, step=step, batch=config.batch_size, rank=rank,
                                          world=world)
            items = [self.dataset.item(i) for i in idx]
            if getattr(self.pipe.vae, "device", None) != self.device:
                self.pipe.vae.to(self.device)
            clean = self.io.encode_video(torch.stack([x for x, _ in items])).float().cpu()
            choice = [self.text_index[c] for _, c in items]
        else:
            clean = torch.randn(self.io.latent_shape(config.batch_size, config.frames, config.height, config.width),
                                generator=g)
            choice = torch.randint(len(self.texts), (config.batch_size,), generator=g).tolist()
        noise = torch.randn(clean.shape, generator=g)
        s = sigma.view(-1, *([1] * (clean.dim() - 1)))
        noisy = (1.0 - s) * clean + s * noise
        text = take(self.embeds, choice, self.device) if self.embeds is not None else self.io.encode_prompts(
            [self.texts[i] for i in choice], self.device, self.weight_dtype)
        return (noisy.to(self.device, self.weight_dtype), (sigma * 1000.0).to(self.device, self.weight_dtype),
                text, (noise - clean).to(self.device))

    def loss(self, batch, *, grad: bool):
        noisy, timesteps, text, flow_target = batch
        with self.accelerator.autocast():
            if self.config.mode == "distill":  # the teacher: the same transformer, dense, without LoRA
                with torch.no_grad(), self.handle.bypassed(), _adapters_disabled(self.transformer), \
                        self._at_step(0):  # dense whatever the step; a plan's handle still asks for one
                    target = self.io.forward(self.transformer, noisy, timesteps, text).float()
            else:
                target = flow_target.float()
            with contextlib.nullcontext() if grad else torch.no_grad():
                pred = self.student(noisy, timesteps, text)
                return torch.nn.functional.mse_loss(pred.float(), target)

    def plan_steps(self, timesteps: torch.Tensor) -> List[int]:
        """The plan's denoising step of each sample: the step whose timestep is nearest (0 for a plan that is
        the same at every step)."""
        if self.plan_timesteps is None:
            return [0] * timesteps.shape[0]
        table = torch.tensor(self.plan_timesteps, dtype=torch.float64)
        t = timesteps.detach().reshape(-1).to("cpu", torch.float64)
        return (t[:, None] - table[None, :]).abs().argmin(dim=1).tolist()

    def student(self, noisy: torch.Tensor, timesteps: torch.Tensor, text):
        """The student's prediction. Under a plan, the samples of one micro-batch may map to different steps:
        each group of samples at one step is one transformer call at that step."""
        if self.plan is None:
            return self.io.forward(self.transformer, noisy, timesteps, text)
        steps = self.plan_steps(timesteps)
        total = len(self.plan_timesteps) if self.plan_timesteps is not None else None
        groups: Dict[int, List[int]] = {}
        for i, s in enumerate(steps):
            groups.setdefault(s, []).append(i)
        if len(groups) == 1:
            with self._at_step(steps[0], total):
                return self.io.forward(self.transformer, noisy, timesteps, text)
        out: List[Optional[torch.Tensor]] = [None] * len(steps)
        for s, idx in groups.items():
            index = torch.tensor(idx, device=noisy.device)
            with self._at_step(s, total):
                pred = self.io.forward(self.transformer, noisy[index], timesteps[index], take(text, index))
            for j, row in zip(idx, pred):
                out[j] = row
        return torch.stack(out)

    @contextlib.contextmanager
    def _at_step(self, step: int, total: Optional[int] = None):
        """This thread's transformer calls run the plan's ``step`` (nothing to do without a plan)."""
        if self.plan is None:
            yield
            return
        self.handle.set_step(step, total)
        try:
            yield
        finally:
            self.handle.set_step(None)

    def eval_loss(self) -> Optional[float]:
        if not self.config.eval_batches:
            return None
        values = [float(self.loss(self.batch(i, held_out=True), grad=False)) for i in range(self.config.eval_batches)]
        return sum(values) / len(values)

    def step(self, step: int, first: bool) -> float:
        """One optimizer step (``accum`` micro-batches); returns the loss averaged over processes."""
        config = self.config
        warm = min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * warm * group["lr_scale"]
        loss = 0.0
        for micro in range(self.accum):
            try:
                micro_loss = self.loss(self.batch(step * self.accum + micro), grad=True) / self.accum
            except ValueError as e:
                if first:  # a model/method mismatch found by the first forward: nothing trained yet
                    raise ValueError(f"{_method_label(config)} on token grid {self.grid}: {e}") from None
                raise
            self.accelerator.backward(micro_loss)
            loss = loss + micro_loss.detach()
        trainable = list(self.params.values())
        _sync_grads(trainable, self.accelerator, "sum" if config.cp else "mean")
        if config.max_grad_norm and config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(loss.float().reshape(1), reduction="mean").item())


@contextlib.contextmanager
def _adapters_disabled(transformer):
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def _trainable(transformer, projections, targets) -> Dict[str, nn.Parameter]:
    """LoRA and SLA-projection parameters by checkpoint key, made trainable in fp32."""
    params: Dict[str, nn.Parameter] = {f"transformer.{n}": p for n, p in transformer.named_parameters()
                                       if "lora_" in n}
    if not params:
        raise ValueError(f"--target-modules {','.join(targets)} matched no layers of {type(transformer).__name__}.")
    for name, module in projections.items():
        for pname, p in module.named_parameters():
            params[f"sla.{name}.{pname}"] = p
    for p in params.values():
        p.requires_grad_(True)
        p.data = p.data.float()  # trainable tensors in fp32 whatever the frozen weights use
    return params


def _resume(trainer: _Trainer, out: Path) -> Tuple[int, List[float], Optional[int]]:
    """``(start step, losses so far, resumed_from)`` from the last checkpoint when ``--resume``."""
    if not trainer.config.resume:
        return 0, [], None
    found = _checkpoints(out)
    if not found:
        if trainer.accelerator.is_main_process:
            print(f"--resume: no checkpoint in {out / CKPT_DIR}; starting from step 0")
        return 0, [], None
    steps = trainer.config.steps
    if _step_of(found[-1]) > steps:
        raise ValueError(f"--resume --steps {steps}: {str(out)!r} holds a checkpoint at step {_step_of(found[-1])}, "
                         f"past step {steps}; pass --steps {_step_of(found[-1])} or more to continue it, or "
                         "--overwrite to train again from step 0.")
    for path in reversed(found):  # a bad latest checkpoint: the one before it, with a warning
        try:
            start, losses = _load_checkpoint(path, trainer.params, trainer.optimizer, trainer.scaler)
        except BadFileError as err:
            older = [p for p in found if _step_of(p) < _step_of(path)]
            if not older:
                raise BadFileError(err.path, err.problem, err.expected + f" (no older checkpoint in {out / CKPT_DIR} "
                                   "to fall back to; --overwrite starts again from step 0)") from None
            import warnings

            warnings.warn(f"dit_accel: --resume: {err}; resuming from the previous checkpoint, {older[-1].name}",
                          DitAccelWarning, stacklevel=2)
            continue
        return start, losses[:start], start
    raise AssertionError("unreachable")


def _train(trainer: _Trainer, out: Path, start: int, losses: List[float]) -> float:
    """The training loop from ``start``; checkpoints on the main process. Returns the seconds it took."""
    from tqdm.auto import tqdm

    config, accelerator = trainer.config, trainer.accelerator
    bar = tqdm(total=config.steps, initial=start, disable=not (config.progress and accelerator.is_main_process),
               desc=f"finetune {trainer.method.name}/{config.mode}")
    t0 = time.perf_counter()
    for step in range(start, config.steps):
        losses.append(trainer.step(step, first=step == start))
        bar.update(1)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        done = step + 1
        if accelerator.is_main_process and (
                done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)):
            _save_checkpoint(out, done, trainer.params, trainer.optimizer, trainer.scaler, losses,
                             config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
    bar.close()
    return time.perf_counter() - t0


def _write_results(trainer: _Trainer, out: Path, result: dict) -> None:
    """The weights folder and the log (main process)."""
    config = trainer.config
    extra = {"model": config.settings()["model"], "token_grid": list(trainer.grid),
             "dense_layers": trainer.dense_layers, "frames": config.frames, "height": config.height,
             "width": config.width}
    if trainer.plan is not None:
        extra["plan_sha256"] = trainer.plan.content_hash()
    save_trained_weights(out, transformer=trainer.transformer, method=trainer.method, lora_config=trainer.lora_config,
                         sla_projections=trainer.projections or None, extra=extra)
    losses = result["loss"]
    log = {
        "settings": config.settings(), "versions": versions(("torch", "diffusers", "peft", "accelerate")),
        "num_processes": trainer.accelerator.num_processes, "device": str(trainer.device), "token_grid": list(trainer.grid),
        "trainable_parameters": int(sum(p.numel() for p in trainer.params.values())),
        "gradient_accumulation_steps": trainer.accum, "samples_per_step": trainer.samples_per_step,
        "resumed_from": result["resumed_from"], "seconds_this_session": round(result["seconds"], 3),
        "loss": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)],
        "initial_loss": result["initial_loss"], "final_loss": result["final_loss"],
        "eval_loss_start": result["eval_loss_start"], "eval_loss_end": result["eval_loss_end"],
    }
    atomic_write_json(out / LOG_FILE, log)


def finetune(config: FinetuneConfig) -> Dict[str, Any]:
    """Fine-tune ``config.model`` for ``config.method`` (or under ``config.plan``) and write the result to
    ``config.output``.

    Returns a dict with ``output`` (folder), ``loss`` (per-step losses, averaged
    over processes; the steps of earlier sessions too after ``--resume``),
    ``initial_loss``, ``final_loss``, ``steps``, ``resumed_from`` (step or None),
    ``steps_this_session``, ``seconds``, ``samples_per_step``, ``eval_loss_start`` /
    ``eval_loss_end`` (held-out student-teacher or flow loss, None when
    ``eval_batches=0``) and the live objects ``pipe`` and ``handle`` (the trained
    student, dit_accel installed, LoRA active).

    All input errors (ValueError) are raised before the first optimizer step.
    """
    validate_config(config)
    prompts, dataset = _read_inputs(config)
    accelerator = _accelerator(config)
    out, out_contents = _check_output(config, accelerator.num_processes)
    trainer = _Trainer(config, accelerator, prompts, dataset)
    start, losses, resumed_from = _resume(trainer, out)
    try:  # the first forward finds model/method mismatches before anything is trained
        eval_start = trainer.eval_loss()
    except ValueError as e:
        raise ValueError(f"{_method_label(config)} on token grid {trainer.grid}: {e}") from None
    _init_output(config, accelerator, out, out_contents)
    if config.mode == "distill" and trainer.samples_per_step < DISTILL_SAMPLES_PER_STEP and config.progress \
            and accelerator.is_main_process:
        print(f"note: {trainer.samples_per_step} sample(s) per optimizer step; distillation gradients are mostly "
              "sample-specific, so the held-out loss can rise before it falls. Leave --gradient-accumulation-steps "
              f"unset (>= {DISTILL_SAMPLES_PER_STEP} samples per step) or raise --batch-size.", file=sys.stderr)
    seconds = _train(trainer, out, start, losses)
    result = {
        "output": str(out), "loss": losses, "initial_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "steps": config.steps, "resumed_from": resumed_from,
        "steps_this_session": config.steps - start, "seconds": seconds,
        "num_processes": accelerator.num_processes,
        "samples_per_step": trainer.samples_per_step, "eval_loss_start": eval_start,
        "eval_loss_end": trainer.eval_loss(),
    }
    if accelerator.is_main_process:
        _write_results(trainer, out, result)
    accelerator.wait_for_everyone()
    trainer.transformer.eval()
    return {**result, "pipe": trainer.pipe, "handle": trainer.handle,
            "sla_state": sla_state_dict(trainer.projections) if trainer.projections else {}}
