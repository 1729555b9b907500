"""Fine-tuning a sparse-attention student: LoRA (+ SLA projections, + VSA gates) with accelerate and peft.

Under ``VSA`` each attention layer gets a zero-initialised ``to_gate_compress`` Linear (so step 0 is
training-free VSA), trained with LoRA by distillation; the sparsity of step s follows FastVideo's decay from
0 to the target (:func:`~dit_accel.training.config.vsa_sparsity_at`, ``vsa_decay_steps`` /
``vsa_decay_interval``), and the gates are saved in FastVideo's key layout beside the LoRA.

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

import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..atomic_files import BadFileError, atomic_write_json
from .._util import versions
from ..checkpoints.finetuned import save_trained_weights, sla_state_dict
from . import data as data_mod
from ..errors import NonFiniteOutputError
from .checkpoints import _check_output, _init_output, _load_rng, _OutputState, _save_checkpoint, _save_rng
from .config import (CKPT_DIR, DISTILL_SAMPLES_PER_STEP, LOG_FILE, RUN_FILE, FinetuneConfig,  # noqa: F401
                     _method_label, finetune_methods, validate_config)
from .finite import finite_weights
from .loop import _adapters_disabled, _resume, _train, _Trainer  # noqa: F401  (tests import them)
from .loop import check_cp_processes, check_method_before_load

__all__ = ["FinetuneConfig", "finetune", "validate_config", "finetune_methods", "RUN_FILE", "LOG_FILE"]


def _read_inputs(config: FinetuneConfig):
    """``(prompts, dataset)``: the prompt list (distill without data) or the caption folder (with the folder of held-out
    clips, ``eval_data``, as its ``held_out``), checked."""
    if config.data is not None:
        dataset, held_out = (None if folder is None else data_mod.CaptionDataset(
            folder, frames=config.frames, height=config.height, width=config.width, flag=flag)
            for folder, flag in ((config.data, "--data"), (config.eval_data, "--eval-data")))
        data_mod.check_batchable(dataset, config.batch_size)
        if held_out is not None:
            data_mod.check_batchable(held_out, config.batch_size)
            data_mod.check_held_out(dataset, held_out)
            dataset.held_out = held_out  # (the trainer draws the held-out batches from it)
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
    if config.mixed_precision is None:  # (validate_config resolves it; a config not validated yet, here)
        from .config import launched_mixed_precision

        config.mixed_precision = launched_mixed_precision()
    return Accelerator(mixed_precision=config.mixed_precision, cpu=use_cpu)


def _trained_on(config: FinetuneConfig) -> Optional[str]:
    """The model a weights folder records (``generate``/``eval --weights`` refuse it on another ``--model``): the name
    or path given, or, for a pipeline passed in, the name or folder it was loaded from (``pipe.name_or_path``), else
    None (not known). Before: the pipeline's type ("<WanPipeline object>"), so those commands refused the folder on
    every model, telling the user to pass ``--model <WanPipeline object>``."""
    if isinstance(config.model, str):
        return config.model
    origin = getattr(config.model, "name_or_path", None)
    return os.fspath(origin) if isinstance(origin, (str, os.PathLike)) and os.fspath(origin) else None


def _write_results(trainer: _Trainer, out: Path, result: dict) -> None:
    """The weights folder and the log (main process)."""
    config = trainer.config
    frames, grid = _trained_size(trainer)
    extra = {"model": _trained_on(config), "token_grid": grid,
             "dense_layers": trainer.dense_layers, "frames": frames, "height": config.height,
             "width": config.width}
    if trainer.plan is not None:
        extra["plan_sha256"] = trainer.plan.content_hash()
    gates = None
    if trainer.gates:
        from ..pipelines.vsa_gates import gate_state_dict

        gates = gate_state_dict(trainer.gates)
        extra["vsa_decay"] = {"steps": config.vsa_decay_steps, "interval": config.vsa_decay_interval}
    save_trained_weights(out, transformer=trainer.transformer, method=trainer.method, lora_config=trainer.lora_config,
                         sla_projections=trainer.projections or None, extra=extra, vsa_gates=gates)
    losses = result["loss"]
    log = {
        "settings": config.settings(), "versions": versions(("torch", "diffusers", "peft", "accelerate")),
        "num_processes": trainer.accelerator.num_processes, "device": str(trainer.device), "token_grid": grid,
        "trainable_parameters": int(sum(p.numel() for p in trainer.params.values())),
        "gradient_accumulation_steps": trainer.accum, "samples_per_step": trainer.samples_per_step,
        "resumed_from": result["resumed_from"], "seconds_this_session": round(result["seconds"], 3),
        "loss": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)],
        "initial_loss": result["initial_loss"], "final_loss": result["final_loss"],
        "eval_loss_start": result["eval_loss_start"], "eval_loss_end": result["eval_loss_end"],
    }
    log["warnings"] = _run_warnings(trainer)
    if trainer.gates:  # the sparsity each step trained at (FastVideo's decay from dense to the target)
        log["vsa_sparsity"] = [{"step": i + 1, "sparsity": trainer.vsa_sparsity(i)} for i in range(len(losses))]
    atomic_write_json(out / LOG_FILE, log)


def _trained_size(trainer: _Trainer):
    """``(frames, token grid)`` the run trained at: with a ``--data`` folder of images only, one frame and the images'
    grid, whatever ``--frames`` says (before: the weights folder and the log recorded ``--frames`` and its video grid,
    which no sample had)."""
    dataset = trainer.dataset
    if dataset is not None and trainer.config.frames != 1 and all(dataset.num_frames(i) == 1
                                                                  for i in range(len(dataset))):
        return 1, list(trainer.io.token_grid(1, trainer.config.height, trainer.config.width))
    return trainer.config.frames, list(trainer.grid)


def _run_warnings(trainer: _Trainer) -> List[str]:
    """What the run warned about (its schedules, short clips, the method on this model), for the log: ``--quiet`` keeps
    them off the terminal. Before: nowhere, though ``--quiet`` said the log kept them. Not the decay's own dense
    steps under VSA, which are meant (and not shown)."""
    from .loop import _folders

    found = list(trainer.config.__dict__.get("_warnings", ()))
    for folder in _folders(trainer.dataset):
        found += folder.warnings.messages
    found += [m for m in trainer.handle.warnings if not (trainer.gates and "visits every key block" in m)]
    return list(dict.fromkeys(found))


def _number(v: float) -> str:
    """``v`` as a person writes it on a command line: 1e6, 0.0001, 2e-5."""
    return f"{v:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _divergence(config: FinetuneConfig, out: Path, losses: List[float], eval_end: Optional[float],
                finite: bool) -> Optional[str]:
    """The report of a run that diverged (NaN or inf trainable tensors, last training loss or held-out loss),
    or None when it did not."""
    bad_eval = eval_end is not None and not math.isfinite(eval_end)
    if finite and not bad_eval and (not losses or math.isfinite(losses[-1])):
        return None
    what = [] if finite else [f"NaN or inf weights after step {len(losses)}"]
    if eval_end is not None:
        what.append(f"held-out loss {eval_end:.3g}")
    if losses:
        what.append(f"training loss {losses[0]:.3g} -> {losses[-1]:.3g}")
    fix = f"lower --lr (now {_number(config.lr)})"
    if not config.max_grad_norm:
        fix += " or clip gradients (--max-grad-norm 1)"
    if config.mixed_precision == "fp16":
        fix += " or train in bf16 (--mixed-precision bf16), whose range does not overflow"
    return f"the run diverged ({', '.join(what)}): nothing was written to {out}; {fix}"


def _finish(trainer: _Trainer, out: Path, state: Optional[_OutputState], start: int, losses: List[float],
            eval_start: Optional[float], resumed_from: Optional[int]) -> Dict[str, Any]:
    """Train from ``start``, then, unless the run diverged, write the last checkpoint, the weights and the log.
    A run that diverged raises :class:`~dit_accel.errors.NonFiniteOutputError` and leaves ``out`` as it was; so does
    a run that fails (an undecodable data file, an interrupt) before it wrote a checkpoint. One that fails later keeps
    its checkpoints, for ``resume``."""
    config, accelerator = trainer.config, trainer.accelerator
    try:
        seconds = _train(trainer, out, start, losses, state)
        finite = finite_weights(trainer.params)
        rng = _save_rng()  # the last checkpoint, written after the held-out loss, holds the generators of now
        eval_end = trainer.eval_loss() if finite else None
        _load_rng(rng)
        problem = _divergence(config, out, losses, eval_end, finite)
        if problem is not None:
            raise NonFiniteOutputError(problem)
        result = {
            "output": str(out), "loss": losses, "initial_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "steps": config.steps, "resumed_from": resumed_from,
            "steps_this_session": config.steps - start, "seconds": seconds,
            "num_processes": accelerator.num_processes,
            "samples_per_step": trainer.samples_per_step, "eval_loss_start": eval_start, "eval_loss_end": eval_end,
        }
        if accelerator.is_main_process:
            if config.steps > start:
                _save_checkpoint(out, config.steps, trainer.params, trainer.optimizer, trainer.scaler, losses,
                                 config.checkpoints_total_limit, state, eval_start=eval_start)
            _write_results(trainer, out, result)
    except BaseException as err:
        # (before: only a diverged run was undone; any other failure deleted what --overwrite had set aside and left
        # a run record without weights)
        if state is not None and (isinstance(err, NonFiniteOutputError) or not state.new_checkpoints()):
            state.restore()
        raise
    finally:
        if state is not None:
            state.commit()  # what --overwrite and the checkpoint limit replaced goes (nothing after restore())
    return result


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

    A run that diverges (a trainable tensor, the last training loss or the held-out loss NaN or inf) raises
    :class:`~dit_accel.errors.NonFiniteOutputError` naming the losses and what to lower: its weights and its last
    checkpoint are not written, and the output folder is left as it was before the run (a new folder is removed;
    what ``overwrite`` would have replaced is kept; a resumed run keeps the checkpoints it resumed from); so is a run
    that fails otherwise before writing a checkpoint. A pipeline passed as ``model`` loses the processors and the
    LoRA a failed run added and gets back, bit for bit, the tensors its cast to ``mixed_precision`` replaced (they
    are kept until the run ends) and a dit_accel handle it held (a run that succeeds replaces that handle, with a
    warning); one that already holds LoRA adapters is refused (fuse or delete them first). ``resume`` on such a
    pipeline is refused when its transformer's weights are not those the run started from (the run record holds a
    fingerprint of a sample of its tensors, as it holds the sha256 of a model folder's files).
    """
    validate_config(config)
    prompts, dataset = _read_inputs(config)
    check_method_before_load(config, dataset)
    accelerator = _accelerator(config)
    check_cp_processes(config, accelerator.num_processes)
    try:
        with _output_lock(config, accelerator):
            out, out_contents = _check_output(config, accelerator.num_processes)
            trainer = _Trainer(config, accelerator, prompts, dataset)
            try:
                result = _run(trainer, out, out_contents)
            except BaseException:
                trainer.undo()  # a pipeline passed in as model= gets back what the failed run added to it
                raise
    except RuntimeError as err:
        problem = _out_of_memory(config, err)
        if problem is None:
            raise
        raise problem from None
    trainer.commit()
    return result


class TrainingOutOfMemoryError(RuntimeError, MemoryError):
    """Out of memory in a fine-tuning run, naming the options that size a step. A RuntimeError as torch's own (code
    that caught those catches it) and a MemoryError."""


def _out_of_memory(config: FinetuneConfig, err: RuntimeError) -> Optional[TrainingOutOfMemoryError]:
    """A MemoryError naming the options that size a step, for torch's out-of-memory error (CUDA's, or the CPU
    allocator's "can't allocate memory"); None for another error. Before: a raw RuntimeError from deep inside the
    forward (``--frames 1000000001``, a large --batch-size), naming no option. The output folder is already back as
    it was (:func:`_finish`)."""
    import re

    text = " ".join(str(err).split())
    if not (isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocate (\d+ bytes|[\d.]+ ?[KMGT]i?B)", text)
    if asked and asked.group(1).endswith(" bytes"):
        asked_text = f"{int(asked.group(1).split()[0]) / 2 ** 30:.1f} GiB"
    else:
        asked_text = asked.group(1) if asked else None
    fixes = [f"--batch-size (now {config.batch_size})", f"--frames/--height/--width (now {config.frames}x"
             f"{config.height}x{config.width})"]
    more = [] if config.gradient_checkpointing else ["--gradient-checkpointing"]
    more += [] if config.mixed_precision in ("bf16", "fp16") else ["--mixed-precision bf16"]
    tried = f" (it tried to allocate {asked_text})" if asked_text else ""
    kept = ""
    if any((Path(config.output) / CKPT_DIR).glob("step-*")):  # (before: the --resume this invites was refused unsaid)
        kept = (f" Its checkpoints are kept: --resume continues it with {more[0] if more else 'the same settings'};"
                " another size starts a new run (another --output, or --overwrite).")
    return TrainingOutOfMemoryError(f"out of memory while fine-tuning{tried}: lower {' or '.join(fixes)}"
                                    + (f", or pass {' and '.join(more)}" if more else "")
                                    + " (--gradient-accumulation-steps keeps the samples per step with smaller "
                                    "micro-batches)." + kept)


def _output_lock(config: FinetuneConfig, accelerator):
    """The main process holds ``--output`` for the whole session: a second run on it (another finetune, or a --resume
    of this one) is refused at once (:class:`~dit_accel.atomic_files.BusyError`). Before: both trained, wrote their
    checkpoints into one folder and each reported the weights as its own (the last to finish won). Held from before
    the folder is checked, where the folder above it exists (the lock file is its hidden sibling; nothing is created
    for a run that is refused)."""
    import contextlib

    from ..atomic_files import locked

    out = Path(os.path.abspath(config.output))
    if not accelerator.is_main_process or not out.name or not out.parent.is_dir() \
            or not os.access(out.parent, os.W_OK):  # (a writable --output in a read-only folder: no lock file there)
        return contextlib.nullcontext()
    return locked(out, wait=False)


def _run(trainer: _Trainer, out: Path, out_contents: list) -> Dict[str, Any]:
    """:func:`finetune` once the student is installed."""
    config, accelerator = trainer.config, trainer.accelerator
    start, losses, resumed_from = _resume(trainer, out)
    try:  # the first forward finds model/method mismatches before anything is trained
        eval_start = trainer.eval_loss()
    except BadFileError:
        raise  # a data file that cannot be read: no fault of the method (it was blamed on its token grid)
    except ValueError as e:
        raise ValueError(f"{_method_label(config)} on token grid {trainer.grid}: {e}") from None
    if resumed_from is not None and trainer.resumed_eval_start is not None and eval_start is not None:
        eval_start = trainer.resumed_eval_start  # the run's start, not the checkpoint's weights
    trainer.eval_start = eval_start
    state = _OutputState(out) if accelerator.is_main_process else None
    try:
        _init_output(config, accelerator, out, out_contents, state)
    except BaseException:
        if state is not None:
            state.restore()  # what --overwrite had set aside comes back
        raise
    if config.mode == "distill" and trainer.samples_per_step < DISTILL_SAMPLES_PER_STEP and config.progress \
            and accelerator.is_main_process:
        print(f"note: {trainer.samples_per_step} sample(s) per optimizer step; distillation gradients are mostly "
              "sample-specific, so the held-out loss can rise before it falls. Leave --gradient-accumulation-steps "
              f"unset (>= {DISTILL_SAMPLES_PER_STEP} samples per step) or raise --batch-size.", file=sys.stderr)
    result = _finish(trainer, out, state, start, losses, eval_start, resumed_from)
    accelerator.wait_for_everyone()
    trainer.transformer.eval()
    trainer._use_method(trainer.vsa_method_at(None))  # the trained student runs the target
    return {**result, "pipe": trainer.pipe, "handle": trainer.handle,
            "sla_state": sla_state_dict(trainer.projections) if trainer.projections else {}}
