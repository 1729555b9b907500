"""``dit_accel.apply``: make a Diffusers pipeline's self-attention sparse, and ``remove()`` to undo it.

``apply`` checks its arguments, builds the :class:`~.schedule.Schedule`, the shared
:class:`~.hooks.Runtime` (plans, statistics, capture, warnings) and one
:class:`~.hooks.TransformerHook` per transformer, and returns an
:class:`AccelHandle`. Nothing is stored on classes or modules beyond the wrapped
processors, one forward pre/post hook per transformer and, for SLA, one
projection submodule per attention layer, all of which ``remove()`` takes away.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from .._util import WarningLog, is_int
from ..methods import SLA, Method
from ..plans import Plan
from ..sparse_plan import SparsePlan
from ..weights import load_into
from .capture import Capture, check_capture_dir
from .hooks import Runtime, SparseAttnProcessor, TransformerHook, attention_modules
from .presets import check_pipeline, preset_for
from .schedule import Schedule, StepSource
from .stats import Stats

__all__ = ["apply", "AccelHandle", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch", "flex")


# ------------------------------------------------------------------ argument checks
def _check_int(name: str, value, minimum: int = 0) -> int:
    if not is_int(value) or value < minimum:
        raise (TypeError if not is_int(value) else ValueError)(
            f"{name}={value!r} is invalid: expected an int >= {minimum}")
    return int(value)


def _check_int_list(name: str, value) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    if is_int(value):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None") from None
    if not all(is_int(i) and i >= 0 for i in items):
        raise ValueError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None")
    return tuple(int(i) for i in items)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool) and not (type(value).__name__ == "bool_" and type(value).__module__ == "numpy"):
        raise TypeError(f"{name}={value!r} is invalid: expected True or False")
    return bool(value)


def _check_weights(weights):
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights={weights!r} is invalid: expected the path of a weights folder (str or os.PathLike) "
                        "written by dit-accel finetune or dit-accel convert, or None")
    return weights


def _check_method(name: str, method) -> Method:
    if not isinstance(method, Method):
        hint = f"dit_accel.method_from_name({method!r})" if isinstance(method, str) else "dit_accel.Tile(...)"
        raise TypeError(f"{name} must be a dit_accel method config (dit_accel.Dense(), GNA(...), Tile(...), "
                        f"Radial(...) or SLA(...)); got {type(method).__name__}. Try {hint}")
    return method


def _find_transformers(obj) -> Tuple[List[Tuple[str, nn.Module]], object]:
    """[(prefix, transformer)], pipeline (None for a bare transformer)."""
    if isinstance(obj, nn.Module):
        found, pipe = [("", obj)], None
    else:
        found, pipe = [], obj
        check_pipeline(obj)
        for attr in ("transformer", "transformer_2"):  # Wan 2.2 A14B has a second (low-noise) expert
            module = getattr(obj, attr, None)
            if isinstance(module, nn.Module):
                found.append(("" if attr == "transformer" else f"{attr}.", module))
        if not found:
            raise TypeError(f"apply() needs a Diffusers pipeline with a `transformer` or a transformer module; "
                            f"got {type(obj).__name__}")
    for _, module in found:
        if hasattr(module, "_orig_mod"):  # torch.compile wrapper: the graph would not see the new processors
            raise ValueError("apply() got a torch.compile'd transformer (OptimizedModule); apply dit_accel to the "
                             "uncompiled module (transformer._orig_mod) instead")
    return found, pipe


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _sla_projection(module: nn.Module) -> nn.Linear:
    """A zero ``Linear(D, D)`` on the module's device and dtype: SLA starts as plain top-k sparse attention."""
    d = module.head_dim if isinstance(getattr(module, "head_dim", None), int) else \
        module.to_q.out_features // module.heads
    ref = next(module.parameters())
    # Sequential CPU offload leaves the model's parameters on the meta device: the projection starts on the CPU
    # and moves to the compute device at its first call (SparseAttnProcessor.projection).
    proj = nn.Linear(d, d, device="cpu" if ref.device.type == "meta" else ref.device, dtype=ref.dtype)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj


