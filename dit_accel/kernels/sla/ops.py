"""Torch custom ops around the fused SLA Triton kernels (fake impls + autograd).

``dit_accel::sla_fwd`` / ``dit_accel::sla_bwd`` are opaque to torch.compile (traced through
their fake implementations, no graph break), and ``sla_fwd`` is differentiable through
``register_autograd``; importing this module does not import triton. ``dit_accel::sla_pool`` is the
classification's pooling (:mod:`.pool`, one launch), the Triton backend's only pass over q and k, and
``dit_accel::sla_select`` its selection (:mod:`.select`, one launch: the scores and both block sets, no
sort); past the selection kernel's bounds the twin's :func:`~.common.classify_pooled` selects instead.
Eager calls with nothing to trace or record call the launchers themselves (:func:`_direct`). The forward
takes q, k, v and the block lists and returns the sparse branch, its lse and the linear branch ``O_l`` (before the
projection) in q's dtype: phi, the global sums ``phi(K)^T V``, ``sum(phi(K))`` and ``num / den``
are taken inside the kernels, so no ``(B, H, N, D)`` intermediate is made around them
(``tests/kernels/test_sla_glue.py`` counts). The backward recomputes what it needs (the rounded
features, the global sums) on the host.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._util import cdiv as _cdiv
from .. import selfcheck
from ..request import kernel_backward, records_grad
from .common import (FEATURE_IDS, FEATURE_MAPS, SLABlocks, SLAParams, classify_pooled,
                     rounded_features, sla_block_counts)

FEATURE_NAMES = dict(enumerate(FEATURE_MAPS))

__all__ = ["sla_triton_attention", "sla_triton_classify", "linear_plan"]


@torch.library.custom_op("dit_accel::sla_pool", mutates_args=())
def sla_pool(q: Tensor, k: Tensor, block_q: int, block_k: int) -> Tuple[Tensor, Tensor]:
    """The classification's pooled ``(qb, kb)`` from one Triton launch (:func:`~.pool.pool_blocks`)."""
    from .pool import pool_blocks

    return pool_blocks(q, k, block_q, block_k)


@sla_pool.register_fake
def _(q, k, block_q, block_k):
    b, h, nq, d = q.shape
    return (q.new_empty((b, h, _cdiv(nq, block_q), d), dtype=torch.float32),
            q.new_empty((b, h, _cdiv(k.shape[-2], block_k), d), dtype=torch.float32))


