"""Fused Triton kernels of SLA (sparse-linear attention), forward and backward.

One program per query tile (forward, dQ) or key block (dK/dV), written from the dense
kernels' tile steps (:mod:`dit_accel.kernels.dense.tiles`):

- the *critical* loop is the sparse branch: an online softmax over the critical key blocks,
  with no mask code (the scale folded into one FFMA before ``exp2``); only the ragged last
  key block, which can only be the last critical block of a row, runs in a second, masked loop;
- the *linear* loop adds (``lin_sign = +1``: the marginal blocks) or removes (``-1``: the
  negligible and the critical blocks, the "subtract" plan) linear-attention terms
  ``num += (phi(q) phi(K_j)^T) V_j``, ``den += rowsum(phi(q) phi(K_j)^T)``. It runs apart
  from the softmax loop: fusing the two kept both accumulators live and spilled. It reads
  ``phi(K_j)`` from the features the global-sums kernel stored, so each block is three
  tensor-core products and a row sum (phi made there, once per query tile, cost six times the
  softmax loop's instructions per key block on sm_90).

The global-sums kernel runs first: phi(K) for every key, stored once in the input dtype (a tensor
the size of K), and, once per (batch, head) in fp32, ``phi(K)^T V``, ``sum(phi(K))`` and
``max|phi(K)|`` (partial sums per 1024-key chunk, added by the launcher). The forward's epilogue (the
*global* loop) adds the global sums ``phi(q) (phi(K)^T V)`` and ``phi(q) . sum(phi(K))`` and divides:
the forward returns the sparse branch and ``O_l = num / (den + eps)`` in the input dtype, and ``den``.
phi (softmax over the real head-dim columns, elu + 1 or relu, a runtime argument) is taken in fp32
and rounded once to the input dtype (the value the backward recomputes with
:func:`~.common.rounded_features`): phi(q) in the forward from its q tile, phi(K) in the global-sums
kernel.

Numerics of the linear terms: the scores ``a = phi(q) phi(K)^T`` accumulate in fp32 and are
divided by a per-row scale ``s_i >= 1`` (``sum|phi(q_i)| * max|phi(k)| / 2^15``, so ``a / s``
fits fp16 whatever relu/elu give); ``a / s`` enters the ``@ V`` product as a hi + lo pair in the
input dtype (about 16 significant bits; :func:`_dot_split`), and the same fp32 ``a`` gives the
denominator. The global ``phi(K)^T V`` enters as a hi + lo pair too (over a power of two, so it
fits fp16), beside the same rounded ``phi(q)``: block terms and global sums agree to about 16 bits,
and the subtract plan cancels. Token offsets are formed in 64 bits.

On sm_90 the forward loads Q, K and V by TMA, from descriptors it makes over its (batch, head) slice
(rows past the slice arrive as zeros, so the ragged last key block needs no load mask), and reads the
critical and linear loops' next block index an iteration ahead into a register: the index takes no
pipeline stage, so ``num_stages`` is the depth of the critical loop's K / V ring. Inputs whose base or
strides are not 16-byte aligned, and older GPUs, take pointer loads, where cp.async prefetches the
indices in the loop.

Launch configurations and the list of shipped ones: :mod:`.configs`.
"""

from __future__ import annotations

from typing import Dict

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..._util import cdiv as _cdiv
from .. import selfcheck
from .._cache import bounded_get
from .. import occupancy
from ..dense.configs import tma_ok
from ..dense.tiles import LN2, dkdv_step, dq_step, fwd_step, load_tile, slice_descriptors
from ..dense.tiles import LOG2E_HOST as _LOG2E
from ..dense.triton import ensure_allocator
from .common import FEATURE_IDS, chunk_totals
from .configs import BLOCK_K, BLOCK_M, GLOBAL_COLUMNS, SLAKernelConfig, pointer_fallback, select_sla_config
from .operands import global_operands
from .phi import phi, phi_stats, phi_tile

__all__ = ["sla_forward", "global_sums", "FEATURE_IDS", "KERNELS"]

_FEATURE_NAMES = {i: name for name, i in FEATURE_IDS.items()}
#: Rows of the global ``phi(K)^T V`` the forward's epilogue multiplies at a time.
KV_ROWS: tl.constexpr = tl.constexpr(32)


@triton.jit
def _split(x, DT: tl.constexpr):
    """fp32 ``x`` as ``hi + lo`` in dtype ``DT`` (about twice the dtype's significant bits)."""
    hi = x.to(DT)
    return hi, (x - hi.to(tl.float32)).to(DT)


