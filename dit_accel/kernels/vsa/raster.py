"""VSA's inference forward on raster-order tensors: both branches read q, k and v where they are.

The cube-order path (:func:`.api.vsa_parts`) copies q, k and v into cube order (every token, padded to whole cubes:
1.22x the tokens at Wan 480p's (21, 30, 52)), runs the coarse launches and the fine branch on the copies and copies
the fine output and its lse back: five memory-bound passes around the kernels, most of VSA's traffic outside them
(BENCHMARKS section 6, MODELLED). Here the pool launch reads each cube's tokens through the cube permutation's row
table (``_vsa_pool_kernel`` with ``GATHER``: the same sums in the same order) and the fine branch runs the gathered
block-sparse forward over the same table (:mod:`dit_accel.kernels.block_sparse.gather`), which writes o and lse in
raster order; what is left is the gated sum's one pass, which the fine launch takes over where its variant passed
its self-check (``vsa.triton.gated_fwd``, :func:`raster_forward`). The selection, and so the pattern, is the cube-order
path's bit for bit, and so are the outputs (the same tiles reach the same products).

Which calls take it is :func:`.api.vsa_parts`' decision (``_reads_raster``): an eager inference call (nothing
records a backward, no trace) whose coarse branch runs the Triton launches and whose fine branch runs the
``triton`` backend, where the gathered forward passed its first-use self-check
(:func:`~dit_accel.kernels.block_sparse.gather.gather_runs`; ``DIT_ACCEL_GATHER=1`` forces it, ``0`` turns it off),
every row offset fits 32 bits (a batch that does not fold into heads as a view, :func:`folds`, runs one batch at a
time), and it timed faster than the cube-order path on the call's inputs (autotune family :data:`FAMILY`), decided
by the class's first eager call and kept; a CUDA graph capture takes the eager answer, or cube order.

A call that records a backward (:func:`raster_train`) reads raster order both ways too, where the gathered backward
passed its self-check as well and forward and backward together timed faster (family :data:`TRAIN_FAMILY`). The
cube-order training path copied q, k and v into cube order, ran the coarse branch's PyTorch twin on the copies
(the launches are forward only), and in the backward scattered the fine output's gradient into cube order, added
the coarse branch's gradient (each cube's, expanded over its tokens) to the fine branch's in cube order and
scattered the sums back. Here one autograd function runs the pool launch (through the row table), selects from
the means in the coarse launch and runs the gathered forward; the coarse output is computed from its fp32 means
under autograd (the twin's formula, in one fused attention op, so neither pass writes ``C x C`` scores or their
gradient). Its backward runs the gathered two-pass backward, which writes dQ, dK and dV in raster order and adds
each cube's mean gradient (over the cube's size) to the cube's rows as it stores them, where that variant passed its
self-check (``vsa.triton.spread_bwd``, :func:`spread_runs`: heads of 64, 128 or 256); elsewhere the means' gradients
are added over the cube's tokens in place afterwards (:func:`~.layouts.token_views`: a broadcast, no token-sized
copy, but a pass over each gradient: about 4.5 q-sized units a call at Wan 480p, MODELLED). The means are the pool
launch's, not the twin's (another fp32 summation order), so the selection is the cube-order path's up to fp32
near-ties and the gradients are within rounding of it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..request import kernel_backward
from . import fine as fine_path
from .layouts import layout_of_rows, token_views
from .naive import Cubes, cube_sizes

__all__ = ["FAMILY", "TRAIN_FAMILY", "raster_forward", "raster_train", "spread_runs", "folds", "folded",
           "launched"]

#: The autotune families of the choice between the raster and the cube-order path: an inference call's forward,
#: and a training call's forward and backward.
FAMILY, TRAIN_FAMILY = "vsa.gather", "vsa.gather_train"


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
                   with_coarse: bool, gate: Optional[torch.Tensor] = None
                   ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coarse or None, selection, fine, lse)`` of raster ``q``, ``k``, ``v`` ``(B, H, N, D)``: :func:`.api.vsa_parts`'s
    parts, with ``fine`` ``(B, H, N, D)`` and ``lse`` ``(B, H, N)`` in raster order. Batches that do not fold into
    heads as a view (:func:`folds`) run one at a time, their parts joined (one pass over the fine output). The caller
    decided the path (the module docstring); no input checks here.

    ``gate`` (``with_coarse``; like q, last dim contiguous, at a head dim the kernel does not pad: the caller's to
    check, :func:`.api.vsa_parts`): the fine launch adds VSA's gated term in its epilogue (:func:`.fine.raster_fine`):
    ``fine`` is then ``fine + gate * coarse`` per raster row, in fp32 and rounded once to q's dtype, and ``coarse``
    comes back None. That saves the gated sum's pass over fine, gate and
    the output (and on a grid the cube does not divide, the cube rows' gather): about 4 q-sized units of traffic a
    call at Wan 480p, the kernel reading the gate once instead (``python -m dit_accel.eval.traffic``, MODELLED)."""
    from .triton import coarse_triton

    b, h, n, d = q.shape
    if not all(folds(x) for x in (q, k, v)):
        return _per_batch(raster_forward, q, k, v, gate, cubes, count, scale, with_coarse)
    table = cubes.perm.row_table(q.device)
    coarse, _, selection = coarse_triton(q, k, v, cubes, count, scale, with_coarse, rows=table)
    q_f, k_f, v_f = (folded(x) for x in (q, k, v))
    gated = None
    if gate is not None and coarse is not None and folds(gate):
        gated = (folded(gate), coarse.reshape(1, b * h, *coarse.shape[2:]), cubes.volume)
    o, lse = fine_path.raster_fine(q_f, k_f, v_f, cubes, selection, scale, table, gated)
    return None if gated is not None else coarse, selection, o.view(b, h, n, d), lse.view(b, h, n)


