"""The layouts' own figures (``dit-accel bench layouts``) and the layout constructors' time and memory.

:func:`layout_rows`: for every published and recommended setting of the Wan 2.1 and HunyuanVideo presets at
the grids of :data:`GRIDS` (and every setting of the main job's shipped plan at its grid), the true density, padded work and masked tiles of the block layout the plan
runs on a GPU (:mod:`dit_accel.kernels.geometry`), from the layouts alone (no GPU), and ``kernel_lengths``: of the
visited blocks that carry an element mask, the fraction the shipped Triton forward runs by a column count
(:func:`~dit_accel.kernels.geometry.kernel_length_tiles`; null when none carries a mask). SLA and VSA choose their blocks
per call: their rows use their configured count of blocks, drawn uniformly at random with a fixed seed, and
say ``"selection": "runtime"``.

``python -m dit_accel.eval.bench_layouts [T H W] [--block 128]`` times the layout constructors at video
scale (one CPU core): each runs in a fresh process with one torch thread; memory is the growth of the
process's peak RSS during the call (a dense N x N mask would be N^2 bytes); ``block_density``: the share of the
layout's blocks it visits (not the true density of :func:`layout_rows`: partial blocks count in full).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["GRIDS", "MODEL_OF_GRID", "SHIPPED_PLAN_OF_GRID", "layout_rows", "configurations", "plan_configurations",
           "grid_settings", "figures_row", "main"]

#: The grids ``bench layouts`` reports, by name.
GRIDS: Dict[str, Tuple[int, int, int]] = {
    "Wan 2.1 480p": (21, 30, 52), "Wan 2.1 720p": (21, 45, 80), "HunyuanVideo 720p": (30, 48, 80),
    "FastWan 448x832": (16, 28, 52), "tiny-shapes-63": (32, 12, 12)}
#: ``(transformer class, family)`` whose settings run at each grid.
MODEL_OF_GRID = {"Wan 2.1 480p": ("WanTransformer3DModel", "Wan 2.1"),
                 "Wan 2.1 720p": ("WanTransformer3DModel", "Wan 2.1"),
                 "HunyuanVideo 720p": ("HunyuanVideoTransformer3DModel", "HunyuanVideo"),
                 "FastWan 448x832": ("WanTransformer3DModel", "Wan 2.1"),
                 "tiny-shapes-63": ("WanTransformer3DModel", None)}
#: Grids whose rows are the settings of a plan shipped for the model (the main job's), not the presets'.
SHIPPED_PLAN_OF_GRID = {"tiny-shapes-63": "tiny-shapes-63.json"}
METHODS = ("tile", "gna", "radial", "sla", "vsa")


def plan_configurations(file_name: str) -> Iterator[Tuple[str, str, object]]:
    """``(method, source, config)`` of every distinct sparse setting of the plan shipped as ``file_name``."""
    from ..models.tiny_shapes import TINY_SHAPES_PLAN
    from ..plans.sparse_plan import SparsePlan

    for config in SparsePlan.load(TINY_SHAPES_PLAN.with_name(file_name)).methods():
        name = type(config).__name__.lower()
        if name in METHODS:
            yield name, f"shipped plan ({file_name})", config


def configurations(class_name: str, family: Optional[str]) -> Iterator[Tuple[str, str, object]]:
    """``(method, source, config)`` of every published setting of ``class_name`` (every family) and of
    :func:`~dit_accel.pipelines.presets.recommended` for each method of :data:`METHODS` it takes (one row per
    distinct config)."""
    from ..pipelines.presets import published_settings, recommended

    seen = set()
    for pub in published_settings(class_name):
        config = pub.build()[0]
        if repr(config) not in seen:
            seen.add(repr(config))
            yield pub.method, f"published ({pub.family})", config
    for method in METHODS:
        try:
            config = recommended(class_name, method, family)[0]
        except ValueError:  # a method the class refuses
            continue
        if repr(config) not in seen:
            seen.add(repr(config))
            yield method, "recommended", config


def _random_layout(n_q: int, n_k: int, count: int, heads: int, seed: int, **sizes):
    """A layout whose query blocks each visit ``count`` key blocks drawn uniformly (what a run-time selection
    visits on average), ``heads`` layout heads."""
    from ..kernels.layout import BlockLayout

    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(heads, n_q, n_k, generator=gen).argsort(-1)[..., :count]
    visited = torch.zeros(heads, n_q, n_k, dtype=torch.bool).scatter_(2, order, True)
    return BlockLayout.from_block_masks(visited, **sizes)


def _plan_layout(config, grid, heads: int, seed: int):
    """``(layout, real positions or None, extra keys)`` of ``config``'s plan on ``grid``; None when the plan
    is dense."""
    from ..kernels.sla import SLAParams, sla_block_counts
    from ..kernels.vsa.api import vsa_layout
    from ..plans.plan import LayoutPlan

    plan = config.plan(grid)
    if isinstance(plan, LayoutPlan):
        plan = plan.call_plan("cuda")  # what a GPU runs (whole-frame blocks: 64-token blocks over packed tiles)
        real = None if plan.perm is None else plan.perm.order >= 0
        return plan.layout, real, {"selection": "static", "ran": repr(plan.method)}  # a fitted Tile's own tile
    kind = getattr(plan, "kind", None)
    n = int(torch.tensor(grid).prod())
    if kind == "vsa":
        cubes, count = plan.cubes, plan.count
        gen = torch.Generator().manual_seed(seed)
        selection = torch.rand(1, heads, cubes.count, cubes.count, generator=gen).argsort(-1)[..., :count]
        layout = vsa_layout(cubes, selection.sort(-1).values)
        return layout, cubes.real.flatten(), {"selection": "runtime", "cubes": cubes.count, "topk": count}
    params = getattr(plan, "params", None)
    if isinstance(params, SLAParams):
        n_k, crit, _, _ = sla_block_counts(n, params)
        n_q = -(-n // params.block_q)
        layout = _random_layout(n_q, n_k, crit, heads, seed, q_len=n, kv_len=n, block_q=params.block_q,
                                block_k=params.block_k)
        return layout, None, {"selection": "runtime", "topk_blocks": crit}
    return None


def figures_row(grid_name: str, grid, method: str, source: str, config, *, heads: int = 1, seed: int = 0
                ) -> dict:
    """One ``bench layouts`` row: the setting, its block sizes and :func:`~dit_accel.kernels.geometry.block_figures`
    (dense plans: density 1, no padding, no masks)."""
    from ..kernels.geometry import block_figures, kernel_length_tiles

    row = {"grid": list(grid), "grid_name": grid_name, "method": method, "source": source, "config": repr(config)}
    found = _plan_layout(config, tuple(grid), heads, seed)
    if found is None:
        return {**row, "density": 1.0, "padded_work": 1.0, "masked_tiles": 0.0, "kernel_lengths": None,
                "selection": "static", "dense": True}
    layout, real, extra = found
    fig = block_figures(layout, real, real)
    return {**row, **extra, "density": round(fig.density, 5), "padded_work": round(fig.padded_work, 4),
            "masked_tiles": round(fig.masked_tiles, 4), "kernel_lengths": _rounded(kernel_length_tiles(layout)),
            "block": [layout.block_q, layout.block_k],
            "visited_tiles": fig.visited_tiles, "tokens": fig.tokens_q}


def grid_settings(name: str) -> Iterator[Tuple[str, str, object]]:
    """``(method, source, config)`` of every setting ``bench layouts`` reports at the grid ``name`` of :data:`GRIDS`."""
    if name in SHIPPED_PLAN_OF_GRID:
        return plan_configurations(SHIPPED_PLAN_OF_GRID[name])
    return configurations(*MODEL_OF_GRID[name])


def _rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


def layout_rows(grids: Optional[Sequence[str]] = None, methods: Optional[Sequence[str]] = None,
                log=None) -> List[dict]:
    """The rows of ``dit-accel bench layouts`` for the named grids of :data:`GRIDS` (default all) and methods
    (default all of :data:`METHODS`; any case, and the ``sta`` alias)."""
    import warnings

    from .._util import DitAccelWarning
    from ..methods import canonical_method_name

    methods = [canonical_method_name(m) for m in ([methods] if isinstance(methods, str) else methods or ())]
    bad = [m for m in methods if m not in METHODS]
    if bad:  # (else no row for it, and an empty list read as "nothing published")
        raise ValueError(f"methods={bad!r}: not a method of bench layouts; choose from {', '.join(METHODS)} "
                         "(any case; sta = tile), or leave methods unset for all")
    grids = [grids] if isinstance(grids, str) else grids  # (a name, not a list: each letter was a grid)
    unknown = [g for g in grids or () if g not in GRIDS]
    if unknown:  # (a raw KeyError)
        raise ValueError(f"grids={unknown!r}: not a grid of bench layouts; choose from {', '.join(map(repr, GRIDS))} "
                         "(the exact names; `dit-accel bench layouts --grids` takes parts of them)")
    rows = []
    for name in grids or GRIDS:
        for method, source, config in grid_settings(name):
            if methods and method not in methods:
                continue
            with warnings.catch_warnings():  # GNA's fit notes on short grids
                warnings.simplefilter("ignore", DitAccelWarning)
                row = figures_row(name, GRIDS[name], method, source, config)
            rows.append(row)
            if log:
                log(row)
    return rows

_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from dit_accel.patterns import gna_layout, radial_layout, tile_layout
name, grid, block = sys.argv[1], tuple(map(int, sys.argv[2].split(","))), int(sys.argv[3])
calls = {
    "tile_layout tile=(6,8,8) window=(3,3,3)": lambda g: tile_layout(g, (6, 8, 8), (3, 3, 3), block_q=block, block_k=block),
    "gna_layout kernel=(13,13,13) stride=1": lambda g: gna_layout(g, (13, 13, 13), block_q=block, block_k=block),
    "gna_layout kernel=(18,24,24) stride=(6,8,8) tile=(6,8,8)": lambda g: gna_layout(
        g, (18, 24, 24), (6, 8, 8), tile=(6, 8, 8), block_q=block, block_k=block),
    "radial_layout decay=1.0 sink=(0,)": lambda g: radial_layout(g, block),
}
fn = calls[name]
fn(tuple(min(x, 24) for x in grid))  # warm-up: imports, allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = fn(grid)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
lay = out[1] if isinstance(out, tuple) else out
print(json.dumps({"layout": name, "seconds": round(dt, 3), "peak_rss_growth_mb": round(peak / 1024, 1),
                  "block_density": round(lay.density(), 4), "partial": round(lay.partial_fraction(), 4)}))
"""

