"""VSA's inference forward on raster-order tensors: both branches read q, k and v where they are.

The cube-order path (:func:`.api.vsa_parts`) copies q, k and v into cube order (every token, padded to whole cubes:
1.22x the tokens at Wan 480p's (21, 30, 52)), runs the coarse launches and the fine branch on the copies and copies
the fine output and its lse back: five memory-bound passes around the kernels, most of VSA's traffic outside them
(BENCHMARKS section 6, MODELLED). Here the pool launch reads each cube's tokens through the cube permutation's row
table (``_vsa_pool_kernel`` with ``GATHER``: the same sums in the same order) and the fine branch runs the gathered
block-sparse forward over the same table (:mod:`dit_accel.kernels.block_sparse.gather`), which writes o and lse in
raster order; what is left is the gated sum's one pass. The selection, and so the pattern, is the cube-order
path's bit for bit, and so are the outputs (the same tiles reach the same products).

Which calls take it is :func:`.api.vsa_parts`' decision (``_reads_raster``): an eager inference call (nothing
records a backward, no trace) whose coarse branch runs the Triton launches and whose fine branch runs the
``triton`` backend, where the gathered forward passed its first-use self-check
(:func:`~dit_accel.kernels.block_sparse.gather.gather_runs`; ``DIT_ACCEL_GATHER=1`` forces it, ``0`` turns it off),
every row offset fits 32 bits (a batch that does not fold into heads as a view, :func:`folds`, runs one batch at a
time), and it timed faster than the cube-order path on the call's inputs (autotune family :data:`FAMILY`), decided
by the class's first eager call and kept; a CUDA graph capture takes the eager answer, or cube order.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import fine as fine_path
from .layouts import cube_masks, layout_of_rows
from .naive import Cubes

__all__ = ["FAMILY", "raster_forward", "folds", "folded", "launched"]

#: The autotune family of the choice between the raster and the cube-order forward.
FAMILY = "vsa.gather"


def folds(x: torch.Tensor) -> bool:
    """Whether ``(B, H, N, D)`` ``x`` views as ``(1, B * H, N, D)`` (the fine branch's one layout head per (batch,
    head)): one batch, or heads that step through the batch."""
    return x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def folded(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as ``(1, B * H, N, D)`` (:func:`folds` must hold)."""
    b, h, n, d = x.shape
    return x.view(1, b * h, n, d)


def launched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """q, k, v as one launch of :func:`raster_forward` takes them: folded ``(1, B * H, N, D)``, or where a batch does
    not fold, the first batch (each runs alike)."""
    if all(folds(x) for x in (q, k, v)):
        return tuple(folded(x) for x in (q, k, v))
    return q[:1], k[:1], v[:1]


def raster_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes: Cubes, count: int, scale: float,
                   with_coarse: bool) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coarse or None, selection, fine, lse)`` of raster ``q``, ``k``, ``v`` ``(B, H, N, D)``: :func:`.api.vsa_parts`'s
    parts, with ``fine`` ``(B, H, N, D)`` and ``lse`` ``(B, H, N)`` in raster order. Batches that do not fold into
    heads as a view (:func:`folds`) run one at a time, their parts joined (one pass over the fine output). The caller
    decided the path (the module docstring); no input checks here."""
    from ..block_sparse.triton import triton_forward
    from .triton import coarse_triton

    b, h, n, d = q.shape
    if not all(folds(x) for x in (q, k, v)):  # (a pipeline's (B, N, H, D) batch: one batch at a time, then joined)
        parts = [raster_forward(q[i:i + 1], k[i:i + 1], v[i:i + 1], cubes, count, scale, with_coarse)
                 for i in range(b)]
        coarse, selection, fine, lse = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
        return coarse, selection, fine, lse
    table = cubes.perm.row_table(q.device)
    coarse, _, selection = coarse_triton(q, k, v, cubes, count, scale, with_coarse, rows=table)
    q_f, k_f, v_f = (folded(x) for x in (q, k, v))
    rows = selection.reshape(b * h, *selection.shape[2:])
    ran = fine_path.fine_rows(q_f, k_f, v_f, cubes, rows, scale, table)
    if ran is None:  # the class's first call: its layout, and the template the next calls run
        layout = layout_of_rows(cubes, selection)
        ran = triton_forward(q_f, k_f, v_f, layout, scale, rows=table)
        fine_path.remember(q_f, k_f, v_f, cubes, rows, layout, cube_masks(cubes, q.device)[0], table)
    o, lse = ran
    return coarse, selection, o.view(b, h, n, d), lse.view(b, h, n)
