"""Tiled token order: the tile permutation, block boxes inside a tile, and the default tile.

Tiled order lists tiles in raster order of their tile coordinates and the tokens
of each tile contiguously (raster order inside the tile), so a multi-dimensional
window becomes a few contiguous blocks (METHODS.md, "Tile permutation").
"""

from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .._util import cdiv, is_int
from .checks import as_grid, per_dim, positive_int

__all__ = ["TilePermutation", "PackedTilePermutation", "default_tile", "block_box", "pick_tile", "least_work_tile", "permutation_for",
           "PARTIAL_BLOCK_COST"]


class TilePermutation:
    """Raster token order <-> tiled order, padding each dimension to a tile multiple.

    Tiled order lists tiles in raster order of their tile coordinates, and the
    tokens of each tile contiguously, in raster order inside the tile. Padded
    positions (beyond the grid along some dimension) hold zeros after
    :meth:`permute`; layouts never let a query attend to them.

    Args:
        grid: ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
        tile: tokens per tile, int or one per dimension.

    Attributes:
        num_tokens: ``N = prod(grid)``.
        padded_grid: grid rounded up to tile multiples.
        num_padded: ``Np = prod(padded_grid)``.
        order: LongTensor ``[Np]``: raster index of each tiled position, ``-1`` for padding.
        identity: tiled order is raster order (no padding, tiles of whole rows, e.g. whole frames):
            :meth:`permute` and :meth:`unpermute` then return their input.

    Example::

        perm = TilePermutation((30, 48, 80), (6, 8, 8))
        q_tiled = perm.permute(q)           # (B, H, N, D) -> (B, H, Np, D)
        out = perm.unpermute(out_tiled)     # (B, H, Np, D) -> (B, H, N, D)
    """

    def __init__(self, grid, tile):
        self.grid = as_grid(grid)
        self.tile = per_dim("tile", tile, len(self.grid), minimum=1)
        self.padded_grid = tuple(cdiv(g, t) * t for g, t in zip(self.grid, self.tile))
        self.num_tiles = tuple(p // t for p, t in zip(self.padded_grid, self.tile))
        self.num_tokens = math.prod(self.grid)
        self.num_padded = math.prod(self.padded_grid)
        self.tile_volume = math.prod(self.tile)
        coords = self.coords()  # [Np, nd] padded coordinates of each tiled position
        real = (coords < torch.tensor(self.grid)).all(-1)
        strides = torch.tensor([math.prod(self.grid[d + 1:]) for d in range(len(self.grid))])
        self.order = torch.where(real, (coords * strides).sum(-1), -1)
        self.inverse = real.nonzero().flatten()[torch.argsort(self.order[real])]  # tiled position of each raster index
        self.identity = self.num_padded == self.num_tokens and bool((self.order == torch.arange(self.num_tokens)).all())
        self._device_cache = {}

    def coords(self) -> torch.Tensor:
        """LongTensor ``[Np, ndim]``: the padded grid coordinate of each tiled position."""
        nd = len(self.grid)
        pos = torch.arange(self.num_padded)
        tile_idx, inner = pos // self.tile_volume, pos % self.tile_volume
        out = torch.empty(self.num_padded, nd, dtype=torch.long)
        for d in reversed(range(nd)):
            out[:, d] = (tile_idx % self.num_tiles[d]) * self.tile[d] + inner % self.tile[d]
            tile_idx, inner = tile_idx // self.num_tiles[d], inner // self.tile[d]
        return out

    def prepare(self, device) -> None:
        """Move the index tensors to ``device`` now (``torch.compile`` then traces calls without moving them, and a
        CUDA-graph capture copies none)."""
        self._indices(device)
        self.row_table(device)

    def row_table(self, device) -> torch.Tensor:
        """int32 ``[Np]`` on ``device``: the raster token of each tiled position, ``-1`` at padded ones (the row
        table through which the block-sparse kernel reads raster order: ``dit_accel.kernels.block_sparse.gather``);
        made once per device."""
        key = ("rows", torch.device(device))
        if key not in self._device_cache:
            with torch.inference_mode(False):  # (kept: see _kept)
                self._device_cache[key] = _kept(self.order.to(dtype=torch.int32), key[1])
        return self._device_cache[key]

    def _indices(self, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gather, inverse, pads)`` on ``device``: the raster token of each tiled position (token 0 at a padded
        one), the tiled position of each raster token, and the padded positions."""
        device = torch.device(device)
        if device not in self._device_cache:
            with torch.inference_mode(False):  # (kept: see _kept)
                gather = self.order.clamp_min(0)
                pads = (self.order < 0).nonzero().flatten()
                self._device_cache[device] = tuple(_kept(t, device) for t in (gather, self.inverse, pads))
        return self._device_cache[device]

    def _check(self, x: torch.Tensor, dim: int, expected: int, what: str) -> int:
        if not isinstance(x, torch.Tensor):  # (AttributeError "'list' object has no attribute 'dim'")
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not is_int(dim):  # (a float dim raised "tuple indices must be integers" from inside)
            raise TypeError(f"dim={dim!r} is invalid: expected an int, the token axis of x")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
        dim %= x.dim()
        if x.shape[dim] != expected:
            raise ValueError(f"x has {x.shape[dim]} positions along dim={dim}, expected {expected} ({what}) "
                             f"for grid={self.grid}, tile={self.tile}")
        return dim

    def permute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Raster ``[..., N, ...]`` -> tiled and zero-padded ``[..., Np, ...]`` along ``dim`` (differentiable: the
        gradient is :meth:`unpermute`'s gather, no scatter)."""
        dim = self._check(x, dim, self.num_tokens, "N raster tokens")
        # No copy: the four gathers of q, k, v and o cost 5-15% of a whole-frame Tile call's self-attention on CPU
        # (BENCHMARKS.md section 8.7).
        if self.identity:
            return x
        gather, inverse, pads = self._indices(x.device)
        # (x's gradient comes back laid out as x is, where x is a (B, N, H, D) tensor viewed as (B, H, N, D))
        return _reindex(x, dim, gather, pads, inverse, None, back_nhd=_is_nhd(x, dim))

    def unpermute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Tiled ``[..., Np, ...]`` -> raster ``[..., N, ...]`` along ``dim``; padded positions are dropped.

        A ``(B, H, Np, D)`` attention output comes back as ``(B, H, N, D)`` laid out as ``(B, N, H, D)`` in memory,
        as SDPA's CUDA kernels return theirs: a pipeline's ``transpose(1, 2).flatten(2)`` is then a view, not a
        copy of the whole output."""
        dim = self._check(x, dim, self.num_padded, "Np tiled positions")
        if self.identity:
            return x
        gather, inverse, pads = self._indices(x.device)
        return _reindex(x, dim, inverse, None, gather, pads, nhd=x.dim() == 4 and dim == 2)

    def __repr__(self) -> str:
        return (f"TilePermutation(grid={self.grid}, tile={self.tile}, padded_grid={self.padded_grid}, "
                f"N={self.num_tokens}, Np={self.num_padded})")


def _kept(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` as a normal tensor, for the index tables a permutation keeps between calls (made with
    ``torch.inference_mode(False)``): made as inference tensors (a first call under ``torch.inference_mode``, a preview
    or a validation step), a later permute that records a backward could not save them, torch's "Inference tensors
    cannot be saved for backward". A copy where ``t`` itself is one (a permutation built in inference mode), which
    ``to()`` returns as it is."""
    t = t.to(device)
    return t.clone() if t.is_inference() else t


def _reindex(x: torch.Tensor, dim: int, index: torch.Tensor, zero: Optional[torch.Tensor], back: torch.Tensor,
             back_zero: Optional[torch.Tensor], *, nhd: bool = False, back_nhd: bool = False) -> torch.Tensor:
    """``x`` gathered along ``dim`` by ``index``, the positions ``zero`` set to zero: one direction of a token
    permutation, whose gradient is the other direction (gathered by ``back``, ``back_zero`` zeroed). ``nhd``
    (``back_nhd`` for the gradient): a 4-D result laid out as ``(B, N, H, D)`` in memory.

    Autograd's own backward of a gather is a scatter-add into a zero tensor (a fill, then atomic adds on a GPU): two
    passes and atomics for what is, between real tokens, a bijection. Here the backward is the inverse gather, one
    pass, the same values (each real token's gradient has exactly one source; a padded position's is dropped or
    zero), and itself differentiable."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Reindex.apply(x, dim, index, zero, back, back_zero, nhd, back_nhd)
    return _gather(x, dim, index, zero, nhd)


def _is_nhd(x: torch.Tensor, dim: int) -> bool:
    return x.dim() == 4 and dim == 2 and x.transpose(1, 2).is_contiguous()


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor, zero: Optional[torch.Tensor], nhd: bool) -> torch.Tensor:
    out = x.transpose(1, 2).index_select(1, index).transpose(1, 2) if nhd else x.index_select(dim, index)
    # Padded positions gathered token 0: zero them (no concatenated copy of x with a zero row).
    return out.index_fill_(dim, zero, 0) if zero is not None and zero.numel() else out


class _Reindex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, index, zero, back, back_zero, nhd, back_nhd):
        ctx.dim, ctx.nhd, ctx.back_nhd = dim, nhd, back_nhd
        ctx.save_for_backward(index, zero, back, back_zero)
        return _gather(x, dim, index, zero, nhd)

    @staticmethod
    def backward(ctx, grad):
        index, zero, back, back_zero = ctx.saved_tensors
        return (_reindex(grad, ctx.dim, back, back_zero, index, zero, nhd=ctx.back_nhd, back_nhd=ctx.nhd),
                None, None, None, None, None, None, None)


class PackedTilePermutation(TilePermutation):
    """Tiled order in which every tile's real tokens come first and its padding last, each tile ``slot`` positions.

    Where :class:`TilePermutation` pads every dimension (a partial edge tile keeps holes where its missing rows
    and columns would be), this order packs a tile's real tokens (raster order inside the tile) at its start and
    pads the tile to ``slot`` positions, a multiple of the kernel block. A block then never straddles two tiles,
    and a block's padding is its tail: its validity is a length (the first ``c`` keys), which kernels run as a
    column count rather than an element mask (ARCHITECTURE.md, "Geometry before kernels").

    Example: tile (1, 6, 52) on Wan 2.1 480p's (21, 30, 52) holds 312 tokens, packed into 320 positions (five
    blocks of 64, the last holding 56 tokens); Np / N = 320 / 312.

    Args:
        grid, tile: as :class:`TilePermutation`.
        block: the kernel block; ``slot`` is ``prod(tile)`` rounded up to a multiple of it.
    """

    def __init__(self, grid, tile, block: int = 64):
        self.grid = as_grid(grid)
        self.tile = per_dim("tile", tile, len(self.grid), minimum=1)
        self.block = positive_int("block", block)
        self.num_tiles = tuple(cdiv(g, t) for g, t in zip(self.grid, self.tile))
        self.padded_grid = tuple(n * t for n, t in zip(self.num_tiles, self.tile))
        self.tile_volume = math.prod(self.tile)
        self.slot = cdiv(self.tile_volume, self.block) * self.block
        self.num_tokens = math.prod(self.grid)
        self.num_padded = math.prod(self.num_tiles) * self.slot
        nd = len(self.grid)
        raster = torch.arange(self.num_tokens).view(self.grid)
        coords = [torch.arange(g) for g in self.grid]
        tile_of = [c // t for c, t in zip(coords, self.tile)]
        # Sort the raster tokens by (tile index, raster index): each tile's real tokens, in raster order.
        tile_idx = torch.zeros(self.grid, dtype=torch.long)
        for d in range(nd):
            shape = [1] * nd
            shape[d] = self.grid[d]
            tile_idx = tile_idx * self.num_tiles[d] + tile_of[d].view(shape)
        tile_idx = tile_idx.flatten()
        order_tokens = raster.flatten()[torch.argsort(tile_idx * self.num_tokens + raster.flatten())]
        counts = torch.bincount(tile_idx, minlength=math.prod(self.num_tiles))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(self.num_tokens) - torch.repeat_interleave(starts, counts)
        position = torch.repeat_interleave(torch.arange(counts.numel()), counts) * self.slot + rank
        self.order = torch.full((self.num_padded,), -1, dtype=torch.long)
        self.order[position] = order_tokens
        self.inverse = torch.empty(self.num_tokens, dtype=torch.long)
        self.inverse[order_tokens] = position
        #: Real tokens per tile, in tile order.
        self.tile_counts = counts
        self.identity = self.num_padded == self.num_tokens and bool((self.order == torch.arange(self.num_tokens)).all())
        self._device_cache = {}

    def coords(self) -> torch.Tensor:
        raise NotImplementedError("a PackedTilePermutation's positions are not a padded grid's: use order/inverse")

    def block_lengths(self) -> torch.Tensor:
        """int64 ``[Np / block]``: the real tokens at the start of each block (the rest of the block is padding)."""
        per = self.slot // self.block
        inner = torch.arange(per) * self.block
        return (self.tile_counts[:, None] - inner[None, :]).clamp(0, self.block).flatten()

    def __repr__(self) -> str:
        return (f"PackedTilePermutation(grid={self.grid}, tile={self.tile}, slot={self.slot}, N={self.num_tokens}, "
                f"Np={self.num_padded})")


def block_box(tile: Sequence[int], block: int):
    """Shape of a block of ``block`` consecutive tiled positions if it is a box inside a tile, else None.

    Inside a tile tokens are in raster order, so a block is a box iff it spans
    whole trailing dimensions and a divisor of the next one.
    """
    box: List[int] = [1] * len(tile)
    rem = block
    for d in reversed(range(len(tile))):
        if rem == 1:
            break
        if rem >= tile[d]:
            if rem % tile[d]:
                return None
            box[d], rem = tile[d], rem // tile[d]
        else:
            if tile[d] % rem:
                return None
            box[d], rem = rem, 1
    return tuple(box) if rem == 1 else None


def _candidate_tiles(grid: Tuple[int, ...], blocks: Sequence[int]):
    """Tiles of volume ``max(blocks)`` in which every block is a box, each with :func:`pick_tile`'s order key
    (fewest padded tokens, then the most cube-like, then larger trailing extents)."""
    block = max(blocks)
    divisors = [t for t in range(1, block + 1) if block % t == 0]
    for tile in itertools.product(*[divisors] * len(grid)):
        if math.prod(tile) != block or any(block_box(tile, b) is None for b in blocks):
            continue
        padded = math.prod(cdiv(g, t) * t for g, t in zip(grid, tile))
        yield tile, (padded, max(tile) / min(tile), tuple(-t for t in reversed(tile)))


def pick_tile(grid: Tuple[int, ...], blocks: Sequence[int]) -> Tuple[int, ...]:
    block = max(blocks)
    if len(grid) == 1:
        return (block,)
    # Fewest padded tokens first, then the most cube-like tile (window locality), then larger trailing extents.
    best = min(_candidate_tiles(grid, blocks), key=lambda c: c[1], default=(None,))[0]
    if best is None:  # pragma: no cover - block is a power of two in practice
        raise ValueError(f"no tile of {block} tokens with box-shaped blocks {tuple(blocks)} exists for grid={grid}; "
                         f"pass tile= explicitly")
    return best


#: A partial (element-masked) block's cost relative to a full one, for choosing tiles: the compiled
#: block-sparse forward's partial vs full tile loop (sm_90, bf16, head dim 128: 495 vs 381 SASS
#: instructions per tile, BENCHMARKS.md section 7).
PARTIAL_BLOCK_COST = 1.3


def least_work_tile(grid: Tuple[int, ...], relations: Sequence[torch.Tensor], block: int = 64,
                    partial_cost: float = PARTIAL_BLOCK_COST) -> Tuple[int, ...]:
    """The tile of ``block`` tokens under which the separable pattern ``kron(relations)`` costs least
    (``relations``: ``[L, L]`` bool tensors or :class:`~dit_accel.patterns.separable.Band` objects).

    With one block per tile, block ``(a, b)`` is visited iff every dimension's tile pair holds a
    related token pair, and needs no element mask iff every dimension's tile pair is fully
    related (no padding), so the visited and full block counts are products over dimensions.
    The cost is ``visited + (partial_cost - 1) * partial`` blocks; ties go to
    :func:`pick_tile`'s order (least padding, most cube-like).

    Example::

        >>> from dit_accel.patterns.gna import gna_relations
        >>> grid, rels = gna_relations((21, 30, 52), (7, 16, 16), 1, 1, False)
        >>> least_work_tile(grid, rels)     # visits 0.094 of the blocks; pick_tile's (1, 16, 4): 0.120
        (1, 8, 8)
    """
    grid = as_grid(grid)
    if len(grid) == 1:
        return (block,)
    cache = {}  # (dim, tile extent) -> (visited tile pairs, full tile pairs)

    def counts(d: int, t: int):
        if (d, t) not in cache:
            n = grid[d]
            m = cdiv(n, t) * t
            rel = torch.zeros(m, m, dtype=torch.bool)
            given = relations[d]  # (a separable.Band, the rule, builds its n x n relation here: n is short)
            rel[:n, :n] = (given.dense() if callable(getattr(given, "dense", None)) else given).bool()
            real = torch.zeros(m, dtype=torch.bool)
            real[:n] = True
            pairs = rel.view(m // t, t, m // t, t)
            full = (pairs & real.view(m // t, t)[:, :, None, None] & real.view(m // t, t)[None, None]).all(3).all(1)
            cache[(d, t)] = (int(pairs.any(3).any(1).sum()), int(full.sum()))
        return cache[(d, t)]

    def cost(tile) -> float:
        dims = [counts(d, t) for d, t in enumerate(tile)]
        visited, full = math.prod(v for v, _ in dims), math.prod(f for _, f in dims)
        return visited + (partial_cost - 1.0) * (visited - full)

    return min(_candidate_tiles(grid, (block,)), key=lambda c: (cost(c[0]), c[1]))[0]


def default_tile(grid, block: int = 64) -> Tuple[int, ...]:
    """A tile of ``block`` tokens for ``grid`` in which each block of ``block`` tokens is a box.

    Picks, among tiles whose volume equals ``block``, the one that pads the grid
    least, then the most cube-like one. 1-D grids get ``(block,)``.

    Example::

        >>> default_tile((30, 48, 80), 64)
        (2, 4, 8)
    """
    return pick_tile(as_grid(grid), (positive_int("block", block),))


def permutation_for(grid: Tuple[int, ...], tile, block_q: int, block_k: int,
                    relations: Optional[Sequence[torch.Tensor]] = None) -> TilePermutation:
    """The tiled order for blocks of ``block_q``/``block_k``: ``tile`` itself, or a picked one for None.

    Given the separable pattern's ``relations`` (and equal block sizes), the picked tile is the one
    under which the pattern costs least (:func:`least_work_tile`); otherwise the least-padding one
    (:func:`pick_tile`).
    """
    block_q, block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
    if tile is None:
        if relations is not None and block_q == block_k:
            tile = least_work_tile(grid, relations, block_q)
        else:
            tile = pick_tile(grid, (block_q, block_k))
    return TilePermutation(grid, tile)
