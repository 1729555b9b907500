"""``dit_accel.apply``: make a Diffusers pipeline's self-attention sparse, and ``remove()`` to undo it.

``apply`` checks its arguments (:mod:`.apply_checks`), builds the :class:`~.schedule.Schedule`, the shared
:class:`~.hooks.Runtime` (plans, statistics, capture, warnings) and one
:class:`~.hooks.TransformerHook` per transformer, installs them here, and returns an
:class:`~.handle.AccelHandle`. Nothing is stored on classes or modules beyond the wrapped
processors, one forward pre/post hook per transformer and, for SLA, one
projection submodule per attention layer, all of which ``remove()`` takes away.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..atomic_files import folders_to_make, remove_empty
from .._util import DitAccelWarning, WarningLog
from ..methods import Method
from ..plans.model_config import check_model_config
from ..plans.sparse_plan import SparsePlan
from .apply_checks import (BACKENDS, _check_apply_args, _check_bool, _check_int, _check_int_list,  # noqa: F401
                           _check_method, _check_weights, _check_weights_folder, _find_transformers, _heads_of,
                           _plan_call_check, _projection_dim, _resolve_layers, _runs_sla, refuse_foreign_adapter,
                           _warn_unknown_strategy_layers, inner_configs)
from .capture import Capture, check_capture_dir
from .context import CallGate
from .handle import AccelHandle, _active_adapters, _distributed  # noqa: F401
from .hooks import Runtime, SparseAttnProcessor, TransformerHook, attention_modules
from .presets import check_method_for, preset_for
from .schedule import Schedule, StepSource
from .stats import Stats
from .vsa_gates import attach_gates, gates_folder, trained_gates

__all__ = ["apply", "AccelHandle", "BACKENDS"]


# ------------------------------------------------------------------ install
def _sla_projection(module: nn.Module) -> nn.Linear:
    """A zero ``Linear(D, D)`` on the module's device and dtype: SLA starts as plain top-k sparse attention."""
    d = _projection_dim(module)
    ref = next(module.parameters())
    # Quantized weights (GGUF, bitsandbytes) are packed ints: the projection takes the dtype of the module's
    # first floating-point parameter (a norm's, say), else fp32; each call casts it to q's dtype anyway. Weights
    # stored in 8 bits (enable_layerwise_casting's float8) are a storage dtype, not one a Linear can hold.
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype.itemsize > 1),
                 torch.float32)
    # Sequential CPU offload leaves the model's parameters on the meta device: the projection starts on the CPU
    # and moves to the compute device at its first call (SparseAttnProcessor.projection).
    proj = nn.Linear(d, d, device="cpu" if ref.device.type == "meta" else ref.device, dtype=dtype)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj




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


def apply(pipe_or_transformer, method: Method, *, dense_steps: int = 0, dense_last_steps: int = 0,
          dense_layers: Union[int, Sequence[int], None] = None, layer_methods: Optional[Dict[int, Method]] = None,
          backend: str = "auto", weights=None, capture=None, capture_layers: Optional[Iterable[int]] = None,
          capture_steps: Optional[Iterable[int]] = None, scheduler=None, timing: bool = False,
          allow_other_grid: bool = False) -> AccelHandle:
    """Make a Diffusers pipeline's (or transformer's) self-attention sparse.

    Only self-attention among video/image tokens changes; cross-attention stays dense, and in joint attention
    (HunyuanVideo, FLUX, CogVideoX, Mochi) text tokens attend and are attended to densely (video queries: sparse
    over video keys + dense over valid text keys, merged exactly by log-sum-exp).

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, for Wan 2.2,
            ``transformer_2``, for MiniMax-H3 ``transformer_ref``, for Ideogram 4 ``unconditional_transformer``, are
            wrapped) or a transformer of a supported class
            (:data:`dit_accel.pipelines.presets.PRESETS`, or one registered with
            :func:`dit_accel.register_preset`); a compiled or DDP one: the module it wraps (``handle.transformer``).
        method: ``dit_accel.Dense()``, ``GNA(...)``, ``Tile(...)``, ``Radial(...)``, ``SLA(...)``, any
            registered method config, or a :class:`dit_accel.SparsePlan` (a method per step, layer and head,
            e.g. from ``dit-accel calibrate``).
        dense_steps: run the first N denoising steps dense.
        dense_last_steps: run the last N denoising steps dense.
        dense_layers: int N (the first N attention layers dense) or a list of layer indices.
        layer_methods: ``{layer index: Method}`` overrides of ``method`` per layer.
        backend: kernel backend, one of ``"auto"``, ``"triton"``, ``"torch"``, ``"flex"``.
        weights: folder of fine-tuned weights (LoRA, SLA projections) to load after installing.
        capture: folder; saves video q/k/v of attention calls as ``layer{L:03d}_step{S:03d}.pt`` (first call per
            layer and step; another transformer of the pipeline after its prefix, ``transformer_2.layer000_step000.pt``,
            see :mod:`.capture`). Or an observer with :class:`~.capture.Capture`'s ``wants(layer, step)``, ``save(...)``
            and optionally ``for_transformer(prefix)`` (calibration keeps its samples in memory this way).
        capture_layers, capture_steps: restrict capture to these indices (None = all); need ``capture``.
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
        model exactly. Calling apply() again on the same model replaces the first handle: it is removed exactly
        as ``handle.remove()`` does, with a warning that names it (the new handle's ``warnings`` list it too).
        Inside the first handle's ``with`` block it is a RuntimeError (the block would go on dense after).

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
    # a plan is a schedule: a method per step, layer and head; a weights folder's "~" is the home folder
    method, weights = method.as_method() if isinstance(method, SparsePlan) else method, _check_weights(weights)
    method, dense_steps, dense_last_steps, dense_layers, layer_methods, capture_layers, capture_steps = \
        _check_apply_args(method, dense_steps, dense_last_steps, dense_layers, layer_methods, backend,
                          capture_layers, capture_steps, scheduler, weights, timing)
    with _capture(capture, capture_layers, capture_steps) as capture:  # (a failed apply() takes its folders away)
        found, pipe = _find_transformers(pipe_or_transformer)
        targets = [(prefix, t, preset, attention_modules(t, prefix, preset))
                   for prefix, t in found for preset in [preset_for(t)]]
        _check_fit(targets, method, layer_methods, allow_other_grid)
        options = dict(dense_steps=dense_steps, dense_last_steps=dense_last_steps, dense_layers=dense_layers,
                       layer_methods=layer_methods)
        ours = None if gates_folder(method, layer_methods, weights) else weights  # else: a VSA checkpoint's gates
        schedule, runtime, steps, log = _build_runtime(targets, pipe, method, options, backend, ours, capture,
                                                       capture_layers, capture_steps, scheduler, timing, allow_other_grid)
        # Everything above only reads the model. From here on it changes, so every step is undone on failure:
        # the model (and any handle already applied to it) is then exactly as before. One apply() at a time
        # finds the model's live handle and takes its place: two threads never both find the model free.
        with _APPLYING:
            return _take_over(found, targets, schedule, runtime, steps, ours, log,
                              trained_gates(method, layer_methods, ours) if ours is weights else weights)


@contextlib.contextmanager
def _capture(capture, capture_layers, capture_steps):
    """``capture`` as an observer: a folder becomes a :class:`~.capture.Capture` of those layers and steps. Layers
    or steps without a place to put them would capture nothing: a ValueError, before the model changes. The
    folders made for it (:func:`~.capture.check_capture_dir`) are taken away again, while still empty, when the
    block fails: a failed apply() leaves the user's files as they were."""
    if capture is None and (capture_layers is not None or capture_steps is not None):
        raise ValueError("capture_layers/capture_steps need capture=FOLDER (where the captured q/k/v go); pass "
                         "capture=, or drop capture_layers/capture_steps")
    for name, chosen in (("capture_layers", capture_layers), ("capture_steps", capture_steps)):
        if chosen is not None and not chosen:  # (before: taken, and the run captured nothing, unsaid)
            what = name.split("_")[1]
            raise ValueError(f"{name}=[] names no {what[:-1]}, so nothing would be captured: pass the {what} to "
                             f"capture, or leave {name} out (None: every {what[:-1]})")
    observer = hasattr(capture, "wants") and hasattr(capture, "save")
    if observer and (capture_layers is not None or capture_steps is not None):  # (they would be ignored, unsaid)
        raise ValueError(f"capture_layers/capture_steps choose what a capture folder saves; the observer "
                         f"{type(capture).__name__} chooses its own layers and steps (its wants(layer, step)): drop "
                         "them, or pass capture=FOLDER")
    made = []
    if capture is not None and not observer:
        made = folders_to_make(capture)
        capture = Capture(check_capture_dir(capture), capture_layers, capture_steps)
    try:
        yield capture
    except BaseException:
        remove_empty(made)
        raise


