"""The block-sparse backward's two-pass kernels (launched by :func:`.triton.triton_backward`).

- ``_bwd_dkdv_kernel``: grid ``(key tiles, B*H)``, walks the *transposed* plan (only the query tiles that visit this
  key tile) and recomputes ``P`` from the saved log-sum-exp (base 2) and ``delta = rowsum(dO * O)`` that the
  preprocess wrote; dK and dV are accumulated in registers and stored once.
- ``_bwd_dq_kernel``: grid ``(query tiles, B*H)`` over the forward plan; dQ accumulated in registers.

Both own their outputs (no atomics). The tile steps are the dense kernel's (:mod:`dit_accel.kernels.dense.tiles`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..dense.tiles import dkdv_step, dq_step, load_tile, row_bits

__all__ = ["_bwd_dkdv_kernel", "_bwd_dq_kernel"]


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, PLAN, BITS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    plan_h, plan_r, w, bits_w,
    H, q_len, kv_len, head_dim, sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    k = load_tile(k_base, k_base, b, h, col0, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, False, True, EVEN_D)
    v = load_tile(v_base, v_base, b, h, col0, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, False, True, EVEN_D)
    rows_at = pid_bh.to(tl.int64) * q_len  # LSE2 / DELTA rows of this (batch, head)
    offs_m = tl.arange(0, BLOCK_M)

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
        q = load_tile(Q, q_base, b, h, row, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, TMA, False, EVEN_D)
        do = load_tile(DO, do_base, b, h, row, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, TMA, False, EVEN_D)
        lse = tl.load(LSE2 + rows_at + row + offs_m)
        delta = tl.load(DELTA + rows_at + row + offs_m)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, DOT_PRECISION)
    keys = tl.arange(0, BLOCK_N)
    nxt = tl.load(part, mask=n_part > 0, other=0)
    nxt_bits = tl.load(bits, mask=n_part > 0, other=0)
    for i in range(0, n_part):  # loop: partial
        row = nxt * BLOCK_M
        keep = row_bits(BITS, nxt_bits, keys, bits_w, BLOCK_M)
        nxt = tl.load(part + i + 1, mask=i + 1 < n_part, other=0)
        nxt_bits = tl.load(bits + i + 1, mask=i + 1 < n_part, other=0)
        q = load_tile(Q, q_base, b, h, row, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        do = load_tile(DO, do_base, b, h, row, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        m_ok = row + offs_m < q_len  # rows past q_len: lse = +inf, so P = 0
        lse = tl.load(LSE2 + rows_at + row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + rows_at + row + offs_m, mask=m_ok, other=0.0)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, keep, True, DOT_PRECISION)

    offs_n = col0 + keys
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n < kv_len)[:, None] & (offs_d < head_dim)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    # dK / dV are allocated like K / V: same strides.
    dk_ptrs = DK + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rows * skn + offs_d[None, :]
    dv_ptrs = DV + b.to(tl.int64) * svb + h.to(tl.int64) * svh + rows * svn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, PLAN, BITS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    plan_h, plan_r, w, bits_w,
    H, q_len, kv_len, head_dim, sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    q = load_tile(q_base, q_base, b, h, row0, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    do = load_tile(do_base, do_base, b, h, row0, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    rows = tl.arange(0, BLOCK_M)
    offs_m = row0 + rows
    m_ok = offs_m < q_len
    lse = tl.load(LSE2 + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=0.0)

    plan = PLAN + h.to(tl.int64) * plan_h + pid_m.to(tl.int64) * plan_r
    n_full = tl.load(plan)
    n_part = tl.load(plan + 1)
    full = plan + 2
    part = full + n_full
    bits = full + w + n_full  # the partial tiles' bit offsets
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_full):  # loop: full
        col = tl.load(full + i) * BLOCK_N
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, 0, False, DOT_PRECISION)
    for i in range(0, n_part):  # loop: partial
        col = tl.load(part + i) * BLOCK_N
        keep = row_bits(BITS, tl.load(bits + i), rows, bits_w, BLOCK_N)
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, keep, True, DOT_PRECISION)

    offs_d = tl.arange(0, BLOCK_D)
    mask = m_ok[:, None] & (offs_d < head_dim)[None, :]
    dq_ptrs = DQ + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)  # dQ is allocated like Q