# ------------------------------------------------------------------ the handle
class AccelHandle:
    """The installed configuration, returned by :func:`apply`.

    Methods: :meth:`remove` (also on leaving a ``with`` block), :meth:`stats`,
    :meth:`summary`, :meth:`sla_projections`, :meth:`set_step`, :meth:`plan`.
    Attributes: ``transformer`` (the first/only transformer), ``transformers``,
    ``method``, ``schedule``, ``backend``, ``warnings`` (every dit_accel warning so far).
    """

    def __init__(self, hooks: List[TransformerHook], schedule: Schedule, runtime: Runtime, steps: StepSource):
        self._hooks, self.schedule, self._runtime, self._steps = hooks, schedule, runtime, steps
        self.transformers = [h.transformer for h in hooks]
        self.transformer = self.transformers[0]
        self.method = schedule.method
        self.backend = runtime.backend
        self.removed = False
        self._adapters: List[Tuple[nn.Module, List[str], bool]] = []  # LoRA adapters that weights= loaded
        for hook in hooks:
            hook.detach = self.remove

    # --------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Restore every wrapped processor, drop hooks, SLA projections and loaded LoRA adapters. Idempotent."""
        for hook in self._hooks:
            hook.remove()
        for transformer, names, had_lora in self._adapters:
            if had_lora:
                users = [a for a in _active_adapters(transformer) if a not in names]
                with warnings.catch_warnings():  # peft notes that the active set changes: that is intended
                    warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                    transformer.delete_adapters(names)
                if users:
                    transformer.set_adapters(users)
            else:  # no LoRA before apply(): take the peft layers out entirely
                transformer.unload_lora()
        self._adapters = []
        self.removed = True

    def __enter__(self) -> "AccelHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def bypassed(self):
        """Context manager: inside it, this thread's attention calls run the original processors (dense
        attention, no SLA projection) without touching the model, e.g. for a dense teacher in distillation."""
        return self._runtime.bypass()

    def load_weights(self, folder) -> None:
        """Load a fine-tuned folder (``dit-accel finetune`` output); ``remove()`` unloads its LoRA too."""
        before = [set(getattr(t, "peft_config", None) or {}) for t in self.transformers]
        active = [_active_adapters(t) for t in self.transformers]
        with warnings.catch_warnings():  # peft's "multiple adapters" notice: composing them is the point
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
            load_into(self, folder)
        for transformer, old, users in zip(self.transformers, before, active):
            new = sorted(set(getattr(transformer, "peft_config", None) or {}) - old)
            if new:
                self._adapters.append((transformer, new, bool(old)))
            if new and users:
                # Loading activates only the new adapter; keep the user's active ones on beside it (weight 1 each).
                transformer.set_adapters(users + [a for a in new if a not in users])
                self._runtime.warnings.warn(
                    f"weights= loaded LoRA adapter {new} beside the active adapters {users}: both are active "
                    f"(weight 1.0 each; change with transformer.set_adapters). remove() deletes {new} and "
                    f"leaves {users} active.")

    # ---------------------------------------------------------------- schedule
    def set_step(self, step: int, total: Optional[int] = None) -> None:
        """Tell a bare transformer which denoising step comes next (``0 <= step < total``).

        Needed for ``dense_steps``/``dense_last_steps`` when apply() got a bare
        transformer and no ``scheduler=``; overrides the scheduler when set.
        """
        step = _check_int("step", step)
        if total is not None:
            total = _check_int("total", total, 1)
            if step >= total:
                raise ValueError(f"step={step} is invalid for total={total}: steps count 0 .. total - 1")
        self._steps.manual = (step, total)

    def plan(self, method: Method, grid) -> Plan:
        """The plan ``method`` runs on ``grid`` (the one the attention calls use; built once per geometry)."""
        return self._runtime.plans.get(method, grid)

    @property
    def plans(self) -> Dict[tuple, Plan]:
        """Every plan built so far, by ``(method, grid)``."""
        return self._runtime.plans.items()

    # --------------------------------------------------------------- reporting
    @property
    def _layers(self) -> List[SparseAttnProcessor]:
        return [layer for hook in self._hooks for layer in hook.layers]

    @property
    def layers(self) -> List[str]:
        """Names of the wrapped attention modules, in layer order."""
        return [layer.name for layer in self._layers]

    @property
    def warnings(self) -> List[str]:
        return list(self._runtime.warnings.messages)

    def stats(self, all_ranks: bool = False) -> List[dict]:
        """Per attention layer (see :meth:`dit_accel.pipelines.stats.Stats.rows`).

        Under context parallelism each rank counts its own calls and the visited density of its
        own share; ``all_ranks=True`` (a collective: call it on every rank) returns every rank's
        rows, each with its ``rank``.
        """
        methods = [self.schedule.layer_method(layer.index).name for layer in self._layers]
        rows = self._runtime.stats.rows(methods)
        if not all_ranks or not _distributed():
            return rows
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return [{**row, "rank": rank} for rank, rank_rows in enumerate(gathered) for row in rank_rows]

    def summary(self, all_ranks: bool = False) -> dict:
        """Totals over layers (and over ranks with ``all_ranks``, a collective): calls, call-weighted mean
        density and sparsity, attention time, the settings."""
        s = self.schedule
        return {"method": self.method.name, "config": self.method.to_dict(), **self._runtime.stats.summarize(
            self.stats(all_ranks)), "dense_steps": s.dense_steps, "dense_last_steps": s.dense_last_steps,
            "dense_layers": sorted(s.dense_layers), "backend": self.backend, "warnings": self.warnings}

    def sla_projections(self) -> Dict[str, nn.Linear]:
        """SLA output projections by attention module name (empty unless a layer runs SLA)."""
        return {layer.name: layer.sla_proj for layer in self._layers if layer.sla_proj is not None}

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"AccelHandle({self.method!r}, layers={len(self._layers)}, backend={self.backend!r}, {state})"


