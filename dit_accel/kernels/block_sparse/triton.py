"""Triton block-sparse attention over a :class:`BlockLayout` (forward and backward).

Three GPU kernels (plus a small preprocess) implement FlashAttention-2 style
attention restricted to the blocks a layout lists:

- ``_fwd_kernel``: grid ``(query tiles, B*H)``. Each program keeps its query tile
  in registers and walks the key blocks its layout row lists (``kv_indices``),
  with an online softmax in base 2 (``exp2`` with a ``log2(e)``-scaled scale).
  Full blocks run without any masking; the element mask of ``mask_table`` is
  applied only to partial blocks (``kv_mask_ids >= 0``) and the bounds mask only
  to the ragged last key block.
- ``_bwd_dkdv_kernel``: grid ``(key tiles, B*H)``, walks the *transposed* layout
  (``q_indices``: only the query blocks that visit this key block) and recomputes
  ``P`` from the saved log-sum-exp.
- ``_bwd_dq_kernel``: grid ``(query tiles, B*H)`` over the forward layout.

Both backward kernels own their outputs, so no atomics are needed.

The kernel tile ``(BLOCK_M, BLOCK_N)`` may be smaller than the layout block
``(block_q, block_k)`` (it always divides it): a layout block is then covered by
several programs (query side) or several loop steps (key side). That keeps
layouts at 128 usable on GPUs with less shared memory and with head dim 256.

Launchers (pure functions, no autograd and no input checks: :mod:`.ops` wraps
them in custom ops, and :func:`dit_accel.kernels.block_sparse_attention` has
checked the inputs and chosen this backend): :func:`triton_forward`,
:func:`triton_backward`. Launch configurations: :mod:`.configs`.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..layout import BlockLayout
from .configs import select_config

__all__ = ["triton_forward", "triton_backward", "KERNELS"]

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    KV_COUNTS, KV_INDICES, KV_MASK_IDS, MASK_TABLE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh,
    lay_ch, lay_cq,
    lay_ih, lay_iq,
    mt_p, mt_i,
    H, q_len, kv_len, head_dim, layout_bq, layout_bk,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    # Query tiles of one layout block are consecutive programs.
    qb = pid_m // (layout_bq // BLOCK_M)
    row0 = pid_m * BLOCK_M
    mrow0 = row0 - qb * layout_bq  # row offset inside the layout block's element mask

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = row0 + offs_m0
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim

    q_ptrs = Q + off_b * sqb + off_h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_b * skb + off_h.to(tl.int64) * skh
    v_base = V + off_b * svb + off_h.to(tl.int64) * svh

    count = tl.load(KV_COUNTS + off_h * lay_ch + qb * lay_cq)
    row_base = off_h * lay_ih + qb * lay_iq
    n_sub = layout_bk // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # One flat loop over (visited key block, key tile inside it) so the
    # compiler can software-pipeline the K/V loads.
    for j in range(0, count * n_sub):
        slot = j // n_sub
        sub = j - slot * n_sub
        kb = tl.load(KV_INDICES + row_base + slot)
        mid = tl.load(KV_MASK_IDS + row_base + slot)
        col0 = kb * layout_bk + sub * BLOCK_N
        offs_n = col0 + offs_n0
        n_ok = offs_n < kv_len
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if (mid >= 0) | (col0 + BLOCK_N > kv_len):
            # Partial block or ragged last key tile: the only places a mask is applied.
            em = tl.load(MASK_TABLE + tl.maximum(mid, 0).to(tl.int64) * mt_p
                         + (mrow0 + offs_m0)[:, None] * mt_i + (sub * BLOCK_N + offs_n0)[None, :],
                         )
            s = tl.where(((em != 0) | (mid < 0)) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed key keeps m = -inf; use 0 to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + off_b * sob + off_h.to(tl.int64) * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + off_b * slb + off_h.to(tl.int64) * slh + offs_m, lse, mask=m_ok)

@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + off_b * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    # DELTA is a contiguous (B*H, q_len) buffer.
    tl.store(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)

@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_COUNTS, Q_INDICES, Q_MASK_IDS, MASK_TABLE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    slb, slh,
    lay_ch, lay_ck,
    lay_ih, lay_ik,
    mt_p, mt_i,
    H, q_len, kv_len, head_dim, layout_bq, layout_bk,
    sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    kb = pid_n // (layout_bk // BLOCK_N)
    col0 = pid_n * BLOCK_N
    mcol0 = col0 - kb * layout_bk

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = col0 + offs_n0
    n_ok = offs_n < kv_len
    d_ok = offs_d < head_dim
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + off_b * skb + off_h.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * svb + off_h.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    q_base = Q + off_b * sqb + off_h.to(tl.int64) * sqh
    do_base = DO + off_b * sdb + off_h.to(tl.int64) * sdh
    lse_base = LSE + off_b * slb + off_h.to(tl.int64) * slh
    delta_base = DELTA + pid_bh.to(tl.int64) * q_len
    ragged = col0 + BLOCK_N > kv_len

    count = tl.load(Q_COUNTS + off_h * lay_ch + kb * lay_ck)
    row_base = off_h * lay_ih + kb * lay_ik
    m_sub = layout_bq // BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, count * m_sub):
        slot = j // m_sub
        sub = j - slot * m_sub
        qb = tl.load(Q_INDICES + row_base + slot)
        mid = tl.load(Q_MASK_IDS + row_base + slot)
        offs_m = qb * layout_bq + sub * BLOCK_M + offs_m0
        m_ok = offs_m < q_len
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
        # Rows past q_len or without any allowed key get lse = +inf so that P = 0.
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if (mid >= 0) | ragged:
            em = tl.load(MASK_TABLE + tl.maximum(mid, 0).to(tl.int64) * mt_p
                         + (sub * BLOCK_M + offs_m0)[None, :] * mt_i + (mcol0 + offs_n0)[:, None],
                         )
            st = tl.where(((em != 0) | (mid < 0)) & n_ok[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + off_b * skb + off_h.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * svb + off_h.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)

@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    KV_COUNTS, KV_INDICES, KV_MASK_IDS, MASK_TABLE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    slb, slh,
    lay_ch, lay_cq,
    lay_ih, lay_iq,
    mt_p, mt_i,
    H, q_len, kv_len, head_dim, layout_bq, layout_bk,
    sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    qb = pid_m // (layout_bq // BLOCK_M)
    row0 = pid_m * BLOCK_M
    mrow0 = row0 - qb * layout_bq

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = row0 + offs_m0
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + off_b * sqb + off_h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * sdb + off_h.to(tl.int64) * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + off_b * slb + off_h.to(tl.int64) * slh + offs_m, mask=m_ok,
                  other=float("inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=0.0)
    k_base = K + off_b * skb + off_h.to(tl.int64) * skh
    v_base = V + off_b * svb + off_h.to(tl.int64) * svh

    count = tl.load(KV_COUNTS + off_h * lay_ch + qb * lay_cq)
    row_base = off_h * lay_ih + qb * lay_iq
    n_sub = layout_bk // BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, count * n_sub):
        slot = j // n_sub
        sub = j - slot * n_sub
        kb = tl.load(KV_INDICES + row_base + slot)
        mid = tl.load(KV_MASK_IDS + row_base + slot)
        col0 = kb * layout_bk + sub * BLOCK_N
        offs_n = col0 + offs_n0
        n_ok = offs_n < kv_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if (mid >= 0) | (col0 + BLOCK_N > kv_len):
            em = tl.load(MASK_TABLE + tl.maximum(mid, 0).to(tl.int64) * mt_p
                         + (mrow0 + offs_m0)[:, None] * mt_i + (sub * BLOCK_N + offs_n0)[None, :],
                         )
            s = tl.where(((em != 0) | (mid < 0)) & n_ok[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + off_b * sqb + off_h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)

KERNELS = {
    "fwd": _fwd_kernel,
    "bwd_preprocess": _bwd_preprocess_kernel,
    "bwd_dkdv": _bwd_dkdv_kernel,
    "bwd_dq": _bwd_dq_kernel,
}


# ---------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------
def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 80  # interpreter: any valid config works


def _layout_args(layout: BlockLayout, transposed: bool):
    counts = layout.q_counts if transposed else layout.kv_counts
    indices = layout.q_indices if transposed else layout.kv_indices
    mask_ids = layout.q_mask_ids if transposed else layout.kv_mask_ids
    # Row-major strides are passed explicitly (size-1 dims may carry any stride in torch).
    indices, mask_ids, counts = indices.contiguous(), mask_ids.contiguous(), counts.contiguous()
    hl, rows, width = indices.shape
    shared = hl == 1  # one pattern for all heads: head stride 0
    table = layout.mask_table
    if table.numel() == 0:
        table = torch.ones(1, layout.block_q, layout.block_k, dtype=torch.bool, device=layout.device)
    table = table.contiguous().view(torch.uint8)
    strides = (0 if shared else rows, 1,
               0 if shared else rows * width, width,
               layout.block_q * layout.block_k, layout.block_k)
    return counts, indices, mask_ids, table, strides


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------
def triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward with the Triton kernel.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, H, M, D)``; fp16, bf16 or fp32 (one dtype), any
            strides, ``D <= 256``. ``N == layout.q_len`` and ``M == layout.kv_len``.
        layout: :class:`BlockLayout` on q's device with 1 (shared) or ``H`` heads;
            ``block_q``/``block_k`` in (64, 128, 256) on CUDA, also 16 or 32 under the interpreter.
        scale: softmax scale.

    Inputs are not checked here: :func:`dit_accel.kernels.block_sparse_attention` checks them once.

    Returns:
        ``o`` ``(B, H, N, D)`` in q's dtype (contiguous) and ``lse`` fp32 ``(B, H, N)``
        natural log. Rows with no allowed key give ``o = 0`` and ``lse = -inf``.

    Example:
        >>> layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
        >>> o, lse = triton_forward(q, k, v, layout, scale=q.shape[-1] ** -0.5)
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    o = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    if m == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    cfg = select_config("fwd", q.dtype, d, layout.block_q, layout.block_k, _arch(q.device))
    counts, indices, mask_ids, table, lay_strides = _layout_args(layout, transposed=False)
    grid = (triton.cdiv(n, layout.block_q) * (layout.block_q // cfg.block_m), b * h)
    _fwd_kernel[grid](
        q, k, v, o, lse,
        counts, indices, mask_ids, table,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        lse.stride(0), lse.stride(1),
        *lay_strides,
        h, n, m, d, layout.block_q, layout.block_k,
        scale * _LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, layout: BlockLayout, scale: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_forward` w.r.t. q, k, v.

    Args:
        do: upstream gradient ``(B, H, N, D)`` (any float dtype; cast to q's dtype).
        q, k, v, layout, scale: exactly as given to :func:`triton_forward`.
        o, lse: its outputs (``lse`` fp32 natural log ``(B, H, N)``).

    Returns:
        ``(dq, dk, dv)`` shaped, typed and (when dense) strided like q, k, v. ``dk``/``dv`` come
        from a kernel that walks the transposed layout (only the query blocks that
        visit each key block); ``dq`` from one over the forward layout. No atomics.
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    do = do.to(q.dtype)
    o = o.to(q.dtype)
    lse = lse.to(torch.float32)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    arch = _arch(q.device)

    pre = select_config("bwd_preprocess", q.dtype, d, layout.block_q, layout.block_k, arch)
    delta = torch.empty((b * h, n), dtype=torch.float32, device=q.device)
    _bwd_preprocess_kernel[(triton.cdiv(n, pre.block_m), b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, n, d,
        BLOCK_M=pre.block_m, BLOCK_D=pre.block_d, num_warps=pre.num_warps, num_stages=pre.num_stages,
    )

    common_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0), lse.stride(1))
    sizes = (h, n, m, d, layout.block_q, layout.block_k, scale, scale * _LOG2E)
    # dk/dv share k/v's strides: allocate them like k/v.
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dk.stride() != k.stride() or dv.stride() != v.stride():  # e.g. overlapping or odd strides
        k, v = k.contiguous(), v.contiguous()
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        common_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0), lse.stride(1))

    cfg = select_config("bwd_dkdv", q.dtype, d, layout.block_q, layout.block_k, arch)
    counts, indices, mask_ids, table, lay_strides = _layout_args(layout, transposed=True)
    grid = (triton.cdiv(m, layout.block_k) * (layout.block_k // cfg.block_n), b * h)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk, dv,
        counts, indices, mask_ids, table,
        *common_strides, *lay_strides, *sizes,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    dq = torch.empty_like(q)
    if dq.stride() != q.stride():
        q = q.contiguous()
        dq = torch.empty_like(q)
        common_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0), lse.stride(1))
    cfg = select_config("bwd_dq", q.dtype, d, layout.block_q, layout.block_k, arch)
    counts, indices, mask_ids, table, lay_strides = _layout_args(layout, transposed=False)
    grid = (triton.cdiv(n, layout.block_q) * (layout.block_q // cfg.block_m), b * h)
    _bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq,
        counts, indices, mask_ids, table,
        *common_strides, *lay_strides, *sizes,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv
