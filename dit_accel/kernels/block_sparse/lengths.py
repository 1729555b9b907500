"""The block-sparse forward's length tiles: a visited tile whose allowed pairs are its first ``c`` key columns.

A packed layout's ragged blocks (the last block of a Tile key tile, a VSA partial cube, the last block past the
key length) allow every row the same column prefix. The layout carries them as column-prefix masks
(``mask_table``); the bit-mask path loads a mask word per row per tile for them. With lengths, the tile plan
(:func:`.tile_plans.tile_plan` with ``lengths``) lists them between the full and the partial tiles with the count
``c`` in place of their bit offset. The backward and the twin keep running them as masks, and a forward that runs
lengths takes the one-loop kernel, never the (opt-in) warp-specialized one. Pointer loads (sm_80 / 89, unaligned
tensors) keep the ragged last key tile bit-masked (their length loop loads no row masks); TMA loads zero-fill past
the keys, so there it is a length tile too.

The mask is added by the tensor cores, not by a compare and select per score element: one more product of depth
16, ``[1, 0, ..., 0]`` per query row (:func:`length_rows`) times a ``[16, BLOCK_N]`` operand whose first row is
``0`` for the allowed columns and ``-inf`` for the others, read from a small table (:func:`len_bias_table`) at an
offset set by the count (:func:`length_bias`): each thread loads and stores one vector, and the masked scores come
out ``-inf`` exactly, as the bit-mask path writes them. The sm_90 loop reads a tile's kind with its column
(:func:`column_offsets`): a length tile is told from the others by one test.

Static cost (``tests/kernels/test_sass_lengths.py``, bf16, instructions per tile-loop iteration): a length tile is
1.03-1.04x a full one on sm_90 (d128 and d64) and 1.05x on sm_80 (d128), a bit-masked one 1.28-1.33x.

Timed on an H100 (BENCHMARKS section 10) the bit-mask path was faster on fitted Tile and VSA layouts (this path
0.92-0.93x of its speed, the earlier compare and select 0.96-1.00x): per length tile the table is loaded without
read-ahead and stored to shared memory behind a CTA barrier before the second product, where the bit-mask path
reads its mask words an iteration ahead. So the variant is opt-in (``DIT_ACCEL_LENGTHS=1``,
:data:`.configs.LENGTHS_OFF_REASON`), and even then runs only where its first-use self-check (:data:`VARIANT`,
:mod:`dit_accel.kernels.selfcheck`) passed; elsewhere the bit-mask path runs.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .. import selfcheck
from ..layout import tensor_version
from ..request import in_graph

from ..dense.tiles import row_words, words_keep
from .gather_tiles import store_rows
from .configs import lengths_enabled

__all__ = ["VARIANT", "PARTIAL", "len_step", "length_rows", "length_offsets", "length_bias", "bit_masked",
           "fwd_epilogue", "column_offsets", "len_bias_table", "prefix_masks", "runs_lengths"]

#: The self-check's name of the forward that runs column-prefix tiles by their length.
VARIANT = "block_sparse.triton.fwd_len"

#: The bit that marks a bit-masked tile in :func:`column_offsets`' entries (key columns stay below it).
PARTIAL = tl.constexpr(1 << 30)


@triton.jit
def len_step(q, k, v, acc, m_i, l_i, qk_scale, ones, LEN_BIAS, offsets, r, DOT_PRECISION: tl.constexpr):
    """The online-softmax update with a tile whose last ``r`` key columns are masked (:func:`length_bias`):
    every row keeps a finite maximum, so no ``-inf`` guard is needed (as in a full tile)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = length_bias(s, ones, LEN_BIAS, offsets, r, DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def length_rows(q, BLOCK_M: tl.constexpr):
    """The left operand of :func:`length_bias`: ``[BLOCK_M, 16]`` in ``q``'s dtype, ``[1, 0, ..., 0]`` per row."""
    first = (tl.arange(0, 16)[None, :] == 0) & (tl.arange(0, BLOCK_M)[:, None] >= 0)
    return tl.where(first, 1.0, 0.0).to(q.dtype)


@triton.jit
def length_offsets(BLOCK_N: tl.constexpr):
    """``[BLOCK_N, 16]`` element offsets of the table's rows (:func:`len_bias_table`), one row per key column."""
    return tl.arange(0, BLOCK_N)[:, None] * 16 + tl.arange(0, 16)[None, :]


@triton.jit
def length_bias(s, ones, LEN_BIAS, offsets, r, DOT_PRECISION: tl.constexpr):
    """``s`` with its last ``r`` (``0 .. BLOCK_N - 1``) columns set to ``-inf`` by the tensor cores: ``ones``
    (:func:`length_rows`) times the table's rows from row ``r`` on (``BLOCK_N - r`` rows of zeros, then ``r``
    whose first entry is ``-inf``). No instruction touches a score element."""
    bias = tl.load(LEN_BIAS + (offsets + r * 16))
    return tl.dot(ones, tl.trans(bias), s, input_precision=DOT_PRECISION)


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
    store_rows(O, LSE, b, h, offs_m, offs_m < q_len, sob, soh, son, slb, slh, acc, m_i, l_i, head_dim, BLOCK_D)


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
    version = tensor_version(table)
    hit = _PREFIX.get(id(table))
    if hit is not None and hit[0]() is table and hit[1] == version:
        return hit[2]
    count = int(column_prefix(table).sum())
    if len(_PREFIX) >= _PREFIX_MAX:
        _PREFIX.clear()
    _PREFIX[id(table)] = (weakref.ref(table), version, count)
    return count


def column_offsets(plan, block_n: int):
    """The sm_90 forward's form of a plan with lengths: each key tile as its first column, its kind in the bits a
    column offset leaves free. A length tile's low bits hold the number of columns it masks (``block_n - c``, in
    ``1 .. block_n - 1``), a bit-masked tile carries :data:`PARTIAL`, a full tile neither, so the loop reads a
    tile's kind and count with the tile itself."""
    table = plan.plan.clone()
    w = plan.w
    slot = torch.arange(w, device=table.device)
    n_full, n_rest, n_len = table[..., 0:1], table[..., 1:2], table[..., 2:3]
    counted = (slot >= n_full) & (slot < n_full + n_len)
    masked = (slot >= n_full + n_len) & (slot < n_full + n_rest)
    cols = table[..., 3:3 + w] * block_n
    cols = torch.where(counted, cols + block_n - table[..., 3 + w:], cols)
    table[..., 3:3 + w] = torch.where(masked, cols + PARTIAL.value, cols)
    return dataclasses.replace(plan, plan=table)


#: (device, dtype, block_n) -> the table :func:`length_bias` reads (``2 * block_n`` rows of 16 values).
_TABLES: Dict[tuple, torch.Tensor] = {}


def len_bias_table(device: torch.device, dtype: torch.dtype, block_n: int) -> torch.Tensor:
    """``[2 * block_n, 16]`` in ``dtype`` on ``device``: ``block_n`` rows of zeros, then ``block_n`` rows
    ``[-inf, 0, ..., 0]``. The kernels read ``block_n`` consecutive rows of it (:func:`length_bias`). Made once, but
    not kept when made inside a CUDA graph capture: there its values are written only when the graph replays, so
    it serves that call alone (a temporary of the graph, like its outputs)."""
    key = (torch.device(device), dtype, int(block_n))
    table = _TABLES.get(key)
    if table is None:
        table = torch.zeros(2 * block_n, 16, dtype=dtype, device=device)
        table[block_n:, 0] = float("-inf")
        if not in_graph():
            _TABLES[key] = table
    return table


def runs_lengths(q: torch.Tensor, layout, forced: Optional[bool], cache) -> bool:
    """Whether a forward runs its column-prefix tiles by length: where ``forced`` says so, else where
    ``$DIT_ACCEL_LENGTHS`` asks for them (:data:`.configs.LENGTHS_OFF_REASON` says why they are off by default),
    ``layout`` has such tiles (:func:`prefix_masks`, kept in the launchers' plan ``cache``; not decided inside a
    capture) and the variant passed its self-check on this device, dtype and shape."""
    if forced is not None:
        return forced
    if not lengths_enabled():
        return False
    has = cache.get(layout, ("has_lengths",), lambda: None if in_graph() else bool(prefix_masks(layout)))
    return bool(has) and selfcheck.usable_fast(VARIANT, q.device, q.dtype, q.shape[-1], layout.block_q,
                                               layout.block_k)
