"""The Triton path as torch custom ops, so ``torch.compile(fullgraph=True)`` traces it.

``dit_accel::block_sparse_fwd`` and ``dit_accel::block_sparse_bwd`` take the
layout as its tensors plus Python ints; each op rebuilds a :class:`BlockLayout`
inside and calls the launchers of :mod:`.triton` (imported lazily: importing
this module does not import triton). The ops do not check their inputs:
:func:`dit_accel.kernels.block_sparse_attention` has, once, before choosing them. Fake
implementations give the output shapes without running anything, and
``register_autograd`` connects the two ops; an ``lse`` gradient enters the backward
op as ``delta - dlse``, so ``return_lse`` training costs no extra kernel. The
launchers derive the kernels' tile plan once per (layout tensors, tile shape), the
only host sync of this path (cached: later calls have none).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from ..layout import BlockLayout
from ..request import kernel_backward, records_grad, tracing

__all__ = ["triton_block_sparse_attention", "direct_call_ok"]

Tensor = torch.Tensor


def _layout(kv_counts, kv_indices, kv_mask_ids, q_counts, q_indices, q_mask_ids, mask_table,
            q_len, kv_len, block_q, block_k) -> BlockLayout:
    return BlockLayout(q_len, kv_len, block_q, block_k, kv_counts, kv_indices, kv_mask_ids,
                       q_counts, q_indices, q_mask_ids, mask_table)


@torch.library.custom_op("dit_accel::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor,
                     kv_counts: Tensor, kv_indices: Tensor, kv_mask_ids: Tensor,
                     q_counts: Tensor, q_indices: Tensor, q_mask_ids: Tensor, mask_table: Tensor,
                     q_len: int, kv_len: int, block_q: int, block_k: int, scale: float) -> Tuple[Tensor, Tensor]:
    layout = _layout(kv_counts, kv_indices, kv_mask_ids, q_counts, q_indices, q_mask_ids, mask_table,
                     q_len, kv_len, block_q, block_k)
    o, lse = _launchers()[0](q, k, v, layout, scale)
    return o, lse


@block_sparse_fwd.register_fake
def _(q, k, v, kv_counts, kv_indices, kv_mask_ids, q_counts, q_indices, q_mask_ids, mask_table,
      q_len, kv_len, block_q, block_k, scale):
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("dit_accel::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                     kv_counts: Tensor, kv_indices: Tensor, kv_mask_ids: Tensor,
                     q_counts: Tensor, q_indices: Tensor, q_mask_ids: Tensor, mask_table: Tensor,
                     q_len: int, kv_len: int, block_q: int, block_k: int,
                     scale: float, dlse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    layout = _layout(kv_counts, kv_indices, kv_mask_ids, q_counts, q_indices, q_mask_ids, mask_table,
                     q_len, kv_len, block_q, block_k)
    dq, dk, dv = _launchers()[1](do, q, k, v, o, lse, layout, scale, dlse)
    # Outputs of a custom op must not alias its inputs.
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@block_sparse_bwd.register_fake
def _(do, q, k, v, o, lse, kv_counts, kv_indices, kv_mask_ids, q_counts, q_indices, q_mask_ids, mask_table,
      q_len, kv_len, block_q, block_k, scale, dlse=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


_N_LAYOUT = 7  # layout tensors after q, k, v


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    layout_tensors = inputs[3:3 + _N_LAYOUT]
    ctx.geometry = inputs[3 + _N_LAYOUT:]
    ctx.set_materialize_grads(False)  # an unused lse then arrives as None: no extra kernels
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *layout_tensors)


@kernel_backward("block-sparse attention's Triton kernel")  # (as _EagerBlockSparse's: unmarked, the op's gradient
# under create_graph=True failed in torch with "no autograd formula was registered" for block_sparse_bwd)
def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, *layout_tensors = ctx.saved_tensors
    q_len, kv_len, block_q, block_k, scale = ctx.geometry
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    # An lse gradient g enters the same kernels as delta - g (d lse_i / d s_ij = P_ij).
    dq, dk, dv = block_sparse_bwd(grad_o, q, k, v, o, lse, *layout_tensors, q_len, kv_len, block_q, block_k, scale,
                                  grad_lse)
    return (dq, dk, dv) + (None,) * (_N_LAYOUT + 5)


block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)


def direct_call_ok(*tensors: Tensor) -> bool:
    """Whether an eager call may skip the custom op and call the launcher itself: nothing is being
    traced (``torch.compile``), no dispatch mode (FakeTensorMode, a profiler's or a test's) or functorch
    transform is active, and the tensors are plain. The op's dispatch, its re-packing of the layout and
    its autograd wrapper cost about 90 us of host time per call (``dit_accel.eval.host_path``); with
    nothing to intercept them, the launcher gives the same outputs without them."""
    if tracing() or _dispatch_modes() or _functorch_active():
        return False
    for t in tensors:
        if type(t) is not torch.Tensor:
            return False
    return True


# torch's own queries, looked up once (each is a C function; absent in some versions: then assume the worst).
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 1)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: True)


@functools.cache
def _launchers():
    """``(triton_forward, triton_backward)``, imported on first use (importing this module does not import
    triton) and then bound: an import statement in the call path costs a microsecond per call."""
    from .triton import triton_backward, triton_forward

    return triton_forward, triton_backward


class _EagerBlockSparse(torch.autograd.Function):
    """The custom op's autograd, for eager calls that record a graph (same kernels, same lse gradient); with a row
    table ``rows``, raster-order tensors read and written through it both ways (:mod:`.gather`)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, rows=None):
        o, lse = _launchers()[0](q, k, v, layout, scale, rows=rows)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.rows = layout, scale, rows
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @kernel_backward("block-sparse attention's Triton kernel")
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        dq, dk, dv = _launchers()[1](grad_o, q, k, v, o, lse, ctx.layout, ctx.scale, grad_lse, rows=ctx.rows)
        return dq, dk, dv, None, None, None


def triton_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout,
                                  scale: float) -> Tuple[Tensor, Tensor]:
    """``(o, lse)`` through the custom op; ``layout`` already on q's device, inputs validated.

    Eager calls with nothing to intercept them (:func:`direct_call_ok`) call the launcher directly
    (through :class:`_EagerBlockSparse` when autograd records); traced ones go through the op."""
    if direct_call_ok(q, k, v):
        if records_grad(q, k, v):
            return _EagerBlockSparse.apply(q, k, v, layout, float(scale))
        return _launchers()[0](q, k, v, layout, float(scale))
    tensors: List[Tensor] = [getattr(layout, name) for name in BlockLayout.TENSORS]
    return block_sparse_fwd(q, k, v, *tensors, layout.q_len, layout.kv_len, layout.block_q, layout.block_k,
                            float(scale))
