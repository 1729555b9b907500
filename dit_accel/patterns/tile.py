"""Sliding tile attention (STA): windows counted in tiles, on the separable machinery.

STA is GNA with ``kernel_size = window * tile`` and ``stride = tile`` applied on
the tile-padded grid (METHODS.md), so it shares :func:`~.separable.relation_1d`
with :func:`~.gna.gna_mask`. An even window ``w`` follows FastVideo's STA: it
covers tiles ``centre - w//2 .. centre + w//2``, the same tiles as ``w + 1``.

Windows may differ per attention head: ``window=((3, 3, 3), (1, 6, 10), ...)``,
one window per head. Masks then have a head axis and layouts one layout head per
attention head (:func:`~.separable.stack_heads`). FastVideo's searched strategies
choose such a per-head window for every (denoising step, layer):
:func:`read_sta_strategy` reads its mask-strategy JSON.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from pathlib import Path
from typing import Dict, Tuple

import torch

from .._util import cdiv, is_int
from ..kernels.layout import BlockLayout
from .checks import as_grid, check_mask_memory, int_or_tuple, number_in, per_dim, per_head, positive_int
from .permutation import PackedTilePermutation, TilePermutation, block_box, permutation_for
from .separable import covers_grid, kron, relation_1d, separable_layout, stack_heads

__all__ = ["tile_mask", "tile_layout", "packed_tile_layout", "packed_work", "KERNEL_PACKED_WORK", "fit_tile", "window_at_density", "check_tile_args", "check_tile_block", "tile_relations", "covered_tiles",
           "tile_token_density", "tile_covers_grid", "read_sta_strategy"]


def covered_tiles(window: int) -> int:
    """Tiles a window of ``window`` covers per dimension: odd windows themselves, even ``w`` as ``w + 1``."""
    return window | 1


def check_tile_args(tile, window, *, owner: str = ""):
    """Shape-free STA rules: ``tile >= 1`` and ``window >= 1`` (in tiles) per dimension, matching lengths.

    ``window`` is one window (an int or a tuple of ints) or a tuple of per-head windows (each an int or
    a tuple of ints). Returns ``(tile, window)`` normalised (per-head windows as a tuple of windows).
    """
    tile = int_or_tuple(owner, "tile", tile, minimum=1)
    heads = per_head(window)
    if heads is None:
        windows = (int_or_tuple(owner, "window", window, minimum=1),)
    else:
        windows = tuple(int_or_tuple(owner, f"window[{h}]", w, minimum=1) for h, w in enumerate(heads))
    lengths = {len(w) for w in windows if isinstance(w, tuple)} | ({len(tile)} if isinstance(tile, tuple) else set())
    if len(lengths) > 1:
        raise ValueError(f"{owner}window={window!r} is invalid: every window must have as many dimensions as "
                         f"tile {tile} (one value per grid dimension)")
    return tile, (windows if heads is not None else windows[0])


def check_tile_block(grid, tile, block: int) -> None:
    """ValueError unless blocks of ``block`` tokens are boxes inside ``tile`` (one per grid dimension)."""
    tile = per_dim("tile", tile, len(as_grid(grid)))
    if block_box(tile, int(block)) is None:
        volume = math.prod(tile)  # (the largest boxes, distinct: a 1-frame tile listed its size twice)
        boxes = [b for b in range(volume, 1, -1) if volume % b == 0 and block_box(tile, b) is not None][:3]
        raise ValueError(f"Tile.block_size={block} is invalid for tile {tile} ({volume} tokens): a block must "
                         f"be a box of whole trailing tile dimensions, e.g. {volume} (the whole tile)"
                         + "".join(f" or {b}" for b in boxes[1:]) + "; or leave block_size unset for 64-token blocks")


def tile_relations(grid, tile, window) -> Tuple[Tuple[int, ...], Tuple[int, ...], list]:
    """``(grid, tile, relations)``: one STA window checked against ``grid``, one relation per dimension.

    Along a dimension, STA is GNA (kernel ``covered_tiles(window) * tile``, stride ``tile``)
    on the tile-padded extent, cut to the real tokens; a window of more tiles than the
    dimension has covers it all (dense along it).
    """
    grid = as_grid(grid)
    if per_head(window) is not None:
        raise ValueError(f"window={window!r} holds per-head windows; tile_relations takes one window")
    check_tile_args(tile, window)
    tile, window = per_dim("tile", tile, len(grid)), per_dim("window", window, len(grid))
    relations = []
    for extent, t, w in zip(grid, tile, window):
        padded = cdiv(extent, t) * t
        kernel = min(covered_tiles(w) * t, padded)
        relations.append(relation_1d(padded, kernel, min(t, kernel))[:extent, :extent])
    return grid, tile, relations


def _windows(grid, tile, window) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """``(grid, tile, windows)`` with every window as a per-dimension tuple (one per head, or one shared)."""
    grid = as_grid(grid)
    tile, window = check_tile_args(tile, window)
    tile = per_dim("tile", tile, len(grid))
    _check_padding(grid, tile)
    heads = per_head(window) or (window,)
    return grid, tile, tuple(per_dim("window", w, len(grid)) for w in heads)


#: A tile whose padded grid holds more tokens than this many times the grid's own (and more than
#: :data:`_PADDED_FLOOR`) is refused: a tile far longer than the grid along a dimension was sized into memory
#: (a terabyte for tile (10**6, 1, 1) at Wan 720p) or overflowed an index.
_PADDED_RATIO, _PADDED_FLOOR = 64, 1 << 20


def _check_padding(grid: Tuple[int, ...], tile: Tuple[int, ...]) -> None:
    padded = math.prod(-(-g // t) * t for g, t in zip(grid, tile))
    n = math.prod(grid)
    if padded > max(_PADDED_RATIO * n, _PADDED_FLOOR):
        longer = [d for d, (g, t) in enumerate(zip(grid, tile)) if t > g]
        def count(x) -> str:
            return f"{x:,.0f}" if x < 1e12 else f"{x:.2e}"

        raise ValueError(f"tile={tuple(tile)} on the grid {tuple(grid)} pads it to {count(padded)} tokens, "
                         f"{count(padded / n)}x its {n:,}" + (f" (longer than the grid along dimension "
                                                             f"{', '.join(map(str, longer))})" if longer else "")
                         + ": a tile covers at most the grid's extent; use one within the grid, such as (6, 8, 8)")


def tile_token_density(grid, tile, window) -> float:
    """Allowed token pairs / N^2 of the STA pattern, averaged over heads for per-head windows."""
    grid, tile, windows = _windows(grid, tile, window)
    density = {}
    for w in dict.fromkeys(windows):
        density[w] = math.prod(float(rel.float().mean()) for rel in tile_relations(grid, tile, w)[2])
    return sum(density[w] for w in windows) / len(windows)


def tile_covers_grid(grid, tile, window) -> bool:
    """Whether every head's window covers the whole grid (the pattern is dense attention)."""
    grid, tile, windows = _windows(grid, tile, window)
    return all(covers_grid(tile_relations(grid, tile, w)[2]) for w in dict.fromkeys(windows))


