"""The candidate method configs a calibration scores for every layer and head of a model.

Every registered pattern method over a small parameter grid sized to the token grid (Tile windows,
GNA kernel sizes, Radial decays, SLA top-k; VSA sparsities when asked for, see :data:`OPTIONAL_METHODS`),
plus dense. Tile and GNA candidates share one tile, so
their heads lay out in one token order and a layer mixing them runs one per-head layout without
conversion (:mod:`dit_accel.plans.per_head`). Candidates whose plan is dense on the grid, nearly dense
(visited density above ``max_density``) or that repeat another candidate's blocks are dropped.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..methods import GNA, SLA, VSA, Dense, Method, Radial, Tile
from ..plans.per_head import MAX_CONVERTED_TOKENS

__all__ = ["Candidate", "candidate_grid", "sparse_candidates", "check_candidate_tile", "GRIDS", "METHODS",
           "OPTIONAL_METHODS", "CALIBRATABLE", "VIDEO_ONLY"]

#: Sizes of the parameter grid: "small" (one or two per method: tests, smoke runs), "default", "large".
GRIDS = ("small", "default", "large")
METHODS = ("tile", "gna", "radial", "sla")
#: Methods a calibration considers only when asked (``methods=(..., "vsa")``, ``--methods ...,vsa``): VSA runs
#: as its checkpoint was trained (a FastWan) or training-free, so it is no default candidate of other models.
OPTIONAL_METHODS = ("vsa",)
CALIBRATABLE = METHODS + OPTIONAL_METHODS
#: Methods with candidates on video grids (T, H, W) only: none on an image model's (H, W) grid.
VIDEO_ONLY = ("radial", "vsa")


@dataclass(frozen=True)
class Candidate:
    """A method config as a calibration candidate: ``kind`` is ``"dense"``, ``"block_sparse"``, ``"sla"`` or
    ``"vsa"`` (both chosen per call, one launch per config); ``density`` the visited block density on the grid
    (SLA: its top-k blocks; VSA: its top-k cubes)."""

    method: Method
    kind: str
    density: float

    @property
    def label(self) -> str:
        m = self.method
        if isinstance(m, Dense):
            return "dense"
        if isinstance(m, Tile):
            return "tile w" + "x".join(map(str, m.window))
        if isinstance(m, GNA):
            return "gna k" + "x".join(map(str, m.kernel_size))
        if isinstance(m, Radial):
            return f"radial d{m.decay:g}"
        if isinstance(m, SLA):
            return f"sla k{m.topk:g}"
        if isinstance(m, VSA):
            return f"vsa k{m.topk}" if m.topk is not None else f"vsa s{m.effective_sparsity:g}"
        return m.name


def _tile_windows(n_tiles: Tuple[int, ...], size: str) -> List[Tuple[int, ...]]:
    per_dim = []
    for n in n_tiles:
        odd = list(range(1, n + 1, 2)) + ([n + 1] if n % 2 == 0 else [])
        if size == "small":
            odd = odd[:1] + odd[-1:]
        elif size == "default" and len(odd) > 4:  # at most 4 per dimension: large grids stay a small grid
            # The narrow windows (1, 3, 5 tiles), where sparse attention pays, and one of half the dimension.
            odd = odd[:3] + [odd[len(odd) // 2]]
        per_dim.append(odd)
    return list(itertools.product(*per_dim))


def _gna_kernels(grid: Tuple[int, ...], tile: Tuple[int, ...], size: str) -> List[Tuple[int, ...]]:
    fractions = {"small": (0.67,), "default": (0.5, 1.0), "large": (0.25, 0.5, 0.75, 1.0)}[size]
    per_dim = []
    for g, t in zip(grid, tile):
        ks = sorted({min(g, max(2, round(f * g))) for f in fractions} | ({g} if g <= t else set()))
        per_dim.append(ks)
    return list(itertools.product(*per_dim))


def check_candidate_tile(tile: Optional[Sequence[int]], grid: Optional[Sequence[int]] = None):
    """``tile`` as a tuple (None stays None); ValueError for sizes below 1 or (given the grid) a size count that
    differs from the grid's dimensions."""
    if tile is None:
        return None
    from .._util import is_int

    if isinstance(tile, (str, bytes)) or not hasattr(tile, "__iter__") or not all(is_int(t) for t in tile):
        raise ValueError(f"tile={tile!r} is invalid: one whole number >= 1 per grid dimension, e.g. 1,8,8 or 4,4,4")
    tile = tuple(int(t) for t in tile)  # (before: 1.5 read as 1)
    if not tile or any(t < 1 for t in tile):
        raise ValueError(f"tile={tile} is invalid: one size >= 1 per grid dimension, e.g. 1,8,8 or 4,4,4")
    if grid is not None and len(tile) != len(grid):
        raise ValueError(f"tile={tile} has {len(tile)} sizes but the token grid {tuple(grid)} has {len(grid)} "
                         "dimensions")
    return tile