@triton.jit
def _dot_split(a, b, acc, DT: tl.constexpr, CHAIN: tl.constexpr):
    """``acc + a @ b`` for fp32 ``a`` and ``b`` in dtype ``DT``, with ``a`` as hi + lo in ``DT`` (about
    twice its significant bits).

    ``CHAIN``: two tensor-core products chained on one accumulator (the forward and dQ kernels:
    713 -> 427 SASS instructions per tile in the sm_90 bf16 head-dim-128 forward). Otherwise one
    product of twice the depth, ``[a_hi | a_lo] @ [b ; b]``: its interleaving shuffles cost more,
    but where the chain makes ptxas serialise the wgmma pipeline (advisory C7515, the sm_90 dK/dV
    linear kernel) it is the faster form."""
    hi, lo = _split(a, DT)
    if CHAIN:
        return tl.dot(lo, b, tl.dot(hi, b, acc, input_precision="ieee"), input_precision="ieee")
    rows: tl.constexpr = a.shape[0]
    depth: tl.constexpr = a.shape[1]
    cols: tl.constexpr = b.shape[1]
    a2 = tl.join(hi, lo).reshape([rows, 2 * depth])  # columns hi_0, lo_0, hi_1, lo_1, ...
    b2 = tl.permute(tl.join(b, b), (0, 2, 1)).reshape([2 * depth, cols])  # rows b_0, b_0, b_1, b_1, ...
    return tl.dot(a2, b2, acc, input_precision="ieee")