def tile_mask(grid, tile, window) -> torch.Tensor:
    """Token mask of sliding tile attention (STA), bool ``[N, N]`` in raster order (``[H, N, N]`` per head).

    A query in tile ``q`` (per dimension) sees the key tiles within ``w // 2`` of
    ``clamp(q, w // 2, n_tiles - 1 - w // 2)``. Extents that are not tile multiples
    are padded (the last tile is partly empty), never rejected; a window of more
    tiles than the dimension has is dense along it.

    Args:
        grid: ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
        tile: tokens per tile, int or one per dimension.
        window: window in tiles, int or one per dimension; an even ``w`` covers the same
            tiles as ``w + 1`` (FastVideo's convention). A tuple of windows (one per
            attention head) gives a mask per head.

    Example::

        mask = tile_mask((12, 24, 40), tile=(6, 8, 8), window=(3, 3, 3))  # [11520, 11520]; a video's: tile_layout
        masks = tile_mask((8, 8, 8), 2, window=((1, 3, 3), (3, 1, 1)))   # [2, 512, 512]
    """
    heads = per_head(window)
    check_mask_memory("tile_mask", as_grid(grid), "tile_layout", heads=len(heads or ()) or 1, copies=2 if heads else 1)
    if heads is None:
        return kron(tile_relations(grid, tile, window)[2])
    return torch.stack([kron(tile_relations(grid, tile, w)[2]) for w in heads])


