"""Tile-level building blocks shared by the dense and the block-sparse attention kernels.

A sparse kernel's per-tile work is the dense kernel's work plus a list lookup, so both
are written from the same pieces: :func:`load_tile` (pointer or TMA load of a
``[ROWS, BLOCK_D]`` tile of a ``(B, H, N, D)`` tensor), :func:`fwd_step` (one online
softmax update), :func:`dkdv_step` and :func:`dq_step` (one FlashAttention-2 backward
update). Every step has a ``MASKED`` constexpr: unmasked steps contain no mask code at
all, which is what the SASS parity checks of :mod:`dit_accel.kernels.sass` measure.

Conventions: scores are taken in the base-2 domain with the softmax scale folded into
one FFMA before ``exp2`` (``s * qk_scale - m``, ``qk_scale = scale * log2(e)``); the
running max ``m`` and the backward's ``lse`` are in that domain too.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_tile", "load_rows", "slice_descriptors", "fwd_step", "dkdv_step", "dq_step", "row_bits", "row_words",
           "words_keep", "fwd_update", "LOG2E", "LOG2E_HOST", "LN2"]

LOG2E = tl.constexpr(1.4426950408889634)
# The same as a plain float, for launchers: ``scale * LOG2E`` would be a tl.constexpr, which a launch bakes into
# the kernel as a compile-time constant (one compile per softmax scale, and not the fp32 argument CI compiles).
LOG2E_HOST = float(LOG2E.value)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_tile(X, base, b, h, row0, n_rows, stride_n, head_dim,
              ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, ROW_MASK: tl.constexpr,
              EVEN_D: tl.constexpr):
    """Rows ``row0 .. row0 + ROWS`` of one (batch, head) slice as a ``[ROWS, BLOCK_D]`` tile.

    ``TMA``: ``X`` is a host tensor descriptor over ``(B, H, N, D)`` (sm_90); rows past
    ``N`` and columns past ``D`` arrive as zeros, so no mask code is emitted. Otherwise
    ``base`` points at the slice and the row offset is formed in 64 bits once per tile
    (``row0 * stride_n`` overflows int32 past ~419k tokens in the (B, N, H, D) layout);
    ``ROW_MASK`` guards rows past ``n_rows`` and ``EVEN_D`` (head dim == ``BLOCK_D``)
    drops the column mask.
    """
    if TMA:
        tile = X.load([b, h, row0, 0]).reshape([ROWS, BLOCK_D])
    else:
        offs_r = tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = base + row0.to(tl.int64) * stride_n + (offs_r[:, None] * stride_n + offs_d[None, :])
        tile = load_rows(ptrs, row0 + offs_r < n_rows, offs_d, head_dim, ROW_MASK, EVEN_D)
    return tile


@triton.jit
def load_rows(ptrs, row_ok, offs_d, head_dim, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile at ``ptrs``: zeros in the rows ``row_ok`` rules out (``ROW_MASK``; no row test
    without it) and, unless ``EVEN_D``, in the columns past ``head_dim``."""
    if ROW_MASK:
        if EVEN_D:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    return tile