def _check_fit(targets, method: Method, layer_methods: Dict[int, Method], allow_other_grid) -> None:
    """``allow_other_grid`` is a bool, and the methods fit the model: none a class has no use for (Radial on
    Latte's per-frame 2-D calls) or made for another grid rank (VSA on an image model, a 3-D tile on a 2-D grid),
    and a SparsePlan's model class, layers and heads are the ones it was made for."""
    _check_bool("allow_other_grid", allow_other_grid)
    for _, t, preset, _ in targets:
        for m in (method, *layer_methods.values()):
            check_method_for(type(t).__name__, preset, m)
            for inner, note in inner_configs(m):  # a plan's entries, a PerHead's heads: refused here, not mid-run
                try:
                    check_method_for(type(t).__name__, preset, inner)
                except ValueError as err:  # (worded as ComfyUI's node says it of a plan)
                    raise ValueError(f"{err} ({note})") from None
    if hasattr(method, "check_model"):
        for _, transformer, _, modules in targets:
            method.check_model(type(transformer), [_heads_of(module) for _, module in modules])
        warning = check_model_config(method, targets[0][1])  # (its class, layers and heads fit: was it this model?)
        if warning:
            warnings.warn(f"dit_accel: {warning}", DitAccelWarning, stacklevel=3)
    for _, transformer, _, modules in targets:  # per-head windows (Tile, GNA, a strategy file) need the model's heads
        known = sorted({h for h in (_heads_of(module) for _, module in modules) if h is not None})
        for m in (method, *layer_methods.values()):
            want = getattr(m, "heads", None)
            if isinstance(want, int) and not isinstance(want, bool) and known and known != [want]:
                path = getattr(m, "path", None)
                fix = ("use a strategy searched for this model" if path else
                       "give one window per head, or one window for every head")
                raise ValueError(f"{path or type(m).__name__} has windows for {want} heads per layer, but "
                                 f"{type(transformer).__name__}'s attention layers run "
                                 f"{', '.join(map(str, known))} heads: {fix}")


def _build_runtime(targets, pipe, method: Method, options: dict, backend: str, weights, capture, capture_layers,
                   capture_steps, scheduler, timing: bool, allow_other_grid: bool):
    """``(schedule, runtime, step source, warning log)`` of one apply(), the ``weights`` folder checked against
    the schedule. Reads the model, never changes it."""
    layer_methods = options["layer_methods"]
    log = WarningLog()
    _warn_unknown_strategy_layers((method, *layer_methods.values()), max(len(m) for *_, m in targets),
                                  type(targets[0][1]).__name__, log)
    per_step = any(hasattr(m, "for_layer_step") for m in (method, *layer_methods.values()))  # e.g. TileStrategy
    needs_step = bool(options["dense_steps"] or options["dense_last_steps"] or capture_steps is not None or per_step)
    # the pipeline by a weak reference (before: a transformer kept after `del pipe` kept its VAE and text encoders)
    try:
        pipe_ref = weakref.ref(pipe) if pipe is not None else lambda: None
    except TypeError:  # (an object without weak references, a SimpleNamespace: held as it is)
        pipe_ref = (lambda held: lambda: held)(pipe)
    steps = StepSource(lambda: scheduler if scheduler is not None else getattr(pipe_ref(), "scheduler", None),
                       needs_step, lambda message: log.warn(f"dit_accel: {message}"), reads_step=capture is not None)
    schedule = _resolve_layers(dict(method=method, **options), max(len(m) for *_, m in targets), capture_layers, log)
    if weights is not None:
        _check_weights_folder(weights, schedule, [(name, module, i) for *_, modules in targets
                                                  for i, (name, module) in enumerate(modules)])
    names = [name for *_, modules in targets for name, _ in modules]
    runtime = Runtime(backend, Stats(names, timing), capture, log)
    runtime.call_check = _plan_call_check(method, allow_other_grid, log)
    return schedule, runtime, steps, log


# apply() reads the model's live handle and installs its own as one step (one live handle per model).
_APPLYING = threading.RLock()


def refuse_other_threads(found) -> None:
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


