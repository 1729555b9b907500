"""What may attend to what: attention patterns as index math.

Token masks (raster order, for inspection and tests): :func:`gna_mask`,
:func:`tile_mask`, :func:`radial_mask`. Block layouts for the kernels, built
without materialising ``N x N``: :func:`gna_layout`, :func:`tile_layout`
(tiled order, with a :class:`TilePermutation`) and :func:`radial_layout`
(raster order). The spatial-window radial variant (``Radial(spatial="window")``):
:func:`radial_window_mask` and :func:`radial_window_layout` (tiled order).
"""

from .gna import gna_mask
from .layouts import gna_layout, tile_layout
from .radial import radial_layout, radial_mask
from .radial_window import radial_window_layout, radial_window_mask
from .tile import TilePermutation, default_tile, tile_mask

__all__ = [
    "gna_mask", "tile_mask", "radial_mask", "TilePermutation", "default_tile",
    "gna_layout", "tile_layout", "radial_layout", "radial_window_mask", "radial_window_layout",
]