# A strategy runs a handful of distinct windows in hundreds of (step, layer) combinations:
# each distinct window's layout (and the tiled order) is built once and stacked per head from these caches.
@functools.lru_cache(maxsize=8)
def _permutation(grid, tile, block_q: int, block_k: int) -> TilePermutation:
    return permutation_for(grid, tile, block_q, block_k)


@functools.lru_cache(maxsize=16)
def _window_layout(grid, tile, window, perm: TilePermutation, block_q: int, block_k: int) -> BlockLayout:
    return separable_layout(perm, tile_relations(grid, tile, window)[2], block_q, block_k)


def tile_layout(grid, tile, window, *, block_q: int = 64, block_k: int = 64) -> Tuple[TilePermutation, BlockLayout]:
    """Block layout of :func:`tile_mask` (sliding tile attention) over tiled order, without ``N x N``.

    The permutation uses the STA tile itself when its blocks are boxes inside it
    (``prod(tile)`` a multiple of ``block_q`` and ``block_k``, e.g. tile (6, 8, 8)
    with blocks of 64 or 128); then every visited block is full, except where a
    non-divisible extent leaves padded keys inside a block. Any other tile (say
    (3, 5, 5)) still works: the permutation falls back to :func:`default_tile`
    and blocks on window borders get element masks.

    Per-head windows give a per-head layout (``layout.num_heads`` = number of windows),
    run by the kernels in one launch.

    Returns ``(perm, layout)`` like :func:`gna_layout`; ``perm.tile`` is the
    permutation tile actually used.
    """
    grid, tile, windows = _windows(grid, tile, window)
    block_q, block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
    boxed = block_box(tile, block_q) is not None and block_box(tile, block_k) is not None
    # The STA tile cannot hold whole blocks: permute by a tile that can.
    perm = _permutation(grid, tile if boxed else None, block_q, block_k)
    layouts = [_window_layout(grid, tile, w, perm, block_q, block_k) for w in windows]
    return perm, (layouts[0] if per_head(window) is None else stack_heads(layouts))


# ------------------------------------------------------------------ tiles that fit the grid
#: The padded work a fitted tile may add: (slot / tile volume)^2, at most 8% over the true pairs.
FIT_PADDED_WORK = 1.08
#: How much a fitted window's reach per dimension may differ from the given one's, against its density.
SHAPE_WEIGHT = 0.5
TILE_WEIGHT = 0.25


#: The padded work up to which ``auto`` on CUDA runs a Tile of whole-tile blocks (a 144-token frame: (192 / 144)^2 =
#: 1.78) through the kernels over packed tiles rather than through the PyTorch twin; a forced kernel backend takes
#: the packed tiles at any padding (smaller tiles: 36 tokens would do 3.2x the work).
KERNEL_PACKED_WORK = 2.0