def _method_names(methods) -> Tuple[str, ...]:
    """``methods`` as a tuple of names; one str is a comma list, as ``--methods`` takes (before: ``methods="tile"``
    was read letter by letter, "methods ['e', 'i', 'l', 't'] cannot be calibrated")."""
    if isinstance(methods, str):
        return tuple(m.strip() for m in methods.split(",") if m.strip())
    if not hasattr(methods, "__iter__") or not all(isinstance(m, str) for m in methods):
        raise TypeError(f"methods={methods!r} is invalid: method names such as ('tile', 'sla') or 'tile,sla'; "
                        f"choose from {', '.join(CALIBRATABLE)}")
    return tuple(methods)


def candidate_grid(grid: Sequence[int], *, size: str = "default", methods: Sequence[str] = METHODS,
                   max_density: float = 0.9, tile: Optional[Sequence[int]] = None) -> List[Candidate]:
    """Dense plus the candidates of ``methods`` on ``grid`` (see the module docstring), dense first.

    ``tile``: the token tile of the Tile and GNA candidates (default: :func:`~dit_accel.patterns.default_tile`'s
    64-token tile); e.g. ``(1, 12, 12)`` on a grid of 12x12-token frames makes the windows count frames. A tile
    that holds no whole 64-token block runs its Tile candidates in blocks of one whole tile (``block_size``: the
    PyTorch backend only) and has no GNA candidates (they would lay out in another token order).

    Example::

        [c.label for c in candidate_grid((4, 12, 12), size="small")]
        # ['dense', 'tile w1x1x1', 'tile w1x3x1', ..., 'sla k0.3']
    """
    from ..patterns.permutation import TilePermutation, default_tile

    from ..patterns.checks import as_grid, number_in

    if size not in GRIDS:
        raise ValueError(f"size={size!r} is invalid: choose one of {GRIDS}")
    methods = _method_names(methods)
    unknown = sorted(set(methods) - set(CALIBRATABLE))
    if unknown:
        raise ValueError(f"methods {unknown} cannot be calibrated; choose from {', '.join(CALIBRATABLE)}")
    grid = as_grid(grid)  # (before: int() of each size, so a grid of 4.5 frames was scored as 4)
    number_in("max_density", max_density, 0.0, 1.0, lo_open=True)  # (before: 0 gave dense alone, without a word)
    tile = check_candidate_tile(tile, grid)
    out = [Candidate(Dense(), "dense", 1.0)]
    seen = set()

    def add(method: Method) -> None:
        try:
            plan = method.plan(grid)
        except ValueError:  # a grid rule the config breaks (a kernel larger than an extent, ...)
            return
        if plan.is_dense or plan.density is None or plan.density > max_density:
            return
        layout = plan.layout
        key = (plan.perm.tile if plan.perm is not None else None, layout.kv_counts.numpy().tobytes(),
               layout.kv_indices.numpy().tobytes(), layout.kv_mask_ids.numpy().tobytes(),
               layout.mask_table.numpy().tobytes())
        if key in seen:
            return
        seen.add(key)
        out.append(Candidate(method, "block_sparse", float(plan.density)))

    if len(grid) == 3 or len(grid) == 2:
        tile = tile or default_tile(grid, 64)
        n_tiles = TilePermutation(grid, tile).num_tiles
        whole = math.prod(tile) % 64 == 0  # 64-token blocks are boxes inside the tile
        if "tile" in methods:
            for window in _tile_windows(n_tiles, size):
                add(Tile(tile=tile, window=window, block_size=None if whole else math.prod(tile)))
        if "gna" in methods and whole:
            for kernel in _gna_kernels(grid, tile, size):
                add(GNA(kernel_size=kernel, tile=tile))
    if "radial" in methods and len(grid) == 3 and math.prod(grid) <= MAX_CONVERTED_TOKENS:
        # (Radial's raster band joins a tiled layer through its token mask: small grids only.)
        decays = {"small": (0.5,), "default": (0.25, 0.5, 1.0), "large": (0.1, 0.25, 0.5, 0.75, 1.0)}[size]
        for decay in decays:
            add(Radial(decay=decay, block_size=64, sink_frames=(0,)))
    if "sla" in methods:
        n_blocks = -(-math.prod(grid) // 64)
        topks = {"small": (0.3,), "default": (0.15, 0.3, 0.5), "large": (0.1, 0.2, 0.3, 0.4, 0.6)}[size]
        kept = set()
        for topk in topks:
            blocks = max(1, math.ceil(topk * n_blocks))
            if blocks in kept or blocks / n_blocks > max_density:
                continue
            kept.add(blocks)
            out.append(Candidate(SLA(topk=topk), "sla", blocks / n_blocks))
    if "vsa" in methods and len(grid) == 3:
        sparsities = {"small": (0.7,), "default": (0.5, 0.7, 0.85), "large": (0.3, 0.5, 0.7, 0.8, 0.9)}[size]
        counts = set()
        for sparsity in sparsities:
            try:
                plan = VSA(sparsity=sparsity).plan(grid)
            except ValueError:
                continue
            if plan.count in counts or plan.density > max_density:
                continue
            counts.add(plan.count)
            out.append(Candidate(VSA(sparsity=sparsity), "vsa", plan.density))
    return out


def sparse_candidates(grid: Sequence[int], *, size: str = "default", methods: Sequence[str] = METHODS,
                      tile: Optional[Sequence[int]] = None, log: Callable[[str], None] = print) -> List[Candidate]:
    """:func:`candidate_grid`, with a note to ``log`` when it holds dense alone: the plan can then only be dense
    (before, a calibration ran its search to a dense plan and wrote it, saying nothing of why)."""
    methods = _method_names(methods)
    out = candidate_grid(grid, size=size, methods=methods, tile=tile)
    tokens = math.prod(int(g) for g in grid)
    # (before: Radial was dropped above MAX_CONVERTED_TOKENS without a word, and --methods radial alone was told to
    # pass a larger size, where a smaller one is what gives it candidates)
    radial_out = "radial" in methods and len(grid) == 3 and tokens > MAX_CONVERTED_TOKENS
    radial_why = (f"Radial has candidates on grids of up to {MAX_CONVERTED_TOKENS} tokens only: its raster band joins "
                  "a layer of tiled heads through an N x N token mask")
    if radial_out and len(out) > 1:
        others = ", ".join(sorted({c.label.split()[0] for c in out[1:]}))
        log(f"note: --methods {','.join(methods)}: no Radial candidate on token grid {tuple(int(g) for g in grid)} "
            f"({tokens} tokens): {radial_why}, so the search has {others} only")
    if len(out) > 1:
        tiled = [{"tile": "Tile", "gna": "GNA"}[m] for m in ("tile", "gna") if m in methods]
        if tile is not None and tiled and not any(c.kind == "block_sparse" for c in out):
            # (before: a --tile as large as the grid dropped every Tile and GNA candidate without a word)
            others = ", ".join(sorted({c.label.split()[0] for c in out[1:]}))
            log(f"note: --tile {','.join(map(str, tile))}: no {' or '.join(tiled)} candidate is sparse on token grid "
                f"{tuple(int(g) for g in grid)} (a window of one tile covers the grid or visits more than 90% of it), "
                f"so the search has {others} only; pass a smaller --tile, or leave it out for a 64-token tile")
        return out
    grid = tuple(int(g) for g in grid)
    if len(grid) == 2 and set(methods) <= set(VIDEO_ONLY):
        why, fix = f"{', '.join(methods)} {'has' if len(methods) == 1 else 'have'} candidates on video grids only", \
            "other --methods, e.g. tile,sla"
    elif radial_out and set(methods) == {"radial"}:
        why, fix = radial_why, "a smaller size (--frames, --height, --width) or other --methods, e.g. tile,sla"
    else:
        why, fix = "each candidate runs dense there or visits more than 90% of the key blocks", \
            ("a smaller --tile, " if tile is not None else "") + \
            "a larger size (--frames, --height, --width), --candidates large or other --methods"
        if radial_out:
            why += f"; {radial_why}"
    log(f"note: --methods {','.join(methods)}: no candidate is sparse on token grid {grid} ({why}), so the plan "
        f"is dense; for a sparse one pass {fix}")
    return out
