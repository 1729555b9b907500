"""The transformer hook: per call, the grid, the step and every layer's plan, behind the handle's call gate.

:class:`TransformerHook` installs one :class:`~.processor.SparseAttnProcessor` per attention layer and a forward
pre/post hook on the transformer. Each call passes the :class:`~.context.CallGate` (``remove()`` and a
replacing ``apply()`` wait for calls in flight), reads its step (:class:`~.schedule.StepSource`) and pushes
its :class:`~.context.CallContext`. See :mod:`.hooks` for the whole mechanism."""

from __future__ import annotations

import inspect
import math
import sys
import threading
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..kernels.backends import env_value
from ..kernels.sla import inert_projections
from ..plans.plan import Plan, SLAPlan
from .capture import Capture
from .checkpointing import checkpointing_modules, keep_call_context, restore_checkpointing
from .context import (CallContext, CallGate, CallRecord, ContextStack, call_is_running, calling_pipeline,
                      lasting_tensors, tracing)
from .interceptor import _dispatch_module
from .parallel import Split, check_per_head, check_ulysses_heads, check_ring_layers, check_split
from .presets import GridInfo, Preset
from .processor import Runtime, SparseAttnProcessor, _backend_name
from .schedule import Schedule, StepSource

__all__ = ["TransformerHook", "attention_modules", "warn_unreached_strategy"]


