"""The training loop of a fine-tuning run: the student and teacher set up (:class:`_Trainer`), one optimizer step, the
held-out loss, and the loop that checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..atomic_files import BadFileError
from ..checkpoints.lora_checks import injection_state, undo_injection
from .._util import DitAccelWarning, run_each
from ..methods import SLA, VSA, Dense, Method, Radial
from ..plans.sparse_plan import SparsePlan
from . import data as data_mod
from .checkpoints import _checkpoints, _load_checkpoint, _save_checkpoint, _step_of
from .callers_pipe import cast_keeping, park_handles
from .config import (_CACHED_PROMPTS, CKPT_DIR, DISTILL_SAMPLES_PER_STEP, FinetuneConfig, _method_label,
                     vsa_sparsity_at)
from .finite import finite_weights, nonfinite_weights_error
from .model_io import ModelIO, cp_error, data_error, model_io_for, take


def _check_method_fits(method: Method, io: ModelIO, config: FinetuneConfig, dataset=None) -> Tuple[int, ...]:
    """Token grid for the chosen shape; ValueError when the method cannot run on it, or runs dense attention there
    (the run would train the dense model: before, a Radial or a Tile whose window covers the grid trained without a
    sparse step, with a runtime warning only). In data mode an image is one frame whatever ``--frames`` says, so the
    images' grid is checked too."""
    io.check_geometry(config.frames, config.height, config.width)
    grid = io.token_grid(config.frames, config.height, config.width)
    size = f"{config.frames}x{config.height}x{config.width}"
    if isinstance(method, Radial) and grid[0] < 3:
        raise ValueError(f"--method radial needs at least 3 latent frames to be sparse; token grid {grid} has "
                         f"{grid[0]}. Use more --frames (e.g. {io.vae_scale_temporal * 4 + 1}).")
    _check_grid(method, grid, f"this model at {size} (token grid {grid})",
                "change the method's settings or the sample size (--frames, --height, --width)")
    for folder in _folders(dataset):
        image = _image_grid(io, config, folder)
        if image is not None:
            _check_grid(method, image, f"the images of {folder.flag} {str(folder.root)!r} (one frame each, whatever "
                                       f"--frames says: token grid {image})",
                        "train on videos only, or a method that is sparse on one frame (e.g. sla)")
    return grid


def check_method_before_load(config: FinetuneConfig, dataset=None) -> None:
    """:func:`_check_method_fits` (a plan: its model class and :func:`_check_plan_grid`) before the model loads, on the
    token grid read from its folder's configs (a local folder, an embedded model or a cached snapshot). Before: a
    method that cannot run, or runs dense, at the training size (Radial on fewer than 3 latent frames, a Tile whose
    window covers the grid), or a plan for another model or grid, was refused only once the model had loaded
    (minutes for a real one). Pipelines passed in and models without readable configs are checked once loaded."""
    from ..models.loading import ModelLoadError, model_folder, resolve_model_kind
    from ..pipelines.presets import model_family
    from .model_io import io_from_configs

    if not isinstance(config.model, str):
        return
    try:
        folder = model_folder(config.model) if resolve_model_kind(config.model) != "tiny" else None
        class_name = model_family(config.model)[0] if folder is not None else None
        io = io_from_configs(folder, class_name) if folder is not None else None
    except (ValueError, ModelLoadError):
        return
    if io is None:
        return
    try:
        io.token_grid(config.frames, config.height, config.width)
    except (AttributeError, TypeError, KeyError, ValueError):  # (configs that do not say: the check after loading)
        return
    plan = config.sparse_plan()
    if plan is None:
        _check_method_fits(config.method, io, config, dataset)
        return
    _check_plan_model(plan, config, class_name)
    _check_plan_grid(plan, io, config, dataset)


def _folders(dataset) -> list:
    """The caption folders of a run: ``dataset`` (its training clips) and its held-out clips (``dataset.held_out``,
    ``--eval-data``) where it has them."""
    if dataset is None:
        return []
    held_out = getattr(dataset, "held_out", None)
    return [dataset] + ([held_out] if held_out is not None else [])


