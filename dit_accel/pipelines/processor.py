"""The layer: :class:`SparseAttnProcessor` wraps one attention module's processor, and the :class:`Runtime`
(plans, statistics, capture, warnings) that every layer of one handle shares. See :mod:`.hooks` for the whole
mechanism."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .._util import WarningLog
from ..methods import Method
from ..plans.plan import Plan
from .capture import Capture
from .context import CallContext, ContextStack, lasting_tensors, tracing
from .interceptor import _ROUTE, SDPAInterceptor, native_scope
from .parallel import Split, check_per_head, check_ulysses_heads, check_ring_layers
from .stats import Stats

__all__ = ["SparseAttnProcessor", "Runtime", "PlanCache", "LayerReport"]


class PlanCache:
    """Plans by (method, grid): built once per geometry, shared by every layer and call.

    Least-recently-used plans beyond ``max_plans`` are dropped (a per-step strategy or a sweep over
    resolutions would otherwise keep every layout, hundreds of MiB each at HunyuanVideo size); a
    dropped plan is rebuilt when its geometry comes back.
    """

    def __init__(self, max_plans: int = 64) -> None:
        self.max_plans = max_plans
        self._plans: "OrderedDict[Tuple[Method, Tuple[int, ...]], Plan]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, method: Method, grid) -> Plan:
        key = (method, tuple(int(g) for g in grid))
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        with lasting_tensors():  # outside the lock: plans can take a while; a racing duplicate is harmless
            plan = method.plan(key[1])
        if not isinstance(plan, Plan):  # (a registered method's plan(); built once per geometry)
            raise TypeError(f"{type(method).__name__}.plan(grid) returned {type(plan).__name__}; a method's plan() "
                            "returns a dit_accel.plans.plan.Plan, e.g. LayoutPlan(self, grid, layout) or "
                            "DensePlan(self, grid, reason)")
        with self._lock:
            plan = self._plans.setdefault(key, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        return plan

    def items(self) -> Dict[Tuple[Method, Tuple[int, ...]], Plan]:
        with self._lock:
            return dict(self._plans)


class Runtime:
    """What the hooks of one ``apply`` share: backend, plans, statistics, capture, warnings."""

    def __init__(self, backend: str, stats: Stats, capture: Optional[Capture], warnings: WarningLog):
        self.backend = backend
        self.plans = PlanCache()
        self.stats = stats
        self.capture = capture
        self.warnings = warnings
        self.call_check = None  # (grid, total steps, step) -> None: a SparsePlan's checks of the call (apply sets it)
        self._local = threading.local()  # per-thread bypass depth (handle.bypassed())
        self._captures = {}  # transformer prefix -> its capture observer (capture_for)
        self.mask_seen = None  # (key, weakref to the mask, verdict): the last key mask read (interceptor._hides_video)

    def capture_for(self, prefix: str):
        """The capture observer of the transformer wrapped under ``prefix`` (None without capture): the observer's
        ``for_transformer(prefix)`` (a :class:`Capture` writes each transformer's own files), made once per prefix;
        an observer without that method is shared by every transformer and sees their calls by (layer, step)
        alone, layer indices restarting at 0 in each transformer."""
        if self.capture is None:
            return None
        if prefix not in self._captures:
            split = getattr(self.capture, "for_transformer", None)
            self._captures[prefix] = self.capture if split is None else split(prefix)
        return self._captures[prefix]

    @property
    def bypassed(self) -> bool:
        return getattr(self._local, "bypass", 0) > 0

    @contextlib.contextmanager
    def bypass(self):
        """In this thread, attention runs the original processors (dense, no SLA projection) and is not counted."""
        self._local.bypass = getattr(self._local, "bypass", 0) + 1
        try:
            yield
        finally:
            self._local.bypass -= 1


def _backend_name(processor) -> Optional[str]:
    backend = getattr(processor, "_attention_backend", None)
    return None if backend is None else str(getattr(backend, "value", backend))


class LayerReport:
    """How one attention layer reports its calls (sparse with a density, dense with a reason) and warnings.

    In eager mode straight to the :class:`Runtime`'s statistics and warnings. Code that
    ``torch.compile`` traces cannot count in Python (a counter read there becomes a constant
    of the graph, a list read a guard, and ``warnings`` breaks the graph), so there the layer
    only stores a note, which the compiled code repeats on every call and the transformer's
    post-hook hands on (:meth:`flush`). Only attributes of this object are written there, and
    nothing layer-specific is read, so the blocks of a regionally compiled model share one graph.
    The notes are per thread: two threads running the compiled model at once each hand on their own
    call (one shared note was overwritten: a call counted twice, or lost).
    """

    def __init__(self, runtime: Runtime, slot: int, index: int, prefix: str = ""):
        self.runtime, self.slot, self.index = runtime, slot, index
        self.observer = runtime.capture_for(prefix)  # capture of this layer's transformer (None: no capture)
        self._notes = threading.local()  # .call, .warnings: what this thread's compiled code stored
        self.ready()

    def ready(self) -> None:
        """Empty notes for the calling thread, before its first call: a trace that found them missing would guard
        on that, and recompile once they exist."""
        self._notes.call, self._notes.warnings = None, ()

    @property
    def call(self):
        """(sparse, density or dense reason, backend), stored by this thread's compiled code (None: none)."""
        return getattr(self._notes, "call", None)

    @property
    def warnings(self) -> tuple:
        """((message, key), ...) stored by this thread's compiled code."""
        return getattr(self._notes, "warnings", ())

    def warn(self, message: str, key=None) -> None:
        if tracing():
            self._notes.warnings = (*self.warnings, (message, key))
        else:
            self.runtime.warnings.warn(message, key=key)

    def dense(self, reason: Optional[str] = None) -> None:
        if tracing():
            self._notes.call = (False, reason, None)
        else:
            self.runtime.stats.dense(self.slot, reason)

    def sparse(self, density, backend: Optional[str] = None, token_density: Optional[float] = None) -> None:
        if tracing():
            self._notes.call = (True, density, backend, token_density)
        else:
            self.runtime.stats.sparse(self.slot, density, backend, token_density)

    def timed(self, device):
        if tracing():
            if self.runtime.stats.timing:
                self.warn("dit_accel: attention time is not measured inside torch.compile'd code (stats time_ms "
                          "covers eager calls only); time the compiled model as a whole", key="compiled timing")
            return contextlib.nullcontext()
        return self.runtime.stats.timed(self.slot, device)

    def capture(self, context: CallContext) -> bool:
        if tracing():  # reading the step would specialise the graph to it
            self.warn("dit_accel: capture does not save layers that run inside torch.compile'd code; capture with "
                      "an eager run", key="compiled capture")
            return False
        return self.observer.wants(self.index, context.step)

    def flush(self) -> None:
        """Hand the notes of a compiled call on to the statistics and warnings (eager: nothing to do)."""
        call, warnings = self.call, self.warnings
        self.ready()
        if call is not None:
            self.sparse(*call[1:]) if call[0] else self.dense(call[1])
        for message, key in warnings:
            self.warn(message, key)


def _unset_parallel(transformer, config) -> None:
    """Undo what ``enable_parallelism(config=config)`` did before dit_accel refused ``config`` in it: Diffusers
    records the config on the model and on each processor it reaches before the refusing one, and then refuses a
    second ``enable_parallelism`` ("already applied"), so the refused call would leave the model unusable with
    another config (Ulysses after a refused Ring)."""
    if getattr(transformer, "_parallel_config", None) is config:
        transformer._parallel_config = None
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and not isinstance(processor, SparseAttnProcessor) \
                and processor.__dict__.get("_parallel_config") is config:
            processor._parallel_config = None


def _skipped_attention(kwargs: dict) -> bool:
    """Whether the processor was told to skip attention altogether for every sample: LTX-2's
    ``LTX2PerturbedAttnProcessor`` in a spatio-temporal-guidance pass (``all_perturbed``, or a ``perturbation_mask``
    of zeros) returns the value projection without an SDPA call. Such a call computes no attention to make sparse
    (nor dense): it is neither said nor counted. Read only after a call made no SDPA call."""
    skipped, mask = kwargs.get("all_perturbed"), kwargs.get("perturbation_mask")
    if skipped is None and isinstance(mask, torch.Tensor):
        skipped = (mask == 0).all()
    return skipped is not None and bool(skipped)


class SparseAttnProcessor:
    """Wraps one attention module's original processor (see the module docstring).

    Reads and writes of attributes the wrapper does not own go to the original
    processor, and Diffusers' signature-based keyword filtering sees the original
    ``__call__`` signature, so the module behaves as before apart from SDPA.
    """

    _OWN = ("original", "owner", "index", "slot", "name", "sla_proj", "parallel", "plans", "report", "inert")

    def __new__(cls, original, *args, **kwargs):
        # Diffusers (Attention, FluxAttention, LTXAttention) filters call kwargs with
        # inspect.signature(processor.__call__): the instance is of a subclass whose __call__
        # carries the original's signature (a class attribute, so torch.compile traces it).
        return object.__new__(_with_signature(type(original)) if cls is SparseAttnProcessor else cls)

    # owner: a .transformer_hook.TransformerHook (named, not imported: that module imports this one)
    def __init__(self, original, owner: "TransformerHook", index: int, slot: int, name: str,  # noqa: F821
                 sla_proj: Optional[nn.Module]):
        # A context-parallel config moves into the wrapper, which runs the collectives (see .parallel).
        parallel = getattr(original, "_parallel_config", None)
        for key, value in (("original", original), ("owner", owner), ("index", index), ("slot", slot),
                           ("name", name), ("sla_proj", sla_proj), ("parallel", parallel),
                           ("plans", ContextStack()), ("report", LayerReport(owner.runtime, slot, index, owner.prefix)),
                           ("inert", False)):
            object.__setattr__(self, key, value)
        if parallel is not None:  # last: a wrapper that failed to build leaves the original as it was
            original._parallel_config = None

    def __call__(self, attn, *args, **kwargs):
        owner = self.owner
        runtime = owner.runtime
        split = None if self.parallel is None else Split.of(self.parallel)
        bypassed = runtime.bypassed
        if bypassed and split is None:
            return self.original(attn, *args, **kwargs)
        context = owner.stack.current()
        if context is None:  # called outside the transformer's forward: nothing is known about the grid
            if not owner.attached:  # a removed handle's wrapper set back (a processor dict kept from before)
                return self.original(attn, *args, **kwargs)
            self.report.warn("dit_accel: attention called outside the transformer forward; running dense")
            self.report.dense()
            return self.original(attn, *args, **kwargs)
        backend = _backend_name(self.original)
        if backend not in (None, "native"):
            self.report.warn(f"dit_accel: {self.name} uses the Diffusers attention backend {backend!r}, which "
                              "dit_accel cannot intercept: it runs dense. Call transformer.reset_attention_"
                              "backend() to run the sparse method")
            self.report.dense(f"attention backend {backend}")
            return self.original(attn, *args, **kwargs)
        # The layer's own plan stack, not context.plans[self.index]: compiled code would specialise on the
        # index, and regional compilation could not share one graph between the blocks.
        plan = None if bypassed else self.plans.current()
        capture = not bypassed and runtime.capture is not None and self.report.capture(context)
        if (plan is None or plan.is_dense) and not (capture or runtime.stats.timing or split is not None):
            self.report.dense(None if plan is None else plan.dense_reason)
            return self.original(attn, *args, **kwargs)
        interceptor = SDPAInterceptor(self, context, plan, capture, split)
        if tracing():
            with native_scope(), interceptor:
                out = self.original(attn, *args, **kwargs)
        else:
            out = _ROUTE.run(interceptor, type(self.original), lambda: self.original(attn, *args, **kwargs))
        # (Python bools: compiled code decides them when it traces)
        if not interceptor.seen and not _skipped_attention(kwargs):
            self._no_sdpa_call()
        return out

    def _no_sdpa_call(self) -> None:
        """The processor computed attention without ``scaled_dot_product_attention`` (Diffusers' classic
        ``AttnProcessor``, xformers, sliced attention): nothing could be made sparse. Said, and counted dense."""
        kind = type(self.original).__name__
        self.report.warn(f"dit_accel: the attention processor of {self.name} ({kind}; and of every layer that "
                         "runs it) computes attention without torch's scaled_dot_product_attention, which is what "
                         "dit_accel makes sparse: that layer ran dense. Set a processor that calls it (for Diffusers' "
                         "Attention: AttnProcessor2_0) before dit_accel.apply()", key=("no sdpa call", kind))
        self.report.dense(f"{kind} makes no SDPA call")

    def projection(self, device) -> Optional[nn.Module]:
        """The layer's SLA projection on ``device``.

        Projections are dit_accel's, not submodules of the model: ``state_dict()``/``save_pretrained``
        write the model itself, and offloading (model, sequential, group) never puts them on the meta
        device. So they follow the attention inputs here instead (a move of ``D x D`` weights, once).
        ``handle.sla_projections()`` gives them to an optimizer.
        """
        proj = self.sla_proj
        if proj is not None and proj.weight.device != device:
            proj.to(device)
        return proj

    def __getattr__(self, name):
        if name == "_parallel_config":
            return self.parallel
        if name.startswith("__") or name in self._OWN:
            raise AttributeError(name)
        return getattr(self.original, name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        elif name == "_parallel_config":  # enable_parallelism() after apply(): the wrapper runs it
            try:  # refuses what dit_accel cannot run in enable_parallelism itself, not at the first attention call
                check_ulysses_heads(self.owner.transformer, value)
                Split.of(value)
                if self.index == 0:  # (once per model: the check reads every layer)
                    check_ring_layers(self.owner.transformer, self.owner.preset, value)
                    check_per_head(self.owner.schedule, value)
            except (ValueError, TypeError):
                _unset_parallel(self.owner.transformer, value)
                raise
            object.__setattr__(self, "parallel", value)
        else:  # Diffusers configures processors by attribute (_attention_backend, ...): the original's
            setattr(self.original, name, value)

    def __delattr__(self, name):
        if name in self._OWN:
            object.__delattr__(self, name)
        else:
            delattr(self.original, name)

    def __repr__(self) -> str:
        return f"SparseAttnProcessor({type(self.original).__name__}, layer={self.index})"

    def __reduce_ex__(self, protocol):
        self.owner.refuse_copy()

    def __deepcopy__(self, memo):
        self.owner.refuse_copy()


@functools.lru_cache(maxsize=None)
def _with_signature(processor_type: type) -> type:
    """The :class:`SparseAttnProcessor` subclass for wrapping ``processor_type`` (see ``__new__``)."""

    # A copy of SparseAttnProcessor.__call__ (same code, its own attributes), not a function calling it:
    # this runs on every layer call, and a forwarding frame repacks *args and **kwargs each time.
    base = SparseAttnProcessor.__call__
    __call__ = types.FunctionType(base.__code__, base.__globals__, base.__name__, base.__defaults__, base.__closure__)
    __call__.__kwdefaults__, __call__.__qualname__, __call__.__doc__ = base.__kwdefaults__, base.__qualname__, base.__doc__
    __call__.__signature__ = inspect.signature(processor_type.__call__)
    return type(SparseAttnProcessor.__name__, (SparseAttnProcessor,), {"__call__": __call__,
                                                                       "__module__": __name__})
