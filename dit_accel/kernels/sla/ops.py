"""Torch custom ops around the fused SLA Triton kernels (fake impls + autograd).

``dit_accel::sla_fwd`` / ``dit_accel::sla_bwd`` are opaque to torch.compile (traced through
their fake implementations, no graph break), and ``sla_fwd`` is differentiable through
``register_autograd``; importing this module does not import triton. :func:`sla_triton_attention`
assembles the full SLA output around them: the global linear term ``phi(q) @ (phi(K)^T V)`` is
plain PyTorch (autograd-native), the kernel supplies the sparse branch and the per-block linear
corrections.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .common import FEATURE_IDS, SLABlocks, SLAParams, feature_map, sla_block_counts

__all__ = ["sla_triton_attention", "linear_plan"]


@torch.library.custom_op("dit_accel::sla_fwd", mutates_args=())
def sla_fwd(q: Tensor, k: Tensor, v: Tensor, critical: Tensor, lin_blocks: Tensor, scale: float, feature: int,
            has_lin: bool, lin_sign: int, block_q: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SLA forward: ``(o_sparse, lse, num_c, den_c)``; num/den are empty without the linear branch."""
    from .triton import sla_forward

    return sla_forward(q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q)


@sla_fwd.register_fake
def _(q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q):
    b, h, n, d = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    if has_lin:
        return o, lse, q.new_empty((b, h, n, d), dtype=torch.float32), q.new_empty((b, h, n), dtype=torch.float32)
    return o, lse, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("dit_accel::sla_bwd", mutates_args=())
def sla_bwd(do: Tensor, dlse: Tensor, dnum: Tensor, dden: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
            lse: Tensor, critical: Tensor, lin_blocks: Tensor, scale: float, feature: int, has_lin: bool,
            lin_sign: int, block_q: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused SLA backward: ``(dq, dk, dv)``."""
    from .triton import sla_backward

    return sla_backward(do, dlse, dnum, dden, q, k, v, o, lse, critical, lin_blocks, scale, feature, has_lin,
                        lin_sign, block_q)


@sla_bwd.register_fake
def _(do, dlse, dnum, dden, q, k, v, o, lse, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, block_q = inputs
    o, lse, _, _ = output
    ctx.save_for_backward(q, k, v, o, lse, critical, lin_blocks)
    ctx.args = (scale, feature, has_lin, lin_sign, block_q)


def _backward(ctx, do, dlse, dnum, dden):
    q, k, v, o, lse, critical, lin_blocks = ctx.saved_tensors
    scale, feature, has_lin, lin_sign, block_q = ctx.args
    do = torch.zeros_like(o) if do is None else do
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    if has_lin:
        dnum = torch.zeros(o.shape, dtype=torch.float32, device=o.device) if dnum is None else dnum
        dden = torch.zeros_like(lse) if dden is None else dden
    else:
        dnum, dden = lse.new_empty((0,)), lse.new_empty((0,))
    dq, dk, dv = sla_bwd(do, dlse, dnum, dden, q, k, v, o, lse, critical, lin_blocks, scale, feature, has_lin,
                         lin_sign, block_q)
    return dq, dk, dv, None, None, None, None, None, None, None


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
    global sums taken here, in fp32, from the very rounded ``phi(q)``, ``phi(k)`` the kernel reads,
    so the subtraction cancels exactly up to the kernel's fp32 accumulation.
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
    o_s, lse, num, den = sla_fwd(q, k, v, critical, lin_blocks, scale, FEATURE_IDS[method.feature_map],
                                 has_lin, sign, method.block_q)
    if plan == "none":
        return o_s, lse, (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if with_linear else None)
    if plan in ("subtract", "all"):
        # Global sums over all tokens (the casts round phi exactly as the kernel's operands are rounded).
        qf = feature_map(q.float(), method.feature_map).to(q.dtype).float()
        kf = feature_map(k.float(), method.feature_map).to(k.dtype).float()
        num = num + qf @ (kf.transpose(-1, -2) @ v.float())
        den = den + (qf * kf.sum(-2)[:, :, None]).sum(-1)
    return o_s, lse, num / (den + method.linear_eps)[..., None]