def _image_grid(io: ModelIO, config: FinetuneConfig, dataset) -> Optional[Tuple[int, ...]]:
    """The token grid of the images of a caption folder when it holds images and ``--frames`` is not 1, else None."""
    if dataset is None or config.frames == 1 or not any(dataset.num_frames(i) == 1 for i in range(len(dataset))):
        return None
    return tuple(io.token_grid(1, config.height, config.width))


def _check_grid(method: Method, grid, where: str, fix: str) -> None:
    try:
        plan = method.plan(grid)  # the same validation apply() runs at the first call
    except (ValueError, TypeError) as e:
        raise ValueError(f"--method {method.name} does not fit {where}: {e}") from None
    if plan.is_dense:
        raise ValueError(f"--method {method.name} runs dense attention on {where}: {plan.dense_reason}. Fine-tuning "
                         f"would train the dense model, not the method: {fix}.")


def _check_plan_fits(plan: SparsePlan, io: ModelIO, config: FinetuneConfig, transformer,
                     dataset=None) -> Tuple[int, ...]:
    """Token grid for the chosen shape; ValueError when the plan was calibrated for another model class or
    token grid, or one of its methods cannot run on this grid. The model comes first: a plan for another model
    is said to be one, not a size of its that does not fit this model."""
    from ..pipelines.apply_checks import _heads_of
    from ..pipelines.hooks import attention_modules
    from ..pipelines.presets import preset_for

    ours = type(transformer).__name__
    _check_plan_model(plan, config, ours)
    heads = [_heads_of(module) for _, module in attention_modules(transformer, "", preset_for(transformer))]
    plan.check_model(ours, heads)  # (its message names the plan file)
    return _check_plan_grid(plan, io, config, dataset)


def _check_plan_model(plan: SparsePlan, config: FinetuneConfig, ours: str) -> None:
    """ValueError when the plan was calibrated for another transformer class than ``ours``."""
    prov = plan.provenance
    if prov.get("model_class") and prov["model_class"] != ours:
        raise ValueError(f"--plan {config.plan} was calibrated for a {prov['model_class']} "
                         f"({prov.get('model_id', 'unknown model')}); this model's transformer is a {ours}: "
                         f"calibrate a plan for it (dit-accel calibrate --model {config.settings()['model']} ...).")


def _check_plan_grid(plan: SparsePlan, io: ModelIO, config: FinetuneConfig, dataset=None) -> Tuple[int, ...]:
    """Token grid for the chosen shape; ValueError when the plan was calibrated for another token grid, or none of
    its methods is sparse on this one."""
    prov = plan.provenance
    io.check_geometry(config.frames, config.height, config.width)
    grid = io.token_grid(config.frames, config.height, config.width)
    grids = [tuple(g) for g in prov.get("grids") or ()]
    if grids and tuple(grid) not in grids:
        call = prov.get("call") or {}
        size = (f" (--frames {call['num_frames']} --height {call['height']} --width {call['width']})"
                if {"num_frames", "height", "width"} <= set(call) else "")
        raise ValueError(f"--plan {config.plan} was calibrated on token grid {grids[0]}{size}; this run trains at "
                         f"{config.frames}x{config.height}x{config.width}, token grid {tuple(grid)}. Train at the "
                         "plan's size, or calibrate a plan at this size.")
    for folder in _folders(dataset):  # (before: found by the first forward, named the grid of --frames)
        image = _image_grid(io, config, folder)
        if grids and image is not None and image not in grids:
            raise ValueError(f"--plan {config.plan} was calibrated on token grid {grids[0]}; the images of "
                             f"{folder.flag} {str(folder.root)!r} are one frame each, whatever --frames says (token "
                             f"grid {image}). Train the plan on videos only, or calibrate a plan for images.")
    sparse = False
    for method in plan.methods():
        if isinstance(method, Dense):
            continue
        try:
            sparse = not method.plan(grid).is_dense or sparse
        except (ValueError, TypeError) as e:
            raise ValueError(f"--plan {config.plan}: {method!r} does not fit this model at token grid {grid}: "
                             f"{e}") from None
    if not sparse:  # (before: such a run trained the dense model, loss 0.0 from the first step, and wrote weights)
        raise ValueError(f"{_method_label(config)} runs dense attention at every layer, head and step on token grid "
                         f"{tuple(grid)}: fine-tuning would train the dense model, not a sparse one. Calibrate a plan "
                         "with sparse entries at this size, or train one method (--method).")
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