def refuse_inside_with(found) -> None:
    """RuntimeError when a live handle on these transformers is inside its ``with`` block: replacing it would leave
    the rest of that block running the original (dense) model once the new handle goes (before: a warning, and
    ``with apply(m, A): with apply(m, B): ...`` ran A's block dense after B's block, without another word)."""
    for old in _applied_handles(found):
        if old._blocks:
            raise RuntimeError(f"dit_accel: apply() inside the `with` block of {old!r} on the same model: the new "
                               "handle would replace it, and the rest of that block would run the original (dense) "
                               "model once the new one is removed. Leave that with block first (one method per "
                               "model at a time), or apply the second method to its own copy of the model")


def _take_over(found, targets, schedule: Schedule, runtime: Runtime, steps: StepSource, weights,
               log: WarningLog, gates_from=None) -> AccelHandle:
    """Install the new handle in place of the model's earlier ones (same thread only, and none inside its ``with``
    block), all or nothing. ``gates_from``: the folder of a VSA checkpoint's gates given as ``weights=`` (see
    :mod:`.vsa_gates`)."""
    refuse_other_threads(found)
    refuse_inside_with(found)
    if weights is not None:  # a LoRA of the user's under dit_accel's adapter name (loading would replace it)
        refuse_foreign_adapter(weights, [t for _, t in found], _applied_handles(found))
    previous = suspend_handles(found)
    gate, handle = CallGate(), None
    try:
        handle = AccelHandle(_install(targets, schedule, runtime, steps, gate), schedule, runtime, steps, gate)
        handle._gates = attach_gates(handle, targets, gates_from)
        if weights is not None:
            for old in previous:  # they may hold the adapter name the folder loads: theirs go first
                if old._adapters:
                    old._release()
            handle._load_checked(weights)  # (checked in _build_runtime, before the model changed)
        handle._guard_save()
    except BaseException:
        try:
            if handle is not None:
                try:
                    handle.remove()
                except BaseException:  # cut short (a second Ctrl-C): a second call finishes what it left
                    handle.remove()
        finally:  # (before: skipped when that remove() raised, so the earlier handle stayed taken off, its calls
            restore_handles(previous)  # waiting for a removal that never ended)
        raise
    retire_handles(previous, handle, log.warn, "apply()", "the new",
                   ": apply() to it as well (one handle per transformer), or to the pipeline")
    return handle


def retire_handles(previous: List[AccelHandle], handle: AccelHandle, warn, who: str, new: str,
                   advice: str = "") -> None:
    """The earlier handles go for good, ``handle`` taking their calls (apply() replacing them, or a fine-tuning run
    that succeeded): each is said by ``warn``, with the transformers it held that ``handle`` does not (they now run
    the original model)."""
    successors = {id(hook.transformer): hook for hook in handle._hooks}
    for old in previous:
        name = repr(old)
        for hook in old._hooks:
            hook.unhook()
            hook.successor = successors.get(id(hook.transformer))  # its waiting calls run under the new handle
        old._release()
        old.removed = True
        old._gate.finish()
        # the old handle's other transformers (a pipeline's transformer, when only transformer_2 is applied
        # again) lose dit_accel too: said by name, or their dense run would pass unnoticed
        left = [f"{hook.prefix.rstrip('.') or 'transformer'} ({type(hook.transformer).__name__})"
                for hook in old._hooks if id(hook.transformer) not in successors]
        also = (f"; it also held {', '.join(left)}, which now run{'s' * (len(left) == 1)} the original (dense) "
                f"model{advice}") if left else ""
        warn(f"dit_accel: {who} on a model that {name} was applied to: that handle was removed first (exactly, as "
             f"handle.remove() does) and {new} {handle!r} replaces it{also}", stacklevel=5)


def suspend_handles(found, what: str = "apply()") -> List[AccelHandle]:
    """The earlier handles on these transformers, their hooks and processors taken off (reversibly: their adapters
    stay, and :func:`restore_handles` puts them back) for ``what`` (apply(), or a fine-tuning run) to install its
    own. Their calls in flight finish first."""
    previous = []
    try:
        for old in _applied_handles(found):
            if old._gate.close(what):
                previous.append(old)
                for hook in old._hooks:  # the forward hooks stay until the new handle is in (kept ids, order)
                    hook.unwrap()
    except BaseException:
        restore_handles(previous)
        raise
    return previous


def restore_handles(previous: List[AccelHandle]) -> None:
    """Put back handles that :func:`suspend_handles` took off (what replaced them failed)."""
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


