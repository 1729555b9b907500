"""SLA's block selection in one Triton launch: the pooled scores and both block sets, no sort.

:func:`select_blocks` returns what :func:`~.common.classify_pooled` (the PyTorch twin, the CPU path and the
oracle) returns from the pooled ``qb`` ``[B, H, nQ, D]`` and ``kb`` ``[B, H, nK, D]`` (fp32, any strides):
fp32 ``scores = qb @ kb^T`` and, per row, the int32 critical and negligible key blocks, each ascending, by
the twin's stable descending sort's rule. With ``rank_j = #{i : s_i > s_j or (s_i == s_j and i < j)}``:

- critical: ``rank_j < n_crit`` (a tie goes to the lower index);
- negligible: ``rank_j >= nK - n_neg`` (a tie goes to the higher index): the complement of the top
  ``nK - n_neg``, so both sets come from the same selection routine.

Order: scores compare as floats, with ``-0.0 == +0.0`` (torch's sort treats them alike) and every NaN
above ``+inf`` and equal to every other NaN (torch's descending sort puts NaNs first, in index order).

One program takes :data:`ROWS` query blocks of one (batch, head). It writes their scores with fp32
``tl.dot`` (``input_precision="ieee"``: no TF32 rounding) over key chunks, so kb is read once per
``ROWS`` rows, then selects from the rows it just wrote, a few rows at a time (``GROUP``, so that
``GROUP * BLOCK_N`` values sit in registers): each score becomes an order-preserving int32 key, the key at
rank ``m - 1`` (``m`` the set's size) is found bit by bit (32 count reductions over the row: the largest
``T`` with ``#{key >= T} >= m``), ties at ``T`` are taken lower index first by a cumulative count, and each
selected index is stored at its ascending position (a cumulative count of the selection, minus one).

Bounds: ``nK <= NK_MAX`` (2048 key blocks: Wan 720p has 1182 at 64-token blocks, FLUX at 4K 1024) and
``D <= D_MAX``; :func:`supported` says whether a call fits, and the caller
(:func:`~.ops.sla_triton_classify`) takes the twin's torch path otherwise.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import occupancy
from .._cache import bounded_get

__all__ = ["select_blocks", "supported", "aot_source", "KERNELS", "NK_MAX", "D_MAX", "ROWS"]

#: The most key blocks a row may have (the row's keys sit in registers, ``GROUP`` rows at a time).
NK_MAX = 2048
#: The largest head dim (the pooled rows' width) the score tiles take: the fused forward's bound
#: (``configs.SLA_BLOCK_DS``).
D_MAX = 128
#: Query blocks per program (the score tile's rows; ``tl.dot`` takes 16 or more).
ROWS = 16
#: Key blocks per score tile.
KEYS = 32
#: Values of a row group held in registers while selecting (``GROUP = min(ROWS, ELEMS // BLOCK_N)`` rows, a
#: power of 2 that divides ``ROWS``: a program selects from its own rows only).
ELEMS = 4096

@triton.jit
def _keys(s, valid):
    """int32 keys that order like the fp32 scores ``s``: ``-0.0`` as ``+0.0``, every NaN as the largest key;
    padding (``~valid``) as INT_MIN, below every score's key (-inf's is INT_MIN + 0x7FFFFF), so no count
    below needs the mask."""
    u = s.to(tl.int32, bitcast=True)
    mag = u & 0x7FFFFFFF
    u = tl.where(mag == 0, 0, u)  # -0.0 -> +0.0
    key = tl.where(u < 0, u ^ 0x7FFFFFFF, u)  # negatives: larger magnitude, smaller key
    key = tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)  # NaN above +inf
    return tl.where(valid, key, tl.full(key.shape, -2147483648, tl.int32))


@triton.jit
def _top(key, m):
    """Mask of each row's ``m`` largest keys (``m`` a ``[GROUP]`` int32 count, ``1 <= m <=`` the row's real
    length), a tie at the threshold going to the lower column first."""
    # Counts are fp32 sums of where(cond, 1.0, 0.0) (exact below 2^24): LLVM turns an integer sum of
    # predicates into a popcount of the packed predicates, which it packs through a local-memory stack frame
    # on sm_90; fp32 adds it leaves alone.
    # The threshold T, the m-th largest key, bit by bit from the top: keep a bit when at least m keys are at
    # or above the candidate. In offset-binary (key ^ INT_MIN, unsigned order) a candidate sets the next bit,
    # which in two's complement is t ^ bit (bit 31 first: the sign). All candidates are above the padding.
    mf = m.to(tl.float32)
    one = tl.full([], 1, tl.int32)  # (an int32 shift: 1 << 31 is INT_MIN, not 2^31)
    t = tl.full(m.shape, -2147483648, tl.int32)
    for i in range(32):
        cand = t ^ (one << (31 - i))
        n_ge = tl.sum(tl.where(key >= cand[:, None], 1.0, 0.0), axis=1)
        t = tl.where(n_ge >= mf, cand, t)
    above = key > t[:, None]
    need = m - tl.sum(tl.where(above, 1.0, 0.0), axis=1).to(tl.int32)  # keys equal to T to take (>= 1)
    tie = tl.where(key == t[:, None], 1, 0)  # T is a real key: the padding never ties
    return above | ((tie != 0) & (tl.cumsum(tie, axis=1) <= need[:, None]))


@triton.jit
def _sla_select_kernel(QB, KB, SCORES, CRIT, NEG,
                       stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       H, NQ, NK, D, N_CRIT, N_NEG,
                       ROWS: tl.constexpr, KEYS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUP: tl.constexpr, HAS_NEG: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    q = tl.load(QB + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qn
                + cols[None, :] * stride_qd, mask=(rows < NQ)[:, None] & col_ok[None, :], other=0.0)
    s_base = SCORES + (bh.to(tl.int64) * NQ) * NK
    keys = tl.arange(0, KEYS)
    for k0 in range(0, NK, KEYS):
        kk = k0 + keys
        kb = tl.load(KB + b * stride_kb + h * stride_kh + kk.to(tl.int64)[None, :] * stride_kn
                     + cols[:, None] * stride_kd, mask=col_ok[:, None] & (kk < NK)[None, :], other=0.0)
        s = tl.dot(q, kb, input_precision="ieee")
        tl.store(s_base + rows.to(tl.int64)[:, None] * NK + kk[None, :], s,
                 mask=(rows < NQ)[:, None] & (kk < NK)[None, :])
    # Every thread's scores are written before any thread reads a row back.
    tl.debug_barrier()
    n = tl.arange(0, BLOCK_N)
    n_ok = n < NK
    g = tl.arange(0, GROUP)
    for r0 in range(0, ROWS, GROUP):
        row = tile * ROWS + r0 + g
        row_ok = row < NQ
        valid = row_ok[:, None] & n_ok[None, :]
        s = tl.load(s_base + row.to(tl.int64)[:, None] * NK + n[None, :], mask=valid, other=0.0)
        key = _keys(s, valid)
        m = tl.zeros([GROUP], dtype=tl.int32) + N_CRIT
        crit = valid & _top(key, m)  # (a row past NQ has no real key: its padding would tie)
        pos = tl.cumsum(tl.where(crit, 1, 0), axis=1) - 1
        out = (bh.to(tl.int64) * NQ + row.to(tl.int64))[:, None]
        tl.store(CRIT + out * N_CRIT + pos, n[None, :] + tl.zeros([GROUP, BLOCK_N], dtype=tl.int32), mask=crit)
        if HAS_NEG:
            neg = valid & ~_top(key, m + (NK - N_NEG - N_CRIT))
            pos = tl.cumsum(tl.where(neg, 1, 0), axis=1) - 1
            tl.store(NEG + out * N_NEG + pos, n[None, :] + tl.zeros([GROUP, BLOCK_N], dtype=tl.int32), mask=neg)


KERNELS = {"select": _sla_select_kernel}


def supported(n_k: int, d: int) -> bool:
    """Whether the selection kernel takes ``n_k`` key blocks of pooled width ``d``
    (:data:`NK_MAX`, :data:`D_MAX`)."""
    return 1 <= n_k <= NK_MAX and 1 <= d <= D_MAX


def _constexprs(n_k: int, d: int, has_neg: bool) -> dict:
    block_n = triton.next_power_of_2(n_k)
    return dict(ROWS=ROWS, KEYS=KEYS, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n,
                GROUP=max(1, min(ROWS, ELEMS // block_n)), HAS_NEG=has_neg)


def aot_source(n_k: int, d: int, has_neg: bool = True):
    """``(kernel, signature, constexprs, attrs)`` of the selection kernel for ``triton.compile(ASTSource(...))``
    (static GPU checks without a GPU, in a process without TRITON_INTERPRET; sizes and strides as 32-bit ints,
    like the JIT's typical launch). Launched with ``num_warps`` :data:`NUM_WARPS`."""
    from ..dense.configs import aot_signature

    types = {"QB": "*fp32", "KB": "*fp32", "SCORES": "*fp32", "CRIT": "*i32", "NEG": "*i32"}
    return aot_signature(_sla_select_kernel, types, _constexprs(n_k, d, has_neg), (), torch.float32)


#: Warps per program.
NUM_WARPS = 4


@occupancy.on_inputs_device
def select_blocks(qb: torch.Tensor, kb: torch.Tensor, n_crit: int,
                  n_neg: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(scores, critical, negligible)`` of fp32 ``qb`` ``[B, H, nQ, D]`` and ``kb`` ``[B, H, nK, D]`` (any
    strides) in one launch (module docstring): fp32 ``[B, H, nQ, nK]`` scores, int32 ``[B, H, nQ, n_crit]``
    and ``[B, H, nQ, n_neg]`` sets, ascending; ``negligible`` is None when ``n_neg`` is 0. Needs
    ``supported(nK, D)`` and ``1 <= n_crit <= nK - n_neg``; not checked here (the SLA entry points check
    their inputs, :func:`~.ops.sla_triton_classify` checks the bounds)."""
    key = (qb.shape, qb.stride(), kb.shape, kb.stride(), n_crit, n_neg)
    launch = bounded_get(_LAUNCHES, key, lambda: _select_launch(qb, kb, n_crit, n_neg))
    grid, scores_shape, crit_shape, neg_shape, args, kw = launch
    dev = qb.device
    scores = torch.empty(scores_shape, dtype=torch.float32, device=dev)
    critical = torch.empty(crit_shape, dtype=torch.int32, device=dev)
    negligible = torch.empty(neg_shape, dtype=torch.int32, device=dev) if n_neg else None
    KERNELS["select"][grid](qb, kb, scores, critical, critical if negligible is None else negligible, *args, **kw)
    return scores, critical, negligible


def _select_launch(qb, kb, n_crit: int, n_neg: int):
    """``(grid, shapes of the three outputs, scalar arguments, constexprs)`` of a selection launch: what depends
    only on the shapes, strides and set sizes (:data:`_LAUNCHES`)."""
    b, h, nq, d = qb.shape
    n_k = kb.shape[-2]
    args = (*qb.stride(), *kb.stride(), h, nq, n_k, d, n_crit, n_neg)
    kw = dict(_constexprs(n_k, d, n_neg > 0), num_warps=NUM_WARPS)
    return ((-(-nq // ROWS), b * h), (b, h, nq, n_k), (b, h, nq, n_crit), (b, h, nq, n_neg), args, kw)


#: Launch arguments per (qb, kb shapes and strides, set sizes); plain values only, bounded.
_LAUNCHES: Dict[tuple, tuple] = {}
