"""The SLA backward's glue in four Triton kernels: the gradients the linear branch's output sends back, its
features, the gradients of its global sums and phi's backward, which PyTorch operators around the attention kernels
did before.

With a projection (trained SLA) the backward needs, around its dQ, dK/dV and linear dK/dV kernels: from the linear
output's gradient ``do_l``, ``d num = do_l / (den + eps)``, ``d den = -(do_l . o_l) / (den + eps)`` and their scale
per (batch, head) (the kernels take both over it); the features ``phi(q)``, ``phi(K)`` rounded to the input dtype
(the kernels' operands); the global sums ``kv = phi(K)^T V`` and ``ksum = sum(phi(K))`` again, their gradients
``dkv = phi(q)^T d num``, ``dksum = phi(q)^T d den``, the feature gradients those give (``d num kv^T + d den ksum``
for phi(q); ``V dkv^T + dksum`` for phi(K); ``phi(K) dkv`` for V) and phi's backward ``dx = g + phi'(x)^T g_phi``,
each result rounded once. As PyTorch operators that was about 120 q-sized passes of traffic a call, most of it fp32
(``python -m dit_accel.eval.traffic``; about 8 of the 29 ms of SLA's forward + backward at Wan 1.3B 480p on an
H200). Here:

- :func:`linear_grads` (``_sla_linear_grads_kernel``, one program per row tile; softmax features, whose rows need
  no score scale): ``d den`` and the largest ``|d num|``, ``|d den|`` per tile, from ``do_l`` and ``o_l``.
- :func:`features` (``_sla_features_kernel``, one program per 1,024 tokens, (batch, head) and 32 columns of
  ``d num``): phi(x) rounded to x's dtype, stored by the column block 0 programs; ``d num`` (from ``do_l``) over its
  scale in x's dtype, what the attention kernels read; and the chunk's partial sums of ``phi(x)^T d num`` and
  ``phi(x)^T d den`` (the launcher adds the chunks: a few per head). phi(K), ``kv`` and ``ksum`` come from the
  forward's global-sums kernel, launched again.
- :func:`grad_q` (``_sla_grad_q_kernel``, one program per row tile): ``dq = g + phi'(q)^T (g_phi + d num kv^T +
  d den ksum)``, phi recomputed from q in fp32, written once in q's dtype.
- :func:`grad_k` (``_sla_grad_k_kernel``): ``dk = g + phi'(K)^T (g_phi + V dkv^T + dksum)`` and ``dv = g_v +
  phi(K) dkv``, each written once in the input dtype.

elu and relu features (rows scaled by their scores' bound, read from the features) keep ``d num`` and ``d den`` in
PyTorch operators and take the other three. The products with the ``D x D`` sums run on the tensor cores in tf32x3
(three tf32 products: about fp32's precision, as the operators' fp32 ``matmul``). A variant never timed on a GPU: it
runs where its first-use self-check passed (:data:`VARIANT`), on a GPU by default, and anywhere with
``DIT_ACCEL_SLA_GLUE=1`` (:func:`glue_runs`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._util import cdiv as _cdiv
from .. import occupancy
from ..request import env_switch
from ..dense.tiles import load_tile
from .common import chunk_totals
from .phi import phi, phi_stats, phi_tile

__all__ = ["features", "linear_grads", "grad_q", "grad_k", "glue_runs", "glue_forced", "forced", "VARIANT", "ENV_GLUE", "KERNELS",
           "CHUNK_TILES", "aot_source", "launch_options", "FORMS"]

#: The self-check's name of the glue kernels.
VARIANT = "sla.triton.bwd_glue"
ENV_GLUE = "DIT_ACCEL_SLA_GLUE"
#: Row tiles per program of :func:`features` (1,024 tokens a chunk); columns of ``d num`` per program.
CHUNK_TILES, FEATURE_ROWS, COLUMNS = 32, 32, 32
#: Columns of the fp32 operand per product with a ``D x D`` sum in the gradient kernels.
KC = 32


@triton.jit
def _phi_backward(f, g, feature):
    """``phi'(x)^T g`` per row from ``f = phi(x)`` (fp32, zero outside the real columns): softmax
    ``f * (g - sum(f * g))``; elu + 1: ``g`` where x > 0 (there f > 1), else ``g * exp(x) = g * f``, i.e.
    ``g * min(f, 1)``; relu: ``g`` where ``f > 0``."""
    soft = f * (g - tl.sum(f * g, 1)[:, None])
    return tl.where(feature == 0, soft, tl.where(feature == 1, g * tl.minimum(f, 1.0), tl.where(f > 0, g, 0.0)))


@triton.jit
def _rows_at(T, pid_bh, row0, N_TOK, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, col0=0,
             COLS: tl.constexpr = None):
    """Pointers to rows ``row0 ..`` and columns ``col0 .. col0 + COLS`` (all ``BLOCK_D`` by default) of a
    contiguous ``(B*H, N, BLOCK_D)`` tensor's slice ``pid_bh``."""
    rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = col0 + tl.arange(0, BLOCK_D if COLS is None else COLS)
    return T + pid_bh.to(tl.int64) * N_TOK * BLOCK_D + rows[:, None] * BLOCK_D + cols[None, :]


