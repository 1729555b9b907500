"""The fine branch's layout per call: a :class:`~dit_accel.kernels.BlockLayout` of the selected key cubes, block =
cube, and the element masks of the partial cubes' real columns (:func:`vsa_layout`); and the views that spread a
row per cube over the cube's raster tokens (:func:`token_views`). Shared by the cube-order path (:mod:`.api`) and
the raster one (:mod:`.raster`)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..layout import BlockLayout
from .naive import Cubes

__all__ = ["vsa_layout", "layout_of_rows", "cube_masks", "on_whole_grid", "token_views"]


# (grid, tile, device) -> (mask ids [C] int32, element mask table [P, V, V] or None) of the partial cubes.
_CUBE_MASKS: Dict[tuple, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}


def cube_masks(cubes: Cubes, device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Which cubes are partial and the element mask of their real columns, worked out once per grid and tile on
    the CPU and kept per device (a layout built per call reads nothing back from the GPU)."""
    key = (cubes.perm.grid, cubes.perm.tile, str(device))
    found = _CUBE_MASKS.get(key)
    if found is None:
        real = cubes.real.cpu()
        partial = ~real.all(-1)  # [C]
        mask_ids = torch.full((cubes.count,), -1, dtype=torch.int32)
        table = None
        if bool(partial.any()):
            patterns, inverse = torch.unique(real[partial], dim=0, return_inverse=True)
            mask_ids[partial] = inverse.to(torch.int32)
            # Every row may see the real columns of the cube, its first `size` (packed order: a length); padded
            # query rows are dropped on the way back.
            table = patterns[:, None, :].expand(-1, cubes.volume, -1).contiguous().to(device)
        found = _CUBE_MASKS[key] = (mask_ids.to(device), table)
    return found


def vsa_layout(cubes: Cubes, selection: torch.Tensor, *, check: Optional[bool] = None) -> BlockLayout:
    """The fine branch's layout on cube order: block = cube, one layout head per (batch, head) of ``selection``
    ``(B, H, Cq, k)`` (``Cq``: every cube, or a ring rank's consecutive query cubes; the key side is always every
    cube); key cubes with padding carry an element mask of their real columns. Built on the selection's device
    with no host synchronisation: a query cube visits ``k`` key cubes and a key cube is visited by at most all
    ``Cq`` query cubes, so the index lists' widths are known without reading the selection back. Each row of
    ``selection`` must name ``k`` distinct cubes in ``[0, cubes.count)``, as a top-k does; rows are sorted here.

    ``check``: whether to check those values (ValueError naming the first bad row). None, the default, checks a
    selection on the CPU (no device to read) and not one on a GPU, where reading it back is a host sync per call
    that a CUDA-graph capture cannot take; pass True to check there too (a debug run), False to skip. A cube out of
    range was read from the end of the mask table (negative) or raised an indexing error from inside, and a cube
    named twice was visited twice (its keys counted twice in the softmax), silently."""
    ordered = _check_selection(cubes, selection, check)
    return layout_of_rows(cubes, ordered)


def _check_selection(cubes: Cubes, selection, check: Optional[bool]) -> torch.Tensor:
    """:func:`vsa_layout`'s checks, and the selection with its rows sorted: the shape and dtype always (host facts),
    the values of the sorted rows where ``check`` says."""
    from ..request import in_graph

    if not isinstance(selection, torch.Tensor) or selection.dim() != 4 or selection.is_floating_point() \
            or selection.is_complex() or selection.dtype == torch.bool:
        got = (f"{selection.dtype} {tuple(selection.shape)}" if isinstance(selection, torch.Tensor)
               else type(selection).__name__)
        raise ValueError(f"selection must be an integer tensor (B, H, Cq, k) of key cube indices, e.g. a top-k's "
                         f"indices; got {got}")
    k = selection.shape[-1]
    if not 1 <= k <= cubes.count or not 1 <= selection.shape[2] <= cubes.count:
        raise ValueError(f"selection {tuple(selection.shape)} must have 1 <= k <= {cubes.count} key cubes per row "
                         f"and 1 <= Cq <= {cubes.count} query cubes (the grid's cubes)")
    ordered = selection.sort(-1).values
    if check is None:
        check = selection.device.type == "cpu" and not in_graph()
    if not check or selection.device.type == "meta" or in_graph():
        return ordered
    bad = (ordered[..., 0] < 0) | (ordered[..., -1] >= cubes.count) | (ordered.diff(dim=-1) == 0).any(-1)
    if bool(bad.any()):  # (the one host read, only where checked)
        b, h, c = (int(i) for i in bad.nonzero()[0])
        row = selection[b, h, c].tolist()
        raise ValueError(f"selection[{b}, {h}, {c}] = {row} must name {k} distinct key cubes in "
                         f"[0, {cubes.count}) (no negative, out-of-range or repeated index), as a top-k's indices do")
    return ordered


