"""The interception point: a transformer hook, a processor wrapper per attention layer, a scoped SDPA interceptor.

Mechanism (why it looks like this)
----------------------------------
Diffusers attention modules delegate their maths to a *processor*. Copying each
model's processor body would break on every Diffusers release, so dit_accel keeps
the model's own processor and wraps it:

1. :class:`TransformerHook` puts a forward pre-hook on the transformer. Per call
   it reads the token grid (the preset knows how), the denoising step
   (:class:`~.schedule.StepSource`) and, from the :class:`~.schedule.Schedule`,
   the plan each layer runs; that :class:`~.context.CallContext` is pushed on a
   per-thread stack and popped by a post-hook. Plans are built (and the grid
   rules checked) here, before any attention runs.
2. :class:`SparseAttnProcessor` replaces ``module.processor`` on the targeted
   self/joint attention modules only (the preset lists them). It calls the
   original processor unchanged; attributes Diffusers reads or sets on
   processors (``_attention_backend``, ``_parallel_config``, ...) reach the
   original, so enabling a Diffusers feature after ``apply`` configures the real
   processor and never silently bypasses it.
   Context parallelism is the exception: the wrapper keeps ``_parallel_config``
   itself and runs the collectives around the sparse call (:mod:`.parallel`), while
   the original processor computes on its own share; ``remove()`` hands the config back.
3. While that call runs, an :class:`SDPAInterceptor` sees every
   ``scaled_dot_product_attention`` call made inside the processor: Diffusers'
   native attention backend ends in exactly that call, and CogVideoX/Mochi
   processors call it directly. There q, k, v are projected, normalised and
   rotated (RoPE), laid out ``(B, H, S, D)``. Cross-attention (key length
   differs) and anything unrecognised go to the original SDPA unchanged; self
   and joint attention run the layer's plan. It sees the call in one of two ways:

   - as a :class:`torch.overrides.TorchFunctionMode`, which catches the call however
     the processor reaches it, and which ``torch.compile`` traces away; but in eager
     mode it costs a Python round trip on every torch op of the processor (about
     45 per layer call: 1.3 ms per call of the 2-layer tiny transformer at 320
     tokens, 30% of its time);
   - in eager mode, by :class:`_AttributeRoute`: while any wrapped processor runs,
     ``torch.nn.functional.scaled_dot_product_attention`` is a router that hands
     each thread's calls to the interceptor that thread is running (other threads'
     calls go straight through), so only the SDPA call costs anything. It catches
     only calls that look the function up on ``torch.nn.functional`` when they
     make it, as Diffusers' dispatcher and processors do. So the first call of each
     processor class runs under both, and the class takes the router alone only if
     the router, and not the mode, caught its SDPA calls.

All other state is in the hooks and the :class:`Runtime` they share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import threading
import types
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._util import WarningLog
from ..kernels.backends import env_value
from ..kernels.sla import inert_projections
from ..methods import Method
from ..plans import Plan, SLAPlan
from .capture import Capture
from .context import CallContext, CallGate, CallRecord, ContextStack, call_is_running, calling_pipeline
from .parallel import Split, check_split, run_split
from .presets import Preset
from .schedule import Schedule, StepSource
from .stats import Stats

__all__ = ["SparseAttnProcessor", "SDPAInterceptor", "TransformerHook", "Runtime", "PlanCache",
           "attention_modules", "LayerReport"]

_SDPA = F.scaled_dot_product_attention
_UNFLATTEN = torch.Tensor.unflatten  # re-entered as torch.unflatten (see SDPAInterceptor)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


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
        plan = method.plan(key[1])  # outside the lock: plans can take a while; a racing duplicate is harmless
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
        self.call_check = None  # (grid, total steps) -> None: a SparsePlan's checks of the call (apply sets it)
        self._local = threading.local()  # per-thread bypass depth (handle.bypassed())

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


_NO_SCOPE = contextlib.nullcontext()


_DISPATCH = []  # Diffusers' attention_dispatch module, imported once eagerly (see _dispatch_module)


def _dispatch_module():
    """Diffusers' ``attention_dispatch`` module. Imported on the first eager call (``apply`` makes one), so
    code ``torch.compile`` traces only reads it: older Dynamo refuses the import itself, as
    ``diffusers.models`` is a lazy module ("Bad import result")."""
    if not _DISPATCH:
        from diffusers.models import attention_dispatch

        _DISPATCH.append(attention_dispatch)
    return _DISPATCH[0]


def native_scope():
    """Diffusers' ``attention_backend('native')`` when another process-wide backend is active."""
    ad = _dispatch_module()
    active = getattr(getattr(ad, "_AttentionBackendRegistry", None), "_active_backend", None)
    if active is None or str(getattr(active, "value", active)) == "native":
        return _NO_SCOPE
    return ad.attention_backend("native")


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
    """

    def __init__(self, runtime: Runtime, slot: int, index: int):
        self.runtime, self.slot, self.index = runtime, slot, index
        self.call = None  # (sparse, density or dense reason, backend), stored by compiled code
        self.warnings = ()  # ((message, key), ...)

    def warn(self, message: str, key=None) -> None:
        if torch.compiler.is_compiling():
            self.warnings = (*self.warnings, (message, key))
        else:
            self.runtime.warnings.warn(message, key=key)

    def dense(self, reason: Optional[str] = None) -> None:
        if torch.compiler.is_compiling():
            self.call = (False, reason, None)
        else:
            self.runtime.stats.dense(self.slot, reason)

    def sparse(self, density, backend: Optional[str] = None, token_density: Optional[float] = None) -> None:
        if torch.compiler.is_compiling():
            self.call = (True, density, backend, token_density)
        else:
            self.runtime.stats.sparse(self.slot, density, backend, token_density)

    def timed(self, device):
        if torch.compiler.is_compiling():
            if self.runtime.stats.timing:
                self.warn("dit_accel: attention time is not measured inside torch.compile'd code (stats time_ms "
                          "covers eager calls only); time the compiled model as a whole", key="compiled timing")
            return contextlib.nullcontext()
        return self.runtime.stats.timed(self.slot, device)

    def capture(self, context: CallContext) -> bool:
        if torch.compiler.is_compiling():  # reading the step would specialise the graph to it
            self.warn("dit_accel: capture does not save layers that run inside torch.compile'd code; capture with "
                      "an eager run", key="compiled capture")
            return False
        return self.runtime.capture.wants(self.index, context.step)

    def flush(self) -> None:
        """Hand the notes of a compiled call on to the statistics and warnings (eager: nothing to do)."""
        call, warnings, self.call, self.warnings = self.call, self.warnings, None, ()
        if call is not None:
            self.sparse(*call[1:]) if call[0] else self.dense(call[1])
        for message, key in warnings:
            self.warn(message, key)


# ------------------------------------------------------------------ the layer
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

    def __init__(self, original, owner: "TransformerHook", index: int, slot: int, name: str,
                 sla_proj: Optional[nn.Module]):
        # A context-parallel config moves into the wrapper, which runs the collectives (see .parallel).
        parallel = getattr(original, "_parallel_config", None)
        for key, value in (("original", original), ("owner", owner), ("index", index), ("slot", slot),
                           ("name", name), ("sla_proj", sla_proj), ("parallel", parallel),
                           ("plans", ContextStack()), ("report", LayerReport(owner.runtime, slot, index)),
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
        if torch.compiler.is_compiling():
            with native_scope(), interceptor:
                return self.original(attn, *args, **kwargs)
        return _ROUTE.run(interceptor, type(self.original), lambda: self.original(attn, *args, **kwargs))

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
            Split.of(value)  # refuses what dit_accel cannot run, in enable_parallelism itself
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


def _key_padding_mask(mask, batch: int, s: int, additive: bool = False) -> tuple:
    """(usable, mask): a bool key mask broadcastable to (B, 1, 1, S), or (False, None) if not one.
    ``additive``: a float key bias of that shape is one too (zero on the video keys, Preset.additive_mask)."""
    if mask is None:
        return True, None
    if not isinstance(mask, torch.Tensor) or (mask.dtype != torch.bool and not (additive and mask.is_floating_point())):
        return False, None
    if mask.dim() == 2 and mask.shape[-1] == s and mask.shape[0] in (1, batch):
        return True, mask[:, None, None, :]
    if mask.dim() == 4 and mask.shape[1:3] == (1, 1) and mask.shape[3] == s and mask.shape[0] in (1, batch):
        return True, mask
    return False, None


class SDPAInterceptor(TorchFunctionMode):
    """Routes the SDPA calls issued inside one processor call to the layer's plan.

    ``Tensor.unflatten`` (which processors call to split heads) re-enters as ``torch.unflatten``:
    its Python method calls ``super()``, which Dynamo cannot trace under a mode.
    """

    def __init__(self, layer: SparseAttnProcessor, context: CallContext, plan: Optional[Plan], capture: bool,
                 split: Optional[Split] = None):
        super().__init__()
        self.layer, self.context, self.plan, self.capture, self.split = layer, context, plan, capture, split
        self.routing = False  # a call is being routed: SDPA calls made by the plan itself pass through
        self.counting = False  # eager probe of a processor class (see _AttributeRoute): count who caught what
        self.caught = {"mode": 0, "attribute": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA or self.routing:
            return (torch.unflatten if func is _UNFLATTEN else func)(*args, **kwargs)
        call = dict(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        if self.counting:  # eager probe: the router is installed too, and must let the plan's own calls pass
            self.caught["mode"] += 1
            return self._route_once(call)
        return self.route(call)

    def route_attribute_call(self, args, kwargs):
        """An SDPA call that reached :class:`_AttributeRoute` (eager): routed like the mode's."""
        self.caught["attribute"] += 1
        call = dict(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        return self._route_once(call)

    def _route_once(self, call: dict):
        """:meth:`route`, with the SDPA calls the plan makes meanwhile passing through."""
        self.routing = True
        try:
            return self.route(call)
        finally:
            self.routing = False

    def route(self, call: dict):
        layer, context, runtime = self.layer, self.context, self.layer.owner.runtime
        q, k, v = call["query"], call["key"], call["value"]
        sq, sk = q.shape[-2], k.shape[-2]
        split = self.split
        after = context.num_after
        if after and sq == sk and sq >= context.num_video + after and q.dim() == 4:
            return self._route_after(call, sq, after)
        num_video, position = context.num_video // (split.world if split else 1), layer.owner.preset.text_position
        # The image's queries alone against [text, image] keys (Qwen-Image 2.1's block-causal target call): told
        # from other calls by its exact key count (GridInfo.num_text is then the exact number of other tokens).
        image_queries = (split is None and position != "none" and 0 < num_video == sq < sk
                         and sk - sq == context.num_text)
        num_text = (sk if image_queries else sq) - num_video
        mask = call.get("attn_mask")
        text_rows = None  # the text queries' own rows of a float square mask (Preset.additive_mask)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[2] > 1:
            row = sq - num_video if position == "first" else 0  # a video query: never padded
            if (mask.dtype != torch.bool and context.additive_ok and position != "none" and not image_queries
                    and mask.shape[2] == sq == sk):
                # m_i * m_j with m = 1 on the video: a video row adds 1 to every video key and m_j to text key
                # j; shifted by -1 (softmax is shift-invariant), the video keys get no bias at all.
                text_rows = mask[:, :, :sq - num_video] if position == "first" else mask[:, :, num_video:]
                mask = mask[:, :, row:row + 1] - 1
            elif layer.owner.preset.square_mask:  # (Preset.square_mask; one head of a head-expanded mask)
                mask = mask[:, :1, row:row + 1]
                if position == "none" and mask.dtype == torch.bool and bool(mask.all()):
                    mask = None  # an image alone, every token valid (Lumina-Next's one-size batch): no mask
        ok_mask, key_mask = _key_padding_mask(mask, q.shape[0], sk, additive=text_rows is not None)
        self_attention = (
            q.dim() == 4 and (sq == sk or image_queries) and k.shape[:2] == q.shape[:2] and v.shape[:3] == k.shape[:3]
            and not call.get("is_causal", False) and not call.get("enable_gqa", False)
            and float(call.get("dropout_p", 0.0) or 0.0) == 0.0 and ok_mask)
        joint_ok = (num_text == 0 and key_mask is None) or (position != "none" and 0 < num_text * (
            split.world if split else 1) <= max(context.num_text, 0))
        if not (self_attention and num_video > 0 and joint_ok):
            if sq == sk and sq >= num_video > 0:  # looked like self-attention but could not be routed: say why
                layer.report.warn(
                    f"dit_accel: {layer.name} made an SDPA call it cannot make sparse (length {sq}, {num_video} video "
                    f"tokens, mask {type(call.get('attn_mask')).__name__}, is_causal={call.get('is_causal', False)}, "
                    f"dropout_p={call.get('dropout_p', 0.0)}); running it dense")
            if split is not None:
                raise ValueError(f"dit_accel: {layer.name} made an SDPA call it cannot run under context "
                                 "parallelism (see the warning above)")
            if (sq == sk and sq >= num_video) or image_queries:  # the image's attention, run dense
                layer.report.dense()
            # (other calls, Qwen-Image 2.1's prompt-prefix segments, are not the image's attention: not counted)
            return _SDPA(**call)
        if split is not None:
            if text_rows is not None:
                raise ValueError(f"dit_accel: {layer.name} got an additive attention mask (Chroma's text mask), "
                                 "which context parallelism does not take; run without parallel=, or pass "
                                 "no attention_mask")
            return self._run_split(call, q, k, v, num_text, key_mask)
        if self.capture:  # outside the timer: disk I/O is not attention time
            video = slice(num_text, sk) if position == "first" else slice(0, num_video)
            runtime.capture.save(layer.index, layer.name, context.grid, context.step,
                                 q if image_queries else q[:, :, video], k[:, :, video], v[:, :, video])
        if runtime.stats.timing:
            with layer.report.timed(q.device):
                out, density = self._attend(call, q, k, v, num_text, position == "first", key_mask, image_queries,
                                            text_rows)
        else:  # (no context manager to enter: this runs on every eager layer call)
            out, density = self._attend(call, q, k, v, num_text, position == "first", key_mask, image_queries,
                                        text_rows)
        self._count(density, q, k, v)
        return out

    def _route_after(self, call: dict, s: int, after: int):
        """A [text, grid, after] call (:attr:`CallContext.num_after`): the ``after`` tokens are moved next to
        the text, [text, after, grid], routed like text (exact rows and columns), and moved back."""
        layer, nv = self.layer, self.context.num_video
        if self.split is not None or layer.owner.preset.text_position != "first":
            raise ValueError(f"dit_accel: {layer.name} got {after} tokens after the grid in a call of "
                             f"{type(layer.owner.transformer).__name__}, which dit_accel places only without context "
                             "parallelism in a text-first sequence; use the dense model for this call")
        pre = s - nv - after
        device = call["query"].device
        order = torch.cat([torch.arange(pre, device=device), torch.arange(pre + nv, s, device=device),
                           torch.arange(pre, pre + nv, device=device)])
        back = torch.empty_like(order)
        back[order] = torch.arange(s, device=device)
        moved = dict(call, query=call["query"].index_select(2, order), key=call["key"].index_select(2, order),
                     value=call["value"].index_select(2, order))
        mask = call.get("attn_mask")
        if isinstance(mask, torch.Tensor):
            if mask.shape[-1] == s:
                mask = mask.index_select(mask.dim() - 1, order)
            if mask.dim() == 4 and mask.shape[2] == s:
                mask = mask.index_select(2, order)
            moved["attn_mask"] = mask
        context = self.context
        self.context = dataclasses.replace(context, num_after=0)
        try:
            out = self.route(moved)
        finally:
            self.context = context
        return out.index_select(2, back)

    def _attend(self, call, q, k, v, num_text, text_first, key_mask, image_queries=False, text_rows=None):
        """``(output, density)`` of one routed call: the layer's plan, or SDPA (density None) when dense.
        ``text_rows``: the text queries' rows of an additive square mask (their dense attention's mask)."""
        plan, layer = self.plan, self.layer
        if plan is None or plan.is_dense:
            return _SDPA(**call), None
        # An inert projection (read for every layer at the transformer call, eager CPU only) adds nothing.
        proj = None
        if layer.sla_proj is not None and (torch.compiler.is_compiling() or not layer.inert):
            proj = layer.projection(q.device)
        return plan.run(q, k, v, num_text=num_text, text_first=text_first, key_mask=key_mask,
                        scale=call.get("scale"), backend=layer.owner.runtime.backend, proj=proj, sdpa=_SDPA,
                        text_queries=not image_queries, text_query_mask=text_rows)

    def _count(self, density, q, k, v) -> None:
        layer, plan = self.layer, self.plan
        if layer.owner.runtime.bypassed:
            return
        if plan is None or plan.is_dense:
            layer.report.dense(None if plan is None else plan.dense_reason)
        else:
            layer.report.sparse(density, plan.backend_for(q, k, v, layer.owner.runtime.backend), plan.token_density)

    def _run_split(self, call, q, k, v, num_text, key_mask):
        """Context parallelism: this rank's share through the collectives of :mod:`.parallel`."""
        layer, runtime = self.layer, self.layer.owner.runtime
        context = self.context
        capture = None if not self.capture else lambda cq, ck, cv, heads: runtime.capture.save(
            layer.index, layer.name, context.grid, context.step, cq, ck, cv, heads=heads)
        with layer.report.timed(q.device):
            out, density = run_split(self.plan, q, k, v, split=self.split, num_text=num_text * self.split.world,
                                     text_first=layer.owner.preset.text_position == "first", key_mask=key_mask,
                                     scale=call.get("scale"), backend=runtime.backend,
                                     proj=layer.projection(q.device), capture=capture,
                                     whole=layer.owner.preset.split_whole)
        self._count(density, q, k, v)
        return out


class _AttributeRoute:
    """Eager interception without a mode: ``torch.nn.functional.scaled_dot_product_attention`` swapped for a
    router while any wrapped processor runs (see the module docstring).

    The swap is counted, so it is made by the first running processor call of the process and undone by
    the last; a thread-local stack says which interceptor each thread's calls go to (calls of other
    threads, and calls made while an interceptor routes, reach the function that was there before).
    ``by_attribute`` records per processor class whether its SDPA calls are all caught by the router.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = _SDPA
        self._local = threading.local()
        self.by_attribute: Dict[type, bool] = {}

        @functools.wraps(_SDPA)
        def router(*args, **kwargs):
            stack = getattr(self._local, "stack", None)
            if not stack or stack[-1].routing:
                return self._saved(*args, **kwargs)
            return stack[-1].route_attribute_call(args, kwargs)

        self.router = router

    def run(self, interceptor: "SDPAInterceptor", processor_type: type, call):
        """``call()`` with ``interceptor`` seeing its SDPA calls: by the router alone when ``processor_type``
        is known to reach SDPA through the attribute, by the mode alone when known not to, else by both
        (and learn which)."""
        known = self.by_attribute.get(processor_type)
        with native_scope():
            if known is False:
                with interceptor:
                    return call()
            if known:
                return self._swapped(interceptor, call)
            interceptor.counting = True
            with interceptor:
                out = self._swapped(interceptor, call)
            caught = interceptor.caught
            self.by_attribute[processor_type] = caught["attribute"] > 0 and caught["mode"] == 0
            return out

    def _swapped(self, interceptor: "SDPAInterceptor", call):
        """``call()`` with the router installed and ``interceptor`` on this thread's stack (a plain
        try/finally: this runs on every eager layer call)."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        with self._lock:
            if self._users == 0:
                self._saved = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = self.router
            self._users += 1
        stack.append(interceptor)
        try:
            return call()
        finally:
            stack.pop()
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    F.scaled_dot_product_attention = self._saved