#: The smallest grid every timed layout takes (GNA's (18, 24, 24) kernel; the warm-up caps the grid at 24).
_SMALLEST = (18, 24, 24)
_NAMES = ["tile_layout tile=(6,8,8) window=(3,3,3)", "gna_layout kernel=(13,13,13) stride=1",
          "gna_layout kernel=(18,24,24) stride=(6,8,8) tile=(6,8,8)", "radial_layout decay=1.0 sink=(0,)"]


def main(argv=None) -> int:
    from .._util import positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="*", type=positive_int, default=[30, 48, 80])
    parser.add_argument("--block", type=positive_int, default=128)
    args = parser.parse_args(argv)
    if len(args.grid) != 3 or any(g < m for g, m in zip(args.grid, _SMALLEST)):
        # (a child's layout refused it, and check=True printed the child's whole script as a traceback)
        parser.error(f"grid {' '.join(map(str, args.grid))} is invalid: give T H W, at least "
                     f"{' '.join(map(str, _SMALLEST))} (the largest timed GNA kernel is (18, 24, 24))")
    grid = ",".join(map(str, args.grid))
    for name in _NAMES:
        out = subprocess.run([sys.executable, "-c", _CHILD, name, grid, str(args.block)], capture_output=True,
                             text=True)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            raise SystemExit(f"bench_layouts: {name} at grid {grid} with --block {args.block} failed: {last}")
        print(json.dumps({"grid": grid, "block": args.block, **json.loads(out.stdout)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
