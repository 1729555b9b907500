"""Sliding tile attention (STA): windows counted in tiles, on the separable machinery.

STA is GNA with ``kernel_size = window * tile`` and ``stride = tile`` applied on
the tile-padded grid (METHODS.md), so it shares :func:`~.separable.relation_1d`
with :func:`~.gna.gna_mask`. An even window ``w`` follows FastVideo's STA: it
covers tiles ``centre - w//2 .. centre + w//2``, the same tiles as ``w + 1``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._util import cdiv
from ..kernels.layout import BlockLayout
from .checks import as_grid, int_or_tuple, per_dim, positive_int
from .permutation import TilePermutation, block_box, permutation_for
from .separable import kron, relation_1d, separable_layout

__all__ = ["tile_mask", "tile_layout", "check_tile_args", "tile_relations", "covered_tiles"]


def covered_tiles(window: int) -> int:
    """Tiles a window of ``window`` covers per dimension: odd windows themselves, even ``w`` as ``w + 1``."""
    return window | 1


def check_tile_args(tile, window, *, owner: str = ""):
    """Shape-free STA rules: ``tile >= 1`` and ``window >= 1`` (in tiles) per dimension, matching lengths."""
    tile = int_or_tuple(owner, "tile", tile, minimum=1)
    window = int_or_tuple(owner, "window", window, minimum=1)
    if isinstance(tile, tuple) and isinstance(window, tuple) and len(tile) != len(window):
        raise ValueError(f"{owner}window={window!r} is invalid: must have as many dimensions as tile {tile}")
    return tile, window


def tile_relations(grid, tile, window) -> Tuple[Tuple[int, ...], Tuple[int, ...], list]:
    """``(grid, tile, relations)``: STA arguments checked against ``grid``, one relation per dimension.

    Along a dimension, STA is GNA (kernel ``covered_tiles(window) * tile``, stride ``tile``)
    on the tile-padded extent, cut to the real tokens; a window of more tiles than the
    dimension has covers it all (dense along it).
    """
    grid = as_grid(grid)
    check_tile_args(tile, window)
    tile, window = per_dim("tile", tile, len(grid)), per_dim("window", window, len(grid))
    relations = []
    for extent, t, w in zip(grid, tile, window):
        padded = cdiv(extent, t) * t
        kernel = min(covered_tiles(w) * t, padded)
        relations.append(relation_1d(padded, kernel, min(t, kernel))[:extent, :extent])
    return grid, tile, relations


def tile_mask(grid, tile, window) -> torch.Tensor:
    """Token mask of sliding tile attention (STA), bool ``[N, N]`` in raster order.

    A query in tile ``q`` (per dimension) sees the key tiles within ``w // 2`` of
    ``clamp(q, w // 2, n_tiles - 1 - w // 2)``. Extents that are not tile multiples
    are padded (the last tile is partly empty), never rejected; a window of more
    tiles than the dimension has is dense along it.

    Args:
        grid: ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
        tile: tokens per tile, int or one per dimension.
        window: window in tiles, int or one per dimension; an even ``w`` covers the same
            tiles as ``w + 1`` (FastVideo's convention).

    Example::

        mask = tile_mask((30, 48, 80), tile=(6, 8, 8), window=(3, 3, 3))  # ~91% sparse
    """
    return kron(tile_relations(grid, tile, window)[2])


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
    grid, tile, rels = tile_relations(grid, tile, window)
    block_q, block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
    if block_box(tile, block_q) is None or block_box(tile, block_k) is None:
        tile = None  # the STA tile cannot hold whole blocks: permute by a tile that can
    perm = permutation_for(grid, tile, block_q, block_k)
    return perm, separable_layout(perm, rels, block_q, block_k)