def attention_modules(transformer: nn.Module, prefix: str, preset: Preset) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``preset`` targets in ``transformer``, in model order; ValueError when they
    cannot be wrapped (a trainable processor, a non-native Diffusers attention backend, none found)."""
    found = []
    for name, module in transformer.named_modules():
        # A block the user wrapped in torch.compile (blocks[i] = torch.compile(blocks[i])) is named through the
        # wrapper's _orig_mod: its layers were not found (all wrapped: "found no attention modules"; some: those
        # ran dense, unsaid). The wrapper's graph guards on the processor, so wrapping them recompiles it.
        name = name.replace("._orig_mod.", ".")
        if not preset.matches(name) or getattr(module, "processor", None) is None:
            continue
        original, where = module.processor, prefix + name
        if isinstance(original, nn.Module):
            raise ValueError(f"{where} uses a trainable attention processor ({type(original).__name__}, e.g. "
                             "IP-Adapter); dit_accel wraps plain processors only. Unload it first")
        backend = _backend_name(original)
        if backend not in (None, "native"):
            raise ValueError(f"{where} uses the Diffusers attention backend {backend!r}; dit_accel intercepts the "
                             "native backend. Call transformer.reset_attention_backend() (or "
                             "set_attention_backend('native')) before dit_accel.apply()")
        found.append((where, module))
    if not found:
        raise ValueError(f"found no attention modules matching {preset.attention} in {type(transformer).__name__}")
    return found


_CALL_IMPL = nn.Module._call_impl.__code__


def _module_call_frame():
    """The frame of ``nn.Module._call_impl`` making the current hook call: on the stack for exactly as long as
    the transformer call runs (None where it cannot be found, e.g. inside code torch.compile traced)."""
    frame = sys._getframe(2)
    for _ in range(16):  # (a call the replaced handle hands on passes both hooks' frames)
        if frame is None or frame.f_code is _CALL_IMPL:
            return frame
        frame = frame.f_back
    return None


def _latent_device(bound: dict) -> Optional[torch.device]:
    """The device of the call's latents: ``hidden_states``, or the first tensor of ``x`` (Z-Image takes a list)."""
    for name in ("hidden_states", "x"):
        value = bound.get(name)
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class TransformerHook:
    """Installs and removes dit_accel on one transformer: the forward hooks and one wrapper per attention layer."""

    def __init__(self, transformer: nn.Module, prefix: str, preset: Preset, schedule: Schedule, runtime: Runtime,
                 steps: StepSource, gate: Optional[CallGate] = None):
        self.transformer, self.prefix, self.preset = transformer, prefix, preset
        self.schedule, self.runtime, self.steps = schedule, runtime, steps
        self.gate = CallGate() if gate is None else gate  # shared by the hooks of one handle
        self.handle = None  # the AccelHandle, set by it
        self.stack = ContextStack()
        self._calls = threading.local()  # per thread: the CallRecords of calls in flight (see _pre_forward)
        self.signature = inspect.signature(type(transformer).forward)
        self.layers: List[SparseAttnProcessor] = []
        self._modules: List[nn.Module] = []
        self._handles = []
        self._last = None  # (key, context, parallel config, any plan) of the last call (see _pre_forward)
        self._inert_seen: Dict[int, tuple] = {}  # layer index -> its projection's versions when read as inert
        self._grid = None  # (the preset's fingerprint, GridInfo) of the last call that had a fingerprint
        self._phases_seen = None  # (schedule, total steps) that _warn_recompiles counted
        self._splits_seen = None  # (schedule, grid, total steps, ring, world) that _check_later_splits checked
        self.successor: Optional["TransformerHook"] = None  # the hook of the handle that replaced this one
        self._checkpointing = checkpointing_modules(transformer)  # (see .checkpointing)

    def install(self, modules: List[Tuple[str, nn.Module]], first_slot: int, projections: Dict[int, nn.Module]):
        """Wrap the processors of ``modules`` (``projections``: SLA ``Linear(D, D)`` per layer index), hook forward.

        All or nothing: a failure part way undoes what was done and raises.
        """
        try:
            _dispatch_module()  # imported now, eagerly: the wrapped processors only read it (see there)
            for index, (name, module) in enumerate(modules):
                wrapper = SparseAttnProcessor(module.processor, self, index, first_slot + index, name,
                                              projections.get(index))
                self.layers.append(wrapper)
                self._modules.append(module)
                module.processor = wrapper
            if self.layers and self.layers[0].parallel is not None:  # a model made context-parallel before apply()
                Split.of(self.layers[0].parallel)  # (uneven shares: refused here, not at the first attention call)
                check_ulysses_heads(self.transformer, self.layers[0].parallel)
                check_ring_layers(self.transformer, self.preset, self.layers[0].parallel)
                check_per_head(self.schedule, self.layers[0].parallel)
            self.refresh_inert()
            self._hook_forward()
        except BaseException:
            self.remove()
            raise

    @property
    def attached(self) -> bool:
        """Whether the forward hooks are on the transformer (False once removed or replaced)."""
        return bool(self._handles)

    def _hook_forward(self) -> None:
        self._handles.append(self.transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(self.transformer.register_forward_hook(self._post_forward, always_call=True))

    def remove(self) -> None:
        """Drop the hooks and put the original processors back (unless the user replaced the wrapper since)."""
        self.unhook()
        self.unwrap()

    def unhook(self) -> None:
        """Drop the forward hooks: the last step of every removal (remove(), a replacing apply())."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._forget_saved_wrappers()
        restore_checkpointing(self._checkpointing, self)

    def _forget_saved_wrappers(self) -> None:
        """``fuse_qkv_projections()`` (SD3, PixArt, CogVideoX, ...) keeps the processors it replaces in
        ``original_attn_processors`` for ``unfuse_qkv_projections()`` to set again; fused while applied, those
        are this hook's wrappers, which would come back after remove(): the originals they wrap go there."""
        saved = self.transformer.__dict__.get("original_attn_processors")
        if not isinstance(saved, dict):
            return
        originals = {id(layer): layer.original for layer in self.layers}
        for key, processor in saved.items():
            if id(processor) in originals:
                saved[key] = originals[id(processor)]

    def unwrap(self) -> None:
        """The original processors back in place of this hook's wrappers (:meth:`rewrap` undoes it)."""
        for module, layer in zip(self._modules, self.layers):
            current = getattr(module, "processor", None)
            if current is layer:
                module.processor = layer.original
            if layer.parallel is not None and (current is layer or current is layer.original):
                layer.original._parallel_config = layer.parallel  # a context-parallel model stays exactly that

    def rewrap(self) -> None:
        """Undo :meth:`unwrap` (apply() restoring a handle it had begun to replace)."""
        for module, layer in zip(self._modules, self.layers):
            if getattr(module, "processor", None) is layer.original:
                object.__setattr__(layer, "parallel", getattr(layer.original, "_parallel_config", None))
                module.processor = layer
                if layer.parallel is not None:
                    layer.original._parallel_config = None

    def refuse_copy(self):
        """deepcopy/pickle of an applied model: refused in one line (the hooks hold locks and thread state)."""
        raise TypeError(f"dit_accel: cannot deepcopy or pickle {type(self.transformer).__name__} while dit_accel is "
                        f"applied to it ({self.handle!r}): call handle.remove() first, copy the model, then "
                        "dit_accel.apply() to each copy")

    def __reduce_ex__(self, protocol):
        self.refuse_copy()

    def __deepcopy__(self, memo):
        self.refuse_copy()

    # The hooks run eagerly even when the transformer is compiled (torch.compile calls module hooks outside
    # its graph; a compiled caller that inlines the call gets a graph break here): plans and their device
    # data are built here, and the traced attention layers only read them.
    @torch.compiler.disable
    def _post_forward(self, *_) -> None:
        calls = getattr(self._calls, "list", None)
        if not calls:  # (the hook was added while this call ran)
            return
        self._end(calls.pop())
        compiled = False
        for layer in self.layers:
            report = layer.report
            if report.call is not None or report.warnings:  # notes of compiled code (eager calls leave none)
                compiled = True
                report.flush()
        if compiled and self._last is not None:
            self._warn_recompiles(self._last[1].total)

    def _end(self, record: CallRecord) -> None:
        """Pop what ``record``'s pre-hook pushed and let the gate know the call is over."""
        if record.pushed:
            record.pushed = False
            self.stack.pop()
            for layer in self.layers:
                layer.plans.pop()
        if record.admitted:
            self.gate.leave(record)

    @torch.compiler.disable
    def _pre_forward(self, module, args, kwargs) -> None:
        """Begin a call: a :class:`CallRecord` first (the post-hook, which runs even when this hook raises,
        pops exactly what it says was pushed), then the gate (``remove()`` waits for this call), then the context.

        Records this thread still holds whose call is no longer on its stack belong to calls that an
        exception skipping forward hooks (KeyboardInterrupt) cut short: they are cleaned up first.
        """
        calls = getattr(self._calls, "list", None)
        if calls is None:  # this thread's first call
            calls = self._calls.list = []
            for layer in self.layers:
                layer.report.ready()
        while calls and not call_is_running(calls[-1]):
            self._end(calls.pop())
        call_frame = _module_call_frame()
        if calls and calls[-1].delegated and call_frame is not None and calls[-1].frame is call_frame:
            calls[-1].delegated = False  # begun for this call by the hook it replaced (below): once is enough
            return
        frame, pipeline = calling_pipeline(self.transformer)
        record = CallRecord(call_frame, frame, pipeline)
        del frame
        calls.append(record)
        if not self.gate.enter(record):
            # The handle went while this call waited. Replaced: the call runs wholly under the new handle (its
            # processors are in place now, and its post-hook will end the call). Removed: the original model.
            successor = self.successor
            if successor is not None:
                successor._pre_forward(module, args, kwargs)
                later = getattr(successor._calls, "list", None)
                if later and later[-1].frame is call_frame:
                    later[-1].delegated = True
            return
        try:
            self._begin(record, pipeline, module, args, kwargs)
        except BaseException:
            self._end(record)
            raise

    def _begin(self, record: CallRecord, pipeline, module, args, kwargs) -> None:
        # Pipelines call the transformer with keywords only: those need no binding (a per-step saving).
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments if args else kwargs
        # A call that reads like the last one (the preset's fingerprint of what its reader reads) has its
        # grid: a denoising loop reads it once per geometry.
        fingerprint = self.preset.grid_key(bound) if self.preset.grid_key is not None else None
        grid = self._grid
        if fingerprint is not None and grid is not None and grid[0] == fingerprint:
            info = grid[1]
        else:
            info = self.preset.read_grid(module, bound)
            if not isinstance(info, GridInfo):  # (a registered preset's reader)
                raise TypeError(f"dit_accel: the read_grid of {self.preset.class_name}'s preset returned "
                                f"{type(info).__name__}; it returns a dit_accel.GridInfo(grid, num_text)")
            self._grid = None if fingerprint is None else (fingerprint, info)
        step, total = self.steps.current(bound, pipeline)
        parallel = self.layers[0].parallel if self.layers else None
        device = _latent_device(bound)
        # The context is a function of the key and the parallel config: a call like the last one reuses it
        # (the plans' device data included), so a denoising loop builds and checks once per geometry.
        additive = self.preset.additive_mask
        additive_ok = additive is not None and bool(additive(bound, info))
        key = (tuple(info.grid), info.num_text, info.num_after, step, total, device, env_value(), additive_ok)
        last = self._last
        if last is not None and last[0] == key and last[2] is parallel:
            context, planned = last[1], last[3]
        else:
            with lasting_tensors():  # (plans and their device data outlive the call)
                context = self._context(info, step, total, parallel, device, additive_ok)
            planned = any(plan is not None for plan in context.plans)
            self._last = (key, context, parallel, planned)
        if planned and not self.runtime.bypassed:  # a grid summary()'s ran_on_grid lists (until reset_stats)
            self.runtime.stats.grids.add(context.grid)
        self._check_processors()
        sla = []
        record.pushed = True  # (pushes cannot fail part way: the stacks are lists)
        self.stack.push(context)
        for layer, plan in zip(self.layers, context.plans):
            layer.plans.push(plan)
            if layer.sla_proj is not None and isinstance(plan, SLAPlan):
                sla.append(layer)
            elif layer.inert:  # (a write goes through the wrapper's __setattr__: only when it changes)
                layer.inert = False
        if sla:
            for layer, inert in zip(sla, self._inert_now(sla) if device is not None else [False] * len(sla)):
                if layer.inert != inert:
                    layer.inert = inert
        if self._checkpointing and torch.is_grad_enabled():  # blocks recomputed in backward: under this call's plans
            keep_call_context(self._checkpointing, self)

    def refresh_inert(self) -> None:
        """Read now, eagerly, which SLA projections are still zero (at ``apply`` and after ``load_weights``): a
        first call that torch.compile traces or a CUDA graph captures cannot read them. A projection written
        any other way is read again at the next eager call."""
        sla = [layer for layer in self.layers if layer.sla_proj is not None]
        with torch.no_grad():  # the values alone: whether a call trains the projection is asked per call
            verdicts = self._inert_now(sla)
        for layer, inert in zip(sla, verdicts):
            object.__setattr__(layer, "inert", inert)

    def _inert_now(self, sla: List[SparseAttnProcessor]) -> List[bool]:
        """Whether each SLA layer's projection is still zero (training-free SLA: its linear branch adds nothing,
        so it is not computed). Eager calls read the values (:func:`~dit_accel.kernels.sla.inert_projections`:
        one reduction and one synchronisation per transformer call for every layer, not per layer call). A call
        that torch.compile traces or a CUDA graph captures cannot read them: it keeps the last eager verdict (a
        Python bool, which Dynamo guards: a change recompiles) unless the projection is being trained, and a
        capture keeps it only while the projection's tensors are the ones read then (same version counters and
        storage: an optimizer step or a load in between makes the branch run)."""
        grad = torch.is_grad_enabled()

        def kept(layer) -> bool:  # the last verdict, unless this call trains the projection
            return layer.inert and not (grad and any(p.requires_grad for p in layer.sla_proj.parameters()))

        if tracing():
            return [kept(layer) for layer in sla]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return [kept(layer) and self._inert_seen.get(layer.index) == _versions(layer.sla_proj) for layer in sla]
        verdicts = inert_projections([layer.sla_proj for layer in sla])
        for layer, inert in zip(sla, verdicts):
            if inert:
                self._inert_seen[layer.index] = _versions(layer.sla_proj)
            else:
                self._inert_seen.pop(layer.index, None)
        return verdicts

    def _warn_recompiles(self, total: Optional[int]) -> None:
        """A compiled model gets one graph per schedule phase (steps whose layers all run the same methods) and
        size; past Dynamo's recompile limit it ran eagerly from then on, unsaid (with fullgraph=True it failed
        mid-run: FailOnRecompileLimitHit). Said once per schedule and step count, at the first compiled call."""
        if total is None or self._phases_seen == (self.schedule, total):
            return
        self._phases_seen = (self.schedule, total)
        config = torch._dynamo.config
        limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8)
        phases = len({tuple(self.schedule.method_for(layer.index, step, total) for layer in self.layers)
                      for step in range(total)})
        if phases > limit:
            self.runtime.warnings.warn(
                f"dit_accel: this schedule runs up to {phases} different plans over its {total} steps, and "
                f"torch.compile builds one graph for each (per resolution), past torch._dynamo.config.recompile_limit "
                f"({limit}): later steps run eagerly (with fullgraph=True, they fail). Raise it before the run "
                f"(torch._dynamo.config.recompile_limit = {2 * phases}), or run this schedule uncompiled",
                key=("compiled phases", total))

    def set_schedule(self, schedule: Schedule) -> None:
        """Another schedule from the next call on (the cached call context goes with the old one)."""
        self.schedule = schedule
        self._last = None

    def _context(self, info, step: int, total: Optional[int], parallel, device,
                 additive_ok: bool = False) -> CallContext:
        """The call's context: each layer's plan (built, checked and prepared on ``device``), warnings said."""
        if self.runtime.call_check is not None:  # a calibrated plan's grid and step count, before any attention
            self.runtime.call_check(info.grid, total, step)
        split = Split.of(parallel)
        plans = tuple(self._plan(layer, step, total, info.grid, split) for layer in self.layers)
        if split is not None:
            num_text = info.num_text if self.preset.text_position != "none" else 0
            check_split(split, math.prod(info.grid), num_text, plans)
            self._check_later_splits(split, info.grid, num_text, total)
        schedule = self.schedule
        if schedule.sparse and total is not None and schedule.dense_steps + schedule.dense_last_steps >= total:
            self.runtime.warnings.warn(f"dit_accel: dense_steps={schedule.dense_steps} + dense_last_steps="
                                       f"{schedule.dense_last_steps} cover all {total} denoising steps: every step "
                                       "runs dense. Lower them or raise the number of steps")
        if total is not None:
            for method in schedule.methods():
                warn_unreached_strategy(method, total, self.runtime.warnings)
            _warn_unreached_capture(self.runtime.capture, total, self.runtime.warnings)
        if device is not None:
            for plan in {id(p): p for p in plans if p is not None}.values():
                plan.prepare(device, self.runtime.backend)
        return CallContext(tuple(info.grid), info.num_text, step, total, plans, additive_ok, info.num_after)

    def _check_later_splits(self, split: Split, grid, num_text: int, total: Optional[int]) -> None:
        """Refuse, at a run's first call, a ring split that a later step's plans cannot take (before: refused at
        the first sparse step, after ``dense_steps`` or a plan's dense phase had run). Once per schedule, grid and
        step count."""
        seen = (self.schedule, tuple(grid), total, split.ring, split.world)
        if split.ring == 1 or total is None or self._splits_seen == seen:
            return
        check_split(split, math.prod(grid), num_text, [self._plan(layer, step, total, grid, split)
                                                       for step in range(total) for layer in self.layers])
        self._splits_seen = seen

    def _plan(self, layer: SparseAttnProcessor, step: int, total: Optional[int], grid,
              split: Optional[Split]) -> Optional[Plan]:
        method = self.schedule.method_for(layer.index, step, total)
        if method is None:
            return None
        if split is not None and split.ring > 1:
            method = method.for_shares(tuple(grid), split.ring)
        try:
            plan = self.runtime.plans.get(method, grid)
        except ValueError as err:  # a method this model's grid cannot take: say which model
            name = type(self.transformer).__name__
            if name in str(err):
                raise
            raise ValueError(f"dit_accel: {name}: {str(err).removeprefix('dit_accel: ')}") from None
        # A per-step method (FastVideo's searched windows) picks full windows on purpose: no warning.
        chosen = self.schedule.layer_methods.get(layer.index, self.schedule.method)
        if plan.is_dense and method.name != "dense" and not hasattr(chosen, "for_layer_step"):
            self.runtime.warnings.warn(f"dit_accel: {method!r} on {layer.name} (and every layer it runs on): "
                                       f"{plan.dense_reason}, so it runs dense attention (no speedup)",
                                       key=("dense plan", method, plan.grid))
        elif not plan.is_dense and (plan.density or 0.0) >= 1.0 and not hasattr(chosen, "for_layer_step"):
            # Token masks still apply (the result is the method's), but every key block is visited.
            self.runtime.warnings.warn(f"dit_accel: {method!r} on {layer.name} (and every layer it runs on) "
                                       f"visits every key block of grid {tuple(plan.grid)}: it masks tokens "
                                       "inside the blocks but saves no work (no speedup); a larger grid or "
                                       "a smaller window or block makes it sparse",
                                       key=("full plan", method, plan.grid))
        return plan

    def _check_processors(self) -> None:
        for module, layer in zip(self._modules, self.layers):
            if getattr(module, "processor", None) is not layer:
                self.runtime.warnings.warn(
                    f"dit_accel: the attention processor of {layer.name} was replaced after apply() "
                    f"(now {type(getattr(module, 'processor', None)).__name__}); that layer runs the new processor, "
                    "not dit_accel's method, and handle.remove() leaves it in place. Where a Diffusers call replaced "
                    "it (CogVideoX's fuse_qkv_projections() sets fused processors), make that call before apply()")