def packed_work(volume: int, block: int = 64) -> float:
    """The work of a ``volume``-token tile packed into whole ``block``-token blocks, over its true pairs."""
    return (cdiv(volume, block) * block / volume) ** 2


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def fit_tile(grid, tile, window, *, block: int = 64) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(tile, window)``: an STA tile that divides ``grid`` (no padded tiles, packed blocks add at most
    :data:`FIT_PADDED_WORK`) with the window that keeps ``(tile, window)``'s token density on ``grid`` nearest.

    The given tile is kept when it already divides the grid into whole blocks (HunyuanVideo's published (6, 8, 8)
    at (30, 48, 80)). Otherwise, among tiles of whole divisors of every extent holding 64 to 1,024 tokens, the one
    whose odd window per dimension (about the same tokens as the given window covers there) lands nearest the
    given setting's density and its window's reach in tokens per dimension (``|log density ratio| +
    SHAPE_WEIGHT x sum |log reach ratio|``: the window stays local where it was), then the least padded work.
    Wan 2.1 480p (21, 30, 52) with (6, 8, 8) / (3, 3, 3) (density 0.27 there, padded work 1.40) gets
    (21, 3, 4) / (1, 9, 5): density 0.35 at padded work 1.03, the window's reach kept (all 21 frames, where STA's
    spanned 18; 27 x 20 tokens for 24 x 24). The returned window is in tiles of the returned tile. Where no tile qualifies (a prime extent, a grid
    under a block), the given ``(tile, window)``.
    """
    grid, tile, windows = _windows(grid, tile, window)
    if len(windows) != 1 or per_head(window) is not None:
        raise ValueError("fit_tile takes one window (per-head windows keep their tile)")
    block = positive_int("block", block)  # (0 or a negative one returned the given tile as fitted, silently)
    window = windows[0]
    if all(g % t == 0 for g, t in zip(grid, tile)) and block_box(tile, block) is not None:
        return tile, window
    target = math.log(tile_token_density(grid, tile, window))
    reach = [min(covered_tiles(w) * t, g) for g, t, w in zip(grid, tile, window)]  # tokens the window spans
    best = None
    for cand in itertools.product(*[_divisors(g) for g in grid]):
        volume = math.prod(cand)
        if not block <= volume <= 16 * block or packed_work(volume, block) > FIT_PADDED_WORK:
            continue
        win = tuple(max(1, 2 * round((r / t - 1) / 2) + 1) for r, t in zip(reach, cand))  # odd, ~ the reach
        density = tile_token_density(grid, cand, win)
        # The reach in tokens per dimension, and the tile itself: a larger tile is a coarser window (every query
        # of a tile shares one), so the tile stays near the given one too.
        shape = sum(abs(math.log(min(w * t, g) / r)) + TILE_WEIGHT * abs(math.log(t / t0))
                    for w, t, g, r, t0 in zip(win, cand, grid, reach, tile))
        score = (round(abs(math.log(density) - target) + SHAPE_WEIGHT * shape, 3), packed_work(volume, block))
        if best is None or score < best[0]:
            best = (score, cand, win)
    if best is None:  # no such tile (a prime extent, a tiny grid): the given setting, padded as before
        return tile, window
    return best[1], best[2]


def packed_tile_layout(grid, tile, window, *, block: int = 64) -> Tuple[PackedTilePermutation, BlockLayout]:
    """Block layout of :func:`tile_mask` over packed tile order (:class:`~.permutation.PackedTilePermutation`).

    STA is tile-granular (a query tile attends whole key tiles), so a visited tile pair is fully allowed: every
    visited block is full, or the ragged last block of a key tile, whose real keys are its first ``c``
    positions (a column count; the layout carries it as a column-prefix mask). Blocks of padding only are never
    visited. One shared window (per-head windows: :func:`tile_layout`).
    """
    grid, tile, windows = _windows(grid, tile, window)
    if per_head(window) is not None:
        raise ValueError("packed_tile_layout takes one window; per-head windows run through tile_layout")
    block = positive_int("block", block)
    perm = PackedTilePermutation(grid, tile, block)
    per_tile = []
    for rel, g, t, n in zip(tile_relations(grid, tile, windows[0])[2], grid, tile, perm.num_tiles):
        padded = torch.zeros(n * t, n * t, dtype=torch.bool)
        padded[:g, :g] = rel
        per_tile.append(padded.view(n, t, n, t).any(3).any(1))
    tiles = kron(per_tile)  # [tiles, tiles], tile-major = the packed order's tile order
    per = perm.slot // block
    lengths = perm.block_lengths()
    visited = tiles.repeat_interleave(per, 0).repeat_interleave(per, 1)
    visited &= (lengths > 0)[:, None] & (lengths > 0)[None, :]
    ragged = sorted({int(c) for c in lengths.tolist() if 0 < c < block})
    table = torch.stack([(torch.arange(block) < c)[None, :].expand(block, block) for c in ragged]) if ragged \
        else None
    col_id = torch.full((lengths.numel(),), -1, dtype=torch.long)
    for i, c in enumerate(ragged):
        col_id[lengths == c] = i
    mask_ids = col_id[None, :].expand(visited.shape)
    layout = BlockLayout.from_block_masks(visited, q_len=perm.num_padded, kv_len=perm.num_padded, block_q=block,
                                          block_k=block, mask_ids=mask_ids, mask_table=table)
    return perm, layout


# ------------------------------------------------------------------ FastVideo strategies
_KEY = re.compile(r"^(\d+)_(\d+)_(\d+)$")


def _strategy_entries(path: Path) -> dict:
    from ..atomic_files import read_json

    data = read_json(path, kind=None,
                     expected='FastVideo\'s STA mask strategy, a JSON object {"step_layer_head": [wt, wh, ww], ...}')
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{str(path)!r} must hold a non-empty JSON object {{\"step_layer_head\": [wt, wh, ww]}} "
                         f"(FastVideo's STA mask strategy); got {type(data).__name__}")
    return data


def read_sta_strategy(path) -> Dict[Tuple[int, int], Tuple[Tuple[int, ...], ...]]:
    """FastVideo's STA mask-strategy JSON as ``{(step, layer): (window of head 0, window of head 1, ...)}``.

    The file maps ``"step_layer_head"`` (denoising step, attention-layer index in model
    order, head) to a window ``[wt, wh, ww]`` counted in tiles (even sizes allowed, see
    :func:`tile_mask`). Every (step, layer) present must list heads ``0 .. H-1`` with
    the same ``H`` everywhere, and every window must have the same number of dimensions.

    Example::

        table = read_sta_strategy("mask_strategy_hunyuan.json")
        table[(20, 5)][:2]   # ((3, 6, 10), (5, 6, 4)): windows of heads 0 and 1 at step 20, layer 5
    """
    path = Path(path)
    heads: Dict[Tuple[int, int], Dict[int, Tuple[int, ...]]] = {}
    dims = set()
    named: Dict[Tuple[int, int, int], str] = {}  # (step, layer, head) -> its key
    for key, value in _strategy_entries(path).items():
        match = _KEY.match(str(key))
        if match is None:
            raise ValueError(f"{str(path)!r}: key {key!r} is not \"step_layer_head\" (three non-negative ints "
                             "joined by underscores, e.g. \"12_0_3\")")
        if not (isinstance(value, list) and 1 <= len(value) <= 3 and all(is_int(v) and v >= 1 for v in value)):
            raise ValueError(f"{str(path)!r}: {key!r} maps to {value!r}; expected a window in tiles, a list of 1 to "
                             "3 positive ints such as [3, 6, 10]")
        step, layer, head = map(int, match.groups())
        first = named.setdefault((step, layer, head), str(key))
        if first != key:  # ("01_0_0" beside "1_0_0": the later window replaced the earlier, silently)
            raise ValueError(f"{str(path)!r}: keys {first!r} and {key!r} both name step {step}, layer {layer}, head "
                             f"{head}; keep one of them")
        heads.setdefault((step, layer), {})[head] = tuple(int(v) for v in value)
        dims.add(len(value))
    if len(dims) > 1:
        raise ValueError(f"{str(path)!r} mixes windows of {sorted(dims)} dimensions; a strategy holds one kind")
    n_heads = max(len(by_head) for by_head in heads.values())
    for (step, layer), by_head in sorted(heads.items()):
        missing = sorted(set(range(n_heads)) - set(by_head))
        if missing:
            raise ValueError(f"{str(path)!r}: step {step}, layer {layer} lacks heads {missing[:8]}; every "
                             f"(step, layer) in a strategy lists heads 0..{n_heads - 1}")
    return {key: tuple(by_head[h] for h in range(len(by_head))) for key, by_head in heads.items()}


def window_at_density(grid, tile, density: float) -> Tuple[int, ...]:
    """The window (in tiles of ``tile``) that visits the block density nearest ``density`` on ``grid``.

    With tiles of one 64-token block each, a window of ``w`` tiles per dimension visits about ``prod(w_d / n_d)``
    of the blocks. Nearest density first; among near ties the most even window. Odd windows, plus ``n + 1`` on an
    even tile count ``n`` (the odd window that covers the dimension).
    """
    # (a density of 0 or below raised "math domain error", above 1 or NaN returned a window, silently; an int grid
    # or tile "'int' object is not iterable")
    density = number_in("density", density, 0.0, 1.0, lo_open=True)
    grid = as_grid(grid)
    n_tiles = TilePermutation(grid, per_dim("tile", tile, len(grid))).num_tiles
    candidates = [list(range(1, n + 1, 2)) + ([n + 1] if n % 2 == 0 else []) for n in n_tiles]
    best = None
    for window in itertools.product(*candidates):
        fracs = [math.log(min(w, n) / n) for w, n in zip(window, n_tiles)]
        mean = sum(fracs) / len(fracs)
        score = abs(sum(fracs) - math.log(density)) + 0.02 * sum((f - mean) ** 2 for f in fracs)
        if best is None or score < best[0]:
            best = (score, window)
    return best[1]
