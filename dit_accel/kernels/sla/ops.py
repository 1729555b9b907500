"""Torch custom ops around the fused SLA Triton kernels (fake impls + autograd).

``dit_accel::sla_fwd`` / ``dit_accel::sla_bwd`` are opaque to torch.compile (traced through
their fake implementations, no graph break), and ``sla_fwd`` is differentiable through
``register_autograd``; importing this module does not import triton. :func:`sla_triton_attention`
assembles the full SLA output around them: the features and the global sums ``phi(K)^T V``,
``sum(phi(K))`` are plain PyTorch (autograd-native; the op returns the sums' gradients), the kernel
supplies the sparse branch and the linear branch's numerator and denominator.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .common import FEATURE_IDS, SLABlocks, SLAParams, rounded_features, sla_block_counts

__all__ = ["sla_triton_attention", "linear_plan"]


@torch.library.custom_op("dit_accel::sla_fwd", mutates_args=())
def sla_fwd(q: Tensor, k: Tensor, v: Tensor, qf: Optional[Tensor], kf: Optional[Tensor], kv: Optional[Tensor],
            ksum: Optional[Tensor], critical: Tensor, lin_blocks: Tensor, scale: float, feature: int, has_lin: bool,
            lin_sign: int, block_q: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SLA forward: ``(o_sparse, lse, num, den)``; num/den are empty without the linear branch.

    ``qf``, ``kf``: the rounded features (:func:`~.common.rounded_features`) when ``has_lin``, else None.
    The gradient of the block terms reaches ``q`` and ``k`` through the op's own (the op gives ``kf``
    none, and ``qf`` only that of the global sums). ``kv``, ``ksum``: the global sums ``phi(K)^T V``
    ``(B, H, D, D)`` and ``sum(phi(K))`` ``(B, H, D)``, fp32, which num and den include (None: not)."""
    from .triton import sla_forward

    return sla_forward(q, k, v, qf, kf, kv, ksum, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q)


@sla_fwd.register_fake
def _(q, k, v, qf, kf, kv, ksum, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q):
    b, h, n, d = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    if has_lin:
        return o, lse, q.new_empty((b, h, n, d), dtype=torch.float32), q.new_empty((b, h, n), dtype=torch.float32)
    return o, lse, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("dit_accel::sla_bwd", mutates_args=())
def sla_bwd(do: Tensor, dlse: Tensor, dnum: Tensor, dden: Tensor, q: Tensor, k: Tensor, v: Tensor,
            qf: Optional[Tensor], kf: Optional[Tensor], o: Tensor, lse: Tensor, critical: Tensor, lin_blocks: Tensor,
            scale: float, feature: int, has_lin: bool, lin_sign: int, block_q: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused SLA backward: ``(dq, dk, dv)``."""
    from .triton import sla_backward

    return sla_backward(do, dlse, dnum, dden, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature,
                        has_lin, lin_sign, block_q)


@sla_bwd.register_fake
def _(do, dlse, dnum, dden, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature, has_lin, lin_sign,
      block_q):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, qf, kf, kv, ksum, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q = inputs
    o, lse, _, _ = output
    ctx.save_for_backward(q, k, v, qf, kf, kv, ksum, o, lse, critical, lin_blocks)
    ctx.args = (scale, feature, has_lin, lin_sign, block_q)


def _backward(ctx, do, dlse, dnum, dden):
    q, k, v, qf, kf, kv, ksum, o, lse, critical, lin_blocks = ctx.saved_tensors
    scale, feature, has_lin, lin_sign, block_q = ctx.args
    do = torch.zeros_like(o) if do is None else do
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    if has_lin:
        dnum = torch.zeros(o.shape, dtype=torch.float32, device=o.device) if dnum is None else dnum
        dden = torch.zeros_like(lse) if dden is None else dden
    else:
        dnum, dden = lse.new_empty((0,)), lse.new_empty((0,))
    dq, dk, dv = sla_bwd(do, dlse, dnum, dden, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature,
                         has_lin, lin_sign, block_q)
    dqf = dkv = dksum = None
    if kv is not None:
        dqf, dkv, dksum = _global_sums_backward(qf, kv, ksum, dnum, dden)
    return dq, dk, dv, dqf, None, dkv, dksum, None, None, None, None, None, None, None


sla_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_plan(n_kv: int, method: SLAParams, with_linear: bool, path: str = "auto") -> str:
    """How the kernel forms the linear branch's token set.

    ``"none"``: no linear branch. ``"all"``: global sums only. ``"subtract"``: global sums minus
    the critical blocks (reusing their K/V tiles) minus the negligible blocks. ``"direct"``: sum
    of the marginal blocks (chosen when there are fewer marginal than critical + negligible ones).
    """
    if not with_linear:
        return "none"
    if method.linear_tokens == "all":
        return "all"
    _, n_crit, n_neg, n_marg = sla_block_counts(n_kv, method)
    if n_marg == 0:
        return "none"
    if path == "auto":
        return "direct" if n_marg < n_crit + n_neg else "subtract"
    if path not in ("direct", "subtract"):
        raise ValueError(f"linear path must be 'auto', 'direct' or 'subtract', got {path!r}")
    return path


def sla_triton_attention(q: Tensor, k: Tensor, v: Tensor, blocks: SLABlocks, method: SLAParams, scale: float,
                         with_linear: bool, linear_path: str = "auto"):
    """``(o_sparse, lse_sparse, o_linear or None)`` through the fused kernel (o_linear fp32, before proj).

    The "subtract" plan lists the negligible and the critical blocks for removal (sign -1) from
    global sums taken here, in fp32, from the very rounded ``phi(k)`` the kernel reads (the features
    are computed once, here); the kernel adds them to its block terms, so the subtraction cancels to
    about 16 bits (see :mod:`.triton`).
    """
    plan = linear_plan(k.shape[-2], method, with_linear, linear_path)
    critical = blocks.critical.to(torch.int32).contiguous()  # the kernels' block lists are int32
    b, h, n_qb = critical.shape[:3]
    if plan == "subtract":
        lin_blocks, sign = torch.cat([blocks.negligible.to(torch.int32), critical], -1).contiguous(), -1
    elif plan == "direct":
        lin_blocks, sign = blocks.marginal.to(torch.int32).contiguous(), 1
    else:
        lin_blocks, sign = critical.new_zeros((b, h, n_qb, 0)), 1
    has_lin = plan != "none"
    qf = kf = kv = ksum = None
    if has_lin:
        qf, kf = (rounded_features(t, method.feature_map) for t in (q, k))
    if plan in ("subtract", "all"):
        kv, ksum = _global_sums(kf, v)
    args = (q, k, v, qf, kf, kv, ksum, critical, lin_blocks, scale, FEATURE_IDS[method.feature_map], has_lin, sign,
            method.block_q)
    if _direct(q, k, v, qf, kv):  # eager, nothing to record or intercept: the launcher without the op's dispatch
        from .triton import sla_forward

        o_s, lse, num, den = sla_forward(*args)
    else:
        o_s, lse, num, den = sla_fwd(*args)
    if plan == "none":
        return o_s, lse, (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if with_linear else None)
    return o_s, lse, num / (den + method.linear_eps)[..., None]


def _direct(q: Tensor, k: Tensor, v: Tensor, qf: Optional[Tensor], kv: Optional[Tensor]) -> bool:
    """Whether this forward may call the launcher itself (see ``block_sparse.ops.direct_call_ok``): also no
    autograd recording, which needs the op's registered backward."""
    from ..block_sparse.ops import direct_call_ok

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, qf, kv)):
        return False
    return direct_call_ok(q, k, v)