def layout_of_rows(cubes: Cubes, selection: torch.Tensor) -> BlockLayout:
    """:func:`vsa_layout` of a selection whose rows are ascending already (the coarse branch's): about 20
    launches, on every call of the fine branch. A partial cube's mask is its real columns in every row
    (:func:`cube_masks`), so the layout declares ``KEY_COLUMN_MASKS``."""
    b, h, c_q, k = selection.shape
    mask_ids, table = cube_masks(cubes, selection.device)
    cols = selection.reshape(b * h, c_q, k)
    ids = mask_ids[cols] if table is not None else torch.full(cols.shape, -1, dtype=torch.int32,
                                                                 device=cols.device)
    return BlockLayout._from_full_rows(cols, ids, q_len=c_q * cubes.volume,
                                       kv_len=cubes.perm.num_padded, block_q=cubes.volume, block_k=cubes.volume,
                                       mask_table=table, q_width=c_q, key_column_masks=True)


# (grid, tile, device) -> per dimension of the grid: None where the cube's extent divides it, else the cube
# coordinate of each token coordinate.
SPREADS: Dict[tuple, Tuple[Optional[torch.Tensor], ...]] = {}


def on_whole_grid(coarse: torch.Tensor, cubes: Cubes, order) -> bool:
    """Whether per-cube rows ``coarse`` ``(B, H, C, D)`` are every cube's in ``order`` the grid's permutation (not a
    ring rank's rows): what :func:`token_views` spreads."""
    return order is cubes.perm and coarse.shape[2] == cubes.count


def token_views(coarse: torch.Tensor, cubes: Cubes, order):
    """``(cube rows shaped to broadcast over the tokens, the token axis's split)`` of per-cube rows ``coarse``
    ``(B, H, C, D)`` on the whole grid (``order`` the grid's permutation), or None (a ring rank's rows): each grid
    dimension that the cube's extent divides split into (cubes, extent), so a cube's row broadcasts over its
    tokens; a dimension that does not divide gathers the cube rows to token resolution along it."""
    from ..request import in_graph

    perm = cubes.perm
    if not on_whole_grid(coarse, cubes, order):
        return None
    key = (perm.grid, perm.tile, str(coarse.device))
    spreads = SPREADS.get(key)
    if spreads is None:  # (made on the device, no host copy; not kept when made in a trace or a capture)
        spreads = tuple(None if g % t == 0 else torch.div(torch.arange(g, device=coarse.device), t,
                                                          rounding_mode="floor")
                        for g, t in zip(perm.grid, perm.tile))
        if not in_graph():
            SPREADS[key] = spreads
    b, h, _, d = coarse.shape
    c = coarse.reshape(b, h, *perm.num_tiles, d)
    c_shape, tokens = [], []
    for axis, (g, t, n, spread) in enumerate(zip(perm.grid, perm.tile, perm.num_tiles, spreads)):
        if spread is None:
            c_shape += [n, 1]
            tokens += [n, t]
        else:
            c = c.index_select(2 + axis, spread)
            c_shape.append(g)
            tokens.append(g)
    return c.reshape(b, h, *c_shape, d), tuple(tokens)
