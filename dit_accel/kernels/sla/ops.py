"""Torch custom ops around the fused SLA Triton kernels (fake impls + autograd).

``dit_accel::sla_fwd`` / ``dit_accel::sla_bwd`` are opaque to torch.compile (traced through
their fake implementations, no graph break), and ``sla_fwd`` is differentiable through
``register_autograd``; importing this module does not import triton. :func:`sla_triton_attention`
assembles the full SLA output around them: the global linear term ``phi(q) @ (phi(K)^T V)`` is
plain PyTorch (autograd-native), the kernel supplies the sparse branch and the per-block linear
corrections.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .common import FEATURE_IDS, SLABlocks, SLAParams, rounded_features, sla_block_counts

__all__ = ["sla_triton_attention", "linear_plan"]


@torch.library.custom_op("dit_accel::sla_fwd", mutates_args=())
def sla_fwd(q: Tensor, k: Tensor, v: Tensor, qf: Optional[Tensor], kf: Optional[Tensor], critical: Tensor,
            lin_blocks: Tensor, scale: float, feature: int, has_lin: bool, lin_sign: int,
            block_q: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SLA forward: ``(o_sparse, lse, num_c, den_c)``; num/den are empty without the linear branch.

    ``qf``, ``kf``: the rounded features (:func:`~.common.rounded_features`) when ``has_lin``, else None.
    Their gradient reaches ``q`` and ``k`` through the op's own (no gradient flows to them as inputs)."""
    from .triton import sla_forward

    return sla_forward(q, k, v, qf, kf, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q)


@sla_fwd.register_fake
def _(q, k, v, qf, kf, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q):
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
    q, k, v, qf, kf, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q = inputs
    o, lse, _, _ = output
    ctx.save_for_backward(q, k, v, qf, kf, o, lse, critical, lin_blocks)
    ctx.args = (scale, feature, has_lin, lin_sign, block_q)


def _backward(ctx, do, dlse, dnum, dden):
    q, k, v, qf, kf, o, lse, critical, lin_blocks = ctx.saved_tensors
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
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


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
    global sums taken here, in fp32, from the very rounded ``phi(q)``, ``phi(k)`` the kernel reads
    (computed once, here), so the subtraction cancels exactly up to the kernel's fp32 accumulation.
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
    qf = kf = None
    if has_lin:
        qf, kf = (rounded_features(t, method.feature_map) for t in (q, k))
    o_s, lse, num, den = sla_fwd(q, k, v, qf, kf, critical, lin_blocks, scale, FEATURE_IDS[method.feature_map],
                                 has_lin, sign, method.block_q)
    if plan == "none":
        return o_s, lse, (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if with_linear else None)
    if plan in ("subtract", "all"):
        num, den = _with_global_sums(num, den, qf, kf, v)
    return o_s, lse, num / (den + method.linear_eps)[..., None]


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


def _with_global_sums(num: Tensor, den: Tensor, qf: Tensor, kf: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """``num + phi(q) (phi(K)^T V)`` and ``den + phi(q) . sum(phi(K))`` over all tokens, in fp32 from the
    rounded features the kernel read. The queries' products add as they multiply (``baddbmm``)."""
    b, h, nq, d = num.shape
    nk = kf.shape[-2]
    chunk = min(GLOBAL_CHUNK, nk)
    kf32, v32 = _fp32_rows(kf, chunk), _fp32_rows(v, chunk)
    kv = (kf32.transpose(1, 2) @ v32).view(b * h, -1, d, d).sum(1)  # (B*H, D, D)
    ksum = kf32.sum(1).view(b * h, -1, d).sum(1)
    qf32 = _fp32_rows(qf, nq)
    num = torch.baddbmm(num.view(b * h, nq, d), qf32, kv).view(b, h, nq, d)
    den = torch.baddbmm(den.view(b * h, nq, 1), qf32, ksum[..., None]).view(b, h, nq)
    return num, den
