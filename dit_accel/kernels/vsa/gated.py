"""The backward of VSA's gated term in one Triton launch, reading raster order through the cube permutation's row
table.

A gated VSA call's output is ``fine[r] + gate[r] * coarse[cube of r]`` per raster row ``r`` (:func:`.api.gated_coarse`).
Its backward gives ``fine`` the incoming gradient ``g`` as it is, the gate ``g * coarse[cube of r]`` (in fp32, rounded
once to the gate's dtype) and each cube's coarse row the fp32 sum of ``g * gate`` over its tokens. As PyTorch
operators that was a product and a sum over token-sized fp32 tensors, the gate's product, and on a grid that a cube
does not divide the cube rows' gathers and their backward: about 11 q-sized units of traffic a training call at Wan
480p (``python -m dit_accel.eval.traffic``). ``_vsa_gated_bwd_kernel`` runs one program per (cube, batch x head,
64 columns): it reads the cube's rows of ``g`` and the gate through the row table once, writes the gate's gradient
and its cube's column sums (3 units).

The products are exact in fp32 (half-precision inputs) and each gate gradient is rounded as the PyTorch product
rounds it, so it is the operators' result bit for bit; the cube sums are fp32 sums in another order (within fp32
rounding). A variant never timed on a GPU: it runs where :data:`VARIANT` passed its first-use self-check, on the
same switch as the other raster-order kernels (``DIT_ACCEL_GATHER``: unset on a GPU only, ``1`` anywhere, the
interpreter included, ``0`` never), eagerly (a trace keeps the operators).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import occupancy
from .naive import Cubes

__all__ = ["gated_backward", "gated_kernel_runs", "aot_source", "KERNELS", "VARIANT", "FWD_VARIANT", "SPREAD_VARIANT",
           "NUM_WARPS", "ROWS", "BLOCK_D"]

#: The self-check's name of the kernel; of the gathered fine forward adding the gated term in its epilogue
#: (:func:`.raster.raster_forward`); and of the gathered backward adding the cube means' gradients
#: (:func:`.raster.raster_train`): this switch decides all three.
VARIANT, FWD_VARIANT, SPREAD_VARIANT = "vsa.triton.gated_bwd", "vsa.triton.gated_fwd", "vsa.triton.spread_bwd"
#: Token rows per step, columns per program, warps per program.
ROWS, BLOCK_D, NUM_WARPS = 32, 64, 4


@triton.jit
def _vsa_gated_bwd_kernel(G, GATE, C, RIDX, DGATE, DC, H, D,
                          sg_b, sg_h, sg_n, st_b, st_h, st_n, sd_b, sd_h, sd_n, sc_b, sc_h, sc_c,
                          VOL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                          WITH_DGATE: tl.constexpr, WITH_DC: tl.constexpr):
    cube = tl.program_id(0)  # (cubes on the first axis: the others take at most 65,535)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rows = tl.arange(0, ROWS)
    c_at = b * sc_b + h * sc_h + cube.to(tl.int64) * sc_c + cols
    c = tl.load(C + c_at, mask=col_ok, other=0.0)  # the cube's coarse row, fp32
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(0, VOL, ROWS):
        pos = r + rows
        tok = tl.load(RIDX + cube * VOL + pos, mask=pos < VOL, other=-1)  # the raster row (-1: padding)
        ok = (tok >= 0)[:, None] & col_ok[None, :]
        tok = tok.to(tl.int64)[:, None]
        g = tl.load(G + b * sg_b + h * sg_h + tok * sg_n + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if WITH_DGATE:
            tl.store(DGATE + b * sd_b + h * sd_h + tok * sd_n + cols[None, :],
                     (g * c[None, :]).to(DGATE.dtype.element_ty), mask=ok)
        if WITH_DC:
            gate = tl.load(GATE + b * st_b + h * st_h + tok * st_n + cols[None, :], mask=ok, other=0.0)
            acc += tl.sum(g * gate.to(tl.float32), axis=0)
    if WITH_DC:
        tl.store(DC + c_at, acc, mask=col_ok)


KERNELS = {"gated_bwd": _vsa_gated_bwd_kernel}


def _constexprs(volume: int, with_dgate: bool = True, with_dc: bool = True) -> dict:
    return dict(VOL=volume, ROWS=min(ROWS, triton.next_power_of_2(volume)), BLOCK_D=BLOCK_D, WITH_DGATE=with_dgate,
                WITH_DC=with_dc)


def aot_source(dtype: torch.dtype = torch.bfloat16, volume: int = 64, with_dgate: bool = True,
               with_dc: bool = True):
    """``(kernel, signature, constexprs, attrs)`` of the kernel for ``triton.compile(ASTSource(...))`` (static GPU
    checks without a GPU): the gradient and the gate in ``dtype``, cubes of ``volume``; launched with
    :data:`NUM_WARPS` warps."""
    from ..dense.configs import aot_signature

    types = {"G": "*DT", "GATE": "*DT", "DGATE": "*DT", "C": "*fp32", "DC": "*fp32", "RIDX": "*i32"}
    div16 = ("sg_b", "sg_h", "sg_n", "st_b", "st_h", "st_n", "sd_b", "sd_h", "sd_n", "sc_b", "sc_h", "sc_c")
    return aot_signature(_vsa_gated_bwd_kernel, types, _constexprs(volume, with_dgate, with_dc), div16, dtype)


@occupancy.on_inputs_device
def gated_backward(grad: torch.Tensor, gate: torch.Tensor, coarse: torch.Tensor, cubes: Cubes,
                   with_dgate: bool = True, with_dc: bool = True
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(d gate, d coarse)`` of the gated term (module docstring) for the incoming gradient ``grad`` and the gate
    ``gate``, both ``(B, H, N, D)`` on the whole grid in raster order (any strides), and the cube rows ``coarse``
    ``(B, H, C, D)`` fp32: the gate's gradient laid out like the gate, in its dtype; the cube rows' fp32,
    contiguous. ``with_dgate`` / ``with_dc`` False: that one is not made (None)."""
    b, h, n, d = gate.shape
    grad, gate, coarse = (x if x.stride(-1) == 1 else x.contiguous() for x in (grad, gate, coarse))
    d_gate = torch.empty_like(gate) if with_dgate else None
    d_c = torch.empty(coarse.shape, dtype=torch.float32, device=coarse.device) if with_dc else None
    dg, dc = (d_gate if with_dgate else gate), (d_c if with_dc else coarse)
    grid = (cubes.count, b * h, triton.cdiv(d, BLOCK_D))
    KERNELS["gated_bwd"][grid](grad, gate, coarse, cubes.perm.row_table(gate.device), dg, dc, h, d,
                               *grad.stride()[:3], *gate.stride()[:3], *dg.stride()[:3], *dc.stride()[:3],
                               **_constexprs(cubes.volume, with_dgate, with_dc), num_warps=NUM_WARPS)
    from ..selfcheck import corrupt

    return (None if d_gate is None else corrupt(VARIANT, d_gate)), (None if d_c is None else corrupt(VARIANT, d_c))