# ------------------------------------------------------------------ apply
def _check_apply_args(method, dense_steps, dense_last_steps, dense_layers, layer_methods, backend, capture_layers,
                      capture_steps, scheduler, weights, timing):
    method = _check_method("method", method)
    _check_weights(weights)
    _check_bool("timing", timing)
    dense_steps, dense_last_steps = _check_int("dense_steps", dense_steps), _check_int("dense_last_steps",
                                                                                       dense_last_steps)
    if dense_layers is not None and not is_int(dense_layers):
        dense_layers = _check_int_list("dense_layers", dense_layers)
    elif dense_layers is not None:
        dense_layers = _check_int("dense_layers", dense_layers)
    if layer_methods is not None and not isinstance(layer_methods, dict):
        raise TypeError(f"layer_methods must be a dict {{layer index: Method}}; got {type(layer_methods).__name__}")
    layer_methods = {_check_int("layer_methods key", i): _check_method(f"layer_methods[{i}]", m)
                     for i, m in (layer_methods or {}).items()}
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise TypeError(f"scheduler={type(scheduler).__name__} has no `timesteps`; pass a Diffusers scheduler")
    return (method, dense_steps, dense_last_steps, dense_layers, layer_methods,
            _check_int_list("capture_layers", capture_layers), _check_int_list("capture_steps", capture_steps))


