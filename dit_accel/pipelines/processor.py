"""The interception point: a wrapper processor plus a scoped SDPA interceptor.

Mechanism (why it looks like this)
----------------------------------
Diffusers attention modules delegate their maths to a *processor*. Copying each
model's processor body would break on every Diffusers release, so dit_accel keeps
the model's own processor and wraps it:

1. :class:`SparseAttnProcessor` replaces ``module.processor`` on the targeted
   self/joint attention modules only (the preset lists them). It calls the
   original processor unchanged.
2. While that call runs, a :class:`torch.overrides.TorchFunctionMode`
   (:class:`SDPAInterceptor`) is active. It sees every
   ``torch.nn.functional.scaled_dot_product_attention`` call made inside the
   processor: Diffusers' native attention backend ends in exactly that call, and
   CogVideoX/Mochi processors call it directly. At that point q, k, v are
   projected, normalised and rotated (RoPE), laid out ``(B, H, S, D)``.
3. The interceptor decides from shapes: cross-attention (key length differs from
   the query length) and anything it does not recognise go to the original SDPA
   unchanged; video self-attention and joint video+text attention run the
   handle's sparse plan. Every other torch call passes through untouched.

The mode is entered and left around one processor call; there is no global
monkeypatching and no module-level mutable state. Diffusers' native backend is
required (other backends never call SDPA); when a process-wide backend is set
the call is scoped to native with Diffusers' own ``attention_backend`` context.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .joint import joint_attention

if TYPE_CHECKING:  # pragma: no cover
    from .apply import AccelHandle, _Layer

__all__ = ["SparseAttnProcessor", "SDPAInterceptor"]

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _native_scope():
    """Diffusers' ``attention_backend('native')`` when another process-wide backend is active."""
    try:
        from diffusers.models import attention_dispatch as ad
    except Exception:  # pragma: no cover - very old diffusers: processors call SDPA directly
        return contextlib.nullcontext()
    registry = getattr(ad, "_AttentionBackendRegistry", None)
    active = getattr(registry, "_active_backend", None)
    if active is None or str(getattr(active, "value", active)) == "native":
        return contextlib.nullcontext()
    return ad.attention_backend("native")


class SDPAInterceptor(TorchFunctionMode):
    """Routes SDPA calls issued inside one processor call to the handle's sparse path."""

    def __init__(self, handle: "AccelHandle", layer: "_Layer", plan, capture: bool):
        super().__init__()
        self.handle, self.layer, self.plan, self.capture = handle, layer, plan, capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        call = dict(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        return route_sdpa(self.handle, self.layer, self.plan, self.capture, call)


def _key_padding_mask(mask, batch: int, s: int) -> tuple:
    """(usable, mask): a bool key mask broadcastable to (B, 1, 1, S), or (False, None) if not one."""
    if mask is None:
        return True, None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False, None
    if mask.dim() == 2 and mask.shape[-1] == s and mask.shape[0] in (1, batch):
        return True, mask[:, None, None, :]
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == s and mask.shape[0] in (1, batch):
        return True, mask
    return False, None


def route_sdpa(handle: "AccelHandle", layer: "_Layer", plan, capture: bool, call: dict):
    """One intercepted SDPA call: dense passthrough or the sparse/joint path."""
    q, k, v = call["query"], call["key"], call["value"]
    state = layer.state.current
    sq, sk = q.shape[-2], k.shape[-2]
    num_video = state.info.num_video
    num_text = sq - num_video
    ok_mask, key_mask = _key_padding_mask(call.get("attn_mask"), q.shape[0], sk)
    self_attention = (
        q.dim() == 4 and sq == sk and k.shape[:2] == q.shape[:2] and v.shape[:3] == k.shape[:3]
        and not call.get("is_causal", False) and not call.get("enable_gqa", False)
        and float(call.get("dropout_p", 0.0) or 0.0) == 0.0 and ok_mask
    )
    position = layer.preset.text_position
    joint_ok = (num_text == 0 and key_mask is None) or (
        position != "none" and 0 < num_text <= max(state.info.num_text, 0))
    if not (self_attention and num_video > 0 and joint_ok):
        if sq == sk and sq >= num_video > 0:  # looked like self-attention but could not be routed: say why once
            handle._warn_once(f"dit_accel: {layer.name} made an SDPA call it cannot make sparse (length {sq}, "
                              f"{num_video} video tokens, mask {type(call.get('attn_mask')).__name__}, "
                              f"is_causal={call.get('is_causal', False)}, dropout_p={call.get('dropout_p', 0.0)}); "
                              "running it dense")
        layer.stats.dense_calls += 1
        return _SDPA(**call)

    if capture:  # outside the timer: disk I/O is not attention time
        video = slice(num_text, sq) if position == "first" else slice(0, num_video)
        handle._capture(layer, state, q[:, :, video], k[:, :, video], v[:, :, video])
    if plan.kind == "dense":  # Dense(), full windows, or a schedule-dense step with capture/timing on
        with handle._timer(layer, q.device):
            out = _SDPA(**call)
        layer.stats.dense_calls += 1
        return out
    with handle._timer(layer, q.device):
        out, density = joint_attention(
            q, k, v, plan, num_video=num_video, text_first=position == "first", key_mask=key_mask,
            scale=call.get("scale"), backend=handle.backend, dense_sdpa=_SDPA, proj=layer.sla_proj)
    layer.stats.sparse_calls += 1
    layer.stats.densities.append(density)
    return out


class SparseAttnProcessor:
    """Wraps one attention module's original processor (see module docstring).

    Attribute reads that the wrapper does not define fall through to the original
    processor, and Diffusers' signature-based keyword filtering sees the original
    ``__call__`` signature, so the module behaves as before apart from SDPA.
    """

    def __init__(self, original, handle: "AccelHandle", layer: "_Layer"):
        self.original = original
        self.handle = handle
        self.layer = layer
        # Diffusers (Attention, FluxAttention, LTXAttention) filters call kwargs with
        # inspect.signature(processor.__call__): expose the original signature.
        introspect = functools.partial(type(self).__call__, self)
        functools.update_wrapper(introspect, original.__call__)
        self.__dict__["__call__"] = introspect

    def __call__(self, attn, *args, **kwargs):
        return self.handle._run_processor(self.layer, attn, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("original", "handle", "layer"):
            raise AttributeError(name)
        return getattr(self.original, name)

    def __repr__(self) -> str:
        return f"SparseAttnProcessor({type(self.original).__name__}, layer={self.layer.index})"


class _Timer:
    """Accumulates attention time: CUDA events on GPU (read lazily in stats()), perf_counter on CPU."""

    def __init__(self, stats, device: Optional[torch.device]):
        self.stats, self.device = stats, device

    def __enter__(self):
        if self.device is not None and self.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device is not None and self.device.type == "cuda":
            self.end.record()
            self.stats.events.append((self.start, self.end))
        else:
            self.stats.time_ms += (time.perf_counter() - self.t0) * 1e3
        self.stats.timed_calls += 1
        return False