@triton.jit
def _sla_global_kernel(
    K, V, KF, KV_P, KSUM_P, KMAX_P,
    skb, skh, skn, svb, svh, svn,
    H, NK_TOK, D_REAL, CHUNK_TILES, feature,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial global sums of the linear branch over one chunk of ``CHUNK_TILES`` key tiles:
    ``phi(K_c)^T V_c`` (fp32, ``BLOCK_C`` of its ``BLOCK_D`` columns: program axis 2), ``sum(phi(K_c))`` and
    ``max|phi(K_c)|``, from phi computed here and rounded to the input dtype; the column block 0 programs also
    store those features in ``KF`` (contiguous ``(B*H, NK_TOK, BLOCK_D)``), the values the forward's linear
    loop reads. The launcher sums the chunks (a few per head): deterministic, and enough programs to fill
    a GPU. Column blocks keep the accumulator small (the whole ``D x D`` one spilled at head dim 128)."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + pid_v * BLOCK_C
    offs_n = tl.arange(0, BLOCK_N)
    col_ok = (tl.arange(0, BLOCK_D) < D_REAL)[None, :]
    kv_t = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # (phi(K)^T V)^T: V^T as the product's first operand
    ksum = tl.zeros([BLOCK_D], tl.float32)
    kmax = tl.zeros([BLOCK_D], tl.float32)
    first = pid_c * CHUNK_TILES
    n_tiles = tl.minimum(CHUNK_TILES, tl.cdiv(NK_TOK, BLOCK_N) - first)
    kf_at = KF + pid_bh.to(tl.int64) * NK_TOK * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    kf_rows = tl.where(pid_v == 0, NK_TOK, 0)  # the features are stored by the column block 0 programs
    for t in range(0, n_tiles):  # loop: global_sums
        col = (first + t) * BLOCK_N
        k = load_tile(k_base, k_base, b, h, col, NK_TOK, skn, D_REAL, BLOCK_N, BLOCK_D, False, True, True)
        v = load_tile(v_base, v_base, b, h, col, NK_TOK, svn, D_REAL, BLOCK_N, BLOCK_C, False, True, True)
        ok = (col + offs_n < NK_TOK)[:, None] & col_ok
        kf = phi_tile(k.to(tl.float32), ok, feature).to(V.dtype.element_ty)
        # A predicated store, not a branch (a branch in a loop of tensor-core products serialises sm_90's wgmma).
        tl.store(kf_at + (col + offs_n).to(tl.int64)[:, None] * BLOCK_D, kf, mask=(col + offs_n < kf_rows)[:, None])
        # V^T phi(K), not phi(K)^T V: phi(K) is made in registers, and as the transposed first operand of
        # the product it serialised sm_90's wgmma (ptxas C7515).
        kv_t = tl.dot(tl.trans(v), kf, kv_t, input_precision="ieee")
        kf32 = kf.to(tl.float32)
        ksum += tl.sum(kf32, 0)
        kmax = tl.maximum(kmax, tl.max(tl.abs(kf32), 0))
    at = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_c
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(KV_P + at * BLOCK_D * BLOCK_D + offs_d[None, :] * BLOCK_D + offs_v[:, None], kv_t)
    if pid_v == 0:
        tl.store(KSUM_P + at * BLOCK_D + offs_d, ksum)
        tl.store(KMAX_P + at, tl.max(kmax, 0))


@triton.jit
def _rows(desc, base, row0, n_rows, stride_n, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
          ROW_MASK: tl.constexpr):
    """Rows ``row0 .. row0 + ROWS`` of one (batch, head) slice as a ``[ROWS, BLOCK_D]`` tile: by TMA from
    ``desc``, a descriptor made in the kernel (rows past the slice arrive as zeros: no mask code), or by
    pointer loads from ``base`` (``ROW_MASK`` guards rows past ``n_rows``)."""
    if TMA:
        tile = desc.load([row0, 0])
    else:
        tile = load_tile(base, base, 0, 0, row0, n_rows, stride_n, BLOCK_D, ROWS, BLOCK_D, False, ROW_MASK, True)
    return tile


@triton.jit
def _sla_fwd_kernel(
    Q, K, V, KF, CRIT, LIN, KV, KV_SCALE, KSUM, KMAX, O, LSE, OL, DEN,  # noqa: E741 (the attention output)
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, D_REAL, KC, NL, SUB, qk_scale, lin_sign, feature, lin_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LIN: tl.constexpr, LIN_CHAIN: tl.constexpr = True, TMA: tl.constexpr = False,
):
    # TMA (sm_90, 16-byte aligned inputs): Q, K and V through descriptors made here over this (batch,
    # head) slice; otherwise pointer loads with 64-bit tile offsets.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)  # classification blocks (SUB query tiles each)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if TMA:
        qd, kd, vd = slice_descriptors(Q, K, V, b, h, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, NQ_TOK, NK_TOK,
                                       D, BLOCK_M, BLOCK_N, BLOCK_D)
    else:  # unused
        qd = q_base
        kd = k_base
        vd = v_base
    q = _rows(qd, q_base, row0, NQ_TOK, sqn, BLOCK_M, BLOCK_D, TMA, True)

    crit = CRIT + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * KC
    # Critical blocks ascend, so only the last one can be the ragged last key block.
    last = tl.load(crit + tl.maximum(KC - 1, 0), mask=KC > 0, other=0)  # KC = 0: no block, o = 0
    n_main = KC - ((KC > 0) & ((last + 1) * BLOCK_N > NK_TOK)).to(tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # TMA: the next block's index is read one iteration ahead, into a register: no K / V load waits on
    # an index load of its own iteration, so the pipeliner gives K and V the whole ring (num_stages deep,
    # not one less as when the index load takes a pipeline stage of its own). Pointer loads keep the
    # index in the loop, where cp.async prefetches it (read ahead, it spilled on sm_89).
    nxt = tl.load(crit, mask=(KC > 0) & TMA, other=0)
    for c in range(0, n_main):  # loop: critical
        if TMA:
            col = nxt * BLOCK_N
            nxt = tl.load(crit + c + 1, mask=c + 1 < KC, other=0)
        else:
            col = tl.load(crit + c) * BLOCK_N
        k = _rows(kd, k_base, col, NK_TOK, skn, BLOCK_N, BLOCK_D, TMA, False)
        v = _rows(vd, v_base, col, NK_TOK, svn, BLOCK_N, BLOCK_D, TMA, False)
        acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, 0, False, "ieee")
    for c in range(n_main, KC):  # loop: ragged
        col = tl.load(crit + c) * BLOCK_N
        k = _rows(kd, k_base, col, NK_TOK, skn, BLOCK_N, BLOCK_D, TMA, True)
        v = _rows(vd, v_base, col, NK_TOK, svn, BLOCK_N, BLOCK_D, TMA, True)
        keep = (col + tl.arange(0, BLOCK_N) < NK_TOK)[None, :]
        acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, keep, True, "ieee")

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ_TOK
    qd_mask = m_ok[:, None] & (offs_d < D)[None, :]
    row = pid_bh.to(tl.int64) * NQ_TOK + offs_m  # rows of the contiguous (B, H, N, .) outputs
    empty = l_i == 0.0  # a row that saw no key: o = 0, lse = -inf (not 0/0)
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(O + row[:, None] * D + offs_d[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=qd_mask)
    tl.store(LSE + row, tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2), mask=m_ok)

    if HAS_LIN:
        # phi(q), phi(K_j) are taken here from the q and k tiles (fp32, rounded to the input dtype).
        DT = V.dtype.element_ty
        col_ok = (offs_d < D_REAL)[None, :]
        q_ok = m_ok[:, None] & col_ok
        q32 = q.to(tl.float32)
        qm, ql = phi_stats(q32, q_ok, feature)
        qf = phi(q32, q_ok, qm, ql, feature).to(DT)
        # Scores over a per-row s_i >= 1 (sum|phi(q_i)| max|phi(k)| / 2^15; KMAX is 0 for softmax features).
        inv_s = 1.0 / tl.maximum(tl.sum(tl.abs(qf.to(tl.float32)), 1) * (tl.load(KMAX + pid_bh) / 32768.0), 1.0)
        num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        # phi(K_j) is read, not made: the global-sums kernel stored every key's features (KF, contiguous
        # (B*H, NK_TOK, BLOCK_D), zero past the real columns), so the loop is three tensor-core products and
        # the row sums, with no exp per key element and no register-made operand to stage in shared memory.
        lin = LIN + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * NL
        kf_base = KF + pid_bh.to(tl.int64) * NK_TOK * BLOCK_D
        if TMA:  # rows past the slice arrive as zeros, as for K and V
            kfd = tl.make_tensor_descriptor(kf_base, [NK_TOK, BLOCK_D], [BLOCK_D, 1], [BLOCK_N, BLOCK_D])
        else:  # unused
            kfd = kf_base
        nxt = tl.load(lin, mask=(NL > 0) & TMA, other=0)  # TMA: read an iteration ahead, as above
        for c in range(0, NL):  # loop: linear
            if TMA:
                col = nxt * BLOCK_N
                nxt = tl.load(lin + c + 1, mask=c + 1 < NL, other=0)
            else:
                col = tl.load(lin + c) * BLOCK_N
            kf = _rows(kfd, kf_base, col, NK_TOK, BLOCK_D, BLOCK_N, BLOCK_D, TMA, True)
            v = _rows(vd, v_base, col, NK_TOK, svn, BLOCK_N, BLOCK_D, TMA, True)
            a = tl.dot(qf, tl.trans(kf), input_precision="ieee") * inv_s[:, None]
            num = _dot_split(a, v, num, DT, LIN_CHAIN)
            den += tl.sum(a, 1)
        s = lin_sign / inv_s
        # + the global sums phi(q) (phi(K)^T V) and phi(q) . sum(phi(K)) (zeros for the "direct" plan). KV
        # holds the fp32 D x D product over a power of two (so it fits fp16) as hi (rows 0..D) and lo
        # (rows D..2D) in q's dtype; the products add onto num in units of that power, KV_ROWS rows of
        # KV at a time (whole tiles spilled), with phi(q)'s columns recomputed from q's.
        kv_scale = tl.load(KV_SCALE + pid_bh)
        num = num * (s / kv_scale)[:, None]
        den = den * s
        kv_at = KV + pid_bh.to(tl.int64) * 2 * BLOCK_D * BLOCK_D
        ksum_at = KSUM + pid_bh.to(tl.int64) * BLOCK_D
        offs_c = tl.arange(0, KV_ROWS)
        q_at = q_base + offs_m.to(tl.int64)[:, None] * sqn
        for c0 in range(0, BLOCK_D, KV_ROWS):  # loop: global
            c_ok = m_ok[:, None] & (c0 + offs_c < D_REAL)[None, :]
            q_c = tl.load(q_at + (c0 + offs_c)[None, :], mask=c_ok, other=0.0).to(tl.float32)
            qf_c = phi(q_c, c_ok, qm, ql, feature).to(DT)
            kv_hi = tl.load(kv_at + (c0 + offs_c)[:, None] * BLOCK_D + offs_d[None, :])
            kv_lo = tl.load(kv_at + (BLOCK_D + c0 + offs_c)[:, None] * BLOCK_D + offs_d[None, :])
            num = tl.dot(qf_c, kv_lo, tl.dot(qf_c, kv_hi, num, input_precision="ieee"), input_precision="ieee")
            den += tl.sum(qf_c.to(tl.float32) * tl.load(ksum_at + c0 + offs_c)[None, :], 1)
        # O_l = num / (den + eps), in the input dtype: the caller's projection reads it as it is.
        o_l = num * (kv_scale / (den + lin_eps))[:, None]
        tl.store(OL + row[:, None] * D + offs_d[None, :], o_l.to(OL.dtype.element_ty), mask=qd_mask)
        tl.store(DEN + row, den, mask=m_ok)