@torch.library.custom_op("dit_accel::sla_select", mutates_args=())
def sla_select(qb: Tensor, kb: Tensor, n_crit: int, n_neg: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(scores, critical, negligible)`` of the pooled ``(qb, kb)`` from one Triton launch
    (:func:`~.select.select_blocks`); ``negligible`` is ``(B, H, nQ, 0)`` when ``n_neg`` is 0."""
    from .select import select_blocks

    scores, critical, negligible = select_blocks(qb, kb, n_crit, n_neg)
    if negligible is None:  # an op returns tensors, none aliasing another output
        negligible = critical.new_empty(critical.shape[:-1] + (0,))
    return scores, critical, negligible


@sla_select.register_fake
def _(qb, kb, n_crit, n_neg):
    b, h, nq, _ = qb.shape
    return (qb.new_empty((b, h, nq, kb.shape[-2])), qb.new_empty((b, h, nq, n_crit), dtype=torch.int32),
            qb.new_empty((b, h, nq, n_neg), dtype=torch.int32))


#: The self-check's name of the Triton classification (pool + select).
CLASSIFY_VARIANT = "sla.triton.classify"


def sla_triton_classify(q: Tensor, k: Tensor, method: SLAParams) -> SLABlocks:
    """:func:`~.common.sla_classify` in two Triton launches (the Triton backend's classification): the pooling
    (:func:`~.pool.pool_blocks`) and the selection (:func:`~.select.select_blocks`: scores and both sets, no
    sort), int32 sets for the fused kernels. The same critical and negligible sets from the same rule; the
    pooled values and the scores differ from the twin's in fp32 summation order only. Past the selection
    kernel's bounds (more than ``select.NK_MAX`` key blocks) the twin's :func:`~.common.classify_pooled`
    selects from the pooled values. ``method``: an :class:`SLAParams`."""
    blocks = _classify(q, k, method)
    if selfcheck.faulted(CLASSIFY_VARIANT):  # $DIT_ACCEL_FAULT: the opposite end of the ranking, as a broken select
        n_kb = blocks.scores.shape[-1] if blocks.scores is not None else blocks.classes.shape[-1]
        blocks = SLABlocks((n_kb - 1 - blocks.critical).flip(-1).contiguous(), scores=blocks.scores)
    return blocks


def _classify(q: Tensor, k: Tensor, method: SLAParams) -> SLABlocks:
    _, n_crit, n_neg, _ = sla_block_counts(k.shape[-2], method)
    if _direct(q, k):  # eager, q and k record nothing: the launchers themselves (their outputs record nothing)
        pool, _, _, select, fits, _ = _launchers()
        qb, kb = pool(q, k, method.block_q, method.block_k)
        if fits(kb.shape[-2], kb.shape[-1]):
            scores, critical, negligible = select(qb, kb, n_crit, n_neg)
            return SLABlocks(critical, negligible, scores=scores)
    elif torch.is_grad_enabled():  # the ops have no autograd formula (the top-k choice has no gradient)
        with torch.no_grad():
            return _classify(q, k, method)
    else:
        qb, kb = sla_pool(q, k, method.block_q, method.block_k)
        if _launchers()[4](kb.shape[-2], kb.shape[-1]):
            scores, critical, negligible = sla_select(qb, kb, n_crit, n_neg)
            return SLABlocks(critical, negligible, scores=scores)
    return classify_pooled(qb, kb, k.shape[-2], method, torch.int32)  # the kernels' block lists are int32


@torch.library.custom_op("dit_accel::sla_fwd", mutates_args=())
def sla_fwd(q: Tensor, k: Tensor, v: Tensor, critical: Tensor, lin_blocks: Tensor, scale: float, feature: int,
            has_lin: bool, lin_sign: int, with_global: bool, lin_eps: float,
            block_q: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SLA forward: ``(o_sparse, lse, o_linear, den)``; o_linear (in q's dtype, before the projection)
    and its denominator ``den`` (fp32 ``(B, H, N)``) are empty without the linear branch.

    phi, the global sums ``phi(K)^T V``, ``sum(phi(K))`` (``with_global``) and ``num / (den + lin_eps)`` are
    all taken inside the kernels (:func:`~.triton.sla_forward`)."""
    from .triton import sla_forward

    return sla_forward(q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, with_global, lin_eps,
                       block_q)


@sla_fwd.register_fake
def _(q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, with_global, lin_eps, block_q):
    b, h, n, d = q.shape
    o = q.new_empty((b, h, n, d))
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    if has_lin:
        return o, lse, q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=torch.float32)
    return o, lse, q.new_empty((0,)), q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("dit_accel::sla_bwd", mutates_args=())
def sla_bwd(do: Tensor, dlse: Tensor, dnum: Tensor, dden: Tensor, q: Tensor, k: Tensor, v: Tensor,
            qf: Optional[Tensor], kf: Optional[Tensor], o: Tensor, lse: Tensor, critical: Tensor, lin_blocks: Tensor,
            scale: float, feature: int, has_lin: bool, lin_sign: int, block_q: int, dqf_g: Optional[Tensor] = None,
            dkf_g: Optional[Tensor] = None, dv_g: Optional[Tensor] = None, with_global: bool = False,
            dol: Optional[Tensor] = None, o_l: Optional[Tensor] = None,
            inv: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused SLA backward: ``(dq, dk, dv)``. ``dqf_g``, ``dkf_g``, ``dv_g``: the global sums' fp32 gradients for
    phi(q), phi(K) and V (:func:`_global_grads`), added to the kernels' before phi's backward, which then runs
    once. ``qf`` None with the linear branch: the glue kernels make the features and (``with_global``) those
    gradients (:mod:`.glue`), and given ``dol`` (``o_l``'s gradient), ``o_l`` and ``inv = 1 / (den + eps)``, d num
    and d den too (``dnum`` empty, ``dden`` the incoming gradient of den or empty)."""
    from .backward import sla_backward

    return sla_backward(do, dlse, dnum, dden, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature,
                        has_lin, lin_sign, block_q, dqf_g, dkf_g, dv_g, with_global, dol, o_l, inv)


@sla_bwd.register_fake
def _(do, dlse, dnum, dden, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature, has_lin, lin_sign,
      block_q, dqf_g=None, dkf_g=None, dv_g=None, with_global=False, dol=None, o_l=None, inv=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, with_global, lin_eps, block_q = inputs
    o, lse, o_l, den = output
    ctx.save_for_backward(q, k, v, o, lse, o_l, den, critical, lin_blocks)
    ctx.args = (scale, feature, has_lin, lin_sign, with_global, lin_eps, block_q)


@kernel_backward("SLA's fused Triton kernel")  # (unmarked, a create_graph=True gradient failed in torch: "Trying
# to backward through dit_accel.sla_bwd.default but no autograd formula was registered", naming no way out)
def _backward(ctx, do, dlse, dol, dden):
    """The forward's gradients. What it materialises: ``dnum`` / ``dden`` from ``o_l`` and ``den``; and, where the
    glue kernels do not run (:func:`~.glue.glue_runs`), phi(q), phi(k) rounded (the kernels' operands) and, with the
    global sums, those sums again and their per-token gradients, in fp32."""
    q, k, v, o, lse, o_l, den, critical, lin_blocks = ctx.saved_tensors
    scale, feature, has_lin, lin_sign, with_global, lin_eps, block_q = ctx.args
    do = torch.zeros_like(o) if do is None else do
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    qf = kf = None
    raw = (None,) * 3  # (do_l, o_l, 1 / (den + eps)) where the glue kernels take d num and d den from do_l
    if has_lin:
        # o_l = num / (den + eps): d num = do_l / (den + eps), d den = -(do_l . o_l) / (den + eps), in fp32 as the
        # products widen do_l and o_l (no fp32 copies of either; the fp32 zero makes the product fp32).
        inv = 1.0 / (den + lin_eps)
        glued = _launchers()[5](q)  # (the glue kernels make the features inside the op)
        if glued and dol is not None and FEATURE_NAMES[feature] == "softmax":
            # ... and from do_l d num, d den and their scale (rows of unit scale: softmax features)
            raw, dnum = (dol, o_l, inv), inv.new_empty((0,))
            dden_total = inv.new_empty((0,)) if dden is None else dden
        elif dol is None:
            dnum, dden_total = torch.zeros(o.shape, dtype=torch.float32, device=o.device), torch.zeros_like(inv)
        else:
            dnum = dol * inv[..., None]
            dden_total = -torch.addcmul(inv.new_zeros((1,) * dol.dim()), dol, o_l).sum(-1) * inv
        if dden is not None and raw[0] is None:
            dden_total = dden_total + dden
        if not glued:
            name = FEATURE_NAMES[feature]
            qf, kf = rounded_features(q, name), rounded_features(k, name)
    else:
        dnum, dden_total = lse.new_empty((0,)), lse.new_empty((0,))
    extra = _global_grads(v, qf, kf, dnum, dden_total) if qf is not None and with_global else (None,) * 3
    dq, dk, dv = sla_bwd(do, dlse, dnum, dden_total, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature,
                         has_lin, lin_sign, block_q, *extra, with_global=bool(has_lin and with_global), dol=raw[0],
                         o_l=raw[1], inv=raw[2])
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _global_grads(v, qf, kf, dnum, dden) -> Tuple[Tensor, Tensor, Tensor]:
    """fp32 gradients of ``num += phi(q) kv``, ``den += phi(q) . ksum`` (``kv = phi(K)^T V``, ``ksum = sum(phi(K))``
    over all keys) for phi(q), phi(K) and V. Gradients for the features, not for q and k: phi's backward is linear
    in its upstream gradient, so the backward op adds these to the kernels' and runs it once."""
    kv, ksum, kf32, v32 = _global_sums_rows(kf, v)
    dqf, dkv, dksum = _global_sums_backward(qf, kv, ksum, dnum, dden)
    dkf = torch.matmul(v32, dkv.transpose(-1, -2)).add_(dksum[..., None, :])  # d phi(K) of kv and ksum
    return dqf, dkf, torch.matmul(kf32, dkv)


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
        # Fewer marginal blocks: visit them. One, which may be a ragged last key block (as few tokens as 1 of
        # M = 65 beside a critical 64): visit it too (the same one block of work). Subtracted, the global sums less
        # 64 tokens left it within their rounding: relu features gave o_linear 3.8 off the reference.
        alone = n_marg == 1 and n_kv % method.block_k != 0
        return "direct" if n_marg < n_crit + n_neg or alone else "subtract"
    if path not in ("direct", "subtract"):
        raise ValueError(f"linear path must be 'auto', 'direct' or 'subtract', got {path!r}")
    return path


def sla_triton_attention(q: Tensor, k: Tensor, v: Tensor, blocks: SLABlocks, method: SLAParams, scale: float,
                         with_linear: bool, linear_path: str = "auto"):
    """``(o_sparse, lse_sparse, o_linear or None)`` through the fused kernel, all in q's dtype but the fp32 lse
    (o_linear before proj).

    The "subtract" plan lists the negligible and the critical blocks for removal (sign -1) from
    global sums that the global-sums kernel takes in fp32 from the very rounded ``phi(k)`` the forward
    kernel's block terms read; the kernel adds them to its block terms, so the subtraction cancels to
    about 16 bits (see :mod:`.triton`).
    """
    plan = linear_plan(k.shape[-2], method, with_linear, linear_path)
    critical = blocks.critical
    if critical.dtype != torch.int32 or not critical.is_contiguous():  # (int32 from sla_triton_classify)
        critical = critical.to(torch.int32).contiguous()  # the kernels' block lists are int32
    if plan == "subtract":
        sign = -1
        if sla_block_counts(k.shape[-2], method)[2]:
            lin_blocks = torch.cat([blocks.negligible.to(torch.int32), critical], -1).contiguous()
        else:  # no negligible blocks: the list is the critical one (no copy)
            lin_blocks = critical
    elif plan == "direct":
        lin_blocks, sign = blocks.marginal.to(torch.int32).contiguous(), 1
    else:
        lin_blocks, sign = critical[..., :0], 1  # a view: no allocation
    has_lin = plan != "none"
    args = (q, k, v, critical, lin_blocks, scale, FEATURE_IDS[method.feature_map], has_lin, sign,
            plan in ("subtract", "all"), method.linear_eps, method.block_q)
    if _direct(q, k, v):  # eager, nothing to record or intercept: the launcher without the op's dispatch
        o_s, lse, o_l, _ = _launchers()[1](*args, empties=False)
    else:
        o_s, lse, o_l, _ = sla_fwd(*args)
    if plan == "none":
        return o_s, lse, (torch.zeros_like(o_s) if with_linear else None)
    return o_s, lse, o_l


def _direct(*tensors: Tensor) -> bool:
    """Whether this call may run the launcher itself (see ``block_sparse.ops.direct_call_ok``): also no
    autograd recording, which needs the op's registered backward."""
    if records_grad(*tensors):
        return False
    return _launchers()[2](*tensors)


@functools.cache
def _launchers():
    """``(pool_blocks, sla_forward, direct_call_ok, select_blocks, select_supported, glue_runs)``, imported on first
    use (importing this module does not import triton) and then bound: an import statement in the call path costs
    a microsecond per call."""
    from ..block_sparse.ops import direct_call_ok
    from .glue import glue_runs
    from .pool import pool_blocks
    from .select import select_blocks
    from .select import supported as select_supported
    from .triton import sla_forward

    return pool_blocks, sla_forward, direct_call_ok, select_blocks, select_supported, glue_runs


#: Token chunk of the global sums: ``phi(K)^T V`` reduces 10^4-10^5 tokens into ``D x D`` per head, which as
#: one matmul per head gives a GPU too few output tiles (1.1 ms of a 7 ms SLA call at Wan 480p on an H100);
#: as a sum of per-chunk products it fills the machine.
GLOBAL_CHUNK = 1024


def _chunk(n: int) -> int:
    """Tokens per chunk of the global sums: :data:`GLOBAL_CHUNK`, or the largest divisor of ``n`` down to half of
    it (Wan 480p's 32,760 tokens: 936), so a contiguous fp32 operand needs no padded copy."""
    if n <= GLOBAL_CHUNK:
        return n
    return next((c for c in range(GLOBAL_CHUNK, GLOBAL_CHUNK // 2 - 1, -1) if n % c == 0), GLOBAL_CHUNK)


def _fp32_rows(x: Tensor, chunk: int) -> Tensor:
    """``x`` ``(B, H, N, D)`` as fp32 ``(B*H*c, chunk, D)``, zero-padded to ``c * chunk`` tokens: one copy
    whatever x's layout (``x.float().flatten(0, 1)`` makes two of a head-major view), none of a contiguous fp32
    ``x`` that ``chunk`` divides."""
    b, h, n, d = x.shape
    c = -(-n // chunk)
    if x.dtype == torch.float32 and x.is_contiguous() and c * chunk == n:
        return x.view(b * h * c, chunk, d)
    rows = x.new_empty((b, h, c * chunk, d), dtype=torch.float32)
    rows[:, :, :n].copy_(x)
    if c * chunk > n:
        rows[:, :, n:].zero_()
    return rows.view(b * h * c, chunk, d)


def _token_sums(x: Tensor, *ys: Tensor) -> Tuple[Tensor, ...]:
    """``x^T y`` for each ``y`` over the tokens of ``(B, H, N, Dx)`` and ``(B, H, N, Dy)``, fp32
    ``(B, H, Dx, Dy)``: sums of per-chunk products (:func:`_chunk`; x's fp32 rows made once for all)."""
    chunk = _chunk(x.shape[2])
    return _chunk_sums(x.shape, _fp32_rows(x, chunk), *(_fp32_rows(y, chunk) for y in ys))


def _chunk_sums(shape, x32: Tensor, *y32: Tensor) -> Tuple[Tensor, ...]:
    b, h, _, dx = shape
    return tuple((x32.transpose(1, 2) @ y).view(b, h, -1, dx, y.shape[-1]).sum(2) for y in y32)


def _global_sums_rows(kf: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The linear branch's sums over all keys, fp32 from the rounded features the kernel reads: ``phi(K)^T V``
    ``(B, H, D, D)`` and ``sum(phi(K))`` ``(B, H, D)`` (autograd-native: the op returns their gradients), and the
    fp32 copies of ``kf`` and ``v`` they were summed from, as ``(B, H, N, D)`` views (the backward's products read
    them again instead of widening kf and v a second time)."""
    b, h, n, d = kf.shape
    chunk = _chunk(n)
    kf32, v32 = _fp32_rows(kf, chunk), _fp32_rows(v, chunk)
    (kv,) = _chunk_sums(kf.shape, kf32, v32)
    rows = (x.view(b, h, -1, x.shape[-1])[:, :, :n] for x in (kf32, v32))
    return (kv, kf.sum(-2, dtype=torch.float32), *rows)


def _global_sums_backward(qf: Tensor, kv: Tensor, ksum: Tensor, dnum: Tensor, dden: Tensor):
    """fp32 gradients of ``num += phi(q) kv``, ``den += phi(q) . ksum`` for ``phi(q)``, ``kv`` and ``ksum``."""
    dnum, dden = dnum.float(), dden.float()
    dqf = torch.matmul(dnum, kv.transpose(-1, -2)).addcmul_(dden[..., None], ksum[..., None, :])
    dkv, dksum = _token_sums(qf, dnum, dden[..., None])
    return dqf, dkv, dksum[..., 0]
