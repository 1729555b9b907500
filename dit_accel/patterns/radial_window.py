"""Radial attention with a true 2-D spatial window, on tiled token order (``Radial(spatial="window")``).

The temporal part is the reference rule of :mod:`dit_accel.patterns.radial`
unchanged: the same frame pairs are dense (distance <= 1, sink key frames),
dropped (the power-of-two split rule) or kept with a half-width ``half`` (in
tokens) that halves as the frame distance crosses powers of two. Only the
spatial relation inside a kept far frame pair changes: instead of a diagonal
band over raster positions (a strip of whole rows), each query sees a 2-D
window of rows and columns around its own position, which is what the paper
intends by spatial decay.

The definition, written once (``F, H, W`` the grid, ``S = H*W``)::

    state(qf, kf)   = reference rule (radial.py): drop | full | band(half),
                      half = floor(max(decay * width, B)) tokens, B = block_size
    full            -> window (kh, kw) = (H, W)
    band(half)      -> a  = 2*half + 1                        # keys an interior band query sees
                       rh = floor(H * sqrt(a / S) / 2)        # the frame scaled by sqrt(a / S):
                       rw = floor(W * sqrt(a / S) / 2)        # same key count, same aspect ratio
                       kh = min(2*rh + 1, H),  kw = min(2*rw + 1, W)
    drop            -> no key of frame kf
    window of k on an axis of extent L, query coordinate x:
                       start(x) = clamp(x - (k - 1) // 2, 0, L - k)     # pushed inward at borders (GNA)
                       allowed keys x' : start(x) <= x' < start(x) + k
    (qf, h, w) may attend to (kf, h', w')  iff  state(qf, kf) != drop
                                                and h' in window(h; kh, H) and w' in window(w; kw, W)

So within a kept frame pair every query sees exactly ``kh * kw`` keys, about
the ``2*half + 1`` of the band; at equal decay the token density of the two
variants is comparable. The per-axis windows are GNA relations
(:func:`~dit_accel.patterns.separable.relation_1d` with kernel ``kh`` / ``kw``),
so the spatial relation of a frame pair is separable.

Layout: tokens are permuted with a :class:`TilePermutation` whose tile is one
frame deep, ``(1, th, tw)`` with ``th*tw`` a multiple of the block, so every
block is an ``(1, bh, bw)`` box inside one frame. A block pair's relation is
then (frame-pair state) x (kron of per-axis sub-relations), decided from
``[L, L]`` per-axis tables and ``[blocks/frame]^2`` per-window tables: never
``N x N``. Blocks on window borders carry deduplicated element masks.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from ..kernels.layout import BlockLayout
from .checks import check_mask_memory, per_dim
from .permutation import TilePermutation, block_box, pick_tile
from .radial import frame_pair_states, radial_args
from .separable import kron, relation_1d, separable_blocks

__all__ = ["radial_window_layout", "radial_window_mask"]


def _band_to_window(half: int, height: int, width: int) -> Tuple[int, int]:
    """Band half-width in tokens -> per-axis window sizes ``(kh, kw)`` (module docstring)."""
    a, s = 2 * half + 1, height * width
    # floor(L * sqrt(a / S) / 2) == isqrt(floor(a * L^2 / (4 S))): exact integer math.
    rh, rw = math.isqrt(a * height * height // (4 * s)), math.isqrt(a * width * width // (4 * s))
    return min(2 * rh + 1, height), min(2 * rw + 1, width)


def _window_states(grid, block: int, decay: float, sinks) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """``(state [F, F], windows)``: state -1 = dropped pair, else an index into ``windows`` of ``(kh, kw)``.

    ``windows[0] == (H, W)`` is the dense frame pair.
    """
    frames, height, width = grid
    ref_state, halves = frame_pair_states(frames, height * width, block, decay, sinks)
    windows = [(height, width)]
    index = {(height, width): 0}
    lookup = [-1, 0]  # reference states: drop, full, then one per band half-width in `halves`
    for half in halves.tolist():
        win = _band_to_window(half, height, width)
        if win not in index:
            index[win] = len(windows)
            windows.append(win)
        lookup.append(index[win])
    return torch.tensor(lookup)[ref_state], windows


def _window_tile(grid, tile, block: int) -> Tuple[int, int, int]:
    if tile is None:
        return (1,) + pick_tile(grid[1:], (block,))
    tile = per_dim("tile", tile, 3, minimum=1)
    if tile[0] != 1 or block_box(tile, block) is None:
        raise ValueError(f"tile={tile} is invalid for the spatial-window radial layout: the tile must be one frame "
                         f"deep (1, th, tw) with th*tw a multiple of block_size={block} and blocks that are boxes "
                         f"(e.g. (1, 8, 8) for 64, (1, 8, 16) for 128). Pass such a tile, or tile=None to pick one")
    return tile


def radial_window_mask(grid, block_size: int = 128, decay: float = 1.0,
                       sink_frames: Sequence[int] = (0,)) -> torch.Tensor:
    """Token mask of radial attention with a 2-D spatial window, bool ``[N, N]`` in raster order.

    Semantics in the module docstring (``Radial(spatial="window")``). ``block_size``
    enters only the reference frame-pair rule (split rule and minimum half-width);
    the mask itself is token-exact. Materialises ``N x N``: for inspection and tests.

    Example::

        mask = radial_window_mask((9, 21, 27), block_size=64, decay=1.0)   # [5103, 5103]
    """
    grid, block, decay, sinks = radial_args(grid, block_size, decay, sink_frames)
    check_mask_memory("radial_window_mask", grid, "radial_window_layout", copies=2)  # (the pairs, then reshaped)
    frames, height, width = grid
    state, windows = _window_states(grid, block, decay, sinks)
    spatial = torch.stack([kron([relation_1d(height, kh), relation_1d(width, kw)]) for kh, kw in windows])
    pairs = spatial[state.clamp(min=0)] & (state >= 0)[:, :, None, None]  # [F, F, S, S]
    n = frames * height * width
    return pairs.permute(0, 2, 1, 3).reshape(n, n)


def radial_window_layout(grid, block_size: int = 128, decay: float = 1.0, sink_frames: Sequence[int] = (0,), *,
                         tile=None) -> Tuple[TilePermutation, BlockLayout]:
    """Block layout of :func:`radial_window_mask` over tiled token order, without ``N x N``.

    Args:
        grid: ``(T, H, W)`` latent token grid, frames first.
        block_size: ``B``: block size of the reference frame-pair rule and of the
            layout (``block_q == block_k == B``).
        decay: half-width factor in ``(0, 1]``, as in :func:`radial_layout`.
        sink_frames: key frames every query attends to fully; ``()`` disables the sink.
        tile: permutation tile ``(1, th, tw)`` (one frame deep, ``th*tw`` a
            multiple of ``B``, blocks are boxes); ``None`` picks the per-frame
            :func:`default_tile` of ``(H, W)``.

    Returns:
        ``(perm, layout)`` with ``layout.q_len == layout.kv_len == perm.num_padded``,
        like :func:`gna_layout`: run attention on ``perm.permute(q|k|v)`` and
        ``perm.unpermute`` the output. Padded keys are never allowed.
        ``perm.unpermute`` of ``layout.to_dense_mask()`` along both axes is
        :func:`radial_window_mask`.

    Example::

        perm, layout = radial_window_layout((18, 48, 80), 128, decay=1.0)   # tile (1, 8, 16)
    """
    grid, block, decay, sinks = radial_args(grid, block_size, decay, sink_frames)
    frames, height, width = grid
    tile = _window_tile(grid, tile, block)
    perm = TilePermutation(grid, tile)
    frame_perm = TilePermutation((height, width), tile[1:])  # tiled order inside one frame
    state, windows = _window_states(grid, block, decay, sinks)

    # Per window: the in-frame block pairs it visits and the element masks of partial ones
    # (the separable machinery on one frame), with mask ids offset into one shared table.
    visited_w, ids_w, tables, offset = [], [], [], 0
    for kh, kw in windows:
        visited, ids, table = separable_blocks(frame_perm, [relation_1d(height, kh), relation_1d(width, kw)],
                                               block, block)
        visited_w.append(visited)
        ids_w.append(torch.where(ids >= 0, ids + offset, ids))
        tables.append(table)
        offset += table.shape[0]

    # Frame pairs pick their window's in-frame tables: [F, F, n_s, n_s] -> [F*n_s, F*n_s].
    kept = (state >= 0)[:, :, None, None]
    visited = (torch.stack(visited_w)[state.clamp(min=0)] & kept).permute(0, 2, 1, 3).reshape(
        frames * visited_w[0].shape[0], -1)
    mask_ids = torch.where(kept, torch.stack(ids_w)[state.clamp(min=0)], -1)
    mask_ids = mask_ids.permute(0, 2, 1, 3).reshape(visited.shape)
    layout = BlockLayout.from_block_masks(visited, q_len=perm.num_padded, kv_len=perm.num_padded, block_q=block,
                                          block_k=block, mask_ids=mask_ids, mask_table=torch.cat(tables))
    return perm, layout
