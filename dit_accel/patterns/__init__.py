"""What may attend to what: attention patterns as index math.

Token masks (raster order, for inspection and tests): :func:`gna_mask`,
:func:`tile_mask`, :func:`radial_mask`, :func:`radial_window_mask`. Block layouts
for the kernels, built without materialising ``N x N``: :func:`gna_layout`,
:func:`tile_layout`, :func:`radial_window_layout` (tiled order, with a
:class:`TilePermutation`) and :func:`radial_layout` (raster order).

Layout: :mod:`.separable` is the one window machinery (1-D relations, Kronecker
masks, box-block layouts) that :mod:`.gna`, :mod:`.tile` and :mod:`.radial_window`
share; :mod:`.permutation` the tiled order; :mod:`.radial` the reference radial
rule; :mod:`.checks` the argument rules the method configs reuse.

Windows and kernel sizes may be given per attention head (``tile_mask``,
``tile_layout``, ``gna_mask``, ``gna_layout``): masks gain a head axis and layouts
one layout head per attention head (:func:`.separable.stack_heads`).
:func:`.tile.read_sta_strategy` reads FastVideo's per-(step, layer, head) windows.
"""

from .gna import gna_layout, gna_mask
from .permutation import TilePermutation, default_tile
from .radial import radial_layout, radial_mask
from .radial_window import radial_window_layout, radial_window_mask
from .tile import tile_layout, tile_mask

__all__ = [
    "gna_mask", "tile_mask", "radial_mask", "TilePermutation", "default_tile",
    "gna_layout", "tile_layout", "radial_layout", "radial_window_mask", "radial_window_layout",
]