def check_cp_processes(config: FinetuneConfig, processes: int) -> None:
    """ValueError when ``--cp`` asks for another number of processes than were launched (checked before the model
    loads: before, after minutes of loading a real one)."""
    if not config.cp:
        return
    ulysses, ring = config.cp
    if ulysses * ring != processes:
        raise ValueError(f"--cp ulysses={ulysses},ring={ring} needs {ulysses * ring} processes; {processes} "
                         f"{'was' if processes == 1 else 'were'} launched. Launch {ulysses * ring} (accelerate launch "
                         f"--multi_gpu --num_processes {ulysses * ring} -m dit_accel.cli.finetune ...), or give --cp "
                         f"degrees whose product is {processes}.")


def _check_no_adapters(model) -> None:
    """ValueError when a pipeline passed in already holds peft adapters: the run trains its own adapter and its dense
    teacher runs with adapters disabled, so a LoRA of the user's would silently be left out of both (and the run's
    adapter would deactivate it on the pipeline)."""
    if isinstance(model, str):
        return
    from ..checkpoints.finetuned import ADAPTER_NAME

    names = list(getattr(getattr(model, "transformer", None), "peft_config", None) or {})
    if ADAPTER_NAME in names:  # (before: told to pipe.fuse_lora(), which dit_accel refuses on its own adapter)
        raise ValueError(
            f"model: its transformer holds the LoRA of a dit_accel weights folder (adapter {ADAPTER_NAME!r}, loaded by "
            "dit_accel.apply(..., weights=DIR) or handle.load_weights); finetune trains its own adapter against the "
            "model without adapters, so that one would be left out. Call handle.remove() first (the pipeline gets "
            "its own weights back); to continue the run that wrote the folder, resume it instead (resume=True, "
            "output=DIR; dit-accel finetune --resume --output DIR).")
    if names:
        raise ValueError(
            f"model: its transformer already holds LoRA adapters {names} (pipe.load_lora_weights or add_adapter); "
            "finetune trains its own adapter against the model without adapters (the dense teacher runs with "
            "adapters disabled), so yours would be left out. Fuse it into the weights first (pipe.fuse_lora(); "
            f"pipe.unload_lora_weights()) or remove it (pipe.delete_adapters({names!r})), then fine-tune.")


def _load_pipe(config: FinetuneConfig, device, dtype):
    """``(pipeline, what its cast replaced)``: a pipeline passed in is cast in place, its original tensors kept
    until the run ends (a failed run puts them back: fp32 values do not survive a cast to bf16 and back)."""
    if not isinstance(config.model, str):
        return config.model, cast_keeping(config.model, device, dtype)
    from ..models.loading import load_pipeline

    return load_pipeline(config.model, device=device, dtype=dtype, seed=0), None


