"""Fused Triton kernels of SLA (sparse-linear attention), forward and backward.

One program per query tile (forward, dQ) or key block (dK/dV). The forward pass loads each
critical key block once and uses it twice: the online-softmax update of the sparse branch
and, when the marginal sums are taken by subtraction, the removal of that block from the
linear branch (``num -= (phi(q) phi(K_j)^T) V_j``, ``den -= rowsum(phi(q) phi(K_j)^T)``).
A second, optional list of key blocks adds (``lin_sign = +1``) or removes (``-1``)
linear-attention terms only: the marginal blocks (added directly, when there are fewer of
them than critical + negligible ones) or the negligible blocks (subtracted).

The kernels return the linear branch's *corrections* ``num_c`` / ``den_c``; the caller adds
the global term ``phi(q) @ (phi(K)^T V)`` (a dense matmul, cuBLAS-fast, and autograd-native
so its backward needs no kernel) and divides. Backward: a dQ kernel (over the critical and
linear lists of a query tile) and a dK/dV kernel (over the transposed lists of a key block).
Pointer arithmetic only (no block pointers).

The feature maps ``phi(q)``, ``phi(k)`` are elementwise PyTorch ops done once per call
(``O(N D)``), read by the kernels as tensors, and the kernels return the gradients w.r.t.
them (``dqf``, ``dkf``) for a PyTorch ``phi`` backward. Computing ``phi`` inside the kernels
recomputed it for every visit of a block and, for the row softmax over the head dim, made
the kernels so large that ``ptxas`` spilled and took 15-40 s per configuration.

Launch configurations and the list of shipped ones: :mod:`.configs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .common import FEATURE_IDS, feature_map, true_columns
from .configs import BLOCK_K, BLOCK_M, SLAKernelConfig, select_sla_config

__all__ = ["sla_forward", "sla_backward", "FEATURE_IDS", "transposed_lists", "KERNELS"]

_FEATURE_NAMES = {i: name for name, i in FEATURE_IDS.items()}


@triton.jit
def _sla_fwd_kernel(
    Q, K, V, QF, KF, CRIT, LIN, O, LSE, NUM, DEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, KC, NL, SUB, scale, lin_sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LIN: tl.constexpr, SUB_CRIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_qb = tl.cdiv(NQ_TOK, BLOCK_M * SUB)  # classification blocks (SUB query tiles each)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < NQ_TOK
    d_valid = offs_d < D
    qd_mask = m_valid[:, None] & d_valid[None, :]
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    kf_base = KF + pid_bh.to(tl.int64) * NK_TOK * D
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=qd_mask, other=0.0)
    row = pid_bh.to(tl.int64) * NQ_TOK + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    if HAS_LIN:
        qf = tl.load(QF + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)

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
            if SUB_CRIT:  # the same V tile leaves the linear branch's global sums
                kf = tl.load(kf_base + offs_k[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
                a = tl.dot(qf, tl.trans(kf))
                num -= tl.dot(a.to(v.dtype), v)
                den -= tl.sum(a, 1)

    o = acc * (1.0 / l_i)[:, None]
    tl.store(O + row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=qd_mask)
    tl.store(LSE + row, m_i + tl.log(l_i), mask=m_valid)

    if HAS_LIN:
        lin_row = LIN + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * NL
        for c in range(NL):
            j = tl.load(lin_row + c)
            offs_k = j * BLOCK_N + offs_n
            kv_mask = (offs_k < NK_TOK)[:, None] & d_valid[None, :]
            kf = tl.load(kf_base + offs_k[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            a = lin_sign * tl.dot(qf, tl.trans(kf))
            num += tl.dot(a.to(v.dtype), v)
            den += tl.sum(a, 1)
        tl.store(NUM + row[:, None] * D + offs_d[None, :], num, mask=qd_mask)
        tl.store(DEN + row, den, mask=m_valid)


@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, KF, DO, LSE, DELTA, DNUM, DDEN, DSCALE, CRIT, LIN, DQ, DQF,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, KC, NL, SUB, scale, lin_sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LIN: tl.constexpr, SUB_CRIT: tl.constexpr,
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
    kf_base = KF + pid_bh.to(tl.int64) * NK_TOK * D
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=qd_mask, other=0.0)
    row = pid_bh.to(tl.int64) * NQ_TOK + offs_m
    do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + row, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dqf = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_LIN:
        dnum = tl.load(DNUM + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0).to(q.dtype)
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
                kf = tl.load(kf_base + offs_k[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
                da = tl.dot(dnum, tl.trans(v)) + dden[:, None]
                dqf -= tl.dot(da.to(kf.dtype), kf)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)

    if HAS_LIN:
        lin_row = LIN + (pid_bh.to(tl.int64) * n_qb + pid_m // SUB) * NL
        for c in range(NL):
            j = tl.load(lin_row + c)
            offs_k = j * BLOCK_N + offs_n
            kv_mask = (offs_k < NK_TOK)[:, None] & d_valid[None, :]
            kf = tl.load(kf_base + offs_k[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            da = lin_sign * (tl.dot(dnum, tl.trans(v)) + dden[:, None])
            dqf += tl.dot(da.to(kf.dtype), kf)
        dqf = dqf * tl.load(DSCALE + pid_bh)  # undo the per-head rescaling of dnum / dden
        tl.store(DQF + row[:, None] * D + offs_d[None, :], dqf, mask=qd_mask)


@triton.jit
def _dkdv_linear(QF, DNUM, DDEN, rows, qd_mask, m_valid, offs_d, kf, v, dv, dkf, weight, D):
    """One query tile's linear-branch contribution to a key block, times ``weight`` (sign x dscale)."""
    qf = tl.load(QF + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    dnum = tl.load(DNUM + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0).to(qf.dtype)
    dden = tl.load(DDEN + rows, mask=m_valid, other=0.0)
    a = tl.dot(qf, tl.trans(kf))
    dv += weight * tl.dot(tl.trans(a).to(qf.dtype), dnum)
    da = tl.dot(dnum, tl.trans(v)) + dden[:, None]
    dkf += weight * tl.dot(tl.trans(da).to(qf.dtype), qf)
    return dv, dkf


@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, QF, KF, DO, LSE, DELTA, DNUM, DDEN, DSCALE, CRIT_T, CRIT_T_CNT, LIN_T, LIN_T_CNT, DK, DV, DKF,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ_TOK, NK_TOK, D, SUB, scale, lin_sign,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LIN: tl.constexpr, SUB_CRIT: tl.constexpr,
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
    krow = pid_bh.to(tl.int64) * NK_TOK + offs_k
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dkf = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if HAS_LIN:
        kf = tl.load(KF + krow[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        lin_scale = tl.load(DSCALE + pid_bh)
    row_base = pid_bh.to(tl.int64) * NQ_TOK
    list_at = pid_bh.to(tl.int64) * n_kb + pid_n

    # Query blocks that hold this key block as critical: softmax gradient (+ linear removal).
    # One loop over (listed query block, sub-tile) pairs: unrolled sub-tiles would hold twice the buffers.
    cnt = tl.load(CRIT_T_CNT + list_at)
    for c in range(cnt * SUB):
        i = tl.load(CRIT_T + list_at * n_qb + c // SUB)
        offs_m = (i * SUB + c % SUB) * BLOCK_M + offs_mb
        m_valid = offs_m < NQ_TOK
        qd_mask = m_valid[:, None] & d_valid[None, :]
        rows = row_base + offs_m
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + rows, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + rows, mask=m_valid, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(m_valid[:, None] & k_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        if HAS_LIN:
            if SUB_CRIT:
                dv, dkf = _dkdv_linear(QF, DNUM, DDEN, rows, qd_mask, m_valid, offs_d, kf, v, dv, dkf,
                                       -lin_scale, D)
    # Softmax dk was accumulated unscaled; the linear dkf is returned apart for the phi backward.
    tl.store(DK + krow[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    if HAS_LIN:
        cnt = tl.load(LIN_T_CNT + list_at)
        for c in range(cnt * SUB):
            i = tl.load(LIN_T + list_at * n_qb + c // SUB)
            offs_m = (i * SUB + c % SUB) * BLOCK_M + offs_mb
            m_valid = offs_m < NQ_TOK
            dv, dkf = _dkdv_linear(QF, DNUM, DDEN, row_base + offs_m, m_valid[:, None] & d_valid[None, :],
                                   m_valid, offs_d, kf, v, dv, dkf, lin_sign * lin_scale, D)
        tl.store(DKF + krow[:, None] * D + offs_d[None, :], dkf, mask=kv_mask)
    tl.store(DV + krow[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


KERNELS = {"fwd": _sla_fwd_kernel, "bwd_dq": _sla_bwd_dq_kernel, "bwd_dkdv": _sla_bwd_dkdv_kernel}


# --------------------------------------------------------------------------- host wrappers
def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _features(x: torch.Tensor, feature: int):
    """``(phi(x) fp32, phi(x) contiguous in x's dtype)``: the kernels' linear-branch operands."""
    f32 = feature_map(x.float(), _FEATURE_NAMES[feature])
    return f32, f32.to(x.dtype).contiguous()


def _feature_backward(f32: torch.Tensor, g: torch.Tensor, feature: int) -> torch.Tensor:
    """Gradient of phi for the upstream gradient ``g``, from ``f32 = phi(x)`` alone (all fp32).

    elu + 1: 1 where x > 0 (there f = x + 1 > 1), else exp(x) = f, i.e. min(f, 1); relu: f > 0.
    """
    name = _FEATURE_NAMES[feature]
    if name == "softmax":
        return f32 * (g - (f32 * g).sum(-1, keepdim=True))
    if name == "elu":
        return g * f32.clamp(max=1.0)
    return g * (f32 > 0)


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


def _launch(cfg: SLAKernelConfig, grid, *args):
    try:
        KERNELS[cfg.kernel][grid](*args, **cfg.launch_kwargs())
    except OutOfResources as exc:
        raise ValueError(f"the fused SLA kernel {cfg.name} does not fit this GPU ({exc}); "
                         "use bfloat16/float16 inputs or backend='torch'") from None


def sla_forward(q, k, v, critical, lin_blocks, scale, feature, has_lin, sub_critical, lin_sign, block_q):
    """Launch the fused forward kernel. Returns ``(o, lse, num_c, den_c)`` (num/den empty without linear)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    cfg = select_sla_config("fwd", q.dtype, d, has_lin, sub_critical)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if has_lin:
        qf, kf = _features(q, feature)[1], _features(k, feature)[1]
        num = torch.empty(b, h, nq, d, dtype=torch.float32, device=q.device)
        den = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    else:  # unused pointers get a live allocation: empty tensors may carry a null address
        qf = kf = q
        num = torch.empty(0, dtype=torch.float32, device=q.device)
        den = torch.empty(0, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(nq, BLOCK_M), b * h)
    lin_ptr = lin_blocks if lin_blocks.numel() else critical
    _launch(cfg, grid,
            q, k, v, qf, kf, critical, lin_ptr, o, lse, num if has_lin else lse, den if has_lin else lse,
            *_strides(q), *_strides(k), *_strides(v),
            h, nq, nk, d, critical.shape[-1], lin_blocks.shape[-1], block_q // BLOCK_M, scale, float(lin_sign))
    return o, lse, num, den


def sla_backward(do, dlse, dnum, dden, q, k, v, o, lse, critical, lin_blocks, scale, feature, has_lin,
                 sub_critical, lin_sign, block_q):
    """Launch the dQ and dK/dV kernels. ``dlse`` (may be zeros) is folded into delta."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    cfg_dq = select_sla_config("bwd_dq", q.dtype, d, has_lin, sub_critical)
    cfg_dkdv = select_sla_config("bwd_dkdv", q.dtype, d, has_lin, sub_critical)
    n_kb = triton.cdiv(nk, BLOCK_K)
    do = do.contiguous()
    # d lse / d s = p, so an lse gradient shifts delta: ds = p * (dp - (rowsum(do*o) - dlse)).
    delta = ((do.float() * o.float()).sum(-1) - dlse.float()).contiguous()
    # With the linear branch, dq / dk leave the kernels in fp32 and get the phi backward added here.
    grad_dtype = torch.float32 if has_lin else q.dtype
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=grad_dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if has_lin:
        # dnum ~ do / (phi(q) . z) is tiny; the kernels see it rescaled to O(1) per (batch, head)
        # (every linear-branch gradient is linear in (dnum, dden)) and multiply the scale back.
        dnum, dden = dnum.float(), dden.float()
        dscale = torch.maximum(dnum.abs().amax((-1, -2)), dden.abs().amax(-1)).clamp_min(1e-30)
        dnum = (dnum / dscale[..., None, None]).contiguous()
        dden = (dden / dscale[..., None]).contiguous()
        dscale = dscale.contiguous()
        qf32, qf = _features(q, feature)
        kf32, kf = _features(k, feature)
        dqf = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dkf = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    else:  # unused by the kernels; any live allocation will do
        dnum = dden = dscale = delta
        qf, kf, dqf, dkf = q, k, dq, dk
    lin_ptr = lin_blocks if lin_blocks.numel() else critical
    crit_t, crit_cnt = transposed_lists(critical, n_kb)
    lin_t, lin_cnt = transposed_lists(lin_blocks, n_kb) if has_lin else (crit_t, crit_cnt)
    n_sub, sign = block_q // BLOCK_M, float(lin_sign)
    _launch(cfg_dq, (triton.cdiv(nq, BLOCK_M), b * h),
            q, k, v, kf, do, lse, delta, dnum, dden, dscale, critical, lin_ptr, dq, dqf,
            *_strides(q), *_strides(k), *_strides(v),
            h, nq, nk, d, critical.shape[-1], lin_blocks.shape[-1], n_sub, scale, sign)
    _launch(cfg_dkdv, (n_kb, b * h),
            q, k, v, qf, kf, do, lse, delta, dnum, dden, dscale, crit_t, crit_cnt, lin_t, lin_cnt, dk, dv, dkf,
            *_strides(q), *_strides(k), *_strides(v),
            h, nq, nk, d, n_sub, scale, sign)
    if has_lin:
        dq = (dq + _feature_backward(qf32, dqf, feature)).to(q.dtype)
        dk = (dk + _feature_backward(kf32, dkf, feature)).to(k.dtype)
    return dq, dk, dv
