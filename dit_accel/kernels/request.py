"""What an attention call asks of a backend, and how a backend says no: the leaf every backend module imports.

:class:`Request` describes one call; :class:`BackendUnavailable` is the one exception a backend that was asked
for by name raises. The environment reads here are the per-call ones (one dictionary lookup each).
:mod:`dit_accel.kernels.backends` re-exports all of it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch._guards
import torch.autograd.forward_ad as _forward_ad

__all__ = ["BackendUnavailable", "Request", "interpreting", "in_graph", "records_grad", "kernel_backward", "env_value",
           "env_get", "ENV_BACKEND", "in_functorch", "in_vmap", "tracing", "forward_ad",
           "lasting_caches"]

#: Environment variable that overrides ``backend="auto"``.
ENV_BACKEND = "DIT_ACCEL_BACKEND"


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run these inputs here (the message says why and what to do)."""


@dataclass(frozen=True)
class Request:
    """What a backend needs to know to say whether it can run one call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    needs_grad: bool = False
    block_q: int = 64
    block_k: int = 64
    density: Optional[float] = None  # visited fraction, when the caller knows it (autotune's density bucket)
    q_len: int = 0  # tokens (0: not known), for autotune's token buckets and memory estimates
    kv_len: int = 0
    batch_heads: int = 0
    forward_ad: bool = False  # a forward-mode tangent rides on q, k or v (torch.func.jvp, jacfwd): only twins follow it
    # torch.use_deterministic_algorithms(True) is on and the call records a backward: backends whose backward sums
    # with atomic adds in no fixed order (the vendor kernels' by default) may not run it
    deterministic: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 64, block_k: int = 64,
           density: Optional[float] = None) -> "Request":
        grad = records_grad(q, k, v)
        return cls(q.device, q.dtype, q.shape[-1], grad, block_q, block_k, density, q.shape[-2], k.shape[-2],
                   q.shape[0] * q.shape[1] if q.dim() == 4 else 1, grad and forward_ad(q, k, v),
                   grad and torch.are_deterministic_algorithms_enabled())


def forward_ad(*tensors: torch.Tensor) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (``torch.func.jvp``, ``jacfwd``, ``hessian``,
    ``torch.autograd.forward_ad``): one module attribute read outside a forward-AD level."""
    if getattr(_forward_ad, "_current_level", 0) < 0:  # (torch's own level; absent: look at the tensors)
        return False
    return any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` is differentiated: autograd on and any of them requiring a gradient, or any
    carrying a forward-mode tangent (which the kernels' hand-written backward would drop: a zero tangent)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or forward_ad(*tensors)


#: Whether a torch.func transform (grad, vmap, jacrev) is active: torch's own query (absent in some versions: none).
in_functorch = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: False)


def in_vmap() -> bool:
    """Whether the call runs under ``torch.vmap`` (at any level of nested torch.func transforms)."""
    if not in_functorch():
        return False
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # (another torch: not known, so not refused)
        return False
    return any(i.key().name == "Vmap" for i in retrieve_all_functorch_interpreters())


class _NoSecondDerivative(torch.autograd.Function):
    """The gradients a kernel's backward returned, passed through; differentiating them raises (``what`` says whose).
    Its inputs include the function's saved inputs, so that a second gradient taken with respect to them reaches
    this node (a detached stand-in, as ``once_differentiable`` uses, is skipped by ``autograd.grad(.., q)``)."""

    @staticmethod
    def forward(ctx, what, count, *tensors):
        ctx.what = what
        return tuple(g.clone() for g in tensors[:count])  # (copies: a view of a custom Function's input may not
        # be modified in place, as clip_grad_norm_ does to a .grad left by backward(create_graph=True))

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.what} has no second derivative: autograd cannot differentiate its hand-written backward, so a "
            "gradient taken with create_graph=True (a gradient penalty, a Hessian-vector product) cannot be "
            "differentiated again. Take that gradient without create_graph, or compute that term with dense "
            "PyTorch attention (dit_accel.kernels.dense_attention_reference)")


def kernel_backward(what: str):
    """Decorator for an ``autograd.Function`` backward that runs kernels: it runs under ``no_grad``, and under
    ``create_graph=True`` every gradient it returns is marked so that differentiating it raises, naming ``what``.
    (Unmarked, those gradients were constants to autograd: a penalty on them trained without their second-order
    terms, silently; ``once_differentiable`` did the same where no incoming gradient required grad, as after
    ``out.sum()``, and for ``autograd.grad`` with respect to q.)"""

    def wrap(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            with torch.no_grad():
                out = fn(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            tensors = [o for o in out if isinstance(o, torch.Tensor)]
            if not tensors:
                return out
            anchors = [t for t in ctx.saved_tensors if t.requires_grad]
            marked = iter(_NoSecondDerivative.apply(what, len(tensors), *tensors, *anchors))
            return tuple(next(marked) if isinstance(o, torch.Tensor) else o for o in out)

        return backward

    return wrap


# ---------------------------------------------------------------- environment
#: The values of ``$TRITON_INTERPRET`` triton reads as on (any case, nothing stripped: triton 3.9's
#: ``getenv_bool``; older releases read 1, true and on). Every other value is off for triton, so it is off here too: ``false`` read as on made the
#: package run kernels on the CPU that triton then compiled for a GPU.
INTERPRET_ON = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``), read as triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in INTERPRET_ON


def _traced_in_this_thread() -> bool:
    return torch._guards.TracingContext.try_get() is not None


# Dynamo calls it once, at trace time, in the tracing thread, and keeps the answer: the mark
# ``torch._dynamo.assume_constant_result`` sets, set here without importing Dynamo (seconds) for every kernel user.
_traced_in_this_thread._dynamo_marked_constant = True  # type: ignore[attr-defined]


def tracing() -> bool:
    """Whether torch.compile (or torch.export) is tracing this code, in this thread. ``torch.compiler.is_compiling()``
    alone is one flag for the whole process while Dynamo compiles: eager calls of other threads (running a graph
    compiled before, or another model) read it too and took the traced paths: their calls went uncounted, capture
    and timing were skipped, an SLA projection written since the last read was taken as still zero, a forced
    backend ran unchecked (raw errors from inside torch), FlexAttention's CPU log-sum-exp was refused and kernel
    variants never self-checked were trusted. (:func:`dit_accel.pipelines.context.tracing` is this function.)"""
    return torch.compiler.is_compiling() and _traced_in_this_thread()


def lasting_caches(fn):
    """``fn`` run outside ``torch.inference_mode`` (under ``no_grad``) when called inside it, eager: the tensors it
    keeps between calls (cube permutations and their device copies, per-cube sizes) are then normal tensors. Built
    as inference tensors, a later call that records a backward could not save them: torch's "Inference tensors
    cannot be saved for backward" from deep in the op (fine-tuning after a preview generated under inference_mode,
    as ComfyUI runs). Its outputs are normal tensors, which inference-mode code takes like its own."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not tracing() and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def in_graph() -> bool:
    """Whether this call is being traced (``torch.compile``, in this thread) or captured into a CUDA graph: then
    nothing may time, synchronise or run a first-use check (a ``synchronize()`` inside a capture breaks it);
    choices come from what eager calls stored."""
    if tracing():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# os.environ.get raises and catches a KeyError when the variable is unset (about 1 us, and several
# times that on a cold cache): the mapping underneath answers the same question with one dict lookup.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_BACKEND) if hasattr(os.environ, "encodekey") else None


def env_value() -> Optional[str]:
    """``$DIT_ACCEL_BACKEND`` as set (None when unset): read on every transformer and attention call."""
    if _ENVIRON_DATA is None or _ENV_KEY is None:
        return os.environ.get(ENV_BACKEND)
    raw = _ENVIRON_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def env_get(name: str) -> Optional[str]:
    """``os.environ.get(name)`` through the one-lookup path of :func:`env_value` (for variables read per call)."""
    if _ENVIRON_DATA is None or not hasattr(os.environ, "encodekey"):
        return os.environ.get(name)
    raw = _ENVIRON_DATA.get(os.environ.encodekey(name))
    return None if raw is None else os.environ.decodevalue(raw)


def env_switch(name: str, on: str, off: str, unset: str) -> Optional[bool]:
    """A three-way switch in ``$name``: True for ``1`` (``true``, ``on``, ``yes``), False for ``0`` (``false``,
    ``off``, ``no``), None unset or empty; ValueError naming the variable and what each value does (``on``, ``off``,
    ``unset``) on anything else."""
    raw = (env_get(name) or "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "true", "on", "yes"):
        return True
    if raw in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{name}={raw!r}: expected 1 ({on}), 0 ({off}) or unset ({unset})")
