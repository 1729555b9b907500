"""The block-sparse backward's two-pass kernels (launched by :func:`.triton.triton_backward`).

- ``_bwd_dkdv_kernel``: grid ``(key tiles, B*H)``, walks the *transposed* plan (only the query tiles that visit this
  key tile) and recomputes ``P`` from the saved log-sum-exp (base 2) and ``delta = rowsum(dO * O)`` that the
  preprocess wrote; dK and dV are accumulated in registers and stored once.
- ``_bwd_dq_kernel``: grid ``(query tiles, B*H)`` over the forward plan; dQ accumulated in registers.

Both own their outputs (no atomics). The tile steps are the dense kernel's (:mod:`dit_accel.kernels.dense.tiles`).

``GATHER`` (pointer loads): q, k, v, dO and the gradients are in raster order and every tile is read and written
through the row table ``RIDX`` (the raster token of each tiled position, -1 at padding; :mod:`.gather`), as the
gathered forward does; ``LSE2`` and ``DELTA`` stay in tiled order (the preprocess reads through the table too,
writing +inf and 0 at padding). A padded or out-of-range query row loads zeros with an lse of +inf (P = 0: it adds
nothing), a padded key row zeros (no query sees one: :func:`.gather.padding_unseen`); nothing is stored at either.
``ADD_Q`` / ``ADD_K`` / ``ADD_V`` (with ``GATHER``, VSA's training calls, :mod:`dit_accel.kernels.vsa.raster`): each
stored gradient row also takes its cube's row of ``ADDQ`` / ``ADDK`` / ``ADDV`` (each cube mean's gradient over the
cube's size, fp32), before the one rounding: the spread that was a pass of its own over each gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..dense.tiles import dkdv_step, dq_step, row_bits
from .gather_tiles import _raster_rows, load_kv

__all__ = ["_bwd_dkdv_kernel", "_bwd_dq_kernel"]


@triton.jit
def _query_rows(Q, DO, q_base, do_base, LSE2, DELTA, rows_at, b, h, row, q_len, sqn, sdn, head_dim, RIDX,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, ROW_MASK: tl.constexpr,
                EVEN_D: tl.constexpr, GATHER: tl.constexpr):
    """Q, dO, lse (base 2) and delta of the query tile at position ``row``: rows past ``q_len`` (``ROW_MASK``) give
    zeros, lse +inf and delta 0 (P = 0); with ``GATHER`` Q and dO read at the raster rows the row table names
    (always masked: a padded row reads nothing, and its lse, the preprocess's, is +inf)."""
    # (a pair of row tiles read as K and V are; gathered query rows always row-masked: padding can sit in a full tile)
    q, do = load_kv(Q, DO, q_base, do_base, b, h, row, q_len, sqn, sdn, head_dim, RIDX, BLOCK_M, BLOCK_D, TMA,
                    ROW_MASK or GATHER, EVEN_D, GATHER)
    offs_m = row + tl.arange(0, BLOCK_M)  # (LSE2 / DELTA by tiled position either way: the preprocess's order)
    if ROW_MASK:
        m_ok = offs_m < q_len  # rows past q_len: lse = +inf, so P = 0
        lse = tl.load(LSE2 + rows_at + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + rows_at + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(LSE2 + rows_at + offs_m)
        delta = tl.load(DELTA + rows_at + offs_m)
    return q, do, lse, delta


@triton.jit
def _store_rows(X, b, h, sxb, sxh, sxn, row0, n_rows, x, head_dim, RIDX, ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, GATHER: tl.constexpr, ADD=None, sab=0, sah=0, sac=0, cube_vol=1,
                ADDED: tl.constexpr = False):
    """``x`` ``[ROWS, BLOCK_D]`` at the rows ``row0 ..`` of one (batch, head) slice of ``X`` (those before
    ``n_rows``), or with ``GATHER`` at the raster rows the row table names. ``ADDED`` (VSA's cube means' gradient
    spread over their tokens, the positions in cube order, ``cube_vol`` to a cube, which the tile's rows divide: the
    layout's blocks are the cubes): the tile's cube row of the fp32 ``ADD`` (strides ``sab, sah, sac``) is added to
    every row before the one rounding."""
    offs_d = tl.arange(0, BLOCK_D)
    if GATHER:
        rows = _raster_rows(RIDX, row0, n_rows, ROWS)
        ok = rows >= 0
    else:
        rows = row0 + tl.arange(0, ROWS)
        ok = rows < n_rows
    cols = ok[:, None] & (offs_d < head_dim)[None, :]
    if ADDED:
        x += tl.load(ADD + b.to(tl.int64) * sab + h.to(tl.int64) * sah + (row0 // cube_vol).to(tl.int64) * sac
                     + offs_d, mask=offs_d < head_dim, other=0.0)[None, :]
    ptrs = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + rows.to(tl.int64)[:, None] * sxn + offs_d[None, :]
    tl.store(ptrs, x.to(X.dtype.element_ty), mask=cols)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, PLAN, BITS, RIDX,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    plan_h, plan_r, w, bits_w,
    H, q_len, kv_len, head_dim, sm_scale, qk_scale, ADDK, ADDV, sab, sah, sac, cube_vol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, GATHER: tl.constexpr = False, ADD_K: tl.constexpr = False,
    ADD_V: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    col0 = pid_n * BLOCK_N
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if TMA:  # Q, dO are tensor descriptors; the bases are unused
        q_base = k_base
        do_base = k_base
    else:
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    k, v = load_kv(k_base, v_base, k_base, v_base, b, h, col0, kv_len, skn, svn, head_dim, RIDX, BLOCK_N, BLOCK_D,
                   False, True, EVEN_D, GATHER)  # (the owned key tile: row-masked, pointer loads)
    rows_at = pid_bh.to(tl.int64) * q_len  # LSE2 / DELTA rows of this (batch, head)

    plan = PLAN + h.to(tl.int64) * plan_h + pid_n.to(tl.int64) * plan_r
    n_full = tl.load(plan)
    n_part = tl.load(plan + 1)
    full = plan + 2
    part = full + n_full
    bits = full + w + n_full  # the partial tiles' bit offsets
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The next query tile's index (and bit offset) is loaded one iteration ahead, so an iteration's
    # loads of Q, dO, lse and delta never wait on the load of its index. With num_stages >= 2
    # Triton's pipeliner does this itself; with 1 stage nothing else would.
    nxt = tl.load(full, mask=n_full > 0, other=0)
    for i in range(0, n_full):  # loop: full
        row = nxt * BLOCK_M
        nxt = tl.load(full + i + 1, mask=i + 1 < n_full, other=0)
        q, do, lse, delta = _query_rows(Q, DO, q_base, do_base, LSE2, DELTA, rows_at, b, h, row, q_len, sqn, sdn,
                                        head_dim, RIDX, BLOCK_M, BLOCK_D, TMA, False, EVEN_D, GATHER)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, DOT_PRECISION)
    keys = tl.arange(0, BLOCK_N)
    nxt = tl.load(part, mask=n_part > 0, other=0)
    nxt_bits = tl.load(bits, mask=n_part > 0, other=0)
    for i in range(0, n_part):  # loop: partial
        row = nxt * BLOCK_M
        keep = row_bits(BITS, nxt_bits, keys, bits_w, BLOCK_M)
        nxt = tl.load(part + i + 1, mask=i + 1 < n_part, other=0)
        nxt_bits = tl.load(bits + i + 1, mask=i + 1 < n_part, other=0)
        q, do, lse, delta = _query_rows(Q, DO, q_base, do_base, LSE2, DELTA, rows_at, b, h, row, q_len, sqn, sdn,
                                        head_dim, RIDX, BLOCK_M, BLOCK_D, TMA, True, EVEN_D, GATHER)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, keep, True, DOT_PRECISION)
    # dK / dV are allocated like K / V: same strides.
    _store_rows(DK, b, h, skb, skh, skn, col0, kv_len, dk * sm_scale, head_dim, RIDX, BLOCK_N, BLOCK_D, GATHER,
                ADDK, sab, sah, sac, cube_vol, ADD_K)
    _store_rows(DV, b, h, svb, svh, svn, col0, kv_len, dv, head_dim, RIDX, BLOCK_N, BLOCK_D, GATHER,
                ADDV, sab, sah, sac, cube_vol, ADD_V)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, PLAN, BITS, RIDX,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    plan_h, plan_r, w, bits_w,
    H, q_len, kv_len, head_dim, sm_scale, qk_scale, ADDQ, sab, sah, sac, cube_vol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, GATHER: tl.constexpr = False, ADD_Q: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    if TMA:  # K, V are tensor descriptors; the bases are unused
        k_base = q_base
        v_base = q_base
    else:
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q, do, lse, delta = _query_rows(q_base, do_base, q_base, do_base, LSE2, DELTA, pid_bh.to(tl.int64) * q_len, b, h,
                                    row0, q_len, sqn, sdn, head_dim, RIDX, BLOCK_M, BLOCK_D, False, True, EVEN_D,
                                    GATHER)
    rows = tl.arange(0, BLOCK_M)

    plan = PLAN + h.to(tl.int64) * plan_h + pid_m.to(tl.int64) * plan_r
    n_full = tl.load(plan)
    n_part = tl.load(plan + 1)
    full = plan + 2
    part = full + n_full
    bits = full + w + n_full  # the partial tiles' bit offsets
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_full):  # loop: full
        col = tl.load(full + i) * BLOCK_N
        k, v = load_kv(K, V, k_base, v_base, b, h, col, kv_len, skn, svn, head_dim, RIDX, BLOCK_N, BLOCK_D, TMA,
                       False, EVEN_D, GATHER)
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, 0, False, DOT_PRECISION)
    for i in range(0, n_part):  # loop: partial
        col = tl.load(part + i) * BLOCK_N
        keep = row_bits(BITS, tl.load(bits + i), rows, bits_w, BLOCK_N)
        k, v = load_kv(K, V, k_base, v_base, b, h, col, kv_len, skn, svn, head_dim, RIDX, BLOCK_N, BLOCK_D, TMA,
                       True, EVEN_D, GATHER)
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, keep, True, DOT_PRECISION)
    _store_rows(DQ, b, h, sqb, sqh, sqn, row0, q_len, dq * sm_scale, head_dim, RIDX, BLOCK_M, BLOCK_D,
                GATHER, ADDQ, sab, sah, sac, cube_vol, ADD_Q)  # dQ is allocated like Q