def warn_unreached_strategy(method, total: int, warnings) -> None:
    """A per-step strategy (TileStrategy) that lists no step below the run's ``total``: every call runs dense (its
    file was searched for a longer run). Said once per file and step count, at the first call that knows ``total``."""
    steps = getattr(method, "steps", None) if hasattr(method, "for_layer_step") else None
    if not steps or min(steps) < total:
        return
    listed = f"{steps[0]}-{steps[-1]}" if list(steps) == list(range(steps[0], steps[-1] + 1)) else \
        ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
    warnings.warn(f"dit_accel: {method.path} lists step{'s' * (len(steps) > 1)} {listed}, but this run has {total} "
                  f"step{'s' * (total != 1)}: every call runs dense. Pass the strategy searched for {total} steps, or "
                  f"run more steps", key=("strategy steps unreached", method.path, total))


def _warn_unreached_capture(capture, total: int, warnings) -> None:
    """``capture_steps`` at or past the run's ``total`` steps capture nothing (the folder stayed empty, unsaid). Said
    once per step count, at the first call that knows ``total``."""
    steps = sorted(capture.steps) if isinstance(capture, Capture) and capture.steps is not None else ()
    past = [s for s in steps if s >= total]
    if not past:
        return
    shown = ", ".join(map(str, past[:6])) + (", ..." if len(past) > 6 else "")
    what = "nothing is captured" if len(past) == len(steps) else "no files are written for them"
    warnings.warn(f"dit_accel: capture_steps {shown} {'are' if len(past) > 1 else 'is'} past this run's {total} "
                  f"denoising step{'s' * (total != 1)} (0..{total - 1}): {what}. Pass steps below {total}, or run "
                  "more steps", key=("capture steps unreached", tuple(past), total))


def _versions(proj: nn.Module) -> tuple:
    """What says that ``proj``'s tensors are unchanged since they were read, without reading them (no sync): each
    parameter's version counter (bumped by in-place writes: optimizer steps, ``copy_``) and storage."""
    return tuple((p._version, p.data_ptr()) for p in proj.parameters())
