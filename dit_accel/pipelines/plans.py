"""From (method config, token grid) to what an attention call runs: a :class:`Plan`.

Plans are built once per geometry and cached by the handle (key: method, grid);
a change of resolution or frame count simply builds a new plan. Everything that
depends on the grid is validated here, so a bad combination (a kernel larger
than the grid, radial attention on an image model) raises ``ValueError`` from
the transformer's forward pre-hook, before any attention runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..methods import GNA, SLA, Dense, Method, Radial, Tile

__all__ = ["Plan", "build_plan"]


@dataclass(frozen=True, eq=False)
class Plan:
    """What one (method, grid) pair runs.

    kind: ``"dense"`` (original SDPA), ``"layout"`` (block-sparse kernel over
    ``layout``, tokens reordered by ``perm`` when not None) or ``"sla"``.
    density: visited block fraction of the video-video part (None for dense,
    per call for SLA).
    """

    kind: str
    method: Method
    grid: Tuple[int, ...]
    layout: object = None  # BlockLayout (CPU; moved per device with layout.to)
    perm: object = None  # TilePermutation or None (raster order)
    density: Optional[float] = None


def _per_dim(cls: str, name: str, value, grid) -> Tuple:
    nd = len(grid)
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(items) == 1:
        items = items * nd
    if len(items) != nd:
        raise ValueError(f"{cls}.{name}={value!r} has {len(items)} values but the token grid {tuple(grid)} has {nd} "
                         f"dimensions; pass one value per dimension or a single int")
    return items


def _gna_plan(method: GNA, grid) -> Plan:
    ks = _per_dim("GNA", "kernel_size", method.kernel_size, grid)
    st = _per_dim("GNA", "stride", method.stride, grid)
    dl = _per_dim("GNA", "dilation", method.dilation, grid)
    causal = _per_dim("GNA", "is_causal", method.is_causal, grid)
    for d, (k, s, di, g) in enumerate(zip(ks, st, dl, grid)):
        if k * di > g:
            # GNA kernels are >= 2, so an extent-1 dimension (a single latent frame) cannot take one.
            advice = ("GNA needs at least 2 tokens along every dimension: use Tile (window 1 on that "
                      "dimension) or more frames" if g < 2 else "use a smaller kernel or a larger resolution")
            raise ValueError(f"GNA.kernel_size={method.kernel_size!r} with dilation {method.dilation!r}: "
                             f"kernel*dilation = {k * di} exceeds the token grid extent {g} on dimension {d} "
                             f"(grid {tuple(grid)}); {advice}")
    # A window covering the whole grid (non-causal) is dense attention: take the dense path.
    if all(k == g and di == 1 for k, di, g in zip(ks, dl, grid)) and not any(causal):
        return Plan("dense", method, tuple(grid))
    from ..patterns import gna_layout

    tile = None if method.tile is None else _per_dim("GNA", "tile", method.tile, grid)
    perm, layout = gna_layout(tuple(grid), ks, stride=st, dilation=dl, is_causal=causal, tile=tile)
    return Plan("layout", method, tuple(grid), layout, perm, layout.density())


def _tile_plan(method: Tile, grid) -> Plan:
    tile = _per_dim("Tile", "tile", method.tile, grid)
    window = _per_dim("Tile", "window", method.window, grid)
    # Every query tile sees every key tile: dense.
    if all(-(-g // t) <= w for g, t, w in zip(grid, tile, window)):
        return Plan("dense", method, tuple(grid))
    from ..patterns import tile_layout

    perm, layout = tile_layout(tuple(grid), tile, window)
    return Plan("layout", method, tuple(grid), layout, perm, layout.density())


def _radial_plan(method: Radial, grid) -> Plan:
    if len(grid) != 3:
        raise ValueError(f"Radial attention needs a video token grid (T, H, W); this model has grid {tuple(grid)}. "
                         "Use GNA or Tile for image models")
    sinks = tuple(f for f in method.sink_frames if f < grid[0])
    if method.spatial == "window":  # 2-D windows: tiled order, permuted like GNA / Tile
        from ..patterns import radial_window_layout

        perm, layout = radial_window_layout(tuple(grid), block_size=method.block_size, decay=method.decay,
                                            sink_frames=sinks)
        return Plan("layout", method, tuple(grid), layout, perm, layout.density())
    from ..patterns import radial_layout

    layout = radial_layout(tuple(grid), block_size=method.block_size, decay=method.decay, sink_frames=sinks)
    return Plan("layout", method, tuple(grid), layout, None, layout.density())


def build_plan(method: Method, grid) -> Plan:
    """Validate ``method`` against ``grid`` and build its plan (CPU tensors)."""
    grid = tuple(int(g) for g in grid)
    if isinstance(method, Dense):
        return Plan("dense", method, grid)
    if isinstance(method, GNA):
        return _gna_plan(method, grid)
    if isinstance(method, Tile):
        return _tile_plan(method, grid)
    if isinstance(method, Radial):
        return _radial_plan(method, grid)
    if isinstance(method, SLA):
        return Plan("sla", method, grid)
    raise TypeError(f"unsupported method config {type(method).__name__}")
