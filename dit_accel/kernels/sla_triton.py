"""Fused Triton kernels of SLA (sparse-linear attention), forward and backward.

One program per query block (forward, dQ) or key block (dK/dV). The forward pass loads each
critical key block once and uses it twice: the online-softmax update of the sparse branch
and, when the marginal sums are taken by subtraction, the removal of that block from the
linear branch (``num -= (phi(q) phi(K_j)^T) V_j``, ``den -= rowsum(phi(q) phi(K_j)^T)``).
A second, optional list of key blocks adds (``+1``) or removes (``-1``) linear-attention
terms only: the negligible blocks (subtracted) or the marginal blocks (added directly, when
there are fewer of them than critical + negligible ones).

The kernels return the linear branch's *corrections* ``num_c`` / ``den_c``; the caller adds
the global term ``phi(q) @ (phi(K)^T V)`` (a dense matmul, cuBLAS-fast, and autograd-native
so its backward needs no kernel) and divides. Backward: a dQ kernel (over the critical and
linear lists of a query block) and a dK/dV kernel (over the transposed lists of a key block),
both recomputing ``phi`` in-kernel. Pointer arithmetic only (no block pointers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .sla import true_columns

__all__ = ["sla_forward", "sla_backward", "FEATURE_IDS", "launch_config", "transposed_lists"]

FEATURE_IDS = {"softmax": 0, "elu": 1, "relu": 2}
BLOCK_K = 64


def launch_config(block_q: int, head_dim: int, dtype: torch.dtype, kernel: str = "fwd") -> dict:
    """Compile-time tile sizes and launch options shared by the kernels and the AOT checks.

    ``kernel`` is ``"fwd"``, ``"bwd_dq"`` or ``"bwd_dkdv"``. Tiles are 64 query rows; a 128-row
    classification block is two tiles (SUB = 2). The dK/dV kernel holds the most operands, so it
    runs unpipelined (one stage: 96 KiB at D = 128 in half precision, within sm_89's 99 KiB; two
    stages need 104.5 KiB). The linear branch's dots run in the input dtype (its gradients are
    rescaled per head so fp16 does not underflow).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = dtype == torch.float32
    return {"BLOCK_M": 64, "SUB": block_q // 64, "BLOCK_N": BLOCK_K, "BLOCK_D": block_d,
            "LIN_FP32": fp32, "num_warps": 4, "num_stages": 1 if fp32 or kernel == "bwd_dkdv" else 2}


@triton.jit
def _lin(x, ref, LIN_FP32: tl.constexpr):
    """Cast a linear-branch dot operand to the linear branch's compute dtype."""
    if LIN_FP32:
        y = x.to(tl.float32)
    else:
        y = x.to(ref.dtype)
    return y


