"""NATTEN's fused neighborhood kernels (``pip install natten``: Hopper and Blackwell FNA) for GNA and Tile layouts.

NATTEN does not take block lists: it takes the window itself (``na1d``/``na2d``/``na3d`` with
``kernel_size``, ``stride``, ``dilation``, ``is_causal`` on raster-ordered ``[B, *grid, heads, D]`` tokens)
and tiles internally. A :class:`~dit_accel.kernels.BlockLayout` does not remember which window built it, so the
code that builds a GNA or Tile layout says so once with :func:`attach_gna` / :func:`attach_tile` (a
:class:`NattenWindow` kept beside the layout, or the reason NATTEN cannot express it); a layout without one is
not served. GNA maps one to one (dit_accel follows NATTEN's semantics, METHODS.md); Tile is GNA with
``kernel = covered_tiles(window) * tile`` and ``stride = tile`` when every extent is a multiple of its tile
(a padded last tile makes STA's windows differ from NATTEN's on the real grid, so that is refused).

Exactness: on every real token the result equals the layout's; the tiled order's padding *query* positions
(which ``perm.unpermute`` drops) come back as ``o = 0``, ``lse = -inf``. Per-head kernel sizes or windows are
refused (NATTEN takes one window per call).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..._cache import LayoutCache
from ...layout import BlockLayout
from .common import cuda_reason, package_reason, vendor_import

__all__ = ["NAME", "NattenWindow", "attach_gna", "attach_tile", "window", "reason", "plan", "run"]

NAME = "natten"
MODULE = "natten"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WINDOWS = LayoutCache("block_sparse.natten")
_NO_WINDOW = ("the layout carries no neighborhood window: NATTEN serves GNA and Tile layouts whose builder "
              "registered it (dit_accel.kernels.block_sparse.backends.natten.attach_gna / attach_tile)")


@dataclass(frozen=True)
class NattenWindow:
    """A GNA window in NATTEN's arguments, on ``grid`` in raster order, plus the tile of the layout's token order."""

    grid: Tuple[int, ...]
    tile: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]


def _per_dim(value, n: int, name: str) -> Tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name}={value!r} must have one value per grid dimension ({n})")
    return values


def _check(w: NattenWindow) -> Optional[str]:
    """Why NATTEN cannot take ``w`` (its own argument rules, ``utils/checks.py``), or None."""
    if not 1 <= len(w.grid) <= 3:
        return f"NATTEN takes 1-, 2- or 3-D token grids, not {len(w.grid)}-D"
    for d, (x, k, s, dl) in enumerate(zip(w.grid, w.kernel_size, w.stride, w.dilation)):
        if k < 2:
            return f"NATTEN needs kernel sizes >= 2; dimension {d} has {k}"
        if k * dl > x:
            return f"kernel_size*dilation {k}*{dl} exceeds the extent {x} of dimension {d}"
        if not 1 <= s <= k:
            return f"NATTEN needs 1 <= stride <= kernel_size; dimension {d} has stride {s}, kernel {k}"
    return None


def _store(layout: BlockLayout, perm, w: Union[NattenWindow, str]) -> Union[NattenWindow, str]:
    if not isinstance(w, str):
        if layout.q_len != perm.num_padded or layout.kv_len != perm.num_padded:
            raise ValueError(f"layout has q_len={layout.q_len}, kv_len={layout.kv_len}, but perm orders "
                             f"{perm.num_padded} positions; attach the permutation the layout was built on")
        w = _check(w) or w
    layout.derived[(_WINDOWS.name, "window")] = w
    return w


def attach_gna(layout: BlockLayout, perm, kernel_size, stride=1, dilation=1, is_causal=False):
    """Record that ``layout`` is :func:`dit_accel.patterns.gna_layout` of these arguments over ``perm``.
    Returns the :class:`NattenWindow`, or the reason NATTEN cannot express it (kept too)."""
    from ....patterns.checks import per_head

    nd = len(perm.grid)
    if per_head(kernel_size) is not None:
        return _store(layout, perm, "NATTEN takes one kernel size per call; this layout has one per head")
    w = NattenWindow(tuple(perm.grid), tuple(perm.tile), _per_dim(kernel_size, nd, "kernel_size"),
                     _per_dim(stride, nd, "stride"), _per_dim(dilation, nd, "dilation"),
                     tuple(bool(c) for c in _per_dim(is_causal, nd, "is_causal")))
    return _store(layout, perm, w)


def attach_tile(layout: BlockLayout, perm, tile, window):
    """Record that ``layout`` is :func:`dit_accel.patterns.tile_layout` (sliding tile attention) over ``perm``:
    GNA with ``kernel = covered_tiles(window) * tile`` (at most the extent) and ``stride = tile``, when every
    extent is a multiple of its tile. Returns the :class:`NattenWindow` or the reason (kept too)."""
    from ....patterns.checks import per_head
    from ....patterns.tile import covered_tiles

    nd = len(perm.grid)
    if per_head(window) is not None:
        return _store(layout, perm, "NATTEN takes one window per call; this layout has one per head")
    tile, window = _per_dim(tile, nd, "tile"), _per_dim(window, nd, "window")
    kernels, strides = [], []
    for d, (x, t, w) in enumerate(zip(perm.grid, tile, window)):
        if x % t:
            return _store(layout, perm, f"extent {x} of dimension {d} is not a multiple of the tile {t}: STA's "
                                        "padded last tile gives windows NATTEN does not express")
        kernel = min(covered_tiles(w) * t, x)
        kernels.append(kernel)
        strides.append(min(t, kernel))
    w = NattenWindow(tuple(perm.grid), tuple(perm.tile), tuple(kernels), tuple(strides), (1,) * nd, (False,) * nd)
    return _store(layout, perm, w)


def share_window(source: BlockLayout, other: BlockLayout) -> BlockLayout:
    """Give ``other`` (the same token mask as ``source`` in other blocks, e.g. its 128-row query blocks) the
    window attached to ``source``, if any. Returns ``other``."""
    found = window(source)
    if not isinstance(found, str):
        other.derived[(_WINDOWS.name, "window")] = found
    return other


def window(layout: BlockLayout) -> Union[NattenWindow, str]:
    """The window attached to ``layout`` (or to the layout it was copied from by ``layout.to``), or a reason."""
    return layout.derived.get((_WINDOWS.name, "window"), _NO_WINDOW)


def install_reason() -> Optional[str]:
    """Why NATTEN cannot run any call here, whatever the device (None when it is installed)."""
    return package_reason(MODULE, "natten", "natten")


def reason(request) -> Optional[str]:
    """Why NATTEN cannot run a call like ``request`` here (None when it can); the window comes from :func:`plan`."""
    why = install_reason() or cuda_reason(request.device, "NATTEN") or libnatten_reason()
    if why is not None:
        return why
    if request.dtype not in DTYPES:
        return f"NATTEN takes float16, bfloat16 or float32, not {request.dtype}."
    if request.head_dim % 8:
        return f"NATTEN's fused kernels take head dims that are multiples of 8, not {request.head_dim}."
    return None


@functools.lru_cache(maxsize=1)
def libnatten_reason() -> Optional[str]:
    """Why an installed natten cannot serve: built without its CUDA library (``natten.HAS_LIBNATTEN`` False, as
    a source install without a compiler gives), when it would fall back to eager FlexAttention that holds the
    whole score matrix. None when libnatten is there (or natten is not installed: ``package_reason`` says so)."""
    try:
        module = vendor_import(MODULE, "natten", "natten")
    except Exception:
        return None
    if getattr(module, "HAS_LIBNATTEN", True):
        return None
    return ("natten is installed without libnatten, its CUDA kernels (a source build that compiled nothing): it "
            "would run eager FlexAttention holding the full score matrix; install a natten wheel built for this "
            "torch and CUDA (https://natten.org/install/), or use backend='triton'.")


def plan(layout: BlockLayout, source: Optional[BlockLayout] = None) -> Union[NattenWindow, str]:
    """What NATTEN runs for ``layout``: its attached window (looked up on ``source``, the layout the caller
    passed, when ``layout`` is its device copy), or the reason it cannot run."""
    found = window(layout)
    if isinstance(found, str) and source is not None:
        found = window(source)
    return found


@functools.lru_cache(maxsize=16)
def _perm(grid, tile):
    from ....patterns.permutation import TilePermutation

    return TilePermutation(grid, tile)


def run(w: NattenWindow, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool):
    """One NATTEN call on tiled ``(B, H, Np, D)`` inputs; ``(o, lse or None)`` in the same tiled order."""
    natten = vendor_import(MODULE, "natten", "natten")

    perm = _perm(w.grid, w.tile)
    b, h, _, d = q.shape

    def raster(x):  # tiled (B, H, Np, D) -> NATTEN's (B, *grid, H, D)
        return perm.unpermute(x, dim=2).transpose(1, 2).reshape(b, *w.grid, h, x.shape[-1])

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(w.grid)]
    out, lse = fn(raster(q), raster(k), raster(v), kernel_size=w.kernel_size, stride=w.stride,
                  dilation=w.dilation, is_causal=w.is_causal, scale=scale, return_lse=True)
    o = perm.permute(out.reshape(b, -1, h, d).transpose(1, 2), dim=2)
    if not return_lse:
        return o, None
    lse = perm.permute(lse.reshape(b, -1, h).transpose(1, 2).float(), dim=2)
    pads = perm._indices(lse.device)[2]  # the device copy the permutation keeps: no upload per call
    return o, lse.index_fill_(2, pads, float("-inf")) if pads.numel() else lse