def gated_kernel_runs(gate: torch.Tensor, variant: str = VARIANT) -> bool:
    """Whether the gated term's backward on a gate like ``gate`` runs this kernel (``variant`` :data:`FWD_VARIANT` /
    :data:`SPREAD_VARIANT`: whether the fine launch adds the gated term, the backward the means' gradients):
    ``DIT_ACCEL_GATHER``
    (:func:`~dit_accel.kernels.block_sparse.gather.gather_forced`) ``0`` never; unset, on a GPU only; eager calls on
    plain tensors; and only where :data:`VARIANT` passed its self-check at the gate's dtype and head dim (a forced
    ``1`` raises :class:`~dit_accel.kernels.selfcheck.VariantFailed` where it failed). Inside a CUDA graph capture,
    which may run no check, an unforced call runs it only where a stored verdict says the variant passed."""
    from .. import selfcheck
    from ..block_sparse.gather import gather_forced, raster_allowed
    from ..limits import grid_fits

    forced = gather_forced()
    if not raster_allowed(gate, forced) or gate.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not grid_fits(gate):  # (its launch puts B*H on the grid's second axis; the PyTorch path runs any)
        return False
    shape = {"head_dim": gate.shape[-1], "block_q": 64, "block_k": 64}
    return selfcheck.gate_unverified(variant, gate.device, gate.dtype, shape, forced)
