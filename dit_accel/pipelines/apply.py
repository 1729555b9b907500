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
import threading
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._util import DitAccelWarning, WarningLog, is_int
from ..methods import SLA, Method
from ..plans import Plan
from ..sparse_plan import SparsePlan
from ..weights import load_into
from .capture import Capture, check_capture_dir
from .context import CallGate
from .hooks import Runtime, SparseAttnProcessor, TransformerHook, attention_modules
from .presets import check_method_for, check_pipeline, preset_for
from .schedule import Schedule, StepSource
from .stats import Stats

__all__ = ["apply", "AccelHandle", "BACKENDS"]

from ..kernels.backends import BACKENDS as _KERNEL_BACKENDS

BACKENDS = ("auto",) + _KERNEL_BACKENDS


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
        # Wan 2.2 A14B has a second (low-noise) expert; MiniMax-H3's modular pipeline runs ref2va on transformer_ref
        for attr in ("transformer", "transformer_2", "transformer_ref"):
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
    d = _projection_dim(module)
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
    ``method``, ``schedule``, ``backend``, ``removed``, ``warnings`` (every dit_accel warning so far).

    After :meth:`remove`, the methods that read or change the installed state (``stats``, ``summary``,
    ``set_step``, ``plan``, ``plans``, ``sla_projections``, ``load_weights``, ``bypassed``) raise
    RuntimeError naming the method; ``remove()`` again does nothing, and ``warnings`` stays readable.

    While the handle loaded LoRA adapters (``weights=``), ``transformer.fuse_lora()`` (and
    ``pipe.fuse_lora()``) over them is refused: the fused weights could not be restored bit for bit.
    ``lora_adapter`` names the PEFT adapter holding the ``weights=`` folder's LoRA (``"dit_accel"``, or the
    adapter ``pipe.load_lora_weights(DIR)`` loaded it as), None without one.

    While applied, ``transformer.save_pretrained(DIR)`` (and ``pipe.save_pretrained``) writes the base model
    (the weights under the LoRA layers, which ``from_pretrained`` reads) and, beside it in ``DIR``, a weights
    folder with the LoRA (``lora_adapter``, else the one active adapter), SLA projections and method: load it back
    with
    ``apply(pipe, load_method(DIR), weights=DIR)``, or its LoRA with ``pipe.load_lora_weights(DIR)``.
    ``copy.deepcopy`` and ``pickle`` of an applied model are refused in one line (remove, copy, apply again).
    """

    def __init__(self, hooks: List[TransformerHook], schedule: Schedule, runtime: Runtime, steps: StepSource,
                 gate: Optional[CallGate] = None):
        self._hooks, self.schedule, self._runtime, self._steps = hooks, schedule, runtime, steps
        self._gate = gate if gate is not None else (hooks[0].gate if hooks else CallGate())
        self.transformers = [h.transformer for h in hooks]
        self.transformer = self.transformers[0]
        self.method = schedule.method
        self.backend = runtime.backend
        self.removed = False
        # LoRA adapters that weights= loaded: (transformer, names, the LoRA state before, see _lora_state)
        self._adapters: List[Tuple[nn.Module, List[str], tuple]] = []
        self._fuse_guards: List[nn.Module] = []  # transformers whose fuse_lora this handle refuses
        self._save_guards: List[nn.Module] = []  # transformers whose save_pretrained this handle wraps
        self.lora_adapter: Optional[str] = None
        self._released = False  # its adapters are gone (remove(), or a replacing apply() with weights=)
        self._thread = threading.current_thread()  # the thread that applied it (one live handle per model)
        for hook in hooks:
            hook.handle = self

    def _check_active(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"dit_accel: handle.{what} was called on a removed handle ({self!r}); read stats() "
                               "and summary() before remove() (inside the with block), or apply() again")

    # --------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Restore every wrapped processor, drop hooks, SLA projections and loaded LoRA adapters. Idempotent.

        Safe against other threads: calls in flight finish first, with dit_accel (remove() waits for
        them), and calls that start meanwhile wait, then run the original model, so no call runs half
        sparse and half dense. A call is a transformer call, and also a pipeline call that has begun
        denoising: remove() from another thread waits until that pipeline call returns
        (:class:`~.context.CallGate`). From the pipeline's own step callback (``callback_on_step_end``)
        it does not wait for its own call: the remaining steps run the original model. From inside a
        transformer call of this handle (an attention processor, a forward hook) it raises RuntimeError.
        """
        if not self._gate.close("handle.remove()"):
            return
        try:
            self._detach()
            self._release()
        finally:
            self.removed = True
            self._gate.finish()

    def _detach(self) -> None:
        """Drop the hooks and put the original processors back."""
        for hook in self._hooks:
            hook.remove()

    def _release(self) -> None:
        """The irreversible part of :meth:`remove`: the fuse_lora guards and dit_accel's LoRA adapters."""
        self._released = True
        for transformer in self._fuse_guards:
            _drop_fuse_guard(transformer, self)
        self._fuse_guards = []
        for transformer in self._save_guards:
            _drop_save_guard(transformer, self)
        self._save_guards = []
        adapters, self._adapters = self._adapters, []
        for transformer, names, state in adapters:
            if _unmerge(transformer, names):
                self._runtime.warnings.warn(
                    f"dit_accel: LoRA adapter {names} was merged into the weights of {type(transformer).__name__} "
                    "(not through fuse_lora, which dit_accel refuses): remove() unmerged it, which restores the "
                    "weights up to float rounding, not bit for bit")
            _unload_adapters(transformer, names, state)

    def __enter__(self) -> "AccelHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def bypassed(self):
        """Context manager: inside it, this thread's attention calls run the original processors (dense
        attention, no SLA projection) without touching the model, e.g. for a dense teacher in distillation."""
        self._check_active("bypassed()")
        return self._runtime.bypass()

    def load_weights(self, folder) -> None:
        """Load a fine-tuned folder (``dit-accel finetune`` output); ``remove()`` unloads its LoRA too.

        All or nothing: when loading fails (a missing or truncated file, another model's weights), the
        LoRA adapters it loaded are unloaded again, the active adapters and the SLA projections are as
        before, and the error is raised.
        """
        self._check_active("load_weights()")
        _check_weights(folder)
        _check_weights_folder(folder, self.schedule, [(layer.name, module, layer.index) for hook in self._hooks
                                                      for module, layer in zip(hook._modules, hook.layers)])
        before = [dict(getattr(t, "peft_config", None) or {}) for t in self.transformers]
        states = [_lora_state(t) for t in self.transformers]
        active = [_active_adapters(t) for t in self.transformers]
        projections = {name: {k: v.detach().clone() for k, v in p.state_dict().items()}
                       for name, p in self.sla_projections().items()}
        recorded, guarded = list(self._adapters), list(self._fuse_guards)
        try:
            with warnings.catch_warnings():  # peft's "multiple adapters" notice: composing them is the point
                warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
                load_into(self, folder)
            for transformer, old, users, state in zip(self.transformers, before, active, states):
                config = getattr(transformer, "peft_config", None) or {}
                new = sorted(a for a in config if a not in old or config[a] is not old[a])
                if not new:
                    continue
                self._adapters.append((transformer, new, state))
                if users:
                    # Loading activates only the new adapter; keep the user's active ones on beside it (weight 1 each).
                    transformer.set_adapters(users + [a for a in new if a not in users])
                    self._runtime.warnings.warn(
                        f"weights= loaded LoRA adapter {new} beside the active adapters {users}: both are active "
                        f"(weight 1.0 each; change with transformer.set_adapters). remove() deletes {new} and "
                        f"leaves {users} active.")
                self._guard_fuse(transformer)
        except BaseException:
            self._adapters = recorded
            for transformer in self._fuse_guards[len(guarded):]:
                _drop_fuse_guard(transformer, self)
            self._fuse_guards = guarded
            for transformer, old, users, state in zip(self.transformers, before, active, states):
                config = getattr(transformer, "peft_config", None) or {}
                new = [a for a in config if a not in old or config[a] is not old[a]]
                if new or _lora_state(transformer) != state:
                    _unload_adapters(transformer, new, state)
                    if users:
                        transformer.set_adapters(users)
            with torch.no_grad():
                for name, proj in self.sla_projections().items():
                    for key, value in proj.state_dict().items():
                        value.copy_(projections[name][key])
            raise

    def _guard_fuse(self, transformer: nn.Module) -> None:
        """Refuse ``transformer.fuse_lora`` over this handle's adapters (an instance attribute, taken away by
        remove()): remove() deletes the adapters, and fused weights could not be restored exactly."""
        if transformer in self._fuse_guards or not hasattr(transformer, "fuse_lora"):
            return
        handle, fuse = self, transformer.fuse_lora

        def fuse_lora(lora_scale=1.0, safe_fusing=False, adapter_names=None, **kwargs):
            ours = sorted({a for t, names, *_ in handle._adapters if t is transformer for a in names})
            if ours and (adapter_names is None or set(ours) & set([adapter_names] if isinstance(
                    adapter_names, str) else adapter_names)):
                raise RuntimeError(
                    f"dit_accel: fuse_lora(adapter_names={adapter_names!r}) would fuse dit_accel's LoRA adapter "
                    f"{ours} into the weights of {type(transformer).__name__}, and handle.remove() could then not "
                    "restore the model. Call handle.remove() first, or fuse only your own adapters "
                    "(adapter_names=[...])")
            return fuse(lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs)

        fuse_lora._dit_accel_guard = handle
        transformer.__dict__["fuse_lora"] = fuse_lora
        self._fuse_guards.append(transformer)

    def _guard_save(self) -> None:
        """Wrap ``save_pretrained`` of every transformer (an instance attribute, taken away by remove()): the
        model Diffusers would save holds peft's ``base_layer``/``lora_`` keys, which ``from_pretrained`` cannot
        read, and not the SLA projections (they are not submodules)."""
        for transformer in self.transformers:
            if transformer in self._save_guards or not hasattr(transformer, "save_pretrained"):
                continue
            previous = transformer.__dict__.get("save_pretrained", _ABSENT)
            original = getattr(previous, "_dit_accel_original", previous)  # another handle's guard: its original
            if original is _ABSENT:
                original = transformer.save_pretrained
            handle = self

            def save_pretrained(save_directory, *args, _t=transformer, _original=original, **kwargs):
                return handle._save(_t, _original, save_directory, args, kwargs)

            save_pretrained._dit_accel_guard = handle
            save_pretrained._dit_accel_original = original
            save_pretrained._dit_accel_previous = previous
            transformer.__dict__["save_pretrained"] = save_pretrained
            self._save_guards.append(transformer)

    def _save(self, transformer: nn.Module, original, save_directory, args, kwargs):
        """``save_pretrained`` while applied: the base model, then (for the handle's first transformer) the
        weights folder of the handle beside it. Refused, before anything is written, when dit_accel's LoRA
        is merged into the weights (the base model could not be told from it)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..weights import save_trained_weights

        ours = self.lora_adapter if self.lora_adapter in (getattr(transformer, "peft_config", None) or {}) else None
        active = _active_adapters(transformer)
        if ours is None and len(active) == 1:  # the user's one active LoRA (load_lora_weights): the folder's LoRA
            ours = active[0]
        tuned = sorted(n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))
        merged = sorted({a for n in tuned for a in (getattr(transformer.get_submodule(n), "merged_adapters", None)
                                                    or ())})
        cls = type(transformer).__name__
        if merged:
            raise RuntimeError(
                f"dit_accel: save_pretrained({str(save_directory)!r}) is refused: LoRA adapters {merged} are merged "
                f"into the weights of {cls}, so the base model cannot be saved apart from them. Unmerge them "
                "(transformer.unfuse_lora()) first; nothing was written")
        others = sorted(a for a in (getattr(transformer, "peft_config", None) or {}) if a != ours)
        first = transformer is self.transformer
        projections = self.sla_projections() if first else {}
        if others:
            self._runtime.warnings.warn(
                f"dit_accel: save_pretrained({str(save_directory)!r}) saves {cls}'s base model without the LoRA "
                f"adapters {others} (not dit_accel's): save them with the pipeline's save_lora_weights", stacklevel=4)
        if tuned:  # the weights under the LoRA layers, by their plain names: what from_pretrained reads
            full = type(transformer).state_dict(transformer)
            base = {}
            for key, value in full.items():
                owner = next((n for n in tuned if key.startswith(n + ".")), None)
                if owner is None:
                    base[key] = value
                elif key.startswith(owner + ".base_layer."):
                    base[owner + "." + key[len(owner) + len(".base_layer."):]] = value
            transformer.__dict__["state_dict"] = lambda *a, **k: base
        try:
            result = original(save_directory, *args, **kwargs)
        finally:
            transformer.__dict__.pop("state_dict", None)
        if first and (ours or projections) and kwargs.get("is_main_process", args[0] if args else True):
            save_trained_weights(
                save_directory, transformer=transformer, method=self.method,
                lora_config=transformer.peft_config[ours] if ours else None, sla_projections=projections or None,
                adapter_name=ours or "default", extra={"model": cls, "saved_by": "save_pretrained"})
        return result

    # ---------------------------------------------------------------- schedule
    def set_step(self, step: Optional[int], total: Optional[int] = None) -> None:
        """Tell a bare transformer which denoising step comes next (``0 <= step < total``).

        Needed for ``dense_steps``/``dense_last_steps`` when apply() got a bare
        transformer and no ``scheduler=``; overrides the scheduler when set.
        The step belongs to the calling thread: it applies to the transformer calls this thread makes
        until its next ``set_step``, and never to another thread's calls. ``set_step(None)`` hands this
        thread's calls back to the scheduler.
        """
        self._check_active("set_step()")
        if step is None:
            if total is not None:
                raise ValueError(f"total={total!r} is invalid with step=None: set_step(None) clears the step")
            self._steps.set(None)
            return
        step = _check_int("step", step)
        if total is not None:
            total = _check_int("total", total, 1)
            if step >= total:
                raise ValueError(f"step={step} is invalid for total={total}: steps count 0 .. total - 1")
        self._steps.set((step, total))

    def plan(self, method: Method, grid) -> Plan:
        """The plan ``method`` runs on ``grid`` (the one the attention calls use; built once per geometry)."""
        self._check_active("plan()")
        return self._runtime.plans.get(method, grid)

    @property
    def plans(self) -> Dict[tuple, Plan]:
        """Every plan built so far, by ``(method, grid)``."""
        self._check_active("plans")
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
        self._check_active("stats()")
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
        self._check_active("summary()")
        s = self.schedule
        return {"method": self.method.name, "config": self.method.to_dict(), **self._runtime.stats.summarize(
            self.stats(all_ranks)), "dense_steps": s.dense_steps, "dense_last_steps": s.dense_last_steps,
            "dense_layers": sorted(s.dense_layers), "backend": self.backend, "warnings": self.warnings}

    def sla_projections(self) -> Dict[str, nn.Linear]:
        """SLA output projections by attention module name (empty unless a layer runs SLA)."""
        self._check_active("sla_projections()")
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


def _applied_handles(found) -> List[AccelHandle]:
    """The handles of earlier apply() calls still installed on these transformers (their hooks or wrappers)."""
    handles: Dict[int, AccelHandle] = {}
    for _, transformer in found:
        owners = [getattr(hook, "__self__", None) for hook in transformer._forward_pre_hooks.values()]
        owners += [getattr(m, "processor", None) for m in transformer.modules()]
        for owner in owners:
            owner = owner.owner if isinstance(owner, SparseAttnProcessor) else owner
            handle = getattr(owner, "handle", None) if isinstance(owner, TransformerHook) else None
            if isinstance(handle, AccelHandle) and not handle.removed:
                handles[id(handle)] = handle
    return list(handles.values())


def _runs_sla(method: Method, layer: int) -> bool:
    """Whether ``method`` may run SLA on ``layer`` (plans and per-head configs say per layer)."""
    runs_sla = getattr(method, "runs_sla", None)
    return isinstance(method, SLA) or (runs_sla is not None and bool(runs_sla(layer)))


def _install(targets, schedule: Schedule, runtime: Runtime, steps: StepSource, gate: CallGate
             ) -> List[TransformerHook]:
    """One TransformerHook per transformer; SLA projections for every layer that may run SLA. All or nothing."""
    hooks: List[TransformerHook] = []
    try:
        for prefix, transformer, preset, modules in targets:
            hook = TransformerHook(transformer, prefix, preset, schedule, runtime, steps, gate)
            projections = {i: _sla_projection(m) for i, (_, m) in enumerate(modules)
                           if _runs_sla(schedule.layer_methods.get(i, schedule.method), i)}
            hook.install(modules, sum(len(h.layers) for h in hooks), projections)
            hooks.append(hook)
    except BaseException:
        for hook in hooks:
            hook.remove()
        raise
    return hooks


# Names Diffusers' attention modules give their query projection (fused q/k/v ones produce three times the
# inner dim) and their head count.
_QUERY_PROJECTIONS = (("to_q", 1), ("to_query", 1), ("q_proj", 1), ("query", 1), ("to_qkv", 3), ("qkv", 3))
_HEAD_COUNTS = ("heads", "num_heads", "num_attention_heads", "n_heads")


def _projection_dim(module: nn.Module) -> int:
    """The per-head dim D of SLA's ``Linear(D, D)``: the module's ``head_dim``, else its query projection's
    width over its head count (``to_q``, Kandinsky's ``to_query``, fused ``to_qkv`` / 3, ...). ValueError
    naming the class when neither can be read (apply leaves the model unchanged)."""
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    heads = next((getattr(module, n) for n in _HEAD_COUNTS if isinstance(getattr(module, n, None), int)), None)
    for name, parts in _QUERY_PROJECTIONS:
        proj = getattr(module, name, None)
        width = getattr(proj, "out_features", None)
        if isinstance(width, int) and heads and width % (parts * heads) == 0:
            return width // (parts * heads)
    raise ValueError(f"dit_accel: SLA cannot size its projection for {type(module).__name__}: the attention module "
                     "has no int head_dim and no query projection (to_q, to_query, q_proj, to_qkv) with a head "
                     "count (heads, num_heads) to read the per-head dim from. Use GNA, Tile or Radial on this "
                     "model, or register a preset whose attention modules expose head_dim")


def _check_weights_folder(folder, schedule: Schedule, layers) -> None:
    """What can be checked of a weights folder before the model is touched: the method file, the files it
    names, and the SLA projections' names and shapes against this model's layers (a truncated file fails
    here). :func:`dit_accel.weights.load_into` checks the rest; a failure there is undone too."""
    from pathlib import Path

    from ..weights import LORA_FILE, SLA_FILE, read_weights_info

    folder = Path(folder)
    info = read_weights_info(folder)
    if not isinstance(info, dict):
        raise ValueError(f"weights={str(folder)!r}: its dit_accel_method.json does not hold a JSON object")
    if (info.get("files") or {}).get("lora", LORA_FILE) is not None:
        path = folder / LORA_FILE
        if not path.is_file():
            raise ValueError(f"weights={str(folder)!r} is missing {LORA_FILE}.")
        targets = {key.split("transformer.", 1)[-1].split(".lora_")[0] for key in _safetensors_keys(folder, path)}
        if targets and not any(t.startswith(name + ".") for t in targets for name, *_ in layers):
            # LoRA for modules other than these attention layers (another model, most likely): load_into
            # names the model it belongs to, before it loads anything
            return
    expected = {}
    for name, module, index in layers:  # (attention module name, module, its index in its transformer)
        if _runs_sla(schedule.layer_methods.get(index, schedule.method), index):
            d = _projection_dim(module)
            expected.update({f"{name}.weight": (d, d), f"{name}.bias": (d,)})
    saved = (info.get("method") or {}).get("method") if isinstance(info.get("method"), dict) else None
    if "plan" in (saved, schedule.method.name):  # weights of a plan fit that plan only: say so before the shapes
        from ..weights import check_plan_fits

        check_plan_fits(folder, info["method"] if saved else {}, schedule.method)
    if saved == "sla" or expected:
        path = folder / SLA_FILE
        if not path.is_file():
            raise ValueError(f"weights={str(folder)!r} is missing {SLA_FILE} (the method is SLA).")
        shapes = _safetensors_keys(folder, path)
        if not expected:  # trained for SLA, applied with another method: load_into says so (method check)
            return
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if missing or unexpected:
            raise ValueError(f"weights={str(folder)!r}: {SLA_FILE} does not match the model's SLA layers: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}; was it trained on a different model? It "
                             f"was trained with dense_layers={info.get('dense_layers')}; pass the same dense_layers "
                             "to apply().")
        for key, shape in expected.items():
            if tuple(shapes[key]) != shape:
                raise ValueError(f"weights={str(folder)!r}: {SLA_FILE} holds {key} of shape {tuple(shapes[key])}, "
                                 f"the model's layer needs {shape}")


def _safetensors_keys(folder, path) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a safetensors file, read from its header; ValueError naming the file when it is not
    a whole safetensors file (truncated, empty, another format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"weights={str(folder)!r}: {path.name} is not a readable safetensors file "
                         f"({type(err).__name__}: {err}); it may be truncated: write it again") from None


def _unmerge(transformer: nn.Module, names: Sequence[str]) -> bool:
    """Unmerge ``names`` from every peft layer they were merged into (other merged adapters stay merged);
    whether any was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = False
    for module in transformer.modules():
        merged = list(getattr(module, "merged_adapters", None) or ()) if isinstance(module, BaseTunerLayer) else []
        if any(a in names for a in merged):
            found = True
            module.unmerge()
            others = [a for a in merged if a not in names]
            if others:
                module.merge(adapter_names=others)
    return found


def _drop_fuse_guard(transformer: nn.Module, handle: AccelHandle) -> None:
    if getattr(transformer.__dict__.get("fuse_lora"), "_dit_accel_guard", None) is handle:
        del transformer.__dict__["fuse_lora"]


def _drop_save_guard(transformer: nn.Module, handle: AccelHandle) -> None:
    guard = transformer.__dict__.get("save_pretrained")
    if getattr(guard, "_dit_accel_guard", None) is not handle:
        return
    previous = guard._dit_accel_previous
    if previous is _ABSENT or hasattr(previous, "_dit_accel_guard"):  # none, or a removed handle's guard
        del transformer.__dict__["save_pretrained"]
    else:  # the user's own instance attribute
        transformer.__dict__["save_pretrained"] = previous


_PEFT_FLAG = "_hf_peft_config_loaded"  # Diffusers' "a LoRA was loaded" flag, set on the instance
_ABSENT = object()


def _lora_state(transformer: nn.Module) -> tuple:
    """What unloading must restore: (had LoRA, Diffusers' flag, the names of the modules that were peft layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = frozenset(n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))
    return bool(getattr(transformer, "peft_config", None)), transformer.__dict__.get(_PEFT_FLAG, _ABSENT), tuned


def _unload_adapters(transformer: nn.Module, names: Sequence[str], state: tuple) -> None:
    """Delete the LoRA adapters ``names`` (those still there) and put the model back in ``state``
    (:func:`_lora_state`): modules that were plain layers are their own base layers again."""
    had_lora, flag, tuned = state
    if not had_lora:  # no LoRA before: take the peft layers out entirely (the base layers are the originals)
        if getattr(transformer, "peft_config", None) is not None:
            transformer.unload_lora()
        if flag is _ABSENT:
            transformer.__dict__.pop(_PEFT_FLAG, None)
        else:
            transformer.__dict__[_PEFT_FLAG] = flag
        return
    present = [a for a in names if a in (getattr(transformer, "peft_config", None) or {})]
    users = [a for a in _active_adapters(transformer) if a not in present]
    if present:
        with warnings.catch_warnings():  # peft notes that the active set changes: that is intended
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            transformer.delete_adapters(present)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer) and name not in tuned and not any(
                len(getattr(module, attr, None) or ()) for attr in module.adapter_layer_names):
            # a peft layer that only dit_accel's LoRA made, now empty: the plain layer again
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent) if parent else transformer, child, module.get_base_layer())
    if users and present:
        transformer.set_adapters(users)


def apply(pipe_or_transformer, method: Method, *, dense_steps: int = 0, dense_last_steps: int = 0,
          dense_layers: Union[int, Sequence[int], None] = None, layer_methods: Optional[Dict[int, Method]] = None,
          backend: str = "auto", weights=None, capture=None, capture_layers: Optional[Iterable[int]] = None,
          capture_steps: Optional[Iterable[int]] = None, scheduler=None, timing: bool = False,
          allow_other_grid: bool = False) -> AccelHandle:
    """Make a Diffusers pipeline's (or transformer's) self-attention sparse.

    Only self-attention among video/image tokens changes; cross-attention stays
    dense, and in joint attention (HunyuanVideo, FLUX, CogVideoX, Mochi) text
    tokens attend and are attended to densely (video queries: sparse over video
    keys + dense over valid text keys, merged exactly by log-sum-exp).

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, for Wan 2.2,
            ``transformer_2``, for MiniMax-H3 ``transformer_ref``, are wrapped) or a transformer of a supported class
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
            before each call. A pipeline call reads its own pipeline's scheduler
            (found on the calling thread's stack); ``scheduler=``, then the scheduler of
            the pipeline given here, serve calls that no pipeline makes.
        timing: measure attention time per layer (CUDA events / perf_counter),
            reported as ``time_ms`` in :meth:`AccelHandle.stats`.
        allow_other_grid: run a :class:`~dit_accel.SparsePlan` on a token grid it was not calibrated
            for (with one warning per grid) instead of refusing the call.

    A :class:`~dit_accel.SparsePlan` is checked against what it was made for: here, the transformer class
    (``provenance.model_class``), the number of attention layers (``num_layers``, and every layer its
    phases name) and heads (``num_heads``, per-head entries); at the first transformer call, before any
    attention runs, the token grid (``provenance.grids``) and the run's number of denoising steps
    (``provenance.steps``; no phase may reach past the last step). A mismatch is a ValueError naming both
    values, and the model stays as it was.

    The step index comes from the scheduler position, so classifier-free guidance
    (two transformer calls per step) counts one step. Layer indices count the
    wrapped attention modules in model order (HunyuanVideo/FLUX: double-stream
    blocks, then single-stream blocks).

    Returns:
        :class:`AccelHandle`; ``handle.remove()`` (or leaving ``with``) restores the
        model exactly. Calling apply() again on the same model replaces the first handle: it is
        removed exactly as ``handle.remove()`` does, with a warning that names it (the new handle's
        ``warnings`` list it too).

    All or nothing: every argument, the model's layers and the ``weights`` folder are checked
    before the model changes, and a failure after that (an error while installing or loading)
    is undone, so a failed ``apply`` leaves the model bit-identical to before (processors,
    forward hooks, LoRA adapters, parameters), with an earlier handle still applied.

    Threads and pipelines: the denoising step comes from each transformer call (see
    :class:`~.schedule.StepSource`): from the calling thread's ``set_step``, else the scheduler of
    the pipeline making the call (another pipeline sharing the transformer included), else
    ``scheduler=``/the applied pipeline's scheduler. ``remove()`` waits for calls in flight. One live handle
    per model: apply() from another running thread while a handle is live raises RuntimeError (remove it
    first); one pipeline object called from two threads at once raises RuntimeError (docs/reliability.md).

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
    targets = [(prefix, t, preset, attention_modules(t, prefix, preset))
               for prefix, t in found for preset in [preset_for(t)]]
    _check_bool("allow_other_grid", allow_other_grid)
    for _, t, preset, _ in targets:  # methods a class has no use for (Radial on Latte's per-frame 2-D calls)
        for m in (method, *layer_methods.values()):
            check_method_for(type(t).__name__, preset, getattr(m, "name", None))
    if hasattr(method, "check_model"):  # a SparsePlan: the model class, layers and heads it was made for
        for _, transformer, _, modules in targets:
            method.check_model(type(transformer).__name__, [_heads_of(module) for _, module in modules])
    log = WarningLog()
    _warn_unknown_strategy_layers((method, *layer_methods.values()), max(len(m) for *_, m in targets),
                                  type(targets[0][1]).__name__, log)
    per_step = any(hasattr(m, "for_layer_step") for m in (method, *layer_methods.values()))  # e.g. TileStrategy
    needs_step = bool(dense_steps or dense_last_steps or capture_steps is not None or per_step)
    steps = StepSource(lambda: scheduler if scheduler is not None else getattr(pipe, "scheduler", None), needs_step,
                       lambda message: log.warn(f"dit_accel: {message}"), reads_step=capture is not None)
    schedule = _resolve_layers(dict(method=method, layer_methods=layer_methods, dense_layers=dense_layers,
                                    dense_steps=dense_steps, dense_last_steps=dense_last_steps),
                               max(len(m) for *_, m in targets), capture_layers, log)
    if weights is not None:
        _check_weights_folder(weights, schedule, [(name, module, i) for *_, modules in targets
                                                  for i, (name, module) in enumerate(modules)])
    names = [name for *_, modules in targets for name, _ in modules]
    runtime = Runtime(backend, Stats(names, timing), capture, log)
    runtime.call_check = _plan_call_check(method, allow_other_grid, log)
    # Everything above only reads the model. From here on it changes, so every step is undone on failure:
    # the model (and any handle already applied to it) is then exactly as before. One apply() at a time
    # finds the model's live handle and takes its place: two threads never both find the model free.
    with _APPLYING:
        return _take_over(found, targets, schedule, runtime, steps, weights, log)


# apply() reads the model's live handle and installs its own as one step (one live handle per model).
_APPLYING = threading.RLock()


def _refuse_other_threads(found) -> None:
    """RuntimeError when a live handle on these transformers belongs to another running thread: a model takes
    one live handle at a time, and replacing it would change the model under that thread's calls."""
    for old in _applied_handles(found):
        owner = old._thread
        if owner is not threading.current_thread() and owner.is_alive():
            raise RuntimeError(f"dit_accel: apply() from thread {threading.current_thread().name!r} on a model that "
                               f"{old!r}, applied by thread {owner.name!r}, still holds: a model takes one live "
                               "handle at a time. Call remove() on that handle first (or leave its with block), or "
                               "call the model through it from this thread; for two methods at once, apply each to "
                               "its own copy of the model")


def _take_over(found, targets, schedule: Schedule, runtime: Runtime, steps: StepSource, weights,
               log: WarningLog) -> AccelHandle:
    """Install the new handle in place of the model's earlier ones (same thread only), all or nothing."""
    _refuse_other_threads(found)
    previous = _replace_previous(found)
    gate, handle = CallGate(), None
    try:
        handle = AccelHandle(_install(targets, schedule, runtime, steps, gate), schedule, runtime, steps, gate)
        if weights is not None:
            for old in previous:  # they may hold the adapter name the folder loads: theirs go first
                if old._adapters:
                    old._release()
            handle.load_weights(weights)
        handle._guard_save()
    except BaseException:
        if handle is not None:
            handle.remove()
        _restore_previous(previous)
        raise
    successors = {id(hook.transformer): hook for hook in handle._hooks}
    for old in previous:
        name = repr(old)
        for hook in old._hooks:
            hook.unhook()
            hook.successor = successors.get(id(hook.transformer))  # its waiting calls run under the new handle
        old._release()
        old.removed = True
        old._gate.finish()
        log.warn(f"dit_accel: apply() on a model that {name} was applied to: that handle was removed first "
                 f"(exactly, as handle.remove() does) and the new {handle!r} replaces it", stacklevel=4)
    return handle


def _warn_unknown_strategy_layers(methods, n_layers: int, model: str, log: WarningLog) -> None:
    """A strategy file (TileStrategy) naming attention layers the model lacks: those entries never run, which
    usually means the file was made for another model. Said once, naming the file and the layers."""
    for method in methods:
        table = getattr(method, "_table", None)  # TileStrategy's {(step, layer): windows}, read from its file
        if not isinstance(table, dict):
            continue
        missing = sorted({layer for _, layer in table if layer >= n_layers})
        if missing:
            shown = ", ".join(map(str, missing[:6])) + (", ..." if len(missing) > 6 else "")
            log.warn(f"dit_accel: {getattr(method, 'path', 'the strategy file')} names attention layers {shown}, "
                     f"but {model} has {n_layers} (0..{n_layers - 1}): those entries never run. Was the file made "
                     "for another model? Pass the strategy of this one", stacklevel=4)


def _heads_of(module: nn.Module) -> Optional[int]:
    heads = getattr(module, "heads", None)
    return int(heads) if is_int(heads) else None


def _plan_call_check(method: Method, allow_other_grid: bool, log: WarningLog):
    """What the pre-hook asks of each new call's grid and step count when ``method`` is a plan (else None)."""
    check = getattr(method, "check_call", None)
    if check is None:
        return None

    def on_call(grid, total_steps) -> None:
        warning = check(grid, total_steps, allow_other_grid)
        if warning:
            log.warn(warning, key=("plan on another grid", tuple(grid)))

    return on_call


def _replace_previous(found) -> List[AccelHandle]:
    """apply() on an applied model: the earlier handles' hooks and processors come off (reversibly; their
    adapters stay until the new handle is installed). Their calls in flight finish first."""
    previous = []
    try:
        for old in _applied_handles(found):
            if old._gate.close("apply()"):
                previous.append(old)
                for hook in old._hooks:  # the forward hooks stay until the new handle is in (kept ids, order)
                    hook.unwrap()
    except BaseException:
        _restore_previous(previous)
        raise
    return previous


def _restore_previous(previous: List[AccelHandle]) -> None:
    """Put back handles that :func:`_replace_previous` took off (apply() failed after it)."""
    for old in previous:
        if old._released:  # its adapters went for the new weights: it cannot come back, so it is removed for good
            for hook in old._hooks:
                hook.unhook()
            old.removed = True
            old._gate.finish()
            warnings.warn(f"dit_accel: apply() failed after removing {old!r} to load weights= in its place: that "
                          "handle stays removed (the model is as before that handle's apply())",
                          DitAccelWarning, stacklevel=5)
            continue
        try:
            for hook in old._hooks:
                hook.rewrap()
        finally:
            old._gate.reopen()


def _active_adapters(transformer) -> List[str]:
    """The transformer's active LoRA adapters ([] without peft layers)."""
    if not getattr(transformer, "peft_config", None):
        return []
    try:
        return list(transformer.active_adapters())
    except (ValueError, AttributeError):
        return []
