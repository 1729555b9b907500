"""The block-sparse forward's length tiles: a visited tile whose allowed pairs are its first ``c`` key columns.

A packed layout's ragged blocks (the last block of a Tile key tile, a VSA partial cube, the last block past the
key length) allow every row the same column prefix. The layout carries them as column-prefix masks
(``mask_table``); the bit-mask path loads a mask word per row per tile for them. With lengths, the tile plan
(:func:`.tile_plans.tile_plan` with ``lengths``) lists them between the full and the partial tiles with the count
``c`` in place of their bit offset, and the forward masks them with one compare of the column index against
``c``: no mask load, no per-row work. The backward and the twin keep running them as masks, and a forward
that runs lengths takes the one-loop kernel, never the (opt-in) warp-specialized one. Pointer loads (sm_80 /
89, unaligned tensors) keep the ragged last key tile bit-masked (their length loop loads no row masks); TMA
loads zero-fill past the keys, so there it is a length tile too.

Static cost (``tests/kernels/test_sass_lengths.py``, bf16, instructions per tile-loop iteration): a length
tile is 1.06x a full one on sm_80 (d128) and 1.15-1.18x on sm_90 (d128 / d64), a bit-masked one 1.27-1.35x:
the compare and ``-inf`` select are one instruction per score element.

The variant has never run on a GPU: it runs only where its first-use self-check
(:data:`VARIANT`, :mod:`dit_accel.kernels.selfcheck`) passed; elsewhere the bit-mask path runs.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .. import selfcheck
from ..request import in_graph

from ..dense.tiles import LN2, row_words, words_keep

__all__ = ["VARIANT", "len_step", "bit_masked", "fwd_epilogue", "prefix_masks", "runs_lengths"]

#: The self-check's name of the forward that runs column-prefix tiles by their length.
VARIANT = "block_sparse.triton.fwd_len"


@triton.jit
def len_step(q, k, v, acc, m_i, l_i, qk_scale, count, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The online-softmax update with a tile whose first ``count`` (>= 1) key columns are allowed in every
    row: every row keeps a finite maximum, so no ``-inf`` guard is needed (as in a full tile)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = tl.where(tl.arange(0, BLOCK_N)[None, :] < count, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def bit_masked(s, lo, hi, off, BITS, bits, i, n_tot, rows, bits_w, BLOCK_N: tl.constexpr):
    """A partial tile's element mask on ``s``; the next partial tile's words (and the offset after) read ahead."""
    s = tl.where(words_keep(lo, hi, BLOCK_N), s, float("-inf"))
    lo, hi = row_words(BITS, off, rows, bits_w, BLOCK_N)  # offset 0 past the end: valid
    off = tl.load(bits + i + 2, mask=i + 2 < n_tot, other=0)
    return s, lo, hi, off


@triton.jit
def fwd_epilogue(O, LSE, b, h, row0, sob, soh, son, slb, slh, acc, m_i, l_i, q_len, head_dim,  # noqa: E741
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """O and LSE of a query tile; rows that saw no allowed key get o = 0, lse = -inf."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = (O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64)[:, None] * son
              + offs_d[None, :])
    lse_ptrs = LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + offs_m
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty),
             mask=(offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(lse_ptrs, lse, mask=offs_m < q_len)


#: id(mask table) -> (a weak reference to it, its version counter, its prefix count): layouts built per call around
#: one mask table (VSA's fine branch: the partial cubes' table, made once per grid) read it back once.
_PREFIX: Dict[int, tuple] = {}
_PREFIX_MAX = 64


def prefix_masks(layout) -> int:
    """How many of ``layout``'s element masks allow the same column prefix in every row (one host sync per mask
    table: kept while the table lives and is not edited)."""
    from ..geometry import column_prefix

    table = layout.mask_table
    if not table.numel():
        return 0
    version = _version(table)
    hit = _PREFIX.get(id(table))
    if hit is not None and hit[0]() is table and hit[1] == version:
        return hit[2]
    count = int(column_prefix(table).sum())
    if len(_PREFIX) >= _PREFIX_MAX:
        _PREFIX.clear()
    _PREFIX[id(table)] = (weakref.ref(table), version, count)
    return count


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version (and refuses in-place edits outside it)
        return None


def runs_lengths(q: torch.Tensor, layout, forced: Optional[bool], cache) -> bool:
    """Whether a forward runs its column-prefix tiles by length: where ``forced`` says so, else where ``layout``
    has such tiles (:func:`prefix_masks`, kept in the launchers' plan ``cache``; not decided inside a capture)
    and the variant passed its self-check on this device, dtype and shape."""
    if forced is not None:
        return forced
    has = cache.get(layout, ("has_lengths",), lambda: None if in_graph() else bool(prefix_masks(layout)))
    return bool(has) and selfcheck.usable_fast(VARIANT, q.device, q.dtype, q.shape[-1], layout.block_q,
                                               layout.block_k)
