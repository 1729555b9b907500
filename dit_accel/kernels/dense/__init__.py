"""The in-repo dense FlashAttention-2 Triton kernel: the sparse kernels' yardstick and the dense GPU baseline.

:mod:`.tiles` holds the tile steps the dense and sparse kernels share, :mod:`.triton` the dense
kernels and launchers, :mod:`.configs` their configurations (one per sparse configuration, for
:mod:`dit_accel.kernels.sass`). Importing this package does not import triton.

- :func:`dense_attention`: softmax attention through the Triton kernels (differentiable).
- :func:`dense_contenders`: the dense contenders of ``dit-accel bench kernels`` on some inputs.
- :func:`fastest_attention`: dense attention (and its lse) on the fastest measured dense kernel of this
  machine, SDPA's or the in-repo one (:mod:`.choice`): what ``auto``'s dense fallback runs.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..checks import sdpa_autocast
from ..request import forward_ad, in_functorch, kernel_backward

__all__ = ["dense_attention", "dense_contenders", "fastest_attention", "triton_variant", "DENSE_CONTENDERS"]

#: Names of the dense contenders of ``dit-accel bench kernels``, in report order.
DENSE_CONTENDERS = ("dense SDPA", "dense Triton (dit_accel)", "flash-attn (dense)")


class _DenseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        from .triton import dense_forward

        o, lse = dense_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused lse gives dlse None: the backward launches as before
        return o, lse

    @staticmethod
    @kernel_backward("dense_attention (the in-repo Triton kernel)")
    def backward(ctx, do, dlse):
        from .triton import dense_backward

        q, k, v, o, lse = ctx.saved_tensors
        if do is None:  # only the lse was used
            do = torch.zeros_like(o)
        # (The lse's gradient was dropped: dense_attention(..., return_lse=True) merged with other keys trained
        # on wrong dq and dk, without a word.)
        return (*dense_backward(do, q, k, v, o, lse, ctx.scale, dlse), None)


@sdpa_autocast  # (SDPA's casts: a mixed q, k, v inside a region was refused, and fp32 ones returned fp32)
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    return_lse: bool = False):
    """Dense softmax attention with the in-repo Triton kernels (forward and backward).

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, H, M, D)``; one dtype of fp16 / bf16 / fp32, ``D <= 256``,
            on a CUDA device of compute capability >= 8.0 (or the CPU under ``TRITON_INTERPRET=1``); on meta
            tensors (shape inference) the outputs are shaped meta tensors and nothing runs.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the fp32 natural-log log-sum-exp ``(B, H, N)``.

    Inside ``torch.autocast`` q, k and v are cast as SDPA's are (:func:`~dit_accel.kernels.checks.autocast_qkv`):
    ``o`` in the region's dtype.

    Example::

        >>> o = dense_attention(q, k, v)  # == F.scaled_dot_product_attention(q, k, v) up to rounding
    """
    from ..checks import check_flag, check_qkv, check_scale, meta_outputs

    check_qkv(q, k, v)
    check_flag("return_lse", return_lse)
    scale = check_scale(scale, q.shape[-1])
    if q.shape[-1] > 256 or k.shape[2] == 0:
        raise ValueError(f"the dense Triton kernel takes 1 <= M and D <= 256; got M={k.shape[2]}, D={q.shape[-1]}: "
                         f"{_NO_BACKEND}")
    if q.device.type == "meta":  # (shape inference: the self-check, which has no meta verdict, said it had failed)
        o, lse = meta_outputs(q, k, v)
    else:
        _runnable(q, k, v)
        _verified(q, k, v)
        from ..limits import in_grid_slices

        # (its launches put B*H on the grid's second axis: past 65,535 a raw CUDA launch error)
        o, lse = in_grid_slices(lambda q_, k_, v_, _: _DenseAttention.apply(q_, k_, v_, scale), q, k, v)
    return (o, lse) if return_lse else o


@sdpa_autocast
def fastest_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                      return_lse: bool = False):
    """Dense softmax attention on the fastest dense kernel measured on this machine (:mod:`.choice`):
    ``o``, or ``(o, lse)`` with ``lse`` the fp32 natural-log log-sum-exp ``(B, H, N)`` (both differentiable).
    Inside ``torch.autocast`` q, k and v are cast as SDPA's are: ``o`` in the region's dtype.

    Example::

        >>> o, lse = fastest_attention(q, k, v, return_lse=True)  # then merge_attention(o, lse, o2, lse2)
    """
    from ..checks import check_flag, check_qkv, check_scale, meta_outputs
    from .choice import run

    check_qkv(q, k, v)
    check_flag("return_lse", return_lse)
    scale = check_scale(scale, q.shape[-1])
    if q.device.type == "meta":  # (shape inference, as dense_attention's: with the lse it said no kernel returns one)
        o, lse = meta_outputs(q, k, v)
    else:
        o, lse = run(q, k, v, scale, return_lse)
    return (o, lse) if return_lse else o


def triton_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The configuration :func:`dense_attention`'s forward launches for these inputs (the same decision
    :func:`.triton.dense_forward` takes: sm_90 TMA-aligned half precision runs the warp-specialized kernel).
    For reports (``dit-accel bench gpu``); it imports triton."""
    from .triton import _config, _ws_config

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = _config("fwd", q, (k, v))
    return (_ws_config(cfg, q) or cfg).name


