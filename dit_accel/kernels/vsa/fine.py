"""VSA's fine branch at inference: a call's kernel plan from its selection alone, no layout per call.

Every call of the fine branch visits other key cubes. The general path (:func:`.layouts.layout_of_rows`, then
:func:`~dit_accel.kernels.block_sparse_attention`) builds a :class:`~dit_accel.kernels.BlockLayout` with both of
its index sides, decides its backend and derives its launch (configuration, tile plan, work order, descriptors,
grid) on every call: about 30 launches and 1.07 ms of host time per call on an H200 at FastWan's shape
(``docs/scripts/host_profile.py``, cf9d9eb), more than the kernel takes there (0.83 ms replayed from a CUDA graph).

Within a *class* of calls (grid, cubes, key cubes per query cube, the inputs' shapes, strides, base alignment,
dtype and device) that launch differs only in its tile plan, and the plan of a cube-sized kernel tile is a
function of the selection alone: each listed key cube's class (whole, or partial with its mask) and bit offset.
So the class's first call takes the general path, and its launch becomes the class's *template* once
:func:`rows_plan` of that call's selection equals the tile plan the launcher built from the layout (compared once
per class, one read back). Later calls compute :func:`rows_plan` (3 launches where every cube is whole, 11 with
partial ones) and run the template with it (:func:`~dit_accel.kernels.block_sparse.triton.launch_forward`): the
same kernel, configuration, grid and plan as the general path, without the layout.

It applies where the general path runs the Triton forward on such a plan: the ``triton`` backend (forced, or
``auto``'s choice for the class), no autograd recording, an eager direct call (no trace, dispatch mode or tensor
subclass; no template is made inside a CUDA-graph capture, one made before is used there), kernel tiles equal to
the cubes, and neither length tiles nor the warp-specialized forward (both opt-in). Elsewhere :func:`fine_rows`
answers None and the general path runs.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .. import occupancy
from ..request import in_graph, records_grad

__all__ = ["fine_rows", "raster_fine", "remember", "rows_plan", "cube_tables", "has_template"]


class _Template(NamedTuple):
    """A class's launch (``block_sparse.triton._Launch`` of its first call) and, per key cube, ``rank`` (int32: its
    class times the cube count plus the cube, the plan's order: whole cubes first, each kind ascending; None where
    every cube is whole) and ``entry`` (int32: its bit offset); ``head``: the ``[k, 0]`` header of whole cubes."""

    launch: object
    rank: Optional[torch.Tensor]
    entry: torch.Tensor
    head: Optional[torch.Tensor]


#: Class key (:func:`_key`) -> its template, or None where the class's calls take the general path.
_TEMPLATES: Dict[tuple, Optional[_Template]] = {}
_TEMPLATES_MAX = 64


def _key(q, k, v, cubes, rows_shape, table) -> tuple:
    return (cubes.perm.grid, cubes.perm.tile, tuple(rows_shape), q.shape, q.stride(), k.shape, k.stride(), v.shape,
            v.stride(), q.dtype, k.dtype, v.dtype, q.device, q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16,
            table is not None)


def _outputs(q: torch.Tensor, table: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(o, lse)`` for the folded ``q``: ``o`` in cube order, or read through the row ``table`` in raster
    order laid out as ``(1, N, B * H, D)`` (what the gathered forward writes, :mod:`.raster`)."""
    b, h, n, d = q.shape
    o = (torch.empty((b, h, n, d), dtype=q.dtype, device=q.device) if table is None else
         torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2))
    return o, torch.empty((b, h, n), dtype=torch.float32, device=q.device)


def _direct(q, k, v) -> bool:
    """A call this path may take: nothing records a backward, nothing intercepts the launcher, and the opt-in
    forwards that plan otherwise (length tiles, warp-specialized) are off."""
    from ..block_sparse.configs import lengths_enabled, ws_enabled
    from ..block_sparse.ops import direct_call_ok
    from ..limits import grid_fits

    # (and one launch holds its folded heads: past the grid limit the general path splits them)
    return (direct_call_ok(q, k, v) and not records_grad(q, k, v) and not ws_enabled()
            and not lengths_enabled() and grid_fits(q))