@triton.jit
def _phi(x, d_valid, FEATURE: tl.constexpr):
    """Feature map on rows of x (fp32), over the head dim; padded head-dim columns give 0."""
    if FEATURE == 0:
        xm = tl.where(d_valid[None, :], x, float("-inf"))
        e = tl.exp(xm - tl.max(xm, 1)[:, None])
        f = e / tl.sum(e, 1)[:, None]
    elif FEATURE == 1:
        f = tl.where(d_valid[None, :], tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
    else:
        f = tl.maximum(x, 0.0)
    return f


@triton.jit
def _phi_bwd(x, f, g, d_valid, FEATURE: tl.constexpr):
    """Gradient of _phi at x (f = phi(x)) for the upstream gradient g."""
    if FEATURE == 0:
        dx = f * (g - tl.sum(f * g, 1)[:, None])
    elif FEATURE == 1:
        dx = tl.where(d_valid[None, :], g * tl.where(x > 0, 1.0, tl.exp(x)), 0.0)
    else:
        dx = tl.where(x > 0, g, 0.0)
    return dx


@triton.jit
def _sla_fwd_kernel(
    Q, K, V, CRIT, LIN, O, LSE, NUM, DEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, KC, NL, scale,
    BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr, HAS_LIN: tl.constexpr, SUB_CRIT: tl.constexpr, LIN_SIGN: tl.constexpr,
    LIN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)  # classification blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < NQ_TOK
    d_valid = offs_d < D
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    if HAS_LIN:
        qf = _lin(tl.where(m_valid[:, None], _phi(q.to(tl.float32), d_valid, FEATURE), 0.0), q, LIN_FP32)

    crit_row = CRIT + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * KC
    for c in range(KC):
        j = tl.load(crit_row + c)
        offs_k = j * BLOCK_N + offs_n
        k_valid = offs_k < NK_TOK
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if HAS_LIN:
            if SUB_CRIT:  # the same K/V tile leaves the linear branch's global sums
                kf = _lin(tl.where(k_valid[:, None], _phi(k.to(tl.float32), d_valid, FEATURE), 0.0), q, LIN_FP32)
                a = tl.dot(qf, tl.trans(kf))
                num -= tl.dot(_lin(a, q, LIN_FP32), _lin(v, q, LIN_FP32))
                den -= tl.sum(a, 1)

    o = acc / l_i[:, None]
    row = pid_bh.to(tl.int64) * NQ_TOK + offs_m
    tl.store(O + row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + row, m_i + tl.log(l_i), mask=m_valid)

    if HAS_LIN:
        lin_row = LIN + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * NL
        for c in range(NL):
            j = tl.load(lin_row + c)
            offs_k = j * BLOCK_N + offs_n
            k_valid = offs_k < NK_TOK
            kv_mask = k_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            kf = _lin(tl.where(k_valid[:, None], _phi(k.to(tl.float32), d_valid, FEATURE), 0.0), q, LIN_FP32)
            a = tl.dot(qf, tl.trans(kf))
            num += LIN_SIGN * tl.dot(_lin(a, q, LIN_FP32), _lin(v, q, LIN_FP32))
            den += LIN_SIGN * tl.sum(a, 1)
        tl.store(NUM + row[:, None] * D + offs_d[None, :], num, mask=m_valid[:, None] & d_valid[None, :])
        tl.store(DEN + row, den, mask=m_valid)


@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DNUM, DDEN, DSCALE, CRIT, LIN, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, KC, NL, scale,
    BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr, HAS_LIN: tl.constexpr, SUB_CRIT: tl.constexpr, LIN_SIGN: tl.constexpr,
    LIN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)  # classification blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < NQ_TOK
    d_valid = offs_d < D
    qd_mask = m_valid[:, None] & d_valid[None, :]
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=qd_mask, other=0.0)
    row = pid_bh.to(tl.int64) * NQ_TOK + offs_m
    do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + row, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dqf = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_LIN:
        qf = tl.where(m_valid[:, None], _phi(q.to(tl.float32), d_valid, FEATURE), 0.0)
        dnum = _lin(tl.load(DNUM + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0), q, LIN_FP32)
        dden = tl.load(DDEN + row, mask=m_valid, other=0.0)

    crit_row = CRIT + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * KC
    for c in range(KC):
        j = tl.load(crit_row + c)
        offs_k = j * BLOCK_N + offs_n
        k_valid = offs_k < NK_TOK
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(k_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if HAS_LIN:
            if SUB_CRIT:
                kf = _lin(tl.where(k_valid[:, None], _phi(k.to(tl.float32), d_valid, FEATURE), 0.0), q, LIN_FP32)
                da = tl.dot(dnum, tl.trans(_lin(v, q, LIN_FP32))) + dden[:, None]
                dqf -= tl.dot(_lin(da, q, LIN_FP32), kf)
    dq = dq * scale

    if HAS_LIN:
        lin_row = LIN + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * NL
        for c in range(NL):
            j = tl.load(lin_row + c)
            offs_k = j * BLOCK_N + offs_n
            k_valid = offs_k < NK_TOK
            kv_mask = k_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            kf = _lin(tl.where(k_valid[:, None], _phi(k.to(tl.float32), d_valid, FEATURE), 0.0), q, LIN_FP32)
            da = tl.dot(dnum, tl.trans(_lin(v, q, LIN_FP32))) + dden[:, None]
            dqf += LIN_SIGN * tl.dot(_lin(da, q, LIN_FP32), kf)
        dqf = dqf * tl.load(DSCALE + pid_bh)  # undo the per-head rescaling of dnum / dden
        dq += _phi_bwd(q.to(tl.float32), qf, dqf, d_valid, FEATURE)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_tile(q_base, sqn, DO, LSE, DELTA, DNUM, DDEN, row_base, offs_m, k, v, kf, dk, dv, dkf,
               NQ_TOK, D, scale, lin_scale, offs_d, d_valid, k_valid,
               SOFTMAX: tl.constexpr, LIN: tl.constexpr, SIGN: tl.constexpr, FEATURE: tl.constexpr,
               LIN_FP32: tl.constexpr):
    """One query tile's contribution to a key block: softmax part (dk unscaled) and/or linear part."""
    m_valid = offs_m < NQ_TOK
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
    rows = row_base + offs_m
    if SOFTMAX:
        do = tl.load(DO + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + rows, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + rows, mask=m_valid, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(m_valid[:, None] & k_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    if LIN:
        qf = _lin(tl.where(m_valid[:, None], _phi(q.to(tl.float32), d_valid, FEATURE), 0.0), q, LIN_FP32)
        dnum = _lin(tl.load(DNUM + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0), q, LIN_FP32)
        dden = tl.load(DDEN + rows, mask=m_valid, other=0.0)
        a = tl.dot(qf, tl.trans(kf))
        dv += (SIGN * lin_scale) * tl.dot(tl.trans(_lin(a, q, LIN_FP32)), dnum)
        da = tl.dot(dnum, tl.trans(_lin(v, q, LIN_FP32))) + dden[:, None]
        dkf += SIGN * tl.dot(tl.trans(_lin(da, q, LIN_FP32)), qf)
    return dk, dv, dkf


@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DNUM, DDEN, DSCALE, CRIT_T, CRIT_T_CNT, LIN_T, LIN_T_CNT, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, scale,
    BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr, HAS_LIN: tl.constexpr, SUB_CRIT: tl.constexpr, LIN_SIGN: tl.constexpr,
    LIN_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)  # classification blocks
    n_kb = tl.cdiv(NK_TOK, BLOCK_N)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_valid = offs_k < NK_TOK
    d_valid = offs_d < D
    kv_mask = k_valid[:, None] & d_valid[None, :]
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_k[:, None] * skn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_k[:, None] * svn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkf = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    kf32 = tl.where(k_valid[:, None], _phi(k.to(tl.float32), d_valid, FEATURE), 0.0)
    kf = _lin(kf32, k, LIN_FP32)
    row_base = pid_bh.to(tl.int64) * NQ_TOK
    list_at = pid_bh.to(tl.int64) * n_kb + pid_n
    lin_scale = tl.load(DSCALE + pid_bh)

    # Query blocks that hold this key block as critical: softmax gradient (+ linear removal).
    # One loop over (listed query block, sub-tile) pairs: unrolled sub-tiles would hold twice the buffers.
    cnt = tl.load(CRIT_T_CNT + list_at)
    for c in range(cnt * SUB):
        i = tl.load(CRIT_T + list_at * n_qb + c // SUB)
        dk, dv, dkf = _dkdv_tile(q_base, sqn, DO, LSE, DELTA, DNUM, DDEN, row_base,
                                 (i * SUB + c % SUB) * BLOCK_M + offs_mb, k, v, kf, dk, dv, dkf,
                                 NQ_TOK, D, scale, lin_scale, offs_d, d_valid, k_valid,
                                 True, HAS_LIN and SUB_CRIT, -1, FEATURE, LIN_FP32)
    # Softmax dk was accumulated unscaled; the linear dkf is kept apart until the phi backward.
    dk = dk * scale
    if HAS_LIN:
        cnt = tl.load(LIN_T_CNT + list_at)
        for c in range(cnt * SUB):
            i = tl.load(LIN_T + list_at * n_qb + c // SUB)
            dk, dv, dkf = _dkdv_tile(q_base, sqn, DO, LSE, DELTA, DNUM, DDEN, row_base,
                                     (i * SUB + c % SUB) * BLOCK_M + offs_mb, k, v, kf, dk, dv, dkf,
                                     NQ_TOK, D, scale, lin_scale, offs_d, d_valid, k_valid,
                                     False, True, LIN_SIGN, FEATURE, LIN_FP32)
        dk += _phi_bwd(k.to(tl.float32), kf32, dkf * lin_scale, d_valid, FEATURE)

    out = (pid_bh.to(tl.int64) * NK_TOK + offs_k)[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------- host wrappers
def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def transposed_lists(index: torch.Tensor, n_kb: int):
    """[B, H, nQ, L] key-block lists -> per key block its query blocks ``[B, H, nK, nQ]`` + counts ``[B, H, nK]``.

    No host sync: the width is nQ (the worst case), so shapes are static.
    """
    b, h, n_qb, width = index.shape
    visited = torch.zeros(b, h, n_qb, n_kb, dtype=torch.bool, device=index.device)
    if width:
        visited.scatter_(-1, index.long(), True)
    visited = visited.transpose(-1, -2)
    counts = visited.sum(-1, dtype=torch.int32)
    order = true_columns(visited, n_qb).to(torch.int32)
    return order.contiguous(), counts.contiguous()


def _launch(kernel, grid, *args, **kwargs):
    try:
        kernel[grid](*args, **kwargs)
    except OutOfResources as exc:
        raise ValueError(f"the fused SLA kernel does not fit this GPU ({exc}); fp32 tiles need more shared memory "
                         "than sm_89 offers: use bfloat16/float16 inputs or backend='torch'") from None


def sla_forward(q, k, v, critical, lin_blocks, scale, feature, has_lin, sub_critical, lin_sign, block_q):
    """Launch the fused forward kernel. Returns ``(o, lse, num_c, den_c)`` (num/den empty without linear)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    cfg = launch_config(block_q, d, q.dtype)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if has_lin:
        num = torch.empty(b, h, nq, d, dtype=torch.float32, device=q.device)
        den = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    else:
        num = torch.empty(0, dtype=torch.float32, device=q.device)
        den = torch.empty(0, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * h)
    # Unused pointers get a live allocation: empty tensors may carry a null address.
    lin_ptr = lin_blocks if lin_blocks.numel() else critical
    _launch(
        _sla_fwd_kernel, grid,
        q, k, v, critical, lin_ptr, o, lse, num if has_lin else lse, den if has_lin else lse,
        *_strides(q), *_strides(k), *_strides(v),
        h, nq, nk, d, critical.shape[-1], lin_blocks.shape[-1], scale,
        FEATURE=feature, HAS_LIN=has_lin, SUB_CRIT=sub_critical, LIN_SIGN=lin_sign, **cfg)
    return o, lse, num, den


def sla_backward(do, dlse, dnum, dden, q, k, v, o, lse, critical, lin_blocks, scale, feature, has_lin,
                 sub_critical, lin_sign, block_q):
    """Launch the dQ and dK/dV kernels. ``dlse`` (may be zeros) is folded into delta."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    cfg_dq = launch_config(block_q, d, q.dtype, "bwd_dq")
    cfg_dkdv = launch_config(block_q, d, q.dtype, "bwd_dkdv")
    n_kb = triton.cdiv(nk, BLOCK_K)
    do = do.contiguous()
    # d lse / d s = p, so an lse gradient shifts delta: ds = p * (dp - (rowsum(do*o) - dlse)).
    delta = ((do.float() * o.float()).sum(-1) - dlse.float()).contiguous()
    if has_lin:
        # dnum ~ do / (phi(q) . z) is tiny; the kernels see it rescaled to O(1) per (batch, head)
        # (every linear-branch gradient is linear in (dnum, dden)) and multiply the scale back.
        dnum, dden = dnum.float(), dden.float()
        dscale = torch.maximum(dnum.abs().amax((-1, -2)), dden.abs().amax(-1)).clamp_min(1e-30)
        dnum = (dnum / dscale[..., None, None]).contiguous()
        dden = (dden / dscale[..., None]).contiguous()
        dscale = dscale.contiguous()
    else:  # unused by the kernels; any live allocation will do
        dnum = dden = dscale = delta
    lin_ptr = lin_blocks if lin_blocks.numel() else critical
    crit_t, crit_cnt = transposed_lists(critical, n_kb)
    lin_t, lin_cnt = transposed_lists(lin_blocks, n_kb) if has_lin else (crit_t, crit_cnt)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    flags = dict(FEATURE=feature, HAS_LIN=has_lin, SUB_CRIT=sub_critical, LIN_SIGN=lin_sign)
    _launch(
        _sla_bwd_dq_kernel, (triton.cdiv(nq, cfg_dq["BLOCK_M"]), b * h),
        q, k, v, do, lse, delta, dnum, dden, dscale, critical, lin_ptr, dq,
        *_strides(q), *_strides(k), *_strides(v),
        h, nq, nk, d, critical.shape[-1], lin_blocks.shape[-1], scale, **flags, **cfg_dq)
    _launch(
        _sla_bwd_dkdv_kernel, (n_kb, b * h),
        q, k, v, do, lse, delta, dnum, dden, dscale, crit_t, crit_cnt, lin_t, lin_cnt, dk, dv,
        *_strides(q), *_strides(k), *_strides(v),
        h, nq, nk, d, scale, **flags, **cfg_dkdv)
    return dq, dk, dv
