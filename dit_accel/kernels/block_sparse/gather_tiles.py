"""The row-table loads and stores of the gathered block-sparse forward (:mod:`.gather`): Triton helpers of
``_fwd_kernel`` (:mod:`.triton`) and of the epilogue every forward shares (:func:`.lengths.fwd_epilogue`)."""

from __future__ import annotations

import triton
import triton.language as tl

from ..dense.tiles import LN2, load_rows, load_tile

__all__ = ["load_block", "load_kv", "store_rows", "gathered_epilogue"]


@triton.jit
def _gathered(base, raster, stride_n, head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ROW_MASK: tl.constexpr):
    """The raster rows ``raster`` of one (batch, head) slice at ``base``: zeros where ``raster < 0`` with
    ``ROW_MASK``; without it no row test at all (a full tile, which holds no padded or out-of-range key). The row
    offsets are 32-bit (a 64-bit one per gathered row costs registers sm_80 / 89's d128 tiles do not have; the
    launcher runs this only where every offset in the slice fits, :func:`.gather.gather_fits`) and formed here from
    the stride, whose divisibility the compiler knows (offsets read from a table would cost the 16-byte vector
    loads, and with them the cp.async pipeline)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + (raster * stride_n)[:, None] + offs_d[None, :]
    return load_rows(ptrs, raster >= 0, offs_d, head_dim, ROW_MASK, EVEN_D)


@triton.jit
def _raster_rows(RIDX, row0, n_rows, ROWS: tl.constexpr):
    """The raster row of tiled positions ``row0 .. row0 + ROWS``: ``-1`` for padding and past ``n_rows``."""
    offs = row0 + tl.arange(0, ROWS)
    return tl.load(RIDX + offs, mask=offs < n_rows, other=-1)


@triton.jit
def load_block(X, base, b, h, row0, n_rows, stride_n, head_dim, RIDX,
               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, ROW_MASK: tl.constexpr,
               EVEN_D: tl.constexpr, GATHER: tl.constexpr):
    """The query tile at tiled positions ``row0 .. row0 + ROWS`` as ``[ROWS, BLOCK_D]``: :func:`load_tile`'s
    rows, or with ``GATHER`` (pointer loads only) the raster rows the row table ``RIDX`` names, zeros for padded
    positions and positions past ``n_rows`` (always row-masked)."""
    if GATHER:
        tl.static_assert(not TMA, "a gathered tile is loaded by pointers")
        tile = _gathered(base, _raster_rows(RIDX, row0, n_rows, ROWS), stride_n, head_dim, BLOCK_D, EVEN_D, True)
    else:
        tile = load_tile(X, base, b, h, row0, n_rows, stride_n, head_dim, ROWS, BLOCK_D, TMA, ROW_MASK, EVEN_D)
    return tile


@triton.jit
def load_kv(K, V, k_base, v_base, b, h, col, kv_len, skn, svn, head_dim, RIDX,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, ROW_MASK: tl.constexpr,
            EVEN_D: tl.constexpr, GATHER: tl.constexpr):
    """The key and value tiles at tiled position ``col``: :func:`load_tile`'s, or with ``GATHER`` the raster rows
    the row table names (one read of it for both), row-masked in the tiles ``ROW_MASK`` marks (partial ones: a
    full tile holds no padded or out-of-range key, as the layouts the launcher takes let no query see one)."""
    if GATHER:
        tl.static_assert(not TMA, "a gathered tile is loaded by pointers")
        raster = _raster_rows(RIDX, col, kv_len, BLOCK_N)
        k = _gathered(k_base, raster, skn, head_dim, BLOCK_D, EVEN_D, ROW_MASK)
        v = _gathered(v_base, raster, svn, head_dim, BLOCK_D, EVEN_D, ROW_MASK)
    else:
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, ROW_MASK, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, ROW_MASK, EVEN_D)
    return k, v


@triton.jit
def store_rows(O, LSE, b, h, rows, ok, sob, soh, son, slb, slh, acc, m_i, l_i, head_dim,  # noqa: E741
               BLOCK_D: tl.constexpr, extra=0.0, EXTRA: tl.constexpr = False):
    """O and LSE of the query rows ``rows`` (where ``ok``); rows that saw no allowed key get o = 0, lse = -inf.
    ``EXTRA``: o is ``acc / l + extra`` (fp32 ``[rows, BLOCK_D]``), rounded once."""
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * son + offs_d[None, :]
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if EXTRA:
        o += extra
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=ok[:, None] & (offs_d < head_dim)[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + rows, lse, mask=ok)


@triton.jit
def gathered_epilogue(O, LSE, RIDX, b, h, row0, sob, soh, son, slb, slh, acc, m_i, l_i, q_len, head_dim,  # noqa: E741
                      GATE, CROWS, sgb, sgh, sgn, scb, sch, scc, cube_vol,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, GATED: tl.constexpr):
    """O and LSE of the query tile at tiled position ``row0``, stored at the raster rows the row table ``RIDX``
    names (padded positions and positions past ``q_len`` store nothing). ``GATED`` (VSA's gated sum, the tiled
    positions in cube order, ``cube_vol`` to a cube, which the tile's rows divide: the layout's blocks are the
    cubes): o is ``fine + gate[r] * coarse[cube]`` in fp32, rounded once, ``gate`` read at the same raster rows
    (strides ``sgb, sgh, sgn``), the tile's cube row from the fp32 ``CROWS`` (``scb, sch, scc``)."""
    raster = _raster_rows(RIDX, row0, q_len, BLOCK_M)
    ok = raster >= 0
    if GATED:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        c = tl.load(CROWS + b.to(tl.int64) * scb + h.to(tl.int64) * sch + (row0 // cube_vol).to(tl.int64) * scc
                    + offs_d, mask=d_ok, other=0.0)
        g = tl.load(GATE + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + raster.to(tl.int64)[:, None] * sgn
                    + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        store_rows(O, LSE, b, h, raster, ok, sob, soh, son, slb, slh, acc, m_i, l_i, head_dim, BLOCK_D,
                   g.to(tl.float32) * c[None, :], True)
    else:
        store_rows(O, LSE, b, h, raster, ok, sob, soh, son, slb, slh, acc, m_i, l_i, head_dim, BLOCK_D)
