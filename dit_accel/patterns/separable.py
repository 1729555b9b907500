"""The one window machinery: separable patterns as index math, masks and block layouts without ``N x N``.

Every window in :mod:`dit_accel.patterns` (GNA, sliding tile, the spatial part of
radial-window) is *separable*: a token pair is allowed iff it is allowed along
every grid dimension. A pattern is therefore given by one small relation
``M_d[L_d, L_d]`` per dimension (:func:`relation_1d`), and:

- its token mask (raster order ``idx = t*H*W + h*W + w``) is the Kronecker
  product of the relations (:func:`kron`);
- its block layout over tiled order (:class:`TilePermutation`) follows from
  per-dimension sub-relations when every block is an axis-aligned box of the
  padded grid (:func:`separable_blocks`, :func:`separable_layout`): a block pair is
  full iff every per-dimension sub-relation is all True, empty iff one is all
  False, otherwise partial with element mask ``kron(sub_0, sub_1, ...)``.

Only per-dimension tables (at most ``L_d x L_d``) and block-pair tables are built; given a
:class:`Band` (the 1-D rule itself) instead of a relation tensor, not even ``L_d x L_d``: a long
1-D grid (100k tokens, a 10 GB relation) is laid out from index math on the band.

Per-head patterns (a window per attention head, as in FastVideo's searched STA
strategies) are one layout per distinct window, stacked along the layout's head
axis by :func:`stack_heads`: one kernel launch runs every head with its own blocks.

Padding: key coordinates beyond the grid are never allowed. A padded query
coordinate behaves like the last real coordinate of its dimension, so padded
query rows never turn a full block partial and never have an empty row; their
outputs are dropped by :meth:`TilePermutation.unpermute`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .._util import is_int
from ..kernels.layout import BlockLayout
from . import checks
from .permutation import PackedTilePermutation, TilePermutation, block_box

__all__ = ["window_1d", "relation_1d", "Band", "relation_density", "kron", "covers_grid", "block_boxes", "block_intervals",
           "separable_blocks", "separable_layout", "stack_heads", "wide_query_layout"]


# ------------------------------------------------------------------ the 1-D rule
def window_1d(extent: int, kernel: int, stride: int = 1, causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query key window ``[start, end)`` on one undilated dimension (METHODS.md, GNA 1-D rule).

    Accepts ``kernel == 1`` and any ``kernel <= extent`` (sliding-tile windows of one
    tile); :mod:`dit_accel.patterns.gna` requires ``kernel >= 2`` of its users.
    """
    i = torch.arange(extent)
    group = i // stride
    if causal:
        leader = torch.clamp(group * stride + stride - 1, max=extent - 1)
        return torch.clamp(leader - (kernel - 1), min=0), i + 1
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1  # even kernels take one more key on the left
    leader = torch.clamp(group * stride + stride // 2, max=extent - 1)
    centre = torch.clamp(leader, min=left, max=extent - 1 - right)  # pushed inward at borders
    return centre - left, centre + right + 1


def _rule_args(extent, kernel, stride, dilation) -> Tuple[int, int, int, int]:
    """The 1-D rule's ints: each an int >= 1 (a bool, a float or a string refused: ``stride=0`` divided by zero and
    ``kernel=0`` gave an all-False relation); TypeError / ValueError naming the argument."""
    values = {"extent": extent, "kernel": kernel, "stride": stride, "dilation": dilation}
    for name, value in values.items():
        if not is_int(value) or value < 1:
            raise (TypeError if not is_int(value) else ValueError)(
                f"relation_1d: {name}={value!r} is invalid: an int >= 1 (extent: tokens along the dimension; kernel: "
                "window size; stride: query group size; dilation: key spacing)")
    return tuple(int(v) for v in values.values())


def _spans(extent: int, kernel: int, stride: int, dilation: int, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query coordinate, its key window ``[start, end)`` inside its dilation group (group-inner indices)."""
    start, end = torch.empty(extent, dtype=torch.long), torch.empty(extent, dtype=torch.long)
    for r in range(min(dilation, extent)):
        start[r::dilation], end[r::dilation] = window_1d(len(range(r, extent, dilation)), kernel, stride, causal)
    return start, end


def _check_room(what: str, extent: int, copies: int) -> None:
    """MemoryError before ``copies`` x ``extent x extent`` bools this machine cannot hold (the out-of-memory killer
    ended the process without a word), with what to do instead."""
    need = copies * extent * extent
    if need >= 1 << 28:  # (under a quarter GiB: not worth a read of /proc/meminfo on every small relation)
        checks.check_room(need, f"{what} materialises {extent} x {extent} bools",
                          "build block layouts from the rule (gna_layout, Band), which never materialises it, or use "
                          "a shorter grid")


def relation_1d(extent: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False) -> torch.Tensor:
    """Allowed relation of one dimension, bool ``[extent, extent]`` (query, key).

    Dilation splits the dimension into ``dilation`` interleaved groups; queries
    and keys must share a group and the rule applies to coordinates inside it.
    ``extent x extent`` bools: a long 1-D grid's block layout comes from :class:`Band` instead (never built), and a
    relation this machine cannot hold is a MemoryError up front, not the out-of-memory killer.
    """
    extent, kernel, stride, dilation = _rule_args(extent, kernel, stride, dilation)
    _check_room(f"relation_1d(extent={extent})", extent, 3)  # (the relation and two row-band temporaries)
    start, end = _spans(extent, kernel, stride, dilation, causal)
    allowed = torch.zeros(extent, extent, dtype=torch.bool)
    for r in range(min(dilation, extent)):  # group r: coordinates r, r + dilation, ...; keys by group-inner index
        inner = torch.arange(len(range(r, extent, dilation)))
        band = start[r::dilation, None] <= inner
        band &= inner < end[r::dilation, None]
        allowed[r::dilation, r::dilation] = band
    return allowed


@dataclass(frozen=True)
class Band:
    """One dimension's relation as its rule (:func:`relation_1d`'s arguments), never built as ``L x L``.

    A 1-D neighbourhood is a band: each query's keys lie in one span of known ends, so a block pair is
    visited iff the band meets it, which index math decides. :func:`separable_blocks` and :func:`covers_grid`
    take a Band wherever they take a relation tensor, with identical results; :meth:`dense` builds the tensor.
    """

    extent: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    causal: bool = False

    def __post_init__(self):
        for name, value in zip(("extent", "kernel", "stride", "dilation"),
                               _rule_args(self.extent, self.kernel, self.stride, self.dilation)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "causal", bool(self.causal))

    def dense(self) -> torch.Tensor:
        return relation_1d(self.extent, self.kernel, self.stride, self.dilation, self.causal)

    def spans(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per query coordinate, its key window ``[start, end)`` in group-inner indices (:func:`_spans`)."""
        return _spans(self.extent, self.kernel, self.stride, self.dilation, self.causal)

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor, spans=None) -> torch.Tensor:
        """Whether query coordinate ``rows[..., i, None]`` may see key coordinate ``cols[..., None, j]`` (keys past
        the extent never; rows must lie inside it). ``spans``: :meth:`spans`, where the caller has them."""
        start, end = self.spans() if spans is None else spans
        d, r, c = self.dilation, rows[..., :, None], cols[..., None, :]
        inner = torch.div(c, d, rounding_mode="floor")
        return (c < self.extent) & (c % d == r % d) & (start[r] <= inner) & (inner < end[r])

    def covers(self) -> bool:
        """Whether every query sees every key (the relation is all True)."""
        if self.dilation > 1 and self.extent > 1:
            return False
        start, end = _spans(self.extent, self.kernel, self.stride, 1, self.causal)
        return bool((start <= 0).all() and (end >= self.extent).all())

    def density(self) -> float:
        """The relation's allowed fraction (``relation.float().mean()``)."""
        start, end = self.spans()
        size = torch.tensor([len(range(r, self.extent, self.dilation)) for r in range(self.dilation)])
        group = size[torch.arange(self.extent) % self.dilation]
        return float((torch.minimum(end, group) - start.clamp(min=0)).clamp(min=0).sum()) / self.extent ** 2

    def block_classes(self, padded: int, bq: int, bk: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`separable_blocks`' per-dimension view, as the extended relation's would be: ``(classes [C, bq *
        bk], cls [padded // bq, padded // bk])``, the distinct sub-masks of interval pairs (sorted as
        ``torch.unique`` sorts them) and each pair's class; only pairs the band meets are built."""
        n_q, n_k, d = padded // bq, padded // bk, self.dilation
        start, end = spans = self.spans()
        rows = torch.clamp(torch.arange(padded), max=self.extent - 1).view(n_q, bq)  # padded rows: the last real one
        first, last = rows % d + d * start[rows], rows % d + d * (end[rows] - 1)  # each query's key coordinate span
        lo = torch.clamp(torch.div(first.min(1).values, bk, rounding_mode="floor"), 0, n_k - 1)
        hi = torch.clamp(torch.div(last.max(1).values, bk, rounding_mode="floor"), 0, n_k - 1)
        counts = (hi - lo + 1).clamp(min=0)
        qi = torch.repeat_interleave(torch.arange(n_q), counts)
        kj = lo[qi] + torch.arange(qi.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        subs = self.allowed(rows[qi], kj[:, None] * bk + torch.arange(bk), spans).reshape(-1, bq * bk)
        outside = qi.numel() < n_q * n_k  # pairs the band misses: the all-False sub-mask
        if outside:
            subs = torch.cat([subs, torch.zeros(1, bq * bk, dtype=torch.bool)])
        classes, inverse = torch.unique(subs, dim=0, return_inverse=True)
        cls = torch.full((n_q, n_k), int(inverse[-1]) if outside else 0, dtype=torch.long)
        cls[qi, kj] = inverse[:qi.numel()]
        return classes, cls


def relation_density(rel) -> float:
    """The allowed fraction of one dimension's relation (a bool tensor or a :class:`Band`)."""
    return rel.density() if isinstance(rel, Band) else int(rel.sum()) / rel.numel()  # (exact, as Band's)


def kron(relations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token mask ``[N, N]`` (raster order) from per-dimension relations: allowed iff allowed along every dim."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for rel in relations:
        n, m = mask.shape
        mask = (mask[:, None, :, None] & rel[None, :, None, :]).reshape(n * rel.shape[0], m * rel.shape[1])
    return mask


def covers_grid(relations: Sequence[torch.Tensor]) -> bool:
    """Whether the separable pattern allows every pair: then it is dense attention."""
    return all(rel.covers() if isinstance(rel, Band) else bool(rel.all()) for rel in relations)


# ------------------------------------------------------------------ blocks as boxes
def block_boxes(perm: TilePermutation, block_q: int, block_k: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The box shape of query and key blocks inside ``perm``'s tile; ValueError when a block is no box."""
    boxes = []
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        box = block_box(perm.tile, block)
        if box is None:
            raise ValueError(
                f"{name}={block} does not cut tile={perm.tile} (volume {perm.tile_volume}) into boxes: the tile "
                f"volume must be a multiple of {name} and each block must span whole trailing tile dimensions "
                f"(e.g. tile (2, 8, 8) with blocks of 64 or 128). Pass such a tile, or tile=None to pick one")
        boxes.append(box)
    return boxes[0], boxes[1]


def _extend(rel: torch.Tensor, padded: int) -> torch.Tensor:
    """``[L, L]`` relation -> ``[Lp, Lp]``: padded keys never allowed, padded queries copy the last real one."""
    extent = rel.shape[0]
    rows = torch.clamp(torch.arange(padded), max=extent - 1)
    out = torch.zeros(padded, padded, dtype=torch.bool)
    out[:, :extent] = rel[rows]
    return out


def block_intervals(perm: TilePermutation, box: Sequence[int]) -> List[torch.Tensor]:
    """Per dimension, the interval id (start // box extent) of every block, in tiled order."""
    nd = len(box)
    per_tile = [t // b for t, b in zip(perm.tile, box)]  # boxes per tile along each dim
    n_blocks = perm.num_padded // math.prod(box)
    idx = torch.arange(n_blocks)
    tile_idx, inner = idx // math.prod(per_tile), idx % math.prod(per_tile)
    out: List[Optional[torch.Tensor]] = [None] * nd
    for d in reversed(range(nd)):
        start = (tile_idx % perm.num_tiles[d]) * perm.tile[d] + (inner % per_tile[d]) * box[d]
        out[d] = start // box[d]
        tile_idx, inner = tile_idx // perm.num_tiles[d], inner // per_tile[d]
    return out


def _block_classes(rel, padded: int, bq: int, bk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(classes [C, bq * bk], cls [nIq, nIk])``: the distinct sub-masks of one dimension's interval pairs (of
    ``bq`` query and ``bk`` key coordinates, over the padded extent) and each pair's class."""
    if isinstance(rel, Band):
        return rel.block_classes(padded, bq, bk)
    _check_room("a block layout of a relation tensor", padded, 3)  # (extended, then its interval pairs' copy)
    m = _extend(rel, padded)
    sub = m.view(padded // bq, bq, padded // bk, bk).permute(0, 2, 1, 3)  # [nIq, nIk, bq, bk]
    # Dedupe sub-masks by content: a sliding window repeats few shapes.
    classes, cls = torch.unique(sub.reshape(-1, bq * bk), dim=0, return_inverse=True)
    return classes, cls.view(sub.shape[:2])


def _kron_tables(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[U, a_d, b_d]`` per dimension -> ``[U, prod a_d, prod b_d]``: the element mask of box pairs."""
    table = torch.ones(parts[0].shape[0], 1, 1, dtype=torch.bool)
    for part in parts:
        u, a, b = table.shape
        table = (table[:, :, None, :, None] & part[:, None, :, None, :]).reshape(u, a * part.shape[1],
                                                                               b * part.shape[2])
    return table


def separable_blocks(perm: TilePermutation, relations: Sequence[torch.Tensor], block_q: int, block_k: int):
    """Block-level view of the separable pattern ``kron(relations)`` over ``perm``'s tiled order.

    Returns ``(visited, mask_ids, table)``: bool ``[nQ, nK]``, int64 ``[nQ, nK]`` (-1 for
    full and unvisited blocks, else a row of ``table``) and bool ``[P, block_q, block_k]``
    element masks of the distinct partial blocks (``P`` may be 0).
    """
    box_q, box_k = block_boxes(perm, block_q, block_k)
    iq, ik = block_intervals(perm, box_q), block_intervals(perm, box_k)
    n_q, n_k = iq[0].numel(), ik[0].numel()
    full = torch.ones(n_q, n_k, dtype=torch.bool)
    empty = torch.zeros(n_q, n_k, dtype=torch.bool)
    sub_tables, sub_ids = [], []
    for d, rel in enumerate(relations):
        classes, cls = _block_classes(rel, perm.padded_grid[d], box_q[d], box_k[d])
        bq, bk = box_q[d], box_k[d]
        sub_tables.append(classes.view(-1, bq, bk))
        sub_ids.append(cls)
        # Interval-pair tables are tiny; expand them to block pairs by rows, then columns.
        full &= classes.all(-1)[cls].index_select(0, iq[d]).index_select(1, ik[d])
        empty |= (~classes.any(-1))[cls].index_select(0, iq[d]).index_select(1, ik[d])
    visited = ~empty
    partial = visited & ~full
    mask_ids = torch.full((n_q, n_k), -1, dtype=torch.long)
    table = torch.zeros(0, block_q, block_k, dtype=torch.bool)
    if partial.any():
        qi, ki = partial.nonzero(as_tuple=True)
        key = torch.zeros_like(qi)  # mixed-radix id of the per-dim sub-mask classes
        for d, cls in enumerate(sub_ids):
            key = key * sub_tables[d].shape[0] + cls[iq[d][qi], ik[d][ki]]
        uniq, inverse = torch.unique(key, return_inverse=True)
        mask_ids[qi, ki] = inverse
        parts, rem = [], uniq  # decode the mixed-radix keys back to per-dim classes
        for tab in reversed(sub_tables):
            parts.append(tab[rem % tab.shape[0]])
            rem = rem // tab.shape[0]
        table = _kron_tables(parts[::-1])
    return visited, mask_ids, table


def separable_layout(perm: TilePermutation, relations: Sequence[torch.Tensor], block_q: int,
                     block_k: int) -> BlockLayout:
    """Block layout over tiled order of the separable pattern ``kron(relations)`` (real-grid relations)."""
    visited, mask_ids, table = separable_blocks(perm, relations, block_q, block_k)
    return BlockLayout.from_block_masks(visited, q_len=perm.num_padded, kv_len=perm.num_padded, block_q=block_q,
                                        block_k=block_k, mask_ids=mask_ids, mask_table=table)


# ------------------------------------------------------------------ 128-row query blocks
def wide_query_layout(perm: Optional[TilePermutation], layout: BlockLayout,
                      block_q: int = 128) -> Optional[BlockLayout]:
    """``layout`` with query blocks of ``block_q = 2 x layout.block_q`` rows, when that costs no extra work.

    Each wide block is two consecutive query blocks of ``layout`` (its halves). The wide layout
    is returned only when, in every layout head, the two halves of every wide block visit the
    same key blocks, each full in both or partial in both (a partial wide block's element mask
    is the two halves' masks stacked): then it visits exactly the key tiles per token that
    ``layout`` visits, with the same density and partial fraction, in half the query blocks
    (the sm_90 warp-specialized forward runs 128-row query blocks). Otherwise None: two halves
    with different key lists would visit their union (1.33x the work for a 64-token Tile window
    at 480p). Also None when a wide block is not a box inside one tile of ``perm`` (or ``perm`` is
    None) or the layout has an odd number of query blocks. In packed tile order
    (:class:`~.permutation.PackedTilePermutation`) a wide block must lie inside one tile's slot (a slot of a
    multiple of ``block_q`` positions): its rows are then one tile's real tokens and its padding tail.

    For sliding tile attention (stride = tile) every query of an STA tile has the same window,
    so whenever the STA tile is the permutation tile and ``block_q`` cuts it into boxes (tile
    (6, 8, 8) or (1, 16, 8)), every wide block qualifies; so does every wide block of a packed
    tile whose slot holds whole wide blocks (the fitted tiles: (21, 15, 2) at Wan 480p, 630 tokens in 640).
    """
    block_q = int(block_q)
    if perm is None or block_q != 2 * layout.block_q or layout.num_q_blocks % 2:
        return None
    if (perm.slot % block_q if isinstance(perm, PackedTilePermutation)
            else block_box(perm.tile, block_q) is None):
        return None
    # Packed lists first (cheap, no dense matrix): both halves list the same key blocks, full alike.
    counts, idx, ids = layout.kv_counts, layout.kv_indices, layout.kv_mask_ids
    slot = torch.arange(idx.shape[-1], device=idx.device)
    live = slot < counts[..., None]
    a, b = (slice(0, None, 2), slice(1, None, 2))
    if not (torch.equal(counts[:, a], counts[:, b])
            and torch.equal(torch.where(live[:, a], idx[:, a], -1), torch.where(live[:, b], idx[:, b], -1))
            and torch.equal(live[:, a] & (ids[:, a] >= 0), live[:, b] & (ids[:, b] >= 0))):
        return None
    mask_ids = ids.long()
    pairs = live[:, a] & (mask_ids[:, a] >= 0)  # partial wide blocks, by packed slot
    new_ids = torch.full(idx[:, a].shape, -1, dtype=torch.long, device=idx.device)
    table = torch.zeros(0, block_q, layout.block_k, dtype=torch.bool, device=idx.device)
    if bool(pairs.any()):
        first, second = mask_ids[:, a][pairs], mask_ids[:, b][pairs]
        uniq, inverse = torch.unique(first * layout.mask_table.shape[0] + second, return_inverse=True)
        p = layout.mask_table.shape[0]
        table = torch.cat([layout.mask_table[uniq // p], layout.mask_table[uniq % p]], dim=1)
        new_ids[pairs] = inverse
    heads, n_q = counts.shape[0], counts.shape[1] // 2
    visited = torch.zeros(heads, n_q, layout.num_kv_blocks, dtype=torch.bool, device=idx.device)
    dense_ids = torch.full(visited.shape, -1, dtype=torch.long, device=idx.device)
    h, q, s = live[:, a].nonzero(as_tuple=True)
    k = idx[:, a][h, q, s].long()
    visited[h, q, k] = True
    dense_ids[h, q, k] = new_ids[h, q, s]
    return BlockLayout.from_block_masks(visited, q_len=layout.q_len, kv_len=layout.kv_len, block_q=block_q,
                                        block_k=layout.block_k, mask_ids=dense_ids, mask_table=table)


# ------------------------------------------------------------------ per-head layouts
def stack_heads(layouts: Sequence[BlockLayout]) -> BlockLayout:
    """One per-head :class:`BlockLayout` (``Hl = len(layouts)``) from single-head layouts, head ``h`` = ``layouts[h]``.

    The layouts must share lengths and block sizes. Repeated layout objects (heads with the same
    window) are packed once and share their element masks in the stacked ``mask_table``. Works on
    the packed lists directly, so memory stays ``H x nQ x max visits``, never ``H x nQ x nK``.

    Example::

        _, wide = tile_layout(grid, (6, 8, 8), (3, 6, 10))
        _, narrow = tile_layout(grid, (6, 8, 8), (3, 3, 3))
        layout = stack_heads([wide, narrow, narrow])   # 3 heads, one kernel launch
    """
    layouts = list(layouts)
    if not layouts or not all(isinstance(x, BlockLayout) for x in layouts):
        raise TypeError("stack_heads takes a non-empty sequence of BlockLayout, one per head")
    first = layouts[0]
    shape = (first.q_len, first.kv_len, first.block_q, first.block_k)
    for h, lay in enumerate(layouts):
        got = (lay.q_len, lay.kv_len, lay.block_q, lay.block_k)
        if got != shape or lay.num_heads != 1:
            raise ValueError(f"layouts[{h}] has (q_len, kv_len, block_q, block_k) = {got} and {lay.num_heads} heads; "
                             f"stack_heads needs single-head layouts that all match layouts[0] {shape}")
    distinct = list({id(lay): lay for lay in layouts}.values())
    slot = {id(lay): u for u, lay in enumerate(distinct)}
    heads = torch.tensor([slot[id(lay)] for lay in layouts])
    offsets = [0]
    for lay in distinct[:-1]:  # mask-table rows of each distinct layout in the stacked table
        offsets.append(offsets[-1] + lay.mask_table.shape[0])

    def stacked(name: str, fill: int, shift: bool) -> torch.Tensor:
        parts = [getattr(lay, name)[0] for lay in distinct]
        out = torch.full((len(parts),) + parts[0].shape[:-1] + (max(p.shape[-1] for p in parts),), fill,
                         dtype=parts[0].dtype)
        for u, (part, offset) in enumerate(zip(parts, offsets)):
            out[u, ..., :part.shape[-1]] = torch.where(part >= 0, part + offset, part) if shift and offset else part
        return out if len(distinct) == len(layouts) else out.index_select(0, heads)  # one copy per head

    fields = {name: stacked(name, fill, name.endswith("mask_ids"))
              for name, fill in (("kv_counts", 0), ("kv_indices", 0), ("kv_mask_ids", -1), ("q_counts", 0),
                                 ("q_indices", 0), ("q_mask_ids", -1))}
    return BlockLayout(*shape, **fields, mask_table=torch.cat([lay.mask_table for lay in distinct]).contiguous())
