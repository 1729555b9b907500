"""Block layouts of the separable window patterns (GNA, sliding tile), without ``N x N``.

Tokens are put in tiled order (:class:`TilePermutation`) and cut into blocks of
``block_q`` / ``block_k`` consecutive positions. When the tile volume is a
multiple of the block and the block is a box inside the tile, every block is
an axis-aligned box of the padded grid, i.e. a product of one coordinate
interval per dimension. Because the pattern is separable, the relation between
a query box and a key box is the Kronecker product of per-dimension
sub-relations of the 1-D relation ``M_d``:

- full  iff every per-dimension sub-relation is all True,
- empty iff some per-dimension sub-relation is all False,
- otherwise partial, with element mask ``kron(sub_0, sub_1, sub_2)``.

Only per-dimension tables (at most ``L_d x L_d``) and block-pair tables are built.

Padding: key coordinates beyond the grid are never allowed. A padded query
coordinate behaves like the last real coordinate of its dimension, so padded
query rows never turn a full block partial and never have an empty row; their
outputs are dropped by :meth:`TilePermutation.unpermute`.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from ..kernels.layout import BlockLayout
from .gna import _gna_relations
from .tile import TilePermutation, _block_box, _pick_tile, _tile_relations

__all__ = ["gna_layout", "tile_layout"]


def _check_block(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive int such as 64 or 128")
    return value


def _box(perm: TilePermutation, block: int, name: str) -> Tuple[int, ...]:
    box = _block_box(perm.tile, block)
    if box is None:
        raise ValueError(
            f"{name}={block} does not cut tile={perm.tile} (volume {perm.tile_volume}) into boxes: the tile volume "
            f"must be a multiple of {name} and each block must span whole trailing tile dimensions (e.g. tile "
            f"(2, 8, 8) with blocks of 64 or 128). Pass such a tile, or tile=None to pick one")
    return box


def _extend(rel: torch.Tensor, padded: int) -> torch.Tensor:
    """``[L, L]`` relation -> ``[Lp, Lp]``: padded keys never allowed, padded queries copy the last real one."""
    extent = rel.shape[0]
    rows = torch.clamp(torch.arange(padded), max=extent - 1)
    out = torch.zeros(padded, padded, dtype=torch.bool)
    out[:, :extent] = rel[rows]
    return out


def _block_intervals(perm: TilePermutation, box: Sequence[int]) -> List[torch.Tensor]:
    """Per dimension, the interval id (start // box extent) of every block, in tiled order."""
    nd = len(box)
    per_tile = [t // b for t, b in zip(perm.tile, box)]  # boxes per tile along each dim
    n_blocks = perm.num_padded // math.prod(box)
    idx = torch.arange(n_blocks)
    tile_idx, inner = idx // math.prod(per_tile), idx % math.prod(per_tile)
    out = [None] * nd
    for d in reversed(range(nd)):
        start = (tile_idx % perm.num_tiles[d]) * perm.tile[d] + (inner % per_tile[d]) * box[d]
        out[d] = start // box[d]
        tile_idx, inner = tile_idx // perm.num_tiles[d], inner // per_tile[d]
    return out


def _separable_layout(perm: TilePermutation, relations: Sequence[torch.Tensor], block_q: int,
                      block_k: int) -> BlockLayout:
    """Block layout over tiled order of the separable pattern ``kron(relations)`` (real-grid relations)."""
    box_q, box_k = _box(perm, block_q, "block_q"), _box(perm, block_k, "block_k")
    iq, ik = _block_intervals(perm, box_q), _block_intervals(perm, box_k)
    n_q, n_k = iq[0].numel(), ik[0].numel()

    full = torch.ones(n_q, n_k, dtype=torch.bool)
    empty = torch.zeros(n_q, n_k, dtype=torch.bool)
    sub_tables, sub_ids = [], []
    for d, rel in enumerate(relations):
        m = _extend(rel, perm.padded_grid[d])
        lp, bq, bk = m.shape[0], box_q[d], box_k[d]
        sub = m.view(lp // bq, bq, lp // bk, bk).permute(0, 2, 1, 3)  # [nIq, nIk, bq, bk]
        # Dedupe sub-masks by content: a sliding window repeats few shapes.
        classes, cls = torch.unique(sub.reshape(-1, bq * bk), dim=0, return_inverse=True)
        cls = cls.view(sub.shape[:2])
        sub_tables.append(classes.view(-1, bq, bk))
        sub_ids.append(cls)
        # Interval-pair tables are tiny; expand them to block pairs by rows, then columns.
        full &= classes.all(-1)[cls].index_select(0, iq[d]).index_select(1, ik[d])
        empty |= (~classes.any(-1))[cls].index_select(0, iq[d]).index_select(1, ik[d])

    visited = ~empty
    partial = visited & ~full
    mask_ids = torch.full((n_q, n_k), -1, dtype=torch.int32)
    table = None
    if partial.any():
        qi, ki = partial.nonzero(as_tuple=True)
        key = torch.zeros_like(qi)  # mixed-radix id of the per-dim sub-mask classes
        for d, cls in enumerate(sub_ids):
            key = key * sub_tables[d].shape[0] + cls[iq[d][qi], ik[d][ki]]
        uniq, inverse = torch.unique(key, return_inverse=True)
        mask_ids[qi, ki] = inverse.to(torch.int32)
        # Decode the mixed-radix keys back to per-dim classes and take the Kronecker product.
        table = torch.ones(uniq.numel(), 1, 1, dtype=torch.bool)
        rem = uniq
        parts = []
        for tab in reversed(sub_tables):
            parts.append(tab[rem % tab.shape[0]])
            rem = rem // tab.shape[0]
        for part in reversed(parts):
            u, a, b = table.shape
            table = (table[:, :, None, :, None] & part[:, None, :, None, :]).reshape(u, a * part.shape[1],
                                                                                     b * part.shape[2])
    return BlockLayout.from_block_masks(visited, q_len=perm.num_padded, kv_len=perm.num_padded, block_q=block_q,
                                        block_k=block_k, mask_ids=mask_ids, mask_table=table)


def _permutation(grid, tile, block_q, block_k) -> TilePermutation:
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    if tile is None:
        tile = _pick_tile(grid, (block_q, block_k))
    return TilePermutation(grid, tile)


def gna_layout(grid, kernel_size, stride=1, dilation=1, is_causal=False, *, tile=None, block_q: int = 64,
               block_k: int = 64) -> Tuple[TilePermutation, BlockLayout]:
    """Block layout of :func:`gna_mask` over tiled token order, built without ``N x N``.

    Args:
        grid, kernel_size, stride, dilation, is_causal: as in :func:`gna_mask`.
        tile: token tile of the permutation (int or one per dimension); its volume
            must be a multiple of ``block_q`` and ``block_k`` and every block must
            be a box inside it. ``None`` picks :func:`default_tile`.
        block_q, block_k: kernel block sizes.

    Returns:
        ``(perm, layout)``: ``layout.q_len == layout.kv_len == perm.num_padded``.
        Run attention on ``perm.permute(q)``, ``perm.permute(k)``,
        ``perm.permute(v)`` and ``perm.unpermute`` the output. Padded keys are
        never allowed. Blocks are full, skipped, or partial with a deduplicated
        element mask; with stride a multiple of the tile and window starts on
        tile borders there are no partial blocks.

    Example::

        perm, layout = gna_layout((30, 48, 80), (18, 24, 24), stride=(6, 8, 8), tile=(6, 8, 8), block_q=128)
    """
    grid, rels = _gna_relations(grid, kernel_size, stride, dilation, is_causal)
    perm = _permutation(grid, tile, block_q, block_k)
    return perm, _separable_layout(perm, rels, block_q, block_k)


def tile_layout(grid, tile, window, *, block_q: int = 64, block_k: int = 64) -> Tuple[TilePermutation, BlockLayout]:
    """Block layout of :func:`tile_mask` (sliding tile attention) over tiled order, without ``N x N``.

    The permutation uses the STA tile itself when its blocks are boxes inside it
    (``prod(tile)`` a multiple of ``block_q`` and ``block_k``, e.g. tile (6, 8, 8)
    with blocks of 64 or 128); then every visited block is full, except where a
    non-divisible extent leaves padded keys inside a block. Any other tile (say
    (3, 5, 5)) still works: the permutation falls back to :func:`default_tile`
    and blocks on window borders get element masks.

    Returns ``(perm, layout)`` like :func:`gna_layout`; ``perm.tile`` is the
    permutation tile actually used.
    """
    grid, tile, rels = _tile_relations(grid, tile, window)
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    if _block_box(tile, block_q) is None or _block_box(tile, block_k) is None:
        tile = None  # the STA tile cannot hold whole blocks: permute by a tile that can
    perm = _permutation(grid, tile, block_q, block_k)
    return perm, _separable_layout(perm, rels, block_q, block_k)