#: Token chunk of the global sums: ``phi(K)^T V`` reduces 10^4-10^5 tokens into ``D x D`` per head, which as
#: one matmul per head gives a GPU too few output tiles (1.1 ms of a 7 ms SLA call at Wan 480p on an H100);
#: as a sum of per-chunk products it fills the machine.
GLOBAL_CHUNK = 1024


def _fp32_rows(x: Tensor, chunk: int) -> Tensor:
    """``x`` ``(B, H, N, D)`` as fp32 ``(B*H*c, chunk, D)``, zero-padded to ``c * chunk`` tokens: one copy
    whatever x's layout (``x.float().flatten(0, 1)`` makes two of a head-major view)."""
    b, h, n, d = x.shape
    c = -(-n // chunk)
    rows = x.new_empty((b, h, c * chunk, d), dtype=torch.float32)
    rows[:, :, :n].copy_(x)
    if c * chunk > n:
        rows[:, :, n:].zero_()
    return rows.view(b * h * c, chunk, d)


def _token_sums(x: Tensor, *ys: Tensor) -> Tuple[Tensor, ...]:
    """``x^T y`` for each ``y`` over the tokens of ``(B, H, N, Dx)`` and ``(B, H, N, Dy)``, fp32
    ``(B, H, Dx, Dy)``: sums of :data:`GLOBAL_CHUNK`-token products (x's fp32 rows made once for all)."""
    b, h, n, _ = x.shape
    chunk = min(GLOBAL_CHUNK, n)
    x32 = _fp32_rows(x, chunk).transpose(1, 2)
    return tuple((x32 @ _fp32_rows(y, chunk)).view(b, h, -1, x.shape[-1], y.shape[-1]).sum(2) for y in ys)


def _global_sums(kf: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """The linear branch's sums over all keys, fp32 from the rounded features the kernel reads:
    ``phi(K)^T V`` ``(B, H, D, D)`` and ``sum(phi(K))`` ``(B, H, D)``. Autograd-native (the op returns
    their gradients)."""
    return _token_sums(kf, v)[0], kf.sum(-2, dtype=torch.float32)


def _global_sums_backward(qf: Tensor, kv: Tensor, ksum: Tensor, dnum: Tensor, dden: Tensor):
    """Gradients of ``num += phi(q) kv``, ``den += phi(q) . ksum`` for ``phi(q)`` (in its dtype), ``kv`` and
    ``ksum``."""
    dnum, dden = dnum.float(), dden.float()
    dqf = torch.matmul(dnum, kv.transpose(-1, -2)) + dden[..., None] * ksum[..., None, :]
    dkv, dksum = _token_sums(qf, dnum, dden[..., None])
    return dqf.to(qf.dtype), dkv, dksum[..., 0]
