"""What a block layout costs against what its pattern attends: the true density, padded work and masked tiles.

The figures every efficiency is computed from:

- ``density``: visited query-key token pairs that are allowed and real, over ``N^2`` (``N`` real tokens):
  the pattern's own density, whatever the blocks;
- ``padded_work``: the work the kernel does (every visited block in full, ``block_q x block_k``) over the work
  at the true density (``density x N^2``): 1.0 for a kernel that wastes nothing;
- ``masked_tiles``: the fraction of visited blocks that need an element-wise mask, i.e. whose allowed real
  pairs are not a rectangle of the block's first ``r`` rows and first ``c`` columns (a block of that form
  runs with a row and a column count, no mask load).

Padding (positions a tiled order adds that hold no token) is given as ``q_real`` / ``kv_real``: bool vectors
over the layout's positions; a pair with a padded end is never counted as attended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layout import BlockLayout

__all__ = ["BlockFigures", "block_figures", "efficiency", "column_prefix", "prefix_counts", "kernel_length_tiles"]


@dataclass(frozen=True)
class BlockFigures:
    """The counts behind :func:`block_figures` (``heads`` layout heads averaged in the fractions)."""

    tokens_q: int  # real query tokens
    tokens_kv: int  # real key tokens
    visited_tiles: int  # visited (head, query block, key block) triples
    masked_tiles_count: int  # of those, the ones needing an element mask
    pairs: int  # allowed real pairs inside visited blocks, summed over layout heads
    heads: int
    block_q: int
    block_k: int

    @property
    def density(self) -> float:
        return self.pairs / (self.heads * self.tokens_q * self.tokens_kv)

    @property
    def padded_work(self) -> float:
        return self.visited_tiles * self.block_q * self.block_k / max(self.pairs, 1)

    @property
    def masked_tiles(self) -> float:
        return self.masked_tiles_count / max(self.visited_tiles, 1)


def _real(real: Optional[torch.Tensor], length: int, block: int, what: str) -> torch.Tensor:
    """``[n_blocks, block]`` bool: which positions of each block hold a real token (past ``length``: none)."""
    n = -(-length // block)
    out = torch.zeros(n * block, dtype=torch.bool)
    if real is None:
        out[:length] = True
    else:
        real = torch.as_tensor(real, dtype=torch.bool).flatten().cpu()
        if real.numel() != length:
            raise ValueError(f"{what} has {real.numel()} entries; expected one per layout position ({length})")
        out[:length] = real
    return out.view(n, block)


def _classes(rows: torch.Tensor):
    """Distinct rows of a ``[n, b]`` bool matrix: ``(table [u, b], class of each row [n])``."""
    table, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return table, inverse


def block_figures(layout: BlockLayout, q_real: Optional[torch.Tensor] = None,
                  kv_real: Optional[torch.Tensor] = None) -> BlockFigures:
    """The true density, padded work and masked tiles of ``layout`` (see the module docstring).

    Visited blocks are grouped by (element mask, real rows, real columns): each distinct group is worked
    out once, so a layout of millions of visited blocks costs a few unique calls.
    """
    bq, bk = layout.block_q, layout.block_k
    rq_table, rq_cls = _classes(_real(q_real, layout.q_len, bq, "q_real"))
    rk_table, rk_cls = _classes(_real(kv_real, layout.kv_len, bk, "kv_real"))
    lay = layout.to("cpu")
    keep = torch.arange(lay.kv_indices.shape[-1]) < lay.kv_counts[..., None]
    _, qb, _ = keep.nonzero(as_tuple=True)
    kb = lay.kv_indices[keep].long()
    mask_id = lay.kv_mask_ids[keep].long()
    n_rq, n_rk = rq_table.shape[0], rk_table.shape[0]
    key = ((mask_id + 1) * n_rq + rq_cls[qb]) * n_rk + rk_cls[kb]
    uniq, counts = torch.unique(key, return_counts=True)
    table = torch.cat([torch.ones(1, bq, bk, dtype=torch.bool), lay.mask_table.cpu()])
    rk_u, rest = uniq % n_rk, uniq // n_rk
    rq_u, m_u = rest % n_rq, rest // n_rq
    allowed = table[m_u] & rq_table[rq_u][:, :, None] & rk_table[rk_u][:, None, :]  # [U, bq, bk]
    pairs = allowed.sum((1, 2))
    rows = allowed.any(2).sum(1)  # rows with an allowed pair
    cols = allowed.any(1).sum(1)
    rect = (torch.arange(bq)[None, :, None] < rows[:, None, None]) & (torch.arange(bk)[None, None, :] <
                                                                      cols[:, None, None])
    length_bounded = (allowed == rect).all(2).all(1)
    return BlockFigures(tokens_q=int(rq_table[rq_cls].sum()), tokens_kv=int(rk_table[rk_cls].sum()),
                        visited_tiles=int(counts.sum()), masked_tiles_count=int(counts[~length_bounded].sum()),
                        pairs=int((pairs * counts).sum()), heads=layout.num_heads, block_q=bq, block_k=bk)


def efficiency(speedup: float, true_density: float) -> float:
    """The fraction of the ``1 / density`` ideal a kernel reaches: ``speedup x true density`` (the pattern's
    visited pairs over ``N^2``, not the padded blocks' work: padding is its own column, ``padded_work``)."""
    if not speedup > 0 or not 0 < true_density <= 1:
        raise ValueError(f"need a positive speedup and a density in (0, 1]; got {speedup}, {true_density}")
    return speedup * true_density


def column_prefix(table: torch.Tensor) -> torch.Tensor:
    """bool ``[P]``: which element masks ``[P, block_q, block_k]`` allow the same first ``c >= 1`` columns in every
    row (what the Triton forward's length variant runs with a column count, :mod:`.block_sparse.lengths`)."""
    return prefix_counts(table.bool(), rows=1)[0]


def prefix_counts(masks: torch.Tensor, rows: int):
    """``(prefix, count)`` of bool ``masks`` whose rows run along dimension ``rows`` and columns along the last:
    whether every row allows the same first ``count >= 1`` columns and nothing else, and that column count (the
    columns every row allows), each shaped like ``masks`` without those two dimensions."""
    cols = masks.all(rows)
    count = cols.sum(-1)
    first = torch.arange(masks.shape[-1], device=masks.device) < count[..., None]
    prefix = ((cols == masks.any(rows)) & (cols == first)).all(-1)
    return prefix & (count > 0), count


def kernel_length_tiles(layout: BlockLayout) -> Optional[float]:
    """Of the visited blocks that carry an element mask in ``layout``, the fraction the shipped Triton forward
    runs by a column count once its length variant passed its self-check (their masks are column prefixes);
    the rest load their bit masks. None when no visited block carries a mask."""
    lay = layout.to("cpu")
    keep = torch.arange(lay.kv_indices.shape[-1]) < lay.kv_counts[..., None]
    ids = lay.kv_mask_ids[keep].long()
    ids = ids[ids >= 0]
    if ids.numel() == 0:
        return None
    return float(column_prefix(lay.mask_table)[ids].float().mean())