@triton.jit
def slice_descriptors(Q, K, V, b, h, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, q_len, kv_len, head_dim,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """TMA descriptors made in the kernel over one (batch, head) slice of Q, K and V: 2-D
    ``[rows, head_dim]``, blocks of ``BLOCK_M`` (Q) or ``BLOCK_N`` (K, V) rows by ``BLOCK_D``.

    Triton 3.9 warp-specializes a loop only over descriptors made in the kernel (host descriptors
    fail to compile) and only when Q comes from one too. Rows past the slice and columns past
    ``head_dim`` arrive as zeros. On a GPU the launcher must have set an allocator
    (``triton.set_allocator``) for the descriptors' global scratch.
    """
    qd = tl.make_tensor_descriptor(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, [q_len, head_dim], [sqn, 1],
                                   [BLOCK_M, BLOCK_D])
    kd = tl.make_tensor_descriptor(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh, [kv_len, head_dim], [skn, 1],
                                   [BLOCK_N, BLOCK_D])
    vd = tl.make_tensor_descriptor(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh, [kv_len, head_dim], [svn, 1],
                                   [BLOCK_N, BLOCK_D])
    return qd, kd, vd


@triton.jit
def row_bits(BITS, offset, rows, col_stride, BLOCK_N: tl.constexpr):
    """Expand bit-packed row masks into a ``[len(rows), BLOCK_N]`` bool tile.

    ``BITS`` holds one int64 word per row per 64 columns, word ``w`` of row ``r`` at
    ``offset + w * col_stride + r``: each word is a 1-D vector load (never a 2-D byte
    gather, which made Triton pick a register layout the whole softmax then had to adopt).
    """
    cols = tl.arange(0, BLOCK_N)
    if BLOCK_N <= 64:
        word = tl.load(BITS + offset + rows)
        keep = ((word[:, None] >> cols[None, :].to(tl.int64)) & 1) != 0
    else:
        lo = tl.load(BITS + offset + rows)
        hi = tl.load(BITS + offset + col_stride + rows)
        word = tl.where(cols[None, :] < 64, lo[:, None], hi[:, None])
        keep = ((word >> (cols[None, :] % 64).to(tl.int64)) & 1) != 0
    return keep


@triton.jit
def row_words(BITS, offset, rows, col_stride, BLOCK_N: tl.constexpr):
    """The bit-packed row-mask words of :func:`row_bits`, loaded (``(lo, hi)``; ``hi`` is ``lo`` when
    ``BLOCK_N <= 64``): a loop that expands them only on some iterations loads them on all of them,
    so the load is pipelined (issued iterations ahead) and never waits inside a branch."""
    lo = tl.load(BITS + offset + rows)
    if BLOCK_N <= 64:
        hi = lo
    else:
        hi = tl.load(BITS + offset + col_stride + rows)
    return lo, hi


@triton.jit
def words_keep(lo, hi, BLOCK_N: tl.constexpr):
    """The bool ``[len(rows), BLOCK_N]`` tile of words loaded by :func:`row_words`."""
    cols = tl.arange(0, BLOCK_N)
    if BLOCK_N <= 64:
        keep = ((lo[:, None] >> cols[None, :].to(tl.int64)) & 1) != 0
    else:
        word = tl.where(cols[None, :] < 64, lo[:, None], hi[:, None])
        keep = ((word >> (cols[None, :] % 64).to(tl.int64)) & 1) != 0
    return keep


@triton.jit
def fwd_step(q, k, v, acc, m_i, l_i, qk_scale, keep,
             MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax update of ``(acc, m_i, l_i)`` with a ``[BLOCK_N, D]`` key/value tile.

    ``keep`` (bool ``[BLOCK_M, BLOCK_N]``) is read only when ``MASKED``; a masked row
    with no allowed key so far keeps ``m = -inf`` and contributes nothing.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
    else:
        m_use = m_new
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def fwd_update(s, v, acc, m_i, l_i, qk_scale, DOT_PRECISION: tl.constexpr):
    """The online-softmax update of :func:`fwd_step` from given scores ``s`` (``[BLOCK_M, BLOCK_N]``,
    ``-inf`` where masked), for a loop that masks some tiles behind a branch of its own. The
    ``m = -inf`` guard runs on every tile: a few instructions per row, not per element."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, keep,
              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK/dV update of a key tile (``k``, ``v``: ``[BLOCK_N, D]``) by one query tile.

    ``lse`` is the row log-sum-exp in the base-2 domain (``+inf`` for rows that must not
    contribute), ``delta = rowsum(dO * O)``. ``dk`` accumulates without the softmax scale.
    """
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    if MASKED:
        st = tl.where(keep, st, float("-inf"))
    pt = tl.math.exp2(st * qk_scale - lse[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def dq_step(q, do, lse, delta, k, v, dq, qk_scale, keep,
            MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ update of a query tile by one key/value tile (same conventions as :func:`dkdv_step`)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq
