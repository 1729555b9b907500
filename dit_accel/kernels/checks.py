"""Boundary checks shared by every attention entry point (block-sparse backends,
Triton launchers, SLA), so a bad q/k/v reads the same everywhere."""

from __future__ import annotations

import functools

import torch

from .._util import is_bool

__all__ = ["SUPPORTED_DTYPES", "check_tensor", "check_qkv", "check_scale", "check_flag", "unit_stride", "meta_outputs",
           "autocast_qkv", "in_autocast", "no_autocast", "sdpa_autocast"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t) -> None:
    """``t`` is a 4-D (B, H, N, D) tensor of a supported float dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, N, D); got {type(t).__name__}")
    if t.dim() != 4:  # (it said "Reshape (B, N, H, D) inputs with .transpose(1, 2)", which leaves a 3-D tensor 3-D)
        raise ValueError(f"{name} must have 4 dims (B, H, N, D) like scaled_dot_product_attention; got shape "
                         f"{tuple(t.shape)}. {_FOUR_DIMS.get(t.dim(), 'Reshape it to (B, H, N, D).')}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}. Cast it first.")


#: What to do with a tensor of this many dims where (B, H, N, D) is expected (:func:`check_tensor`).
_FOUR_DIMS = {
    2: "Add batch and head dims: x[None, None] for one sequence of one head (N, D).",
    3: "Add the missing dim: x.unsqueeze(1) for (B, N, D) with one head, x.unsqueeze(0) for (H, N, D) with one "
       "batch, or x.unflatten(-1, (H, D)).transpose(1, 2) for (B, N, H*D) hidden states.",
    5: "Split a packed projection first: q, k, v = x.unbind(2) for (B, N, 3, H, D), then .transpose(1, 2) each.",
}


def check_qkv(q, k, v) -> None:
    """q ``(B, H, N, D)`` and k, v ``(B, H, M, D)`` of one supported dtype on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}. Cast them to one.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}.")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k/v must be (B, H, M, D) with q's B={b}, H={h}, D={d}; got {tuple(k.shape)}. "
                         + _kv_advice(q.shape, k.shape))
    if q.numel() == 0 or k.numel() == 0:  # (a head count or head dim of 0 divided by zero deep inside, or killed
        # the process in the CPU attention op; keys of length 0 leave a softmax over nothing)
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must have no empty dimension: B, H, N, M "
                         "and D are each >= 1 (skip the call for an empty batch)")


def _kv_advice(q_shape, k_shape) -> str:
    """What to do about k/v whose B, H or D differ from q's (it said "Repeat k/v heads" for each of them)."""
    (b, h, _, d), (bk, hk, _, dk) = q_shape, k_shape
    if dk != d:
        return (f"q and k/v need one head dim (q's D={d}, k/v's {dk}): project them to one, or split a packed "
                "head dim first")
    if bk != b:
        return (f"k/v hold batch {bk}, q batch {b}: "
                + ("expand them to q's batch (k.expand(B, -1, -1, -1))" if bk == 1 else "pass one batch for all"))
    if hk < h and h % hk == 0:
        return (f"grouped-query attention ({hk} k/v heads for {h} query heads) is not supported: repeat the k/v "
                f"heads, k.repeat_interleave({h // hk}, dim=1)")
    return f"k/v have {hk} heads and q {h}: pass k and v with q's {h} heads"


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale as a Python float: ``1/sqrt(head_dim)`` for None, else a positive finite number."""
    import math
    import numbers

    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (default 1/sqrt(D)); got {scale!r}.")
    return float(scale)


def check_flag(name: str, value) -> bool:
    """``value`` of the switch argument ``name`` as a bool: True or False (numpy's bool too); TypeError naming it
    otherwise (a string such as ``"no"`` is truthy and would turn the switch on). The one check of a switch
    argument: the attention entry points, ``apply`` and the ComfyUI patch call it."""
    if not is_bool(value):
        raise TypeError(f"{name}={value!r} is invalid: expected True or False")
    return bool(value)


#: Device types with a ``torch.autocast`` (``torch.is_autocast_enabled`` raises for others, the meta device's).
_AUTOCAST_KINDS = frozenset({"cuda", "cpu", "xpu", "mps", "hpu"})


def in_autocast(q) -> bool:
    """Whether an autocast region of ``q``'s device type is active here (then an entry point runs
    :func:`autocast_qkv`'s casts and itself under :func:`no_autocast`)."""
    kind = q.device.type if isinstance(q, torch.Tensor) else None
    return kind in _AUTOCAST_KINDS and torch.is_autocast_enabled(kind)


def autocast_qkv(q, k, v):
    """``(q, k, v)`` as ``torch.autocast`` hands them to ``scaled_dot_product_attention``: inside an autocast region
    of their device type, each float tensor but fp64 in the region's dtype (fp16 on CUDA, bf16 on the CPU by
    default), so the call runs and returns in it, as SDPA does, and q bf16 with k fp32 (a norm with fp32 weights
    on q and k alone, as Diffusers' RMSNorm under autocast) runs; unchanged outside a region. Before, the torch
    and Triton backends ran fp32 inputs in fp32 and returned fp32, FlexAttention returned the region's dtype, and
    a mixed q, k, v was refused."""
    if not in_autocast(q):
        return q, k, v
    kind = q.device.type
    dt = torch.get_autocast_dtype(kind)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dt, torch.float64)
                 and t.device.type == kind else t for t in (q, k, v))


def sdpa_autocast(fn):
    """``fn(q, k, v, ...)`` (an internal entry the plans call: ``vsa_parts``, ``sla_parts_checked``) with
    :func:`autocast_qkv`'s casts and run under :func:`no_autocast` inside an autocast region, as the public entry
    points run."""
    @functools.wraps(fn)
    def wrapper(q, k, v, *args, **kwargs):
        if in_autocast(q):
            q, k, v = autocast_qkv(q, k, v)
            with no_autocast(q.device.type):
                return fn(q, k, v, *args, **kwargs)
        return fn(q, k, v, *args, **kwargs)

    return wrapper


def no_autocast(kind: str):
    """A scope where autocast of device type ``kind`` is off: the kernels' own fp32 math (the PyTorch twins'
    explicit fp32 scores and softmax, SLA's and VSA's pooled means, the text branch's log-sum-exp) stays fp32 inside
    a caller's region, as SDPA's accumulation does. Under a region it ran in the region's dtype: the same bf16
    inputs gave SLA and VSA outputs 0.03 apart in and out of a CPU bf16 region, and a bf16 lse."""
    return torch.autocast(kind, enabled=False)


def unit_stride(*tensors: torch.Tensor):
    """``tensors`` with a unit stride along their last dim (D), any other copied: ATen's CPU flash-attention op,
    which the PyTorch twins run, reads D as contiguous and returns wrong values for a strided D (a ``(B, H, D, N)``
    tensor transposed, an expanded head dim), with no error."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def meta_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``(o, lse)`` of an attention call on meta tensors (shape inference: ``init_empty_weights``, a model on the
    meta device), shaped and typed as a kernel's: ``o`` like q, ``lse`` fp32 ``(B, H, N)``. Where autograd records
    they depend on q, k and v (a zero-weighted sum; meta computes nothing), so a shape-only backward runs too."""
    o, lse = q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        tie = sum(x.sum() for x in (q, k, v) if x.requires_grad) * 0
        o, lse = o + tie.to(o.dtype), lse + tie.float()
    return o, lse
