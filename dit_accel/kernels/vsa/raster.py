"""VSA's inference forward on raster-order tensors: both branches read q, k and v where they are.

The cube-order path (:func:`.api.vsa_parts`) copies q, k and v into cube order (every token, padded to whole cubes:
1.22x the tokens at Wan 480p's (21, 30, 52)), runs the coarse launches and the fine branch on the copies and copies
the fine output and its lse back: five memory-bound passes around the kernels, most of VSA's traffic outside them
(BENCHMARKS section 6, MODELLED). Here the pool launch reads each cube's tokens through the cube permutation's row
table (``_vsa_pool_kernel`` with ``GATHER``: the same sums in the same order) and the fine branch runs the gathered
block-sparse forward over the same table (:mod:`dit_accel.kernels.block_sparse.gather`), which writes o and lse in
raster order; what is left is the gated sum's one pass. The selection, and so the pattern, is the cube-order
path's bit for bit, and so are the outputs (the same tiles reach the same products).

Taken by an eager inference call (nothing records a backward, no trace) whose coarse branch runs the Triton launches
and whose fine branch runs the ``triton`` backend, where the gathered forward passed its first-use self-check
(:func:`~dit_accel.kernels.block_sparse.gather.gather_runs`; ``DIT_ACCEL_GATHER=1`` forces it, ``0`` turns it off),
batch folds into heads as a view (``B == 1``, or ``(B, H)`` adjacent in memory), every row offset fits 32 bits, and
it timed faster than the cube-order path on the call's inputs (autotune family ``vsa.gather``). Decided by the
class's first eager call and kept (:data:`_CHOICES`); a CUDA graph capture takes the eager answer, none: cube order.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..request import in_graph, records_grad
from .naive import Cubes

__all__ = ["FAMILY", "raster_forward", "reads_raster", "folds"]

#: The autotune family of the choice between the raster and the cube-order forward.
FAMILY = "vsa.gather"

#: Class key (:func:`_key`) -> whether its calls read raster order.
_CHOICES: Dict[tuple, bool] = {}
_CHOICES_MAX = 64


def folds(x: torch.Tensor) -> bool:
    """Whether ``(B, H, N, D)`` ``x`` views as ``(1, B * H, N, D)`` (the fine branch's one layout head per (batch,
    head)): one batch, or heads that step through the batch."""
    return x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _folded(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.view(1, b * h, n, d)


def raster_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes: Cubes, count: int, scale: float,
                   with_coarse: bool) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coarse or None, selection, fine, lse)`` of raster ``q``, ``k``, ``v`` ``(B, H, N, D)`` (each
    :func:`folds`): :func:`.api.vsa_parts`'s parts, with ``fine`` ``(B, H, N, D)`` and ``lse`` ``(B, H, N)`` in raster
    order. The caller decided the path (:func:`reads_raster`); no input checks here."""
    from ..block_sparse.triton import triton_forward
    from . import fine as fine_path
    from .api import _cube_masks, _layout_of_rows
    from .triton import coarse_triton

    b, h, n, d = q.shape
    table = cubes.perm.row_table(q.device)
    coarse, _, selection = coarse_triton(q, k, v, cubes, count, scale, with_coarse, rows=table)
    q_f, k_f, v_f = (_folded(x) for x in (q, k, v))
    rows = selection.reshape(b * h, *selection.shape[2:])
    ran = fine_path.fine_rows(q_f, k_f, v_f, cubes, rows, scale, table)
    if ran is None:  # the class's first call: its layout, and the template the next calls run
        layout = _layout_of_rows(cubes, selection)
        ran = triton_forward(q_f, k_f, v_f, layout, scale, rows=table)
        fine_path.remember(q_f, k_f, v_f, cubes, rows, layout, _cube_masks(cubes, q.device)[0], table)
    o, lse = ran
    return coarse, selection, o.view(b, h, n, d), lse.view(b, h, n)


def _key(q, k, v, cubes: Cubes, count: int, with_coarse: bool, backend: str, forced) -> tuple:
    from .. import autotune
    from ..request import env_value

    return (cubes.perm.grid, cubes.perm.tile, count, with_coarse, backend, forced, env_value(), autotune.enabled(),
            q.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device)


def reads_raster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes: Cubes, count: int, scale: float,
                 with_coarse: bool, backend: str, cube_order: Callable[[], object]) -> bool:
    """Whether this call of :func:`.api.vsa_parts` on raster ``q``, ``k``, ``v`` takes :func:`raster_forward` (the
    module docstring's rule); ``cube_order()`` runs the call's cube-order path (the class's first call runs it to
    decide the fine branch's backend, and times it against the raster path)."""
    from ..block_sparse.gather import gather_fits, gather_forced

    forced = gather_forced()
    if forced is False or (forced is None and q.device.type != "cuda") or records_grad(q, k, v) \
            or torch.compiler.is_compiling() or type(q) is not torch.Tensor or k.shape != q.shape \
            or v.shape != q.shape or not all(folds(x) for x in (q, k, v)) \
            or not gather_fits(*(_folded(x) for x in (q, k, v))):
        return False
    key = _key(q, k, v, cubes, count, with_coarse, backend, forced)
    hit = _CHOICES.get(key)
    if hit is None:
        if in_graph():  # (a capture decides nothing: it may not time or sync)
            return False
        hit = _decide(q, k, v, cubes, count, scale, with_coarse, backend, forced, cube_order)
        if len(_CHOICES) >= _CHOICES_MAX:
            _CHOICES.clear()
        _CHOICES[key] = hit
    return hit


def _decide(q, k, v, cubes: Cubes, count: int, scale: float, with_coarse: bool, backend: str, forced,
            cube_order: Callable[[], object]) -> bool:
    """The class's first eager call: the cube-order path runs once (deciding the fine branch's backend), then the
    raster path is taken where both branches run Triton, the gathered forward passed its self-check, and it timed
    faster (``forced``: without timing)."""
    from ..block_sparse.gather import gather_runs, raster_faster
    from .api import _fused_coarse, chosen_fine_backend

    b, h, n, d = q.shape
    if not _fused_coarse(q, k, v, with_coarse, backend):
        return False
    cube_order()
    fine = backend if backend != "auto" else chosen_fine_backend(
        cubes.perm.grid, (1, b * h, cubes.perm.num_padded, d), False, q.dtype)
    vol = cubes.volume
    if fine != "triton" or not gather_runs(q.device, q.dtype, d, vol, vol, forced):
        return False
    return bool(forced) or raster_faster(
        FAMILY, q, vol, vol, count / cubes.count,
        lambda gather: raster_forward(q, k, v, cubes, count, scale, with_coarse) if gather else cube_order())