#: What a :func:`dense_attention` caller can do where its kernels cannot run (it has no ``backend`` argument).
_NO_BACKEND = ("dense_attention runs only these kernels: call dit_accel.kernels.dense.fastest_attention (it takes "
               "the fastest verified dense kernel) or torch.nn.functional.scaled_dot_product_attention")


def _runnable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """BackendUnavailable where the kernels cannot run on q's device and dtype: the self-check said it had failed
    there ("use backend='auto'", an argument this function lacks), on a CPU without the interpreter too."""
    import re

    from ..backends import BackendUnavailable, triton_reason

    reason = triton_reason(q.device)
    if in_functorch():  # (else torch's "must override the setup_context staticmethod", or a storage error)
        reason = "its Triton kernels take plain tensors, not those of torch.func transforms (grad, vmap, jacrev)"
    elif forward_ad(q, k, v):  # (else torch's "You must implement the jvp function", from inside autograd)
        reason = "its kernels have no forward-mode derivative (torch.autograd.forward_ad dual tensors)"
    if reason is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        reason = "the Triton interpreter's bfloat16 dot is wrong (values off by about 1e8): cast to float32 on the CPU"
    if reason is not None:
        reason = re.sub(r"[;,.]? *(or )?[Uu]se backend='torch'[^.]*\.?$", "", reason)
        raise BackendUnavailable(f"dense_attention cannot run on {q.device} ({q.dtype}): {reason}; {_NO_BACKEND}.")


def _verified(q, k, v) -> None:
    """The dense kernels passed their first-use self-check here (:mod:`dit_accel.kernels.selfcheck`), else
    :class:`~dit_accel.kernels.selfcheck.VariantFailed` (callers choosing among dense kernels skip it)."""
    from .. import selfcheck
    from ..request import records_grad

    grad = records_grad(q, k, v)
    for name in ("dense.triton.fwd", "dense.triton.bwd") if grad else ("dense.triton.fwd",):
        if not selfcheck.usable_fast(name, q.device, q.dtype, q.shape[-1], 64, 64):
            selfcheck.require(name, q.device, q.dtype, {"head_dim": q.shape[-1], "block_q": 64, "block_k": 64},
                              advice=_NO_BACKEND)


def dense_contenders(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: Optional[float] = None) -> Dict[str, Callable[[], torch.Tensor]]:
    """``{name: zero-argument callable}`` of the dense contenders that can run on these inputs, in
    :data:`DENSE_CONTENDERS` order: SDPA always, the in-repo Triton kernel where triton can run on
    q's device, flash-attn (``(B, N, H, D)`` copies made here, not timed) when it is installed
    and q is a half-precision CUDA tensor. For ``dit-accel bench kernels``."""
    import torch.nn.functional as F

    from ..backends import triton_reason

    out: Dict[str, Callable[[], torch.Tensor]] = {
        DENSE_CONTENDERS[0]: lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)}
    if triton_reason(q.device) is None and q.shape[-1] <= 256:
        out[DENSE_CONTENDERS[1]] = lambda: dense_attention(q, k, v, scale)
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch
        flash_attn_func = None
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        out[DENSE_CONTENDERS[2]] = lambda: flash_attn_func(qf, kf, vf, softmax_scale=scale)
    return out