def rows_plan(rows: torch.Tensor, template: _Template) -> torch.Tensor:
    """The tile plan (int32 ``[Hl, Cq, 2 + 2k]``, :class:`~dit_accel.kernels.block_sparse.tile_plans.TilePlan`)
    of the key cubes ``rows`` (int64 ``[Hl, Cq, k]``, each row ascending and distinct), as
    :func:`~dit_accel.kernels.block_sparse.tile_plans.tile_plan` builds it from their layout: per row the header
    ``[whole cubes, partial cubes]``, the cubes (whole ones first, each kind ascending) and their bit offsets. (Every
    key cube holds a real token, so none is skipped: :func:`cube_tables` gives no tables where one would be.)"""
    if template.rank is None:  # every cube whole: the rows as they are
        return torch.cat([template.head, rows.to(torch.int32), template.entry[:1].expand(rows.shape)], -1)
    n = template.rank.numel()
    ranked = template.rank[rows].sort(-1).values  # whole cubes (rank < n) first, then partial ones, each ascending
    cols = ranked.remainder(n)
    n_full = (ranked < n).sum(-1)
    head = torch.stack([n_full, rows.shape[-1] - n_full], -1).to(torch.int32)
    return torch.cat([head, cols, template.entry[cols]], -1)


def fine_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes, rows: torch.Tensor, scale: float,
              table: Optional[torch.Tensor] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(o, lse)`` of the fine branch on folded ``q`` ``(1, B * H, Cq cubes' tokens, D)``, ``k``, ``v`` over the key
    cubes ``rows`` (int64 ``[B * H, Cq, k]``, ascending) from its class's template, where the ``triton`` backend
    runs it; None where the general path must run (no template yet, or a call this path does not take). With the
    cube permutation's row ``table``, q, k, v and the outputs are in raster order (:mod:`.raster`)."""
    if not _direct(q, k, v):
        return None
    template = _TEMPLATES.get(_key(q, k, v, cubes, rows.shape, table))
    if template is None:
        return None
    return _launch(q, k, v, template.launch, rows_plan(rows, template), scale, table)


def raster_fine(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes, selection: torch.Tensor, scale: float,
                table: torch.Tensor, gated=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of the raster path's fine branch (:mod:`.raster`) on folded raster ``q``, ``k``, ``v`` over the
    key cubes ``selection`` (``(B, H, Cq, k)``, B * H the folded heads): from the class's template where there is
    one, else from the layout of the selection (whose launch then becomes the template). ``gated``: ``(folded gate,
    folded cube rows, tokens per cube)``, VSA's gated term, which the launch adds in its epilogue (at a head dim the
    kernel does not pad: the caller's to check): ``o`` is then ``fine + gate * coarse``, rounded once."""
    from . import layouts

    rows = selection.reshape(-1, *selection.shape[2:])
    template = _TEMPLATES.get(_key(q, k, v, cubes, rows.shape, table)) if _direct(q, k, v) else None
    if template is not None:
        return _launch(q, k, v, template.launch, rows_plan(rows, template), scale, table, gated)
    layout = layouts.layout_of_rows(cubes, selection)
    ran = _launch(q, k, v, None, None, scale, table, gated, layout=layout)
    remember(q, k, v, cubes, rows, layout, layouts.cube_masks(cubes, q.device)[0], table)
    return ran


@occupancy.on_inputs_device
def _launch(q, k, v, launch, plan: Optional[torch.Tensor], scale: float, table: Optional[torch.Tensor],
            gated=None, layout=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of ``launch`` (a template's) with the tile ``plan``, or where ``launch`` is None, of the launch
    the gathered forward builds for ``layout`` (its own plan); ``gated`` as :func:`raster_fine` takes it."""
    from ..block_sparse.triton import forward_launch, launch_forward

    o, lse = _outputs(q, table)
    if launch is None:
        launch = forward_launch(q, k, v, o, lse, layout, rows=table)
    o, lse = launch_forward(launch, q, k, v, o, lse, scale, plan=plan, gated=gated)
    if gated is not None:
        from ..selfcheck import corrupt
        from .gated import FWD_VARIANT

        corrupt(FWD_VARIANT, o)
    return o, lse


def remember(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes, rows: torch.Tensor, layout,
             mask_ids: torch.Tensor, table: Optional[torch.Tensor] = None) -> None:
    """After a general-path call that ran the ``triton`` backend on ``layout`` (the layout of ``rows``, on q's
    device; ``mask_ids``: each key cube's mask id, -1 whole; ``table``: the row table it read raster order
    through, or None): make its class's template where this path applies to it (once per class; outside
    captures)."""
    if not _direct(q, k, v) or in_graph() or q.numel() == 0 or k.shape[2] == 0:
        return
    key = _key(q, k, v, cubes, rows.shape, table)
    if key in _TEMPLATES:
        return
    if len(_TEMPLATES) >= _TEMPLATES_MAX:
        _TEMPLATES.clear()
    _TEMPLATES[key] = _template(q, k, v, rows, layout, mask_ids, table)


def _template(q, k, v, rows, layout, mask_ids, table) -> Optional[_Template]:
    from ..block_sparse import triton as bst

    # (only the outputs' shapes and strides are read)
    launch = bst.forward_launch(q, k, v, *_outputs(q, table), layout, rows=table)  # the call's own, with its layout
    cfg = launch.cfg
    if cfg.lengths or (cfg.block_m, cfg.block_n) != (layout.block_q, layout.block_k) or layout.kv_len % cfg.block_n:
        return None
    tables = cube_tables(layout, mask_ids, rows.shape)
    if tables is None:
        return None
    # The first call's plan is not kept (launch_forward puts each call's in its place): tens of MB at Wan 14B.
    args = launch.args
    # (a pointer kernel's unread items, and without a row table its unread RIDX, are the plan too)
    launch = dataclasses.replace(launch, args=(None, *args[1:3], args[3] if cfg.tma else None,
                                               args[4] if cfg.gather else None, *args[5:]))
    template = tables._replace(launch=launch)
    built = bst._plan(layout, cfg.block_m, cfg.block_n, False, None).plan  # what the general path ran
    if not torch.equal(rows_plan(rows, template), built):  # (never seen: the tests prove these equal)
        warnings.warn("dit_accel: VSA's per-call tile plan differs from the layout's on this call; this shape "
                      "keeps the general path (please report it)", RuntimeWarning, stacklevel=3)
        return None
    return template


def cube_tables(layout, mask_ids: torch.Tensor, rows_shape) -> Optional[_Template]:
    """:func:`rows_plan`'s tables (no launch) for key cube rows of ``rows_shape`` on ``layout``'s mask table, with
    cube-sized kernel tiles: each key cube's class and bit offset as :func:`tile_plan` classifies its tiles (None
    where a cube's tiles would be skipped, which no VSA cube is)."""
    from ..block_sparse.tile_plans import _mask_classes

    bq, bk = layout.block_q, layout.block_k
    classes = _mask_classes(layout.mask_table, False, layout.kv_len, bq, bk, bq, bk, None)
    code = mask_ids.long() + 1  # the class of each key cube's tiles (tile_plan's code: mask id + 1)
    kind, entry = classes.kind[code].long(), classes.entry[code]
    if layout.mask_table.shape[0] == 0:  # every cube whole
        head = torch.tensor([rows_shape[-1], 0], dtype=torch.int32, device=code.device).expand(*rows_shape[:2], 2)
        return _Template(None, None, entry, head)
    if bool((kind == 3).any()):  # a cube whose tiles allow no pair would be skipped (no VSA cube is so)
        return None
    rank = kind * code.numel() + torch.arange(code.numel(), device=code.device)
    return _Template(None, rank.to(torch.int32), entry, None)


def has_template(grid, q_shape) -> bool:
    """Whether fine branches on ``grid`` with folded queries ``q_shape`` run from a template (for ``bench gpu``)."""
    return any(t is not None and key[0] == tuple(grid) and key[3] == tuple(q_shape) for key, t in _TEMPLATES.items())
