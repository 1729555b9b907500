"""Scoped SDPA interception: inside a wrapped processor's call, its ``scaled_dot_product_attention`` runs the
layer's plan (:class:`SDPAInterceptor`), caught by a ``TorchFunctionMode`` or, in eager mode, by the attribute
router (:class:`_AttributeRoute`). See :mod:`.hooks` for why it looks like this."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental import symbolic_shapes
from torch.overrides import TorchFunctionMode

from ..kernels.request import in_graph
from ..plans.plan import Plan, token_slices
from .context import CallContext, lasting_tensors, run_eagerly, tracing
from .parallel import Split, ring_first_says, run_split

__all__ = ["SDPAInterceptor", "native_scope"]


_SDPA = F.scaled_dot_product_attention


_UNFLATTEN = torch.Tensor.unflatten  # re-entered as torch.unflatten (see SDPAInterceptor)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


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


def _hides_video(runtime, key_mask, num_text: int, text_first: bool) -> bool:
    """Whether a bool key mask hides one of the video keys, which the sparse part runs unmasked (before, a mask
    given to Bria FIBO that hid an image token gave the output of the mask without it, silently): such a call
    runs dense. One host sync per mask: the verdict is kept for the mask the layers share (``Runtime.mask_seen``);
    not read while traced or captured (a float mask's video part is zero by its preset's check)."""
    if key_mask is None or key_mask.dtype != torch.bool or in_graph():
        return False
    base = key_mask if key_mask._base is None else key_mask._base
    key = (id(base), base._version, key_mask.storage_offset(), tuple(key_mask.shape), tuple(key_mask.stride()),
           num_text, text_first)
    seen = runtime.mask_seen
    if seen is not None and seen[0] == key and seen[1]() is base:
        return seen[2]
    hides = not bool(key_mask[..., token_slices(key_mask.shape[-1], num_text, text_first)[0]].all())
    runtime.mask_seen = (key, weakref.ref(base), hides)
    return hides


class SDPAInterceptor(TorchFunctionMode):
    """Routes the SDPA calls issued inside one processor call to the layer's plan.

    ``Tensor.unflatten`` (which processors call to split heads) re-enters as ``torch.unflatten``:
    its Python method calls ``super()``, which Dynamo cannot trace under a mode.
    """

    # layer: a .processor.SparseAttnProcessor (named, not imported: that module imports this one)
    def __init__(self, layer: "SparseAttnProcessor", context: CallContext, plan: Optional[Plan],  # noqa: F821
                 capture: bool, split: Optional[Split] = None):
        super().__init__()
        self.layer, self.context, self.plan, self.capture, self.split = layer, context, plan, capture, split
        self.routing = False  # a call is being routed: SDPA calls made by the plan itself pass through
        self.counting = False  # eager probe of a processor class (see _AttributeRoute): count who caught what
        self.caught = {"mode": 0, "attribute": 0}
        self.seen = False  # an SDPA call of the processor reached route() (else it ran attention its own way)

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
        self.seen = True
        layer, context, runtime = self.layer, self.context, self.layer.owner.runtime
        q, k, v = call["query"], call["key"], call["value"]
        sq, sk = q.shape[-2], k.shape[-2]
        if tracing() and _data_dependent(q, k):  # (Dynamo's raw "Could not guard on data-dependent expression")
            return _route_eagerly(self, call)
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
                if (position == "none" or num_text == 0) and mask.dtype == torch.bool and bool(mask.all()):
                    mask = None  # an image alone, every token valid (Lumina-Next's one-size batch, Ideogram 4's
                    # unconditional pass): no mask
        ok_mask, key_mask = _key_padding_mask(mask, q.shape[0], sk, additive=text_rows is not None)
        hides = ok_mask and num_text > 0 and _hides_video(runtime, key_mask, num_text, position == "first")
        ok_mask = ok_mask and not hides
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
                    f"tokens, mask {type(call.get('attn_mask')).__name__}"
                    f"{' hiding video tokens' if hides else ''}, is_causal={call.get('is_causal', False)}, "
                    f"dropout_p={call.get('dropout_p', 0.0)}); running it dense")
            if split is not None:
                raise ValueError(f"dit_accel: {layer.name} made an SDPA call it cannot run under context "
                                 "parallelism (see the warning above)")
            if (sq == sk and sq >= num_video) or image_queries:  # the image's attention, run dense
                plan = self.plan  # (why, where the schedule asked for the method: before, no reason in stats)
                layer.report.dense(None if plan is None else plan.dense_reason if plan.is_dense else
                                   "an SDPA call it cannot make sparse")
            # (other calls, Qwen-Image 2.1's prompt-prefix segments, are not the image's attention: not counted)
            return _SDPA(**call)
        if split is not None:
            if text_rows is not None:
                raise ValueError(f"dit_accel: {layer.name} got an additive attention mask (Chroma's text mask), "
                                 "which context parallelism does not take; run without parallel=, or pass "
                                 "no attention_mask")
            return self._run_split(call, q, k, v, num_text, key_mask)
        if self.capture:  # outside the timer: disk I/O is not attention time
            self._save(q, k, v, num_text, position == "first", key_mask, image_queries)
        if runtime.stats.timing:
            with layer.report.timed(q.device):
                out, density = self._attend(call, q, k, v, num_text, position == "first", key_mask, image_queries,
                                            text_rows)
        else:  # (no context manager to enter: this runs on every eager layer call)
            out, density = self._attend(call, q, k, v, num_text, position == "first", key_mask, image_queries,
                                        text_rows)
        self._count(density, q, k, v, lse=num_text > 0)
        return out

    def _save(self, q, k, v, num_text: int, text_first: bool, key_mask, image_queries: bool) -> None:
        """Hand the call's video q, k, v to the capture observer; one that :attr:`takes_text` (calibration's
        sampler) also gets the text keys, values and their key mask, which the sparse run visits exactly (before,
        it scored a joint-attention family's candidates without them: on tiny-flux, 16 text keys, Tile w1x1 scored
        a relative L2 error of 0.36 where its run's is 0.46)."""
        layer, context = self.layer, self.context
        sk = k.shape[2]
        video, text = token_slices(sk, num_text, text_first)
        extra = {}
        if num_text and getattr(layer.report.observer, "takes_text", False):
            mask = None if key_mask is None else key_mask.reshape(key_mask.shape[0], sk)[:, text]
            extra["text"] = (k[:, :, text], v[:, :, text], mask)
        layer.report.observer.save(layer.index, layer.name, context.grid, context.step,
                                   q if image_queries else q[:, :, video], k[:, :, video], v[:, :, video], **extra)

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
        # An inert projection adds nothing (read for every layer at the transformer call; traced and captured
        # calls keep the last eager verdict: TransformerHook._inert_now).
        proj = None
        if layer.sla_proj is not None and not layer.inert:
            proj = layer.projection(q.device)
        with lasting_tensors():  # (the plan's caches, made on first use)
            return plan.run(q, k, v, num_text=num_text, text_first=text_first, key_mask=key_mask, check_mask=False,
                            scale=call.get("scale"), backend=layer.owner.runtime.backend, proj=proj, sdpa=_SDPA,
                            text_queries=not image_queries, text_query_mask=text_rows)

    def _count(self, density, q, k, v, lse: bool = True, ran: Optional[str] = None) -> None:
        """Count the call; ``ran``: the backend it ran, where the caller knows it (context parallelism's)."""
        layer, plan = self.layer, self.plan
        if layer.owner.runtime.bypassed:
            return
        if plan is None or plan.is_dense:
            layer.report.dense(None if plan is None else plan.dense_reason)
        else:
            # (lse: the plan asks for it only where text keys are merged in, as Plan.run does)
            layer.report.sparse(density, ran or plan.backend_for(q, k, v, layer.owner.runtime.backend, lse=lse),
                                plan.token_density)

    def _run_split(self, call, q, k, v, num_text, key_mask):
        """Context parallelism: this rank's share through the collectives of :mod:`.parallel`."""
        layer, runtime = self.layer, self.layer.owner.runtime
        context = self.context
        wanted = self.capture
        if self.split.ring > 1 and layer.report.observer is not None and not tracing():
            # Every ring rank must make the capture's gather alike: the first ring rank's observer decides (before,
            # each rank asked its own, and an observer without skip() got save() on every ring rank)
            wanted = ring_first_says(wanted, self.split, q.device)
        capture = None if not wanted else functools.partial(_save_share, layer, context, self.split.ring_rank)
        with layer.report.timed(q.device), lasting_tensors():
            out, density, ran = run_split(self.plan, q, k, v, split=self.split,
                                          num_text=num_text * self.split.world,
                                          text_first=layer.owner.preset.text_position == "first", key_mask=key_mask,
                                          scale=call.get("scale"), backend=runtime.backend,
                                          proj=layer.projection(q.device), capture=capture,
                                          whole=layer.owner.preset.split_whole)
        self._count(density, q, k, v, ran=ran)
        return out


def _data_dependent(*tensors) -> bool:
    """Whether a traced tensor's size is known only when the code runs (an unbacked SymInt, e.g. of ``nonzero``)."""
    unbacked = getattr(symbolic_shapes, "has_free_unbacked_symbols", None)  # (Dynamo answers it; torch >= 2.6)
    return unbacked is not None and any(unbacked(t) for t in tensors)


_EAGER_REASON = ("dit_accel: an attention call whose token count depends on the data (Mochi's per-sample text, "
                 "selected by its attention mask) is routed eagerly under torch.compile: the video/text split of "
                 "the tokens, and so the plan's call, is known only when it runs. Compile without fullgraph=True "
                 "(the rest of the model still compiles)")


def _eager_route(interceptor: SDPAInterceptor, call: dict):
    return interceptor.route(call)


_route_eagerly = run_eagerly(_eager_route, _EAGER_REASON)


def _save_share(layer, context: CallContext, ring_rank: int, q, k, v, heads, text=None) -> None:
    """Capture one context-parallel call (every ring rank of a head group holds the same gathered q, k, v): the
    first ring rank saves it; the others record it as saved where the observer can (its ``skip``), and are never
    handed it (before, an observer without ``skip``, calibration's sampler, got ``save`` on every ring rank: the
    same sample kept, and its file written, once per ring rank). Whether a call is captured is the first ring
    rank's decision on every ring rank (:func:`~.parallel.ring_first_says`), so their gathers match. ``text``: the
    call's text keys, values and key mask, for an observer that :attr:`takes_text` (as :meth:`SDPAInterceptor._save`
    hands them; before, a joint family calibrated under context parallelism was scored without them)."""
    observer = layer.report.observer
    if not ring_rank:
        extra = {"text": text} if text is not None and getattr(observer, "takes_text", False) else {}
        observer.save(layer.index, layer.name, context.grid, context.step, q, k, v, heads=heads, **extra)
    elif getattr(observer, "skip", None) is not None:
        observer.skip(layer.index, context.step)


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
