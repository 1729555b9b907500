"""VSA's coarse branch in two Triton launches: cube pooling of q, k, v, then coarse attention, its scores and
its top-k selection.

:func:`coarse_triton` returns what :func:`~.naive.coarse_attention` (the PyTorch twin, the CPU path and the
oracle) returns: the coarse output per cube, the fp32 scores ``mean(q) . mean(k) * scale`` of every cube pair,
and the selection, the ``count`` largest scores' key cubes per query cube, listed ascending with an exact tie
going to the lower index, as the twin's :func:`~.naive.top_cubes` (one plan, one pattern on every device).

- ``_vsa_pool_kernel``: one program per (batch x head, cube) reads the cube's tokens of q, k and v once in
  tiled order (the permutation's padding holds zeros), or with ``GATHER`` in raster order through the cube
  permutation's row table (:mod:`.raster`), and writes the three fp32 means over its real tokens (the same sums
  in the same order either way).
- ``_vsa_coarse_kernel``: one program per (batch x head, block of query cubes) walks the key cubes, writes
  the scores and keeps an online softmax of them against the value means (fp32, IEEE dots: no TF32). Then
  (``WITH_SELECT``) it reads its rows' scores back, ``GROUP`` rows at a time so ``GROUP * BLOCK_C`` values sit
  in registers, and selects each row's top ``count`` with SLA's selection routine
  (:mod:`dit_accel.kernels.sla.select`: order-preserving int32 keys, the threshold found bit by bit, ties to
  the lower index), storing the int64 indices ascending.

Bound: the fused selection takes ``C <= NK_MAX`` (2048) cubes (FastWan 480p has 624 at 4x4x4); past it the
launch writes the scores only and the selection is :func:`~.naive.top_cubes` of them (the same rule).
Forward only: a call that needs gradients through the coarse branch runs the twin (:mod:`.api` decides), or where
it reads raster order takes the pool launch's means through an autograd function whose backward spreads their
gradient over the cubes' tokens (:func:`.raster.raster_train`).
Registered with the first-use self-check as ``vsa.triton.coarse``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import occupancy
from ..sla.select import NK_MAX, _keys, _top
from .naive import Cubes, cube_sizes, top_cubes

__all__ = ["coarse_triton", "pool_triton", "coarse_of_means", "fused_selection", "aot_source", "KERNELS", "BLOCK_CUBES", "ROWS", "NK_MAX",
           "NUM_WARPS", "VARIANT"]

VARIANT = "vsa.triton.coarse"

#: Query cubes per program, and key cubes per step (tl.dot needs at least 16).
BLOCK_CUBES = 16
#: Token rows of a cube read per step.
ROWS = 64
#: Warps per program (both launches).
NUM_WARPS = 4
#: Scores of a row group held in registers while selecting (``GROUP = min(BLOCK_CUBES, SELECT_ELEMS // BLOCK_C)``
#: rows): half SLA's budget (``sla.select.ELEMS``), as the indices stored are int64; 4096 spilled on sm_100.
SELECT_ELEMS = 2048


@triton.jit
def _cube_mean(base, start, stride_n, stride_d, rows, cols, col_ok, inv, RIDX, VOL: tl.constexpr, ROWS: tl.constexpr,
               GATHER: tl.constexpr):
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for r in range(0, VOL, ROWS):  # not unrolled: tile (4, 8, 8)'s four steps at d 128 spilled when unrolled
        tok = start + r + rows
        ok = (r + rows) < VOL
        if GATHER:  # the raster token of each position of the cube (-1: padding, which adds nothing)
            tok = tl.load(RIDX + tok, mask=ok, other=-1)
            ok = tok >= 0
        ptrs = base + tok.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
        x = tl.load(ptrs, mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    return acc * inv


@triton.jit
def _vsa_pool_kernel(Q, K, V, QC, KC, VC, INV, RIDX,
                     sq_b, sq_n, sq_d, sk_b, sk_n, sk_d, sv_b, sv_n, sv_d, so_b, so_c,
                     D, VOL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, GATHER: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    inv = tl.load(INV + c)  # 1 / real tokens of the cube
    start = c * VOL
    out = bh * so_b + c.to(tl.int64) * so_c + cols
    tl.store(QC + out, _cube_mean(Q + bh * sq_b, start, sq_n, sq_d, rows, cols, col_ok, inv, RIDX, VOL, ROWS,
                        GATHER), mask=col_ok)
    tl.store(KC + out, _cube_mean(K + bh * sk_b, start, sk_n, sk_d, rows, cols, col_ok, inv, RIDX, VOL, ROWS,
                        GATHER), mask=col_ok)
    tl.store(VC + out, _cube_mean(V + bh * sv_b, start, sv_n, sv_d, rows, cols, col_ok, inv, RIDX, VOL, ROWS,
                        GATHER), mask=col_ok)


@triton.jit
def _vsa_coarse_kernel(QC, KC, VC, S, O, SEL, C, D, COUNT, scale, so_b, so_c, ss_b, ss_m,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WITH_OUT: tl.constexpr,
                       WITH_SELECT: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < C
    d_ok = offs_d < D
    qc = tl.load(QC + bh * so_b + offs_m[:, None] * so_c + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                 other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    s_base = S + bh * ss_b
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < C
        kv_ptr = bh * so_b + offs_n[:, None] * so_c + offs_d[None, :]
        kc = tl.load(KC + kv_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qc, tl.trans(kc), input_precision="ieee") * scale
        tl.store(s_base + offs_m[:, None].to(tl.int64) * ss_m + offs_n[None, :], s,
                 mask=m_ok[:, None] & n_ok[None, :])
        if WITH_OUT:
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            vc = tl.load(VC + kv_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, vc, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
    if WITH_OUT:
        tl.store(O + bh * so_b + offs_m[:, None] * so_c + offs_d[None, :], acc / l_i[:, None],
                 mask=m_ok[:, None] & d_ok[None, :])
    if WITH_SELECT:
        # Rows are read back whole, so every thread's score stores must land first.
        tl.debug_barrier()
        n = tl.arange(0, BLOCK_C)
        g = tl.arange(0, GROUP)
        m = tl.zeros([GROUP], dtype=tl.int32) + COUNT
        for r0 in range(0, BLOCK_M, GROUP):
            row = tl.program_id(1) * BLOCK_M + r0 + g
            valid = (row < C)[:, None] & (n < C)[None, :]
            s = tl.load(s_base + row.to(tl.int64)[:, None] * ss_m + n[None, :], mask=valid, other=0.0)
            top = valid & _top(_keys(s, valid), m)  # (a row past C is all padding: its keys would tie)
            pos = tl.cumsum(tl.where(top, 1, 0), axis=1) - 1
            out = (bh * C + row.to(tl.int64))[:, None] * COUNT + pos
            idx = n[None, :] + tl.zeros([GROUP, BLOCK_C], dtype=tl.int32)
            tl.store(SEL + out, idx.to(SEL.dtype.element_ty), mask=top)


KERNELS = {"pool": _vsa_pool_kernel, "coarse": _vsa_coarse_kernel}


def fused_selection(c: int) -> bool:
    """Whether the coarse launch selects for ``c`` cubes itself (``c <= NK_MAX``), else :func:`top_cubes` does."""
    return 1 <= c <= NK_MAX


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _pool_constexprs(d: int, vol: int, gather: bool = False) -> dict:
    return dict(VOL=vol, ROWS=min(ROWS, triton.next_power_of_2(vol)), BLOCK_D=_block_d(d), GATHER=gather)


def _coarse_constexprs(c: int, d: int, with_output: bool) -> dict:
    select = fused_selection(c)
    block_c = max(16, triton.next_power_of_2(c)) if select else 16
    return dict(BLOCK_M=BLOCK_CUBES, BLOCK_N=BLOCK_CUBES, BLOCK_D=_block_d(d), WITH_OUT=with_output,
                WITH_SELECT=select, BLOCK_C=block_c, GROUP=max(1, min(BLOCK_CUBES, SELECT_ELEMS // block_c)))


def aot_source(kernel: str, d: int, c: int = 624, dtype: torch.dtype = torch.bfloat16, volume: int = 64,
               with_output: bool = True, gather: bool = False):
    """``(kernel, signature, constexprs, attrs)`` of ``"pool"`` (q, k, v in ``dtype``, cubes of ``volume``; read
    through a row table with ``gather``) or
    ``"coarse"`` (``c`` cubes: the fused selection when ``c <= NK_MAX``) at head dim ``d``, for
    ``triton.compile(ASTSource(...))`` (static GPU checks without a GPU, in a process without TRITON_INTERPRET;
    sizes and strides as 32-bit ints, those that are multiples of the head dim marked divisible by 16 as the JIT
    marks them at d 64 / 128). Launched with ``num_warps`` :data:`NUM_WARPS`."""
    from ..dense.configs import aot_signature

    if kernel == "pool":
        types = {**{n: "*DT" for n in ("Q", "K", "V")}, **{n: "*fp32" for n in ("QC", "KC", "VC", "INV")},
                 "RIDX": "*i32"}
        div16 = ("sq_b", "sq_n", "sk_b", "sk_n", "sv_b", "sv_n", "so_b", "so_c")
        return aot_signature(_vsa_pool_kernel, types, _pool_constexprs(d, volume, gather), div16, dtype)
    types = {**{n: "*fp32" for n in ("QC", "KC", "VC", "S", "O")}, "SEL": "*i64", "scale": "fp32"}
    return aot_signature(_vsa_coarse_kernel, types, _coarse_constexprs(c, d, with_output), ("so_b", "so_c"),
                         torch.float32)


def coarse_triton(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cubes: Cubes, count: int, scale: float,
                  with_output: bool = True, rows: Optional[torch.Tensor] = None):
    """:func:`~.naive.coarse_attention` (fp32) in two launches, forward only: ``(coarse or None, scores,
    selection)``. ``q_t, k_t, v_t``: ``(B, H, Np, D)`` in tiled order (padding zero); ``1 <= count <= C``. With
    ``rows``, the cube permutation's row table (int32 ``[Np]``: the raster token of each tiled position, -1 at
    padding), they are ``(B, H, N, D)`` in raster order instead, each folding ``B * H`` as a view (:mod:`.raster`).

    ``selection`` int64 ``(B, H, C, count)``: the twin's selection (up to fp32 near-ties), listed ascending with
    exact ties going to the lower index, selected in the launch (:func:`fused_selection`) or past :data:`NK_MAX`
    cubes by :func:`top_cubes`."""
    return coarse_of_means(*pool_triton(q_t, k_t, v_t, cubes, rows), count, scale, with_output)


@occupancy.on_inputs_device
def pool_triton(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cubes: Cubes,
                rows: Optional[torch.Tensor] = None):
    """The pool launch of :func:`coarse_triton` (its inputs): the fp32 means over each cube's real tokens of q, k
    and v, each ``(B, H, C, D)``."""
    b, h, n, d = q_t.shape
    c, vol = cubes.count, cubes.volume
    device = q_t.device
    q3, k3, v3 = (x.view(b * h, n, d) if rows is not None else x.reshape(b * h, n, d) for x in (q_t, k_t, v_t))
    qc, kc, vc = (torch.empty(b * h, c, d, dtype=torch.float32, device=device) for _ in range(3))
    inv = cube_sizes(cubes, device, inverse=True)  # made once per device: no host copy per call
    KERNELS["pool"][(b * h, c)](q3, k3, v3, qc, kc, vc, inv, inv if rows is None else rows, *q3.stride(),
                                *k3.stride(), *v3.stride(), qc.stride(0), qc.stride(1), d,
                                **_pool_constexprs(d, vol, rows is not None), num_warps=NUM_WARPS)
    return qc.view(b, h, c, d), kc.view(b, h, c, d), vc.view(b, h, c, d)


@occupancy.on_inputs_device
def coarse_of_means(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, count: int, scale: float,
                    with_output: bool = True):
    """The coarse launch of :func:`coarse_triton` (its result) on the contiguous fp32 cube means ``(B, H, C, D)``
    of :func:`pool_triton`."""
    b, h, c, d = qc.shape
    device = qc.device
    qc, kc, vc = (x.view(b * h, c, d) for x in (qc, kc, vc))
    scores = torch.empty(b * h, c, c, dtype=torch.float32, device=device)
    out = torch.empty(b * h, c, d, dtype=torch.float32, device=device) if with_output else scores
    cx = _coarse_constexprs(c, d, with_output)
    sel = torch.empty(b * h, c, count, dtype=torch.int64, device=device) if cx["WITH_SELECT"] else None
    grid = (b * h, triton.cdiv(c, BLOCK_CUBES))
    KERNELS["coarse"][grid](qc, kc, vc, scores, out, scores if sel is None else sel, c, d, count, float(scale),
                            qc.stride(0), qc.stride(1), scores.stride(0), scores.stride(1), **cx,
                            num_warps=NUM_WARPS)
    scores = scores.view(b, h, c, c)
    selection = top_cubes(scores, count) if sel is None else sel.view(b, h, c, count)
    from ..selfcheck import corrupt, faulted

    # $DIT_ACCEL_FAULT proves the self-check catches a broken launch: the scores, the output, and the selection
    # (the other end of the ranking; the selection no longer derives from the returned scores).
    scores = corrupt(VARIANT, scores)
    if with_output:
        corrupt(VARIANT, out)
    if faulted(VARIANT):
        selection = (c - 1 - selection).flip(-1)
    return (out.view(b, h, c, d) if with_output else None), scores, selection