def _sync_grads(params: Sequence[nn.Parameter], accelerator, reduction: str = "mean") -> None:
    """Combine gradients over processes in one flat all-reduce (no DDP wrapper: the SLA projections live
    outside the transformer's module tree and the teacher shares its weights). Data parallelism averages;
    context parallelism sums (each process holds the gradient through its own share of the tokens). A parameter
    that no process has a gradient for keeps none, as in one process, where the optimizer skips it (before: a zero
    gradient, which AdamW's momentum and weight decay still moved: an SLA projection on a step that runs no SLA)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device if grads else None,
                       dtype=grads[0].dtype if grads else None)
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads] + [has]), reduction=reduction)
    kept = (flat[flat.numel() - len(params):] > 0).tolist()  # (one host sync for all of them)
    offset = 0
    for p, g, keep in zip(params, grads, kept):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if keep else None
        offset += n


class _Trainer:
    """One run's live objects and its steps: batches, the loss, held-out evaluation, one optimizer step."""

    def __init__(self, config: FinetuneConfig, accelerator, prompts, dataset):
        self.config, self.accelerator, self.dataset = config, accelerator, dataset
        self.device = accelerator.device
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            config.mixed_precision]
        # Under context parallelism every process trains on the same samples: one data-parallel rank.
        self.rank, self.world = (0, 1) if config.cp else (accelerator.process_index, accelerator.num_processes)
        _check_no_adapters(config.model)
        self.handle, self._undo_flags, self._parked = None, None, None
        self.pipe, self._kept = _load_pipe(config, self.device, self.weight_dtype)
        try:
            self._set_up(config, prompts)
        except BaseException:
            self.undo()  # a refused run leaves the caller's pipeline as it was
            raise

    def _set_up(self, config: FinetuneConfig, prompts) -> None:
        from ..models.loading import text_length_error

        problem = text_length_error(self.pipe, config.max_sequence_length)  # (padded to it: out of memory)
        if problem:
            raise ValueError(problem)
        self.io = model_io_for(self.pipe, max_sequence_length=config.max_sequence_length)
        problem = data_error(type(self.io), config.mode, config.data) or cp_error(type(self.io), config.cp)
        if problem:
            raise ValueError(problem)
        self.transformer = self.pipe.transformer
        problem = nonfinite_weights_error(self.transformer, "the transformer of " + (
            repr(config.model) if isinstance(config.model, str) else "the pipeline passed in"))
        if problem:  # (after the cast to the run's dtype, which can overflow: fp16 holds at most 65504)
            raise ValueError(problem + ("; or train in bf16 (--mixed-precision bf16)"
                                        if config.mixed_precision == "fp16" else ""))
        self.plan = config.sparse_plan()
        self.method = config.method if self.plan is None else self.plan.as_method()
        if self.plan is None:
            self.grid = _check_method_fits(config.method, self.io, config, self.dataset)
            self.plan_timesteps = None
        else:
            self.grid = _check_plan_fits(self.plan, self.io, config, self.transformer, self.dataset)
            self.plan_timesteps = _plan_timesteps(self.plan, self.pipe)
        self._prepare_text(prompts)
        self._install_student()
        self.accum = config.gradient_accumulation_steps or (
            math.ceil(DISTILL_SAMPLES_PER_STEP / (config.batch_size * self.world)) if config.mode == "distill" else 1)
        self.samples_per_step = config.batch_size * self.accum * self.world
        # The held-out loss before the run's first step: measured, or read back from the checkpoint resumed from.
        self.eval_start: Optional[float] = None
        self.resumed_eval_start: Optional[float] = None

    def undo(self) -> None:
        """A pipeline the caller passed in loses what the run added to it (dit_accel's processors, the SLA projections
        and VSA gates, the LoRA adapter) and gets its trainable flags, gradient checkpointing and train/eval mode
        back, so a failed run does not leave it running sparse, or producing NaN; then the tensors its cast to the
        run's dtype replaced, and the dit_accel handle it held before the run. Idempotent."""
        if isinstance(self.config.model, str):
            return  # the run loaded the model itself (nobody else holds it)

        flags, self._undo_flags = self._undo_flags, None
        kept, parked, self._kept, self._parked = self._kept, self._parked, None, None
        # Each part even when one before it fails (a second Ctrl-C, an error unloading the LoRA): before, the
        # tensors the cast replaced and the caller's handle were then lost, the pipeline left in the run's dtype
        run_each([lambda: flags is not None and self._undo_install(flags),
               lambda: kept is not None and kept.restore(),
               lambda: parked is not None and parked.restore()])

    def _undo_install(self, flags: dict) -> None:

        transformer = self.transformer

        def remove_handle():
            if self.handle is not None:
                self.handle.remove()

        def injection_back():  # the layers peft wrapped become the model's own again (delete_adapters left them
            if flags.get("injection") is not None:  # wrapped, renaming their weights)
                undo_injection(transformer, "default", flags["injection"])

        def flags_back():
            for name, p in transformer.named_parameters():
                p.requires_grad_(flags["grad"].get(name, p.requires_grad))
            if flags["checkpointing"] is False and getattr(transformer, "is_gradient_checkpointing", False):
                transformer.disable_gradient_checkpointing()
            transformer.train(flags["training"])

        # Each part even when one before it fails, and the handle's removal once more at the end: a remove() cut
        # short stays live and finishes when called again (a removed handle's remove() does nothing)
        run_each([remove_handle, injection_back, flags_back, remove_handle])

    def commit(self) -> None:
        """The run succeeded: the pipeline keeps its cast and the student, and a handle it held goes for good."""
        kept, parked, self._kept, self._parked = self._kept, self._parked, None, None
        del kept  # (the original tensors are freed)
        if parked is not None:
            parked.release(self.handle)

    # ------------------------------------------------------------- set-up
    def _prepare_text(self, prompts) -> None:
        # Up to _CACHED_PROMPTS texts are embedded once and the text encoder leaves the device; more
        # (a large caption set) are embedded per batch so memory does not grow with the dataset.
        self.texts = sorted({c for folder in _folders(self.dataset) for c in folder.captions}) \
            if self.dataset is not None else prompts
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
        self._undo_flags = {"grad": {n: p.requires_grad for n, p in transformer.named_parameters()},
                            "checkpointing": getattr(transformer, "is_gradient_checkpointing", None),
                            "training": transformer.training}
        transformer.requires_grad_(False)
        apply_kwargs = {"backend": config.backend}
        if config.dense_layers is not None:
            apply_kwargs["dense_layers"] = list(config.dense_layers)
        self.dense_layers = apply_kwargs.get("dense_layers")
        if not isinstance(config.model, str):  # the caller's own handle waits aside until the run succeeds
            self._parked = park_handles(transformer)
        self.handle = dit_accel.apply(transformer, self.method, **apply_kwargs)
        layers = len(self.handle.layers)  # (before: such a run trained the dense model, held-out loss 0.0, silently)
        if self.dense_layers is not None and len(set(self.dense_layers)) >= layers:
            raise ValueError(f"--dense-layers {sorted(set(self.dense_layers))} names every attention layer of this "
                             f"model ({layers}): the run would train the dense model, not {_method_label(config)}. "
                             "Leave at least one layer sparse.")
        targets = tuple(config.target_modules.split(",")) if isinstance(config.target_modules, str) else tuple(
            config.target_modules)
        self.lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha if config.alpha is not None else
                                      config.rank, init_lora_weights=True, target_modules=list(targets))
        _check_rank(transformer, config.rank, targets)  # (before add_adapter: a huge rank was allocated first)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # LoRA A init draws from the global generator
            try:
                self._undo_flags["injection"] = injection_state(transformer)
                transformer.add_adapter(self.lora_config)
            except ValueError as e:
                named = any(n == t or n.endswith("." + t) for n, _ in transformer.named_modules() for t in targets)
                problem = _unadaptable(transformer, targets) or (None if named else _unmatched_targets(transformer,
                                                                                                        targets))
                raise ValueError(f"--target-modules {','.join(targets)}: {problem or e}") from None
        _check_targets(transformer, targets)
        self.projections = self.handle.sla_projections()
        self.gates = {}
        if isinstance(config.method, VSA):  # zero-initialised to_gate_compress per layer: step 0 is training-free VSA
            from ..pipelines.vsa_gates import add_trainable_gates

            self.gates = add_trainable_gates(self.handle)
            if not self.gates:
                raise ValueError("--method vsa: no attention layer runs VSA (all in --dense-layers?); nothing to "
                                 "gate. Drop --dense-layers or train another method.")
        if self.plan is not None and any(self.plan.runs_sla(i) for i in range(len(self.handle.layers))) \
                and not self.projections:
            raise ValueError(f"{_method_label(config)}: the plan runs SLA heads but dit_accel.apply created no SLA "
                             "projections for this model.")
        if isinstance(config.method, SLA) and not self.projections:
            raise ValueError("--method sla: dit_accel.apply created no SLA projections for this model.")
        self.params = _trainable(transformer, self.projections, targets, self.gates)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if config.cp:
            self._enable_parallelism()
        transformer.train()
        groups = [{"params": [p for k, p in self.params.items() if k.startswith("transformer.")], "lr_scale": 1.0}]
        sla = [p for k, p in self.params.items() if k.startswith("sla.")]
        if sla:
            groups.append({"params": sla, "lr_scale": config.sla_lr_scale})
        vsa = [p for k, p in self.params.items() if k.startswith("vsa.")]
        if vsa:
            groups.append({"params": vsa, "lr_scale": 1.0})
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.scaler = getattr(self.accelerator, "scaler", None)

    # ------------------------------------------------------------- VSA's sparsity decay
    def vsa_sparsity(self, step: Optional[int]) -> Optional[float]:
        """The VSA sparsity optimizer step ``step`` (0-based) trains at, FastVideo's decay from dense to the target
        (:func:`~dit_accel.training.config.vsa_sparsity_at`); ``None``: the target. A ``topk`` target counts as
        the sparsity it amounts to on this grid. None for other methods."""
        method = self.config.method
        if not isinstance(method, VSA):
            return None
        plan = method.plan(self.grid)
        target = 1.0 - plan.count / plan.cubes.count
        if step is None:
            return target
        return vsa_sparsity_at(step, target, self.config.vsa_decay_steps or 0, self.config.vsa_decay_interval)

    def vsa_method_at(self, step: Optional[int]) -> Optional[Method]:
        """The VSA config step ``step`` trains under (:meth:`vsa_sparsity`): the configured one once the decay is
        over (and for ``None``, the held-out loss), else ``VSA(sparsity=...)`` with its tile. None for other
        methods."""
        method = self.config.method
        if not isinstance(method, VSA):
            return None
        decay = self.config.vsa_decay_steps or 0
        if step is None or step >= decay:
            return method
        return VSA(sparsity=min(self.vsa_sparsity(step), 0.999), tile=method.tile)

    def _use_method(self, method: Optional[Method]) -> None:
        """The handle runs ``method`` everywhere it ran the configured one (VSA's decay steps)."""
        if method is not None:
            self.handle._replace_method(method)

    @contextlib.contextmanager
    def _quiet_decay(self):
        """The decay's first steps run VSA at sparsity 0 on purpose: no "visits every key block" warning."""
        import warnings

        with warnings.catch_warnings():
            if self.gates:
                warnings.filterwarnings("ignore", message=".*visits every key block.*", category=DitAccelWarning)
            yield

    def _enable_parallelism(self) -> None:
        from diffusers import ContextParallelConfig

        from ..pipelines.parallel import enable_context_parallel

        check_cp_processes(self.config, self.accelerator.num_processes)
        ulysses, ring = self.config.cp
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
        if self.dataset is not None:  # (held out: the --eval-data clips where given, else --data's)
            folder = (getattr(self.dataset, "held_out", None) if held_out else None) or self.dataset
            idx = data_mod.sample_indices(len(folder), seed=seed, step=step, batch=config.batch_size, rank=rank,
                                          world=world)
            items = [folder.item(i) for i in idx]
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
        # The timesteps stay fp32, as the pipelines pass the scheduler's (before: cast to bf16 with the latents, the
        # model was told t=788 for sigma 0.7874, and a plan's step was picked from the rounded value).
        return (noisy.to(self.device, self.weight_dtype), (sigma * 1000.0).to(self.device, torch.float32),
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
        self._use_method(self.vsa_method_at(None))  # the held-out loss is the target's
        values = [float(self.loss(self.batch(i, held_out=True), grad=False)) for i in range(self.config.eval_batches)]
        return sum(values) / len(values)

    def step(self, step: int, first: bool) -> float:
        """One optimizer step (``accum`` micro-batches); returns the loss averaged over processes."""
        config = self.config
        warm = min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * warm * group["lr_scale"]
        self._use_method(self.vsa_method_at(step))
        loss = 0.0
        for micro in range(self.accum):
            try:
                with self._quiet_decay():
                    micro_loss = self.loss(self.batch(step * self.accum + micro), grad=True) / self.accum
            except ValueError as e:
                if first and not isinstance(e, BadFileError):  # a model/method mismatch found by the first forward
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


def _trainable(transformer, projections, targets, gates=None) -> Dict[str, nn.Parameter]:
    """LoRA, SLA-projection and VSA-gate parameters by checkpoint key, made trainable in fp32."""
    params: Dict[str, nn.Parameter] = {f"transformer.{n}": p for n, p in transformer.named_parameters()
                                       if "lora_" in n}
    if not params:
        raise ValueError(f"--target-modules {','.join(targets)} matched no layers of {type(transformer).__name__}.")
    for name, module in projections.items():
        for pname, p in module.named_parameters():
            params[f"sla.{name}.{pname}"] = p
    for name, module in (gates or {}).items():
        for pname, p in module.named_parameters():
            params[f"vsa.{name}.{pname}"] = p
    for p in params.values():
        p.requires_grad_(True)
        p.data = p.data.float()  # trainable tensors in fp32 whatever the frozen weights use
    return params


def _check_targets(transformer, targets: Sequence[str]) -> None:
    """ValueError naming the target that matched no layer when others did: peft skips it without a word, so a typo
    (``to_out0``) trained fewer layers than asked while the weights folder listed it as trained."""
    problem = _unmatched_targets(transformer, targets)
    if problem:
        raise ValueError(f"--target-modules {','.join(targets)}: {problem}")


def _unmatched_targets(transformer, targets: Sequence[str]) -> Optional[str]:
    """The targets that matched no layer peft wrapped (all of them when it wrapped none), with the closest names of
    layers LoRA can adapt, or None when each matched. Before, when none matched: peft's "Target modules {'to_Q'} not
    found in the base model", naming no layer that is there."""
    import difflib

    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in wrapped)]
    if not unmatched:
        return None
    names = set()  # the Linear layers' names as targets name them (peft's own layers inside a wrapped one aside)
    for n, m in transformer.named_modules():
        if n and (n in wrapped or (isinstance(m, nn.Linear) and not any(n.startswith(w + ".") for w in wrapped))):
            parts = n.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    lower = {name.lower(): name for name in names}  # (to_Q: to_q first)
    close = [lower[c] for c in difflib.get_close_matches(unmatched[0].lower(), sorted(lower), n=3)]
    where = type(transformer).__name__
    said = (f"{', '.join(unmatched)} matched no layer of {where} (the other names did)" if len(unmatched) < len(targets)
            else f"{', '.join(unmatched)} not found: no layer of {where} is named so")
    return (said + (f"; did you mean {' or '.join(close)}?" if close else "")
            + f" Layers LoRA can adapt there end in e.g. {', '.join(sorted(names)[:8])}.")


def _check_rank(transformer, rank: int, targets: Sequence[str]) -> None:
    """ValueError when ``--rank`` is past the width of an adapted layer (the fewer of its input and output features):
    a rank-r product there has rank at most that width, so the rest trains nothing but memory, and alpha / r scales the
    update down for ranks it cannot have. Checked on the Linear layers the targets name (as peft matches them) before
    peft allocates the adapters: a rank of 10**9 failed there, out of memory, in a raw RuntimeError."""
    widths = [(min(m.in_features, m.out_features), n, m.in_features, m.out_features)
              for n, m in transformer.named_modules() if isinstance(m, nn.Linear)
              and any(n == t or n.endswith("." + t) for t in targets)]
    if not widths or rank <= min(widths)[0]:
        return
    width, name, fan_in, fan_out = min(widths)
    raise ValueError(f"--rank {rank} is past the width of the adapted layer {name} ({fan_in} -> {fan_out} features): a "
                     f"LoRA's rank is at most the fewer of a layer's input and output features, so the widest allowed "
                     f"here is {width}. Pass --rank {width} or less (or leave such layers out of --target-modules).")


def _unadaptable(transformer, targets: Sequence[str]) -> Optional[str]:
    """What peft refused about targets that name layers LoRA cannot adapt (a norm, a block of layers), or None.
    Before: peft's message printed the whole module, dozens of lines for a block, naming neither the target nor a
    layer to name instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # (peft's own layers: those it wrapped before it reached the target it refused)
    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, BaseTunerLayer)
    for target in targets:
        bad = [(n, m) for n, m in transformer.named_modules()
               if (n == target or n.endswith("." + target)) and not isinstance(m, kinds)]
        if not bad:
            continue
        name, module = bad[0]
        inside = [f"{name}.{n}" for n, m in module.named_modules() if n and isinstance(m, kinds)
                  and not any(p.startswith(("lora_", "base_layer")) for p in n.split("."))]
        fix = (f"name the layers inside it instead, e.g. {', '.join(inside[:3])}" if inside else
               "name Linear layers instead, e.g. to_q,to_k,to_v,to_out.0")
        return (f"{target} names {type(module).__name__} layers (e.g. {name}), which LoRA cannot adapt: it adapts "
                f"Linear, Conv and Embedding layers; {fix}.")
    return None


def _train(trainer: _Trainer, out: Path, start: int, losses: List[float], state=None) -> float:
    """The training loop from ``start``; checkpoints on the main process (``state``: the output folder's
    :class:`~dit_accel.training.checkpoints._OutputState`, which takes the checkpoints the limit removes). Returns
    the seconds it took.

    The last step's checkpoint is left to the caller, which writes it once the run is known not to have diverged;
    a step that leaves a trainable tensor NaN or inf ends the loop (every later step would too), before its
    checkpoint: the caller reports it."""
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
        if not finite_weights(trainer.params):  # the same on every process: the gradients were combined
            break
        done = step + 1
        if accelerator.is_main_process and done < config.steps and config.checkpoint_every \
                and done % config.checkpoint_every == 0:
            _save_checkpoint(out, done, trainer.params, trainer.optimizer, trainer.scaler, losses,
                             config.checkpoints_total_limit, state, eval_start=trainer.eval_start)
        accelerator.wait_for_everyone()
    bar.close()
    return time.perf_counter() - t0


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
            start, losses, trainer.resumed_eval_start = _load_checkpoint(path, trainer.params, trainer.optimizer,
                                                                         trainer.scaler)
        except BadFileError as err:
            older = [p for p in found if _step_of(p) < _step_of(path)]
            if not older:
                raise BadFileError(err.path, err.problem, err.expected + f" (no older checkpoint in {out / CKPT_DIR} "
                                   "to fall back to; --overwrite starts again from step 0)") from None
            import warnings

            said = f"dit_accel: --resume: {err}; resuming from the previous checkpoint, {older[-1].name}"
            trainer.config.__dict__.setdefault("_warnings", []).append(said)  # (the log keeps it: before, not --quiet)
            warnings.warn(said, DitAccelWarning, stacklevel=2)
            continue
        return start, losses[:start], start
    raise AssertionError("unreachable")