@triton.jit
def _row_tile(H, N_TOK, D_REAL, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A row-tile program's ``(pid_bh, b, h, row0, offs_n, offs_d, row_ok, ok)``: program axis 0 the row tile, 1 the
    (batch, head); ``row_ok`` ``[BLOCK_N, 1]`` rows before ``N_TOK``, ``ok`` those rows' real columns."""
    pid_bh = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (row0 + offs_n < N_TOK)[:, None]
    return pid_bh, pid_bh // H, pid_bh % H, row0, offs_n, offs_d, row_ok, row_ok & (offs_d < D_REAL)[None, :]


@triton.jit
def _sla_features_kernel(
    X, DNUM, INV, DDEN, DSCALE, XF, DNUM_S, DKV_P, DKSUM_P,
    sxb, sxh, sxn,
    H, N_TOK, D_REAL, CHUNK, feature,
    WITH_SUMS: tl.constexpr, HAS_INV: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """phi(x) rounded to x's dtype over one chunk of ``CHUNK`` row tiles, stored in ``XF`` (contiguous
    ``(B*H, N, BLOCK_D)``) by the column block 0 programs. ``d num`` (``BLOCK_C`` of its columns: program axis 2) is
    ``DNUM`` (fp32), or with ``HAS_INV`` the linear output's gradient ``DNUM`` times ``INV`` per row; ``SCALED``:
    ``d num / DSCALE`` (per (batch, head)) stored in ``DNUM_S`` in x's dtype; ``WITH_SUMS``: the chunk's partial
    ``(d num^T phi(x))`` (stored transposed, as ``phi(x)^T d num``) and ``phi(x)^T DDEN`` in fp32."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    x_base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    offs_n = tl.arange(0, BLOCK_N)
    col_ok = (tl.arange(0, BLOCK_D) < D_REAL)[None, :]
    acc_t = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    dsum = tl.zeros([BLOCK_D], tl.float32)
    first = pid_c * CHUNK
    n_tiles = tl.minimum(CHUNK, tl.cdiv(N_TOK, BLOCK_N) - first)
    xf_rows = tl.where(pid_v == 0, N_TOK, 0)  # the features are stored by the column block 0 programs
    for t in range(0, n_tiles):
        row0 = (first + t) * BLOCK_N
        row_ok = row0 + offs_n < N_TOK
        x = load_tile(x_base, x_base, b, h, row0, N_TOK, sxn, D_REAL, BLOCK_N, BLOCK_D, False, True, True)
        f = phi_tile(x.to(tl.float32), row_ok[:, None] & col_ok, feature).to(XF.dtype.element_ty)
        tl.store(_rows_at(XF, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), f, mask=(row0 + offs_n < xf_rows)[:, None])
        if WITH_SUMS or SCALED:
            at = _rows_at(DNUM, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D, pid_v * BLOCK_C, BLOCK_C)
            dnum = tl.load(at, mask=row_ok[:, None], other=0.0).to(tl.float32)
            if HAS_INV:
                dnum = dnum * tl.load(INV + pid_bh.to(tl.int64) * N_TOK + row0 + offs_n, mask=row_ok, other=0.0)[:, None]
            if SCALED:
                tl.store(_rows_at(DNUM_S, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D, pid_v * BLOCK_C, BLOCK_C),
                         tl.math.div_rn(dnum, tl.load(DSCALE + pid_bh)).to(DNUM_S.dtype.element_ty),
                         mask=row_ok[:, None])
            if WITH_SUMS:
                f32 = f.to(tl.float32)
                acc_t = tl.dot(tl.trans(dnum), f32, acc_t, input_precision="tf32x3")
                dden = tl.load(DDEN + pid_bh.to(tl.int64) * N_TOK + row0 + offs_n, mask=row_ok, other=0.0)
                dsum += tl.sum(f32 * dden[:, None], 0)
    if WITH_SUMS:
        at = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_c
        offs_d = tl.arange(0, BLOCK_D)
        offs_v = pid_v * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(DKV_P + at * BLOCK_D * BLOCK_D + offs_d[None, :] * BLOCK_D + offs_v[:, None], acc_t)
        if pid_v == 0:
            tl.store(DKSUM_P + at * BLOCK_D + offs_d, dsum)


@triton.jit
def _sla_linear_grads_kernel(
    DOL, OL, INV, DDEN_IN, DDEN, PEAK,
    H, N_TOK,
    HAS_DDEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The linear output's gradient on one row tile (``o_l = num / (den + eps)``, ``INV = 1 / (den + eps)``):
    ``d den = -(DOL . OL) INV`` (+ ``DDEN_IN``) stored fp32, and the tile's largest ``|d num| = |DOL| INV`` and
    ``|d den|`` in ``PEAK`` (one per program; the launcher takes the largest per (batch, head)). ``DOL``, ``OL``:
    contiguous ``(B*H, N, BLOCK_D)``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N_TOK
    dol = tl.load(_rows_at(DOL, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok[:, None], other=0.0)
    o_l = tl.load(_rows_at(OL, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok[:, None], other=0.0)
    at = pid_bh.to(tl.int64) * N_TOK + rows
    inv = tl.load(INV + at, mask=row_ok, other=0.0)
    dol = dol.to(tl.float32)
    dden = -tl.sum(dol * o_l.to(tl.float32), 1) * inv
    if HAS_DDEN:
        dden += tl.load(DDEN_IN + at, mask=row_ok, other=0.0)
    tl.store(DDEN + at, dden, mask=row_ok)
    peak = tl.maximum(tl.max(tl.abs(dol), 1) * inv, tl.abs(dden))
    tl.store(PEAK + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_n, tl.max(peak, 0))


@triton.jit
def _sla_grad_q_kernel(
    Q, G, GF, DNUM, INV, DDEN, KV, KSUM, OUT,
    sqb, sqh, sqn, sob, soh, son,
    H, N_TOK, D_REAL, feature,
    WITH_GLOBAL: tl.constexpr, HAS_INV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KC: tl.constexpr,
):
    """``OUT = G + phi'(q)^T (GF + d num KV^T + DDEN KSUM)`` on one row tile, in OUT's dtype (``G``, ``GF``: fp32,
    contiguous ``(B*H, N, BLOCK_D)``, and so is ``DNUM``: ``d num`` itself (fp32), or with ``HAS_INV`` the linear
    output's gradient, times ``INV`` per row; ``KV``: ``(B*H, BLOCK_D, BLOCK_D)``, ``KSUM``)."""
    pid_bh, b, h, row0, offs_n, offs_d, row_ok, ok = _row_tile(H, N_TOK, D_REAL, BLOCK_N, BLOCK_D)
    g_phi = tl.load(_rows_at(GF, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok, other=0.0)
    if WITH_GLOBAL:  # d num kv^T, KC columns of d num (rows of kv^T) at a time
        square = KV + pid_bh.to(tl.int64) * BLOCK_D * BLOCK_D
        if HAS_INV:
            inv = tl.load(INV + pid_bh.to(tl.int64) * N_TOK + row0 + offs_n, mask=row0 + offs_n < N_TOK, other=0.0)
        for c in tl.static_range(0, BLOCK_D, KC):
            dnum = tl.load(_rows_at(DNUM, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D, c, KC), mask=row_ok, other=0.0)
            if HAS_INV:
                dnum = dnum.to(tl.float32) * inv[:, None]
            kv_t = tl.load(square + offs_d[None, :] * BLOCK_D + c + tl.arange(0, KC)[:, None])
            g_phi = tl.dot(dnum, kv_t, g_phi, input_precision="tf32x3")
        dden = tl.load(DDEN + pid_bh.to(tl.int64) * N_TOK + row0 + offs_n, mask=row0 + offs_n < N_TOK, other=0.0)
        ksum = tl.load(KSUM + pid_bh.to(tl.int64) * BLOCK_D + offs_d)
        g_phi += dden[:, None] * ksum[None, :]
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    x = load_tile(q_base, q_base, b, h, row0, N_TOK, sqn, D_REAL, BLOCK_N, BLOCK_D, False, True, True)
    f = phi_tile(x.to(tl.float32), ok, feature)  # (after the products: not live beside them)
    g = tl.load(_rows_at(G, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok, other=0.0)
    out = g + _phi_backward(f, g_phi, feature)
    o_base = OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + row0.to(tl.int64) * son
    tl.store(o_base + offs_n[:, None] * son + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _sla_grad_k_kernel(
    K, V, G, GF, GV, DKV, DKSUM, OUT_K, OUT_V,
    skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, N_TOK, D_REAL, feature,
    WITH_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KC: tl.constexpr,
):
    """``OUT_K = G + phi'(K)^T (GF + V DKV^T + DKSUM)`` and ``OUT_V = GV + phi(K) DKV`` (phi rounded to K's dtype,
    the features the forward's sums read) on one row tile, in the outputs' dtype (``G``, ``GF``, ``GV``: fp32,
    contiguous ``(B*H, N, BLOCK_D)``; ``OUT_K`` and ``OUT_V`` share their strides)."""
    pid_bh, b, h, row0, offs_n, offs_d, row_ok, ok = _row_tile(H, N_TOK, D_REAL, BLOCK_N, BLOCK_D)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    k_rows = k_base + row0.to(tl.int64) * skn + offs_n[:, None] * skn
    m, l_sum = phi_stats(tl.load(k_rows + offs_d[None, :], mask=row_ok, other=0.0).to(tl.float32), ok, feature)
    at = b.to(tl.int64) * sob + h.to(tl.int64) * soh + row0.to(tl.int64) * son + offs_n[:, None] * son
    # Two passes, one accumulator live in each: dV, then phi(K)'s gradient (both at once spilled).
    g_v = tl.load(_rows_at(GV, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok, other=0.0)
    square = DKV + pid_bh.to(tl.int64) * BLOCK_D * BLOCK_D
    if WITH_GLOBAL:  # phi(K) dkv, KC of phi(K)'s columns at a time (from the rows' statistics)
        for c in tl.static_range(0, BLOCK_D, KC):
            cols = c + tl.arange(0, KC)
            x_c = tl.load(k_rows + cols[None, :], mask=row_ok, other=0.0).to(tl.float32)
            f_c = phi(x_c, row_ok & (cols < D_REAL)[None, :], m, l_sum, feature)
            dkv = tl.load(square + cols[:, None] * BLOCK_D + offs_d[None, :])
            g_v = tl.dot(f_c.to(OUT_K.dtype.element_ty).to(tl.float32), dkv, g_v, input_precision="tf32x3")
    tl.store(OUT_V + at + offs_d[None, :], g_v.to(OUT_V.dtype.element_ty), mask=ok)
    g_phi = tl.load(_rows_at(GF, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok, other=0.0)
    if WITH_GLOBAL:  # V dkv^T + dksum, KC of V's columns at a time
        v_rows = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + row0.to(tl.int64) * svn + offs_n[:, None] * svn
        for c in tl.static_range(0, BLOCK_D, KC):
            cols = c + tl.arange(0, KC)
            v = tl.load(v_rows + cols[None, :], mask=row_ok, other=0.0)
            dkv_t = tl.load(square + offs_d[None, :] * BLOCK_D + cols[:, None])
            g_phi = tl.dot(v.to(tl.float32), dkv_t, g_phi, input_precision="tf32x3")
        g_phi += tl.load(DKSUM + pid_bh.to(tl.int64) * BLOCK_D + offs_d)[None, :]
    f = phi(tl.load(k_rows + offs_d[None, :], mask=row_ok, other=0.0).to(tl.float32), ok, m, l_sum, feature)
    out = tl.load(_rows_at(G, pid_bh, row0, N_TOK, BLOCK_N, BLOCK_D), mask=row_ok, other=0.0) \
        + _phi_backward(f, g_phi, feature)
    tl.store(OUT_K + at + offs_d[None, :], out.to(OUT_K.dtype.element_ty), mask=ok)


KERNELS = {"features": _sla_features_kernel, "linear_grads": _sla_linear_grads_kernel, "grad_q": _sla_grad_q_kernel,
           "grad_k": _sla_grad_k_kernel}


def _grad_rows(block_d: int) -> int:
    """Rows per program of the gradient kernels: 32 at a padded head dim of 64, 16 at 128 (with 8 warps, the most
    that compile without spilling on sm_80 / 89 / 90 / 100: ``tests/kernels/test_compile_sla_host_kernels.py``)."""
    return 32 if block_d == 64 else 16


def launch_options(kernel: str, block_d: int) -> dict:
    """Warps and stages of a glue kernel at padded head dim ``block_d``."""
    return {"num_warps": 8, "num_stages": 2 if kernel == "features" else 1}


def _launch(kernel: str, grid, block_d: int, *args, **constexprs):
    KERNELS[kernel][grid](*args, BLOCK_D=block_d, **constexprs, **launch_options(kernel, block_d))


@occupancy.on_inputs_device
def features(x: torch.Tensor, head_dim: int, feature: int, dnum: Optional[torch.Tensor] = None,
             dden: Optional[torch.Tensor] = None, inv: Optional[torch.Tensor] = None,
             dscale: Optional[torch.Tensor] = None,
             sums: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(phi(x), dkv, dksum, dnum_s)``: phi of ``x`` ``(B, H, N, Dp)`` (zero-padded past ``head_dim`` columns)
    rounded to x's dtype, contiguous ``(B, H, N, Dp)``. Given ``dnum`` (contiguous ``(B, H, N, Dp)``: ``d num`` in
    fp32, or with ``inv`` ``(B, H, N)`` the linear output's gradient, ``d num = dnum * inv`` per row) and ``dden``
    (``(B, H, N)``), also, with ``sums``, ``phi(x)^T d num`` ``(B*H, Dp, Dp)`` and ``phi(x)^T dden`` ``(B*H, Dp)`` in
    fp32, and with ``dscale`` ``(B, H)``, ``d num / dscale`` in x's dtype, contiguous ``(B, H, N, Dp)`` (else None)."""
    b, h, n, dp = x.shape
    with_sums, scaled = dnum is not None and sums, dscale is not None
    n_chunks = _cdiv(_cdiv(n, FEATURE_ROWS), CHUNK_TILES)
    xf = torch.empty((b, h, n, dp), dtype=x.dtype, device=x.device)
    dkv = dksum = dnum_s = None
    if with_sums:
        dkv = torch.empty((b * h, n_chunks, dp, dp), dtype=torch.float32, device=x.device)
        dksum = torch.empty((b * h, n_chunks, dp), dtype=torch.float32, device=x.device)
    if scaled:
        dnum_s = torch.empty((b, h, n, dp), dtype=x.dtype, device=x.device)
    live = [t if t is not None else xf for t in (dnum, inv, dden, dscale, dnum_s, dkv, dksum)]  # (unread: any)
    _launch("features", (n_chunks, b * h, dp // COLUMNS if with_sums or scaled else 1), dp, x, *live[:4], xf,
            *live[4:], *x.stride()[:3], h, n, head_dim, CHUNK_TILES, feature, WITH_SUMS=with_sums,
            HAS_INV=inv is not None, SCALED=scaled, BLOCK_N=FEATURE_ROWS, BLOCK_C=COLUMNS)
    if with_sums:
        dkv, dksum = chunk_totals(dkv, dksum)
    return xf, dkv, dksum, dnum_s


@occupancy.on_inputs_device
def linear_grads(dol: torch.Tensor, o_l: torch.Tensor, inv: torch.Tensor,
                 dden: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d den, dscale)`` of the linear branch from its output's gradient ``dol`` and output ``o_l`` (contiguous
    ``(B, H, N, Dp)``) and ``inv = 1 / (den + eps)`` (``(B, H, N)`` fp32): ``d den = -(dol . o_l) inv`` (+ the
    incoming ``dden``), fp32 ``(B, H, N)``, and per (batch, head) the largest ``|d num| = |dol| inv`` and ``|d den|``
    (at least 1e-30), fp32 ``(B, H)``: the scale the attention kernels take d num and d den over."""
    b, h, n, dp = dol.shape
    rows = _grad_rows(dp)
    n_tiles = _cdiv(n, rows)
    out = torch.empty((b, h, n), dtype=torch.float32, device=dol.device)
    peak = torch.empty((b, h, n_tiles), dtype=torch.float32, device=dol.device)
    inv = inv.contiguous()
    _launch("linear_grads", (n_tiles, b * h), dp, dol, o_l, inv, dden.contiguous() if dden is not None else inv,
            out, peak, h, n, HAS_DDEN=dden is not None, BLOCK_N=rows)
    return out, peak.amax(-1).clamp_min_(1e-30)


@occupancy.on_inputs_device
def grad_q(q: torch.Tensor, g: torch.Tensor, g_phi: torch.Tensor, head_dim: int, feature: int,
           dnum: Optional[torch.Tensor] = None, dden: Optional[torch.Tensor] = None,
           kv: Optional[torch.Tensor] = None, ksum: Optional[torch.Tensor] = None,
           inv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dq, contiguous ``(B, H, N, head_dim)`` in q's dtype: ``g + phi'(q)^T (g_phi + d num kv^T + dden ksum)``
    (the global terms where ``kv`` is given). ``q``: ``(B, H, N, Dp)``; ``g``, ``g_phi``: fp32 contiguous
    ``(B, H, N, Dp)``; ``dnum``: the same, ``d num`` in fp32, or with ``inv`` (``(B, H, N)``) the linear output's
    gradient, ``d num = dnum * inv``; ``kv`` ``(B*H, Dp, Dp)`` (rows: phi's columns), ``ksum`` ``(B*H, Dp)``."""
    b, h, n, dp = q.shape
    with_global = kv is not None
    out = torch.empty((b, h, n, head_dim), dtype=q.dtype, device=q.device)
    if not with_global:
        dnum = dden = kv = ksum = g
    rows = _grad_rows(dp)
    _launch("grad_q", (_cdiv(n, rows), b * h), dp, q, g, g_phi, dnum, g if inv is None else inv, dden,
            kv.contiguous(), ksum.contiguous(), out, *q.stride()[:3], *out.stride()[:3], h, n, head_dim, feature,
            WITH_GLOBAL=with_global, HAS_INV=with_global and inv is not None, BLOCK_N=rows, KC=KC)
    return out


@occupancy.on_inputs_device
def grad_k(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, g_phi: torch.Tensor, g_v: torch.Tensor,
           head_dim: int, feature: int, dkv: Optional[torch.Tensor] = None,
           dksum: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dk, dv)``, contiguous ``(B, H, N, head_dim)`` in k's dtype: ``g + phi'(K)^T (g_phi + V dkv^T + dksum)``
    and ``g_v + phi(K) dkv`` (the global terms where ``dkv`` is given; phi(K) rounded to k's dtype). ``k``, ``v``:
    ``(B, H, N, Dp)``; ``g``, ``g_phi``, ``g_v``: fp32 contiguous ``(B, H, N, Dp)``; ``dkv`` ``(B*H, Dp, Dp)``
    (rows: phi's columns), ``dksum`` ``(B*H, Dp)``."""
    b, h, n, dp = k.shape
    with_global = dkv is not None
    dk = torch.empty((b, h, n, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    if not with_global:
        dkv = dksum = g
    rows = _grad_rows(dp)
    _launch("grad_k", (_cdiv(n, rows), b * h), dp, k, v, g, g_phi, g_v, dkv.contiguous(), dksum.contiguous(), dk,
            dv, *k.stride()[:3], *v.stride()[:3], *dk.stride()[:3], h, n, head_dim, feature,
            WITH_GLOBAL=with_global, BLOCK_N=rows, KC=KC)
    return dk, dv


# ----------------------------------------------------------------------------- when the glue runs
_OVERRIDE: list = []


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """Inside, :func:`glue_runs` answers as ``$DIT_ACCEL_SLA_GLUE`` set to ``on`` would, whatever it says (the
    self-checks run each path they check this way; a forced True still checks the variant first)."""
    _OVERRIDE.append(bool(on))
    try:
        yield
    finally:
        _OVERRIDE.pop()


def glue_forced() -> Optional[bool]:
    """``$DIT_ACCEL_SLA_GLUE``: ``1`` (``true``, ``on``, ``yes``) runs the glue kernels in every fused SLA backward
    with a linear branch, the interpreter included (the variant is self-checked first); ``0`` (``false``, ``off``,
    ``no``) never; unset or empty: on a GPU, where the variant passed its self-check. ValueError naming the variable
    on anything else."""
    return env_switch(ENV_GLUE, "the SLA backward's glue in Triton kernels wherever the fused kernels run",
                      "PyTorch operators", "on a GPU, after the variant's self-check")


def glue_runs(q: torch.Tensor) -> bool:
    """Whether a fused SLA backward with a linear branch on inputs like ``q`` runs its glue in these kernels:
    :func:`forced` or :func:`glue_forced` False never; unset, on a GPU only; and only where :data:`VARIANT` passed
    its self-check at q's dtype and head dim (a forced True raises
    :class:`~dit_accel.kernels.selfcheck.VariantFailed` where it failed; the kernels do not depend on the block
    size). Inside a trace or a CUDA graph capture, which may run no check, an unforced call runs them only where a
    stored verdict says the variant passed."""
    from .. import selfcheck

    on = _OVERRIDE[-1] if _OVERRIDE else glue_forced()
    if on is False or (on is None and q.device.type != "cuda"):
        return False
    shape = {"head_dim": q.shape[-1], "block_q": 64, "block_k": 64}
    return selfcheck.gate_unverified(VARIANT, q.device, q.dtype, shape, on)


#: The constexpr forms each glue kernel is launched in (what :func:`aot_source` compiles for the static tests).
FORMS = {
    "features": (dict(WITH_SUMS=True, HAS_INV=True, SCALED=True), dict(WITH_SUMS=False, HAS_INV=True, SCALED=True),
                 dict(WITH_SUMS=True, HAS_INV=False, SCALED=False),
                 dict(WITH_SUMS=False, HAS_INV=False, SCALED=False)),
    "linear_grads": (dict(HAS_DDEN=False), dict(HAS_DDEN=True)),
    "grad_q": (dict(WITH_GLOBAL=True, HAS_INV=True), dict(WITH_GLOBAL=True, HAS_INV=False),
               dict(WITH_GLOBAL=False, HAS_INV=False)),
    "grad_k": (dict(WITH_GLOBAL=True), dict(WITH_GLOBAL=False)),
}


def aot_source(kernel: str, dtype: torch.dtype, block_d: int, form: dict):
    """``(kernel, signature, constexprs, attrs)`` of a glue kernel in one of its :data:`FORMS` for
    ``triton.compile(ASTSource(...))``."""
    from ..dense.configs import aot_signature

    fp32 = ("DDEN", "DKV_P", "DKSUM_P", "G", "GF", "GV", "KV", "KSUM", "DKV", "DKSUM", "INV", "DSCALE", "DDEN_IN",
            "PEAK")
    types = {**{n: "*DT" for n in ("X", "XF", "Q", "K", "V", "OUT", "OUT_K", "OUT_V", "DOL", "OL", "DNUM_S")},
             **{n: "*fp32" for n in fp32}, "DNUM": "*DT" if form.get("HAS_INV") else "*fp32"}
    rows = FEATURE_ROWS if kernel == "features" else _grad_rows(block_d)
    constexprs = dict(form, BLOCK_N=rows, BLOCK_D=block_d)
    if kernel == "features":
        constexprs["BLOCK_C"] = COLUMNS
    elif kernel != "linear_grads":
        constexprs["KC"] = KC
    return aot_signature(KERNELS[kernel], types, constexprs, ("sxn", "sqn", "skn", "svn", "son"), dtype)