def _resolve_layers(schedule_args: dict, n_layers: int, capture_layers, warnings: WarningLog) -> Schedule:
    """The schedule with ``dense_layers`` as indices, every layer index checked against ``n_layers``."""
    dense_layers = schedule_args.pop("dense_layers")
    if is_int(dense_layers):
        dense_layers = frozenset(range(min(dense_layers, n_layers)))
    schedule = Schedule(dense_layers=frozenset(dense_layers or ()), **schedule_args)
    for name, indices in (("dense_layers", schedule.dense_layers), ("layer_methods", schedule.layer_methods),
                          ("capture_layers", capture_layers or ())):
        bad = sorted(i for i in indices if i >= n_layers)
        if bad:
            raise ValueError(f"{name} has layer indices {bad} but the model has {n_layers} attention layers "
                             f"(0..{n_layers - 1})")
    if n_layers and set(range(n_layers)) <= schedule.dense_layers and schedule.sparse:
        warnings.warn(f"dit_accel: dense_layers covers all {n_layers} attention layers: {schedule.method.name} "
                      "never runs and the model stays dense. Pass fewer layers (e.g. dense_layers=1)", stacklevel=4)
    return schedule


def _remove_previous(found) -> None:
    """apply() twice on one model: the previous handle goes first."""
    for _, transformer in found:
        for module in transformer.modules():
            proc = getattr(module, "processor", None)
            if isinstance(proc, SparseAttnProcessor):
                proc.owner.detach()


def _runs_sla(method: Method, layer: int) -> bool:
    """Whether ``method`` may run SLA on ``layer`` (plans and per-head configs say per layer)."""
    runs_sla = getattr(method, "runs_sla", None)
    return isinstance(method, SLA) or (runs_sla is not None and bool(runs_sla(layer)))


def _install(targets, schedule: Schedule, runtime: Runtime, steps: StepSource) -> List[TransformerHook]:
    """One TransformerHook per transformer; SLA projections for every layer that may run SLA."""
    hooks: List[TransformerHook] = []
    try:
        for prefix, transformer, preset, modules in targets:
            hook = TransformerHook(transformer, prefix, preset, schedule, runtime, steps)
            projections = {i: _sla_projection(m) for i, (_, m) in enumerate(modules)
                           if _runs_sla(schedule.layer_methods.get(i, schedule.method), i)}
            hook.install(modules, sum(len(h.layers) for h in hooks), projections)
            hooks.append(hook)
    except Exception:
        for hook in hooks:
            hook.remove()
        raise
    return hooks


def apply(pipe_or_transformer, method: Method, *, dense_steps: int = 0, dense_last_steps: int = 0,
          dense_layers: Union[int, Sequence[int], None] = None, layer_methods: Optional[Dict[int, Method]] = None,
          backend: str = "auto", weights=None, capture=None, capture_layers: Optional[Iterable[int]] = None,
          capture_steps: Optional[Iterable[int]] = None, scheduler=None, timing: bool = False) -> AccelHandle:
    """Make a Diffusers pipeline's (or transformer's) self-attention sparse.

    Only self-attention among video/image tokens changes; cross-attention stays
    dense, and in joint attention (HunyuanVideo, FLUX, CogVideoX, Mochi) text
    tokens attend and are attended to densely (video queries: sparse over video
    keys + dense over valid text keys, merged exactly by log-sum-exp).

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, for Wan 2.2,
            ``transformer_2`` are wrapped) or a transformer of a supported class
            (:data:`dit_accel.pipelines.presets.PRESETS`, or one registered with
            :func:`dit_accel.register_preset`).
        method: ``dit_accel.Dense()``, ``GNA(...)``, ``Tile(...)``, ``Radial(...)``, ``SLA(...)``, any
            registered method config, or a :class:`dit_accel.SparsePlan` (a method per step, layer and head,
            e.g. from ``dit-accel calibrate``).
        dense_steps: run the first N denoising steps dense.
        dense_last_steps: run the last N denoising steps dense.
        dense_layers: int N (the first N attention layers dense) or a list of layer indices.
        layer_methods: ``{layer index: Method}`` overrides of ``method`` per layer.
        backend: kernel backend, one of ``"auto"``, ``"triton"``, ``"torch"``, ``"flex"``.
        weights: folder of fine-tuned weights (LoRA, SLA projections) to load after installing.
        capture: folder; saves video q/k/v of attention calls as
            ``layer{L:03d}_step{S:03d}.pt`` (first call per layer and step). Or an observer with
            :class:`~.capture.Capture`'s ``wants(layer, step)`` and ``save(...)`` (calibration keeps its
            samples in memory this way).
        capture_layers, capture_steps: restrict capture to these indices (None = all).
        scheduler: the scheduler that drives a *bare* transformer (the step index
            comes from ``scheduler.step_index``). Without it, a bare transformer with
            ``dense_steps``/``dense_last_steps`` needs ``handle.set_step(i, total)``
            before each call. Pipelines use ``pipe.scheduler`` automatically.
        timing: measure attention time per layer (CUDA events / perf_counter),
            reported as ``time_ms`` in :meth:`AccelHandle.stats`.

    The step index comes from the scheduler position, so classifier-free guidance
    (two transformer calls per step) counts one step. Layer indices count the
    wrapped attention modules in model order (HunyuanVideo/FLUX: double-stream
    blocks, then single-stream blocks).

    Returns:
        :class:`AccelHandle`; ``handle.remove()`` (or leaving ``with``) restores the
        model exactly. Calling apply() again on the same model replaces the first handle.

    Example::

        handle = dit_accel.apply(pipe, dit_accel.Radial(decay=0.95), dense_steps=12, dense_layers=1)
        video = pipe(prompt="a red panda", num_frames=81).frames[0]
        print(handle.summary()["mean_density"])
        handle.remove()
    """
    if isinstance(method, SparsePlan):  # a plan is a schedule: a method per step, layer and head
        method = method.as_method()
    method, dense_steps, dense_last_steps, dense_layers, layer_methods, capture_layers, capture_steps = \
        _check_apply_args(method, dense_steps, dense_last_steps, dense_layers, layer_methods, backend,
                          capture_layers, capture_steps, scheduler, weights, timing)
    if capture is not None and not (hasattr(capture, "wants") and hasattr(capture, "save")):  # else an observer
        capture = Capture(check_capture_dir(capture), capture_layers, capture_steps)
    found, pipe = _find_transformers(pipe_or_transformer)
    _remove_previous(found)
    targets = [(prefix, t, preset, attention_modules(t, prefix, preset))
               for prefix, t in found for preset in [preset_for(t)]]
    if hasattr(method, "check_layers"):  # a SparsePlan made for another model's layer count
        method.check_layers(max(len(m) for *_, m in targets))
    log = WarningLog()
    per_step = any(hasattr(m, "for_layer_step") for m in (method, *layer_methods.values()))  # e.g. TileStrategy
    needs_step = bool(dense_steps or dense_last_steps or capture_steps is not None or per_step)
    steps = StepSource(lambda: scheduler if scheduler is not None else getattr(pipe, "scheduler", None), needs_step,
                       lambda message: log.warn(f"dit_accel: {message}"))
    schedule = _resolve_layers(dict(method=method, layer_methods=layer_methods, dense_layers=dense_layers,
                                    dense_steps=dense_steps, dense_last_steps=dense_last_steps),
                               max(len(m) for *_, m in targets), capture_layers, log)
    names = [name for *_, modules in targets for name, _ in modules]
    runtime = Runtime(backend, Stats(names, timing), capture, log)
    handle = AccelHandle(_install(targets, schedule, runtime, steps), schedule, runtime, steps)
    if weights is not None:
        try:
            handle.load_weights(weights)
        except Exception:
            handle.remove()
            raise
    return handle


def _active_adapters(transformer) -> List[str]:
    """The transformer's active LoRA adapters ([] without peft layers)."""
    if not getattr(transformer, "peft_config", None):
        return []
    try:
        return list(transformer.active_adapters())
    except (ValueError, AttributeError):
        return []