_ROUTE = _AttributeRoute()


# ------------------------------------------------------------------ the transformer
def attention_modules(transformer: nn.Module, prefix: str, preset: Preset) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``preset`` targets in ``transformer``, in model order; ValueError when they
    cannot be wrapped (a trainable processor, a non-native Diffusers attention backend, none found)."""
    found = []
    for name, module in transformer.named_modules():
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
        self._last = None  # (key, context, parallel config) of the last call (see _pre_forward)
        self._grid = None  # (the preset's fingerprint, GridInfo) of the last call that had a fingerprint
        self.successor: Optional["TransformerHook"] = None  # the hook of the handle that replaced this one

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
            self._hook_forward()
        except BaseException:
            self.remove()
            raise

    def _hook_forward(self) -> None:
        self._handles.append(self.transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(self.transformer.register_forward_hook(self._post_forward, always_call=True))

    def remove(self) -> None:
        """Drop the hooks and put the original processors back (unless the user replaced the wrapper since)."""
        self.unhook()
        self.unwrap()

    def unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
        for layer in self.layers:
            report = layer.report
            if report.call is not None or report.warnings:  # notes of compiled code (eager calls leave none)
                report.flush()

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
        if calls is None:
            calls = self._calls.list = []
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
            context = last[1]
        else:
            context = self._context(info, step, total, parallel, device, additive_ok)
            self._last = (key, context, parallel)
        self._check_processors()
        sla = []
        record.pushed = True  # (pushes cannot fail part way: the stacks are lists)
        self.stack.push(context)
        for layer, plan in zip(self.layers, context.plans):
            layer.plans.push(plan)
            if layer.inert:  # (a write goes through the wrapper's __setattr__: only when it changes)
                layer.inert = False
            if layer.sla_proj is not None and isinstance(plan, SLAPlan):
                sla.append(layer)
        if sla and device is not None and device.type == "cpu":
            # Still-zero projections (kernels.sla.is_inert) read once per call for all layers, not per layer call.
            for layer, inert in zip(sla, inert_projections([layer.sla_proj for layer in sla])):
                layer.inert = inert

    def _context(self, info, step: int, total: Optional[int], parallel, device,
                 additive_ok: bool = False) -> CallContext:
        """The call's context: each layer's plan (built, checked and prepared on ``device``), warnings said."""
        if self.runtime.call_check is not None:  # a calibrated plan's grid and step count, before any attention
            self.runtime.call_check(info.grid, total)
        split = Split.of(parallel)
        plans = tuple(self._plan(layer, step, total, info.grid, split) for layer in self.layers)
        if split is not None:
            check_split(split, math.prod(info.grid), info.num_text if self.preset.text_position != "none" else 0,
                        plans)
        schedule = self.schedule
        if schedule.sparse and total is not None and schedule.dense_steps + schedule.dense_last_steps >= total:
            self.runtime.warnings.warn(f"dit_accel: dense_steps={schedule.dense_steps} + dense_last_steps="
                                       f"{schedule.dense_last_steps} cover all {total} denoising steps: every step "
                                       "runs dense. Lower them or raise the number of steps")
        if device is not None:
            for plan in {id(p): p for p in plans if p is not None}.values():
                plan.prepare(device, self.runtime.backend)
        return CallContext(tuple(info.grid), info.num_text, step, total, plans, additive_ok, info.num_after)

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
                    "not dit_accel's method, and handle.remove() leaves it in place")