def _per_batch(fn, q, k, v, gate, *args):
    """``fn``'s parts of a batch that does not fold into heads as a view (a pipeline's (B, N, H, D) batch): one
    batch at a time (with its rows of ``gate``, if any), the parts joined."""
    parts = [fn(q[i:i + 1], k[i:i + 1], v[i:i + 1], *args, **({} if gate is None else {"gate": gate[i:i + 1]}))
             for i in range(q.shape[0])]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def raster_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cubes: Cubes, count: int, scale: float,
                 with_coarse: bool, spread: Optional[bool] = None
                 ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`raster_forward`'s parts for a call that records a backward (the module docstring): gradients flow to
    q, k and v through the fine output, its lse and (``with_coarse``) the coarse output, not through the
    selection. The caller decided the path; no input checks here. ``spread``: whether the backward kernels add each
    cube mean's gradient to the cube's rows as they store them (:func:`spread_runs`, None: asked here), instead of a
    pass of their own over each gradient."""
    if not all(folds(x) for x in (q, k, v)):
        return _per_batch(raster_train, q, k, v, None, cubes, count, scale, with_coarse, spread)
    spread = spread_runs(q) if spread is None else spread
    fine, lse, qc, kc, vc, selection = _RasterTrain.apply(q, k, v, cubes, count, scale, spread)
    coarse = None
    if with_coarse:  # (the twin's softmax(qc kc^T * scale) vc on the pool launch's means, through one fused
        # attention op: neither pass writes the C x C scores or their gradient, which the operators' autograd did)
        coarse = F.scaled_dot_product_attention(qc, kc, vc, scale=scale)
    return coarse, selection, fine, lse


def spread_runs(q: torch.Tensor) -> bool:
    """Whether a training call on raster ``q`` has its backward kernels add the cube means' gradients
    (``vsa.triton.spread_bwd``, :func:`raster_train`): a head dim they do not pad, where that variant passed its
    self-check, on the raster kernels' switch (:func:`.gated.gated_kernel_runs`)."""
    from ..block_sparse.configs import unpadded
    from .gated import SPREAD_VARIANT, gated_kernel_runs

    return unpadded(q.shape[-1]) and gated_kernel_runs(q, SPREAD_VARIANT)


class _RasterTrain(torch.autograd.Function):
    """The pool launch, the selection and the gathered fine forward of raster ``q``, ``k``, ``v`` (folding into
    heads): ``(fine, lse, q means, k means, v means, selection)``; the backward is the gathered two-pass one, each
    cube's mean gradient added over its tokens by its kernels (``spread``) or in place afterwards."""

    @staticmethod
    def forward(ctx, q, k, v, cubes: Cubes, count: int, scale: float, spread: bool = False):
        from ..block_sparse.triton import triton_forward
        from .triton import coarse_of_means, pool_triton

        b, h, n, d = q.shape
        table = cubes.perm.row_table(q.device)
        means = pool_triton(q, k, v, cubes, rows=table)
        _, _, selection = coarse_of_means(*means, count, scale, with_output=False)
        layout = layout_of_rows(cubes, selection)
        o, lse = triton_forward(folded(q), folded(k), folded(v), layout, scale, rows=table)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cubes, ctx.layout, ctx.scale, ctx.table, ctx.spread = cubes, layout, scale, table, spread
        ctx.mark_non_differentiable(selection)
        ctx.set_materialize_grads(False)
        return (o.view(b, h, n, d), lse.view(b, h, n)) + tuple(means) + (selection,)

    @staticmethod
    @kernel_backward("VSA's Triton kernels")
    def backward(ctx, d_fine, d_lse, d_qc, d_kc, d_vc, _):
        from ..block_sparse.triton import triton_backward

        q, k, v, o, lse = ctx.saved_tensors
        b, h, n, d = q.shape
        d_o = torch.zeros_like(o) if d_fine is None else d_fine.reshape(o.shape)
        d_lse = None if d_lse is None else d_lse.reshape(lse.shape)
        inv = cube_sizes(ctx.cubes, q.device, inverse=True)[:, None]
        adds = [None if g is None else (g * inv).reshape(1, b * h, *g.shape[2:]).contiguous()
                for g in (d_qc, d_kc, d_vc)]  # d x[r] += d mean[cube of r] / size of that cube
        spread = (*adds, ctx.cubes.volume) if ctx.spread and any(a is not None for a in adds) else None
        grads = triton_backward(d_o, folded(q), folded(k), folded(v), o, lse, ctx.layout, ctx.scale, d_lse,
                                rows=ctx.table, spread=spread)
        grads = [g.view(b, h, n, d) for g in grads]
        if spread is not None:
            from ..selfcheck import corrupt
            from .gated import SPREAD_VARIANT

            corrupt(SPREAD_VARIANT, grads[0])
        else:
            for g, add in zip(grads, adds):
                if add is not None:  # (in place over the tokens: a pass of its own over the gradient)
                    rows, tokens = token_views(add.view(b, h, *add.shape[2:]), ctx.cubes, ctx.cubes.perm)
                    g.unflatten(2, tokens).add_(rows)
        return (*grads, None, None, None, None)