@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, KF, DO, LSE2, DELTA, DNUM, DDEN, DSCALE, CRIT, LIN, DQ, DQF,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, KC, NL, SUB, sm_scale, qk_scale, lin_sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LIN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    own = pid_bh.to(tl.int64) * NQ_TOK * D  # this (batch, head) in the contiguous (B, H, N, D) tensors
    q = load_tile(q_base, q_base, b, h, row0, NQ_TOK, sqn, D, BLOCK_M, BLOCK_D, False, True, True)
    do = load_tile(DO + own, DO + own, b, h, row0, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ_TOK
    row = pid_bh.to(tl.int64) * NQ_TOK + offs_m
    lse = tl.load(LSE2 + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)

    crit = CRIT + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * KC
    last = tl.load(crit + tl.maximum(KC - 1, 0), mask=KC > 0, other=0)  # KC = 0: no block, o = 0
    n_main = KC - ((KC > 0) & ((last + 1) * BLOCK_N > NK_TOK)).to(tl.int32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c in range(0, n_main):  # loop: critical
        col = tl.load(crit + c) * BLOCK_N
        k = load_tile(k_base, k_base, b, h, col, NK_TOK, skn, D, BLOCK_N, BLOCK_D, False, False, True)
        v = load_tile(v_base, v_base, b, h, col, NK_TOK, svn, D, BLOCK_N, BLOCK_D, False, False, True)
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, 0, False, "ieee")
    for c in range(n_main, KC):  # loop: ragged
        col = tl.load(crit + c) * BLOCK_N
        k = load_tile(k_base, k_base, b, h, col, NK_TOK, skn, D, BLOCK_N, BLOCK_D, False, True, True)
        v = load_tile(v_base, v_base, b, h, col, NK_TOK, svn, D, BLOCK_N, BLOCK_D, False, True, True)
        keep = (col + tl.arange(0, BLOCK_N) < NK_TOK)[None, :]
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, keep, True, "ieee")
    qd_mask = m_ok[:, None] & (offs_d < D)[None, :]
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)

    if HAS_LIN:
        # dnum / dden arrive rescaled to O(1) per (batch, head); DSCALE undoes it at the end.
        dnum = load_tile(DNUM + own, DNUM + own, b, h, row0, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
        dden = tl.load(DDEN + row, mask=m_ok, other=0.0)
        tile = pid_bh.to(tl.int64) * NK_TOK * D
        dqf = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lin = LIN + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * NL
        for c in range(0, NL):  # loop: linear
            col = tl.load(lin + c) * BLOCK_N
            kf = load_tile(KF + tile, KF + tile, b, h, col, NK_TOK, D, D, BLOCK_N, BLOCK_D, False, True, True)
            v = load_tile(v_base, v_base, b, h, col, NK_TOK, svn, D, BLOCK_N, BLOCK_D, False, True, True)
            da = tl.dot(dnum, tl.trans(v), input_precision="ieee") + dden[:, None]
            dqf = _dot_split(da, kf, dqf, Q.dtype.element_ty, True)
        dqf = dqf * (lin_sign * tl.load(DSCALE + pid_bh))
        tl.store(DQF + row[:, None] * D + offs_d[None, :], dqf, mask=qd_mask)


@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, CRIT_T, CRIT_T_CNT, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, SUB, sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Softmax dK / dV of a key block over the query tiles that hold it as critical."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    col0 = pid_n * BLOCK_N
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)
    n_kb = tl.cdiv(NK_TOK, BLOCK_N)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    own_q = pid_bh.to(tl.int64) * NQ_TOK * D
    k = load_tile(k_base, k_base, b, h, col0, NK_TOK, skn, D, BLOCK_N, BLOCK_D, False, True, True)
    v = load_tile(v_base, v_base, b, h, col0, NK_TOK, svn, D, BLOCK_N, BLOCK_D, False, True, True)
    rows_at = pid_bh.to(tl.int64) * NQ_TOK
    offs_mb = tl.arange(0, BLOCK_M)
    list_at = pid_bh.to(tl.int64) * n_kb + pid_n

    # Query tiles of the query blocks holding this key block as critical, ascending: only the
    # last listed block can hold the ragged (or absent) last query tiles.
    cnt = tl.load(CRIT_T_CNT + list_at)
    crit = CRIT_T + list_at * n_qb
    last = tl.load(crit + tl.maximum(cnt - 1, 0))
    n_main = tl.minimum(cnt * SUB, tl.maximum((cnt - 1) * SUB + tl.maximum(NQ_TOK // BLOCK_M - last * SUB, 0), 0))
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c in range(0, n_main):  # loop: critical
        row = (tl.load(crit + c // SUB) * SUB + c % SUB) * BLOCK_M
        q = load_tile(q_base, q_base, b, h, row, NQ_TOK, sqn, D, BLOCK_M, BLOCK_D, False, False, True)
        do = load_tile(DO + own_q, DO + own_q, b, h, row, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, False, True)
        lse = tl.load(LSE2 + rows_at + row + offs_mb)
        delta = tl.load(DELTA + rows_at + row + offs_mb)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, "ieee")
    for c in range(n_main, cnt * SUB):  # loop: ragged (rows past NQ_TOK: lse = +inf, so P = 0)
        row = (tl.load(crit + c // SUB) * SUB + c % SUB) * BLOCK_M
        m_ok = row + offs_mb < NQ_TOK
        q = load_tile(q_base, q_base, b, h, row, NQ_TOK, sqn, D, BLOCK_M, BLOCK_D, False, True, True)
        do = load_tile(DO + own_q, DO + own_q, b, h, row, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
        lse = tl.load(LSE2 + rows_at + row + offs_mb, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + rows_at + row + offs_mb, mask=m_ok, other=0.0)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, "ieee")

    offs_k = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    krow = pid_bh.to(tl.int64) * NK_TOK + offs_k
    kv_mask = (offs_k < NK_TOK)[:, None] & (offs_d < D)[None, :]
    tl.store(DK + krow[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + krow[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _sla_bwd_dkdv_lin_kernel(
    V, QF, KF, DNUM, DDEN, DSCALE, INV_S, LIN_T, LIN_T_CNT, DV, DKF,
    svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, SUB, lin_sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Linear-branch dV (added to ``DV``, fp32) and d phi(K) of a key block, over the query tiles that
    add (marginal) or remove (critical, negligible) it. A kernel of its own: beside the softmax
    accumulators it spilled."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    col0 = pid_n * BLOCK_N
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)
    n_kb = tl.cdiv(NK_TOK, BLOCK_N)
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    own_q = pid_bh.to(tl.int64) * NQ_TOK * D
    own_k = pid_bh.to(tl.int64) * NK_TOK * D
    v = load_tile(v_base, v_base, b, h, col0, NK_TOK, svn, D, BLOCK_N, BLOCK_D, False, True, True)
    kf = load_tile(KF + own_k, KF + own_k, b, h, col0, NK_TOK, D, D, BLOCK_N, BLOCK_D, False, True, True)
    rows_at = pid_bh.to(tl.int64) * NQ_TOK
    offs_mb = tl.arange(0, BLOCK_M)
    list_at = pid_bh.to(tl.int64) * n_kb + pid_n
    cnt = tl.load(LIN_T_CNT + list_at)
    lin = LIN_T + list_at * n_qb
    # Two passes over the query tiles, one accumulator each: with both live the kernel spilled.
    # dnum_s = s * dnum, dden_s = s * dden (prepared by the launcher): a^T / s and
    # (V dnum_s^T + dden_s) / s keep every operand in range and give the exact products.
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c in range(0, cnt * SUB):  # loop: linear
        row = (tl.load(lin + c // SUB) * SUB + c % SUB) * BLOCK_M
        m_ok = row + offs_mb < NQ_TOK
        qf = load_tile(QF + own_q, QF + own_q, b, h, row, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
        dnum = load_tile(DNUM + own_q, DNUM + own_q, b, h, row, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
        inv_s = tl.load(INV_S + rows_at + row + offs_mb, mask=m_ok, other=1.0)
        at = tl.dot(kf, tl.trans(qf), input_precision="ieee") * inv_s[None, :]
        dv = _dot_split(at, dnum, dv, V.dtype.element_ty, False)
    dkf = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c in range(0, cnt * SUB):  # loop: linear_dkf
        row = (tl.load(lin + c // SUB) * SUB + c % SUB) * BLOCK_M
        m_ok = row + offs_mb < NQ_TOK
        qf = load_tile(QF + own_q, QF + own_q, b, h, row, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
        dnum = load_tile(DNUM + own_q, DNUM + own_q, b, h, row, NQ_TOK, D, D, BLOCK_M, BLOCK_D, False, True, True)
        dden = tl.load(DDEN + rows_at + row + offs_mb, mask=m_ok, other=0.0)
        inv_s = tl.load(INV_S + rows_at + row + offs_mb, mask=m_ok, other=1.0)
        dat = (tl.dot(v, tl.trans(dnum), input_precision="ieee") + dden[None, :]) * inv_s[None, :]
        dkf = _dot_split(dat, qf, dkf, V.dtype.element_ty, False)

    weight = lin_sign * tl.load(DSCALE + pid_bh)
    offs_k = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    krow = pid_bh.to(tl.int64) * NK_TOK + offs_k
    kv_mask = (offs_k < NK_TOK)[:, None] & (offs_d < D)[None, :]
    dv_ptrs = DV + krow[:, None] * D + offs_d[None, :]
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=kv_mask, other=0.0) + dv * weight, mask=kv_mask)
    tl.store(DKF + krow[:, None] * D + offs_d[None, :], dkf * weight, mask=kv_mask)


KERNELS = {"global": _sla_global_kernel, "fwd": _sla_fwd_kernel, "bwd_dq": _sla_bwd_dq_kernel,
           "bwd_dkdv": _sla_bwd_dkdv_kernel, "bwd_dkdv_lin": _sla_bwd_dkdv_lin_kernel}


# --------------------------------------------------------------------------- host wrappers
def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pad_d(block_d: int, *tensors: torch.Tensor):
    """The kernels read whole ``block_d`` columns: other head dims run on zero-padded copies (a zero
    column changes no score, no feature product and no output column)."""
    d = tensors[0].shape[-1]
    if d == block_d:
        return tensors
    return tuple(torch.nn.functional.pad(t, (0, block_d - d)) for t in tensors)


def _live(index: torch.Tensor) -> torch.Tensor:
    """An int32 block list as a kernel argument: an empty one becomes a live one-element allocation
    (empty tensors may carry a null address; the kernels read no entry of it)."""
    return index if index.numel() else index.new_zeros(1)


def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 80  # interpreter: any valid config works


def _launch(cfg: SLAKernelConfig, grid, *args):
    kw = _LAUNCH_KWARGS.get(cfg)
    if kw is None:
        kw = _LAUNCH_KWARGS[cfg] = cfg.launch_kwargs()  # (a handful of shipped configs: bounded)
    try:
        KERNELS[cfg.kernel][grid](*args, **kw)
    except OutOfResources as exc:
        raise ValueError(f"the fused SLA kernel {cfg.name} does not fit this GPU ({exc}); "
                         "use bfloat16/float16 inputs or backend='torch'") from None


_LAUNCH_KWARGS: Dict[SLAKernelConfig, dict] = {}


#: Key tiles per program of the global-sums kernel (1024 tokens): ``phi(K)^T V`` reduces 10^4-10^5 tokens into
#: ``D x D`` per head, which as one product per head gives a GPU too few programs; the chunks' partial sums
#: (a few per head, far smaller than the inputs) are added by the launcher.
GLOBAL_CHUNK_TILES = 16


@occupancy.on_inputs_device
def global_sums(k, v, feature: int, head_dim: int):
    """The linear branch's sums over all keys from the global-sums kernel (phi taken inside it): fp32
    ``phi(K)^T V`` ``(B*H, block_d, block_d)``, ``sum(phi(K))`` ``(B*H, block_d)`` and ``max|phi(K)|``
    ``(B*H,)``, zero in padded columns. ``k``, ``v``: the launcher's inputs, zero-padded to ``block_d``
    columns from ``head_dim``."""
    kv, ksum, kmax, _ = _global_partials(k, v, feature, head_dim)
    kv, ksum = chunk_totals(kv, ksum)
    return kv, ksum, kmax[:, 0] if kmax.shape[1] == 1 else kmax.amax(1)  # (the largest over the chunks)


def _global_partials(k, v, feature: int, head_dim: int, launch=None):
    """The global-sums kernel's fp32 partial sums per chunk of :data:`GLOBAL_CHUNK_TILES` key tiles:
    ``phi(K)^T V`` ``(B*H, C, block_d, block_d)``, ``sum(phi(K))`` ``(B*H, C, block_d)``, ``max|phi(K)|``
    ``(B*H, C)``, and the features ``phi(K)`` in k's dtype, contiguous ``(B*H, Nk, block_d)`` (what the
    forward's linear loop reads). ``launch``: :func:`_global_launch` of these arguments, when the caller has it."""
    b, h, nk, block_d = k.shape
    cfg, grid, tail = launch or _global_launch(k, v, feature, head_dim)
    n_chunks = grid[0]
    kv = torch.empty((b * h, n_chunks, block_d, block_d), dtype=torch.float32, device=k.device)
    ksum = torch.empty((b * h, n_chunks, block_d), dtype=torch.float32, device=k.device)
    kmax = torch.empty((b * h, n_chunks), dtype=torch.float32, device=k.device)
    kf = torch.empty((b * h, nk, block_d), dtype=k.dtype, device=k.device)
    _launch(cfg, grid, k, v, kf, kv, ksum, kmax, *tail)
    return kv, ksum, kmax, kf


def _global_launch(k, v, feature: int, head_dim: int):
    """``(cfg, grid, arguments after the tensors)`` of the global-sums kernel for these (padded) k, v."""
    b, h, nk, block_d = k.shape
    cfg = select_sla_config("global", k.dtype, block_d, True, _arch(k.device))
    n_chunks = _cdiv(_cdiv(nk, BLOCK_K), GLOBAL_CHUNK_TILES)
    tail = (*_strides(k), *_strides(v), h, nk, head_dim, GLOBAL_CHUNK_TILES, feature)
    return cfg, (n_chunks, b * h, block_d // GLOBAL_COLUMNS), tail


def _global_operands(kv, ksum, bh: int, block_d: int, dtype: torch.dtype, device):
    """The forward's global-sum operands from fp32 ``kv`` ``(B*H, block_d, block_d)`` and ``ksum``
    ``(B*H, block_d)`` (zeros when None): ``kv`` over a power of two per (batch, head), split hi / lo in
    ``dtype`` (``(B*H, 2*block_d, block_d)``), the powers ``(B*H,)`` and ``ksum``, fp32. The PyTorch twin of
    :func:`~.operands.global_operands` (one launch), which the forward uses."""
    if kv is None:
        return (torch.zeros((bh, 2 * block_d, block_d), dtype=dtype, device=device),
                torch.ones(bh, dtype=torch.float32, device=device),
                torch.zeros((bh, block_d), dtype=torch.float32, device=device))
    peak = kv.abs().amax((-1, -2))
    # A power of two: exact to divide by and multiply back; kv / 2^p stays within 2^14 (fp16's max is 65504).
    power = torch.exp2(torch.ceil(torch.log2(peak)) - 14).where(peak > 0, torch.ones_like(peak))
    kv = kv / power[:, None, None]
    hi = kv.to(dtype)
    lo = (kv - hi.float()).to(dtype)
    return torch.cat([hi, lo], 1), power, ksum.contiguous()


@occupancy.on_inputs_device
def sla_forward(q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, with_global, lin_eps, block_q,
                empties: bool = True):
    """Launch the fused forward (and, for the linear branch, the global-sums kernel first: it stores phi(K),
    which the forward's linear loop reads). Returns
    ``(o, lse, o_l, den)``: ``o`` the sparse branch and ``o_l = num / (den + lin_eps)`` the linear branch,
    both in q's dtype, contiguous ``(B, H, Nq, D)``; ``den`` fp32 ``(B, H, Nq)`` (o_l and den empty
    without the linear branch).

    phi (``feature``: :data:`FEATURE_IDS`) is taken inside the kernels; ``lin_blocks`` ``[B, H, nQ, L]``:
    key blocks whose linear terms are added (``lin_sign = 1``) or removed (``-1``); ``with_global``: the
    global sums ``phi(K)^T V``, ``sum(phi(K))`` over all keys are added to every row's num and den;
    ``critical`` ``[B, H, nQ, kc]`` ascending. ``empties=False`` (eager calls outside the custom op): None
    instead of the two empty tensors without the linear branch.

    The configuration, grids, strides and scalar arguments are built once per call signature
    (:data:`_FWD_LAUNCHES`); a repeated call allocates its outputs and launches.
    """
    b, h, nq, d = q.shape
    dev = q.device
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, dev, _arch(dev), critical.shape,
           lin_blocks.shape, scale, feature, has_lin, lin_sign, with_global, lin_eps, block_q)
    launch = bounded_get(_FWD_LAUNCHES, key, lambda: _forward_launch(q, k, v, critical, lin_blocks, scale, feature,
                                                                     has_lin, lin_sign, lin_eps, block_q),
                         _MAX_LAUNCHES)
    cfg, dp, prepare, grid, tail, glob = launch
    if prepare:  # a last dim that is not contiguous, or a head dim the kernel pads
        q, k, v = _pad_d(dp, *(_last_dim_contiguous(t) for t in (q, k, v)))
    if cfg.tma and not tma_ok(q, k, v):  # TMA needs 16-byte aligned bases (the strides are in the key)
        cfg = pointer_fallback(cfg)
    if cfg.tma:  # the kernel makes its descriptors in global scratch
        ensure_allocator(dev)
    o = torch.empty((b, h, nq, dp), dtype=q.dtype, device=dev)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=dev)
    if has_lin:
        # The global kernel makes the features phi(K) the linear loop reads; unnormalised ones (elu, relu) need
        # its max|phi(K)| for the row scale, and the "subtract" and "all" plans its sums.
        with_kmax = _FEATURE_NAMES[feature] != "softmax"
        kv_p, ksum_p, kmax_p, kf = _global_partials(k, v, feature, d, glob)
        kv, kv_scale, ksum, kmax = global_operands(kv_p, ksum_p, kmax_p, kv_p.shape[1], with_global, with_kmax,
                                                   b * h, dp, q.dtype, dev)
        o_l = torch.empty((b, h, nq, dp), dtype=q.dtype, device=dev)
        den = torch.empty((b, h, nq), dtype=torch.float32, device=dev)
    else:  # unused pointers get a live allocation: empty tensors may carry a null address
        kv = kf = q
        kv_scale = ksum = kmax = o_l = den = lse
    # An empty list is never read: any live address will do (critical has at least one entry per row).
    _launch(cfg, grid, q, k, v, kf, critical, lin_blocks if lin_blocks.numel() else critical, kv, kv_scale, ksum, kmax,
            o, lse, o_l, den, *tail)
    if not has_lin:  # two distinct empties: a custom op's outputs may not alias
        o_l = torch.empty(0, dtype=q.dtype, device=dev) if empties else None
        den = torch.empty(0, dtype=torch.float32, device=dev) if empties else None
    elif dp != d:
        o_l = o_l[..., :d].contiguous()
    return selfcheck.corrupt("sla.triton.fwd", o if dp == d else o[..., :d].contiguous()), lse, o_l, den


def _forward_launch(q, k, v, critical, lin_blocks, scale, feature, has_lin, lin_sign, lin_eps, block_q):
    """``(cfg, padded head dim, prepare, grid, launch arguments after the tensors, global-sums launch or None)``
    of a forward: what depends only on the call signature (:data:`_FWD_LAUNCHES`)."""
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    cfg = select_sla_config("fwd", q.dtype, d, has_lin, _arch(q.device))
    dp = cfg.block_d
    prepare = dp != d or any(t.stride(-1) != 1 for t in (q, k, v))
    if prepare:  # the strides of the prepared copies (the same on every call with these inputs' strides)
        q, k, v = _pad_d(dp, *(_last_dim_contiguous(t) for t in (q, k, v)))
    tail = (*_strides(q), *_strides(k), *_strides(v), h, nq, nk, dp, d, critical.shape[-1], lin_blocks.shape[-1],
            block_q // BLOCK_M, scale * _LOG2E, float(lin_sign), feature, float(lin_eps))
    glob = _global_launch(k, v, feature, d) if has_lin else None
    return cfg, dp, prepare, (_cdiv(nq, BLOCK_M), b * h), tail, glob


#: Forward launch plans per call signature (q, k, v, block-list shapes and strides, dtype, device, arch and the
#: scalar arguments): a repeated call allocates its outputs and launches. Bounded; plain values only.
_FWD_LAUNCHES: Dict[tuple, tuple] = {}
_MAX_LAUNCHES = 1024
