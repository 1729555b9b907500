"""VSA's Triton variant and its self-check problem (registered with :mod:`dit_accel.kernels.selfcheck`).

``vsa.triton.coarse``: the cube pooling and the coarse attention + selection launches (:mod:`.triton`)
against the twin's :func:`~.naive.coarse_attention` on partial cubes (a grid that is no multiple of the tile),
more cube rows than one program holds, and a ragged last block of key cubes, pooled from cube order and from
raster order through the row table (which must give the same bits). The coarse output and the scores must
agree within :data:`COARSE_TOL` (relative, fp32 both sides); the selections (the launch's own,
ascending, against torch.topk of the twin's scores, compared as sets) may differ in at most
:data:`SELECTION_TOL` of the query cubes (fp32 sums in another order can turn a near-tie), else the error
reported is that fraction. Both problems have fewer cubes than ``NK_MAX``, so the launch selects.

``vsa.triton.gated_bwd``: the gated term's backward (:mod:`.gated`) on partial cubes, two videos, the gradient and
the gate laid out ``(B, N, H, D)`` as a model's projections give them, against float64 sums written here from the
permutation: the gate's gradient and the cube rows' within the forward's bound per dtype (the gate's gradient is
rounded to it).

``vsa.triton.gated_fwd``: the gathered fine forward writing ``fine + gate * coarse`` in its epilogue (:mod:`.raster`)
on the same problem, against the twin's fine branch over the same selection plus the gated term, in float64.

``vsa.triton.spread_bwd``: a training call's gathered backward adding each cube mean's gradient to the cube's rows
as it stores them (:mod:`.raster`), against the same call adding them in PyTorch operators afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..selfcheck import Result, Variant, register, relative_error

__all__ = ["COARSE_TOL", "SELECTION_TOL", "VARIANT", "GATED_VARIANT", "GATED_FWD_VARIANT", "SPREAD_VARIANT"]

COARSE_TOL = 1e-4
SELECTION_TOL = 0.01
VARIANT = "vsa.triton.coarse"
GATED_VARIANT = "vsa.triton.gated_bwd"  # (gated.VARIANT: triton loads on first use)
GATED_FWD_VARIANT = "vsa.triton.gated_fwd"  # (gated.FWD_VARIANT)
SPREAD_VARIANT = "vsa.triton.spread_bwd"  # (gated.SPREAD_VARIANT)


def _applies(device: torch.device) -> Optional[str]:
    from ..backends import triton_reason

    return triton_reason(device)


def _check(device: torch.device, dtype: torch.dtype, shape: dict) -> Result:
    from .naive import coarse_attention, cubes_of
    from .triton import coarse_triton

    big = device.type == "cuda"
    grid, tile = ((13, 30, 52), (4, 4, 4)) if big else ((5, 6, 7), (2, 2, 4))  # partial cubes either way
    cubes = cubes_of(grid, tile)
    b, h, d = (1, 4, shape["head_dim"]) if big else (1, 2, shape["head_dim"])
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(b, h, cubes.perm.num_tokens, d, generator=g).to(device=device, dtype=dtype)
               for _ in range(3))
    q_t, k_t, v_t = (cubes.perm.permute(x, dim=-2) for x in (q, k, v))
    count = max(1, cubes.count // 5)
    scale = d ** -0.5
    with torch.no_grad():
        got = coarse_triton(q_t, k_t, v_t, cubes, count, scale)
        want = coarse_attention(q_t, k_t, v_t, cubes, count, scale)
        # the pool launch reading raster order through the row table (raster.py): the same sums, so the same bits
        raster = coarse_triton(q, k, v, cubes, count, scale, rows=cubes.perm.row_table(device))
    error = max(relative_error(got[0], want[0]), relative_error(got[1], want[1]))
    if not all(torch.equal(a, b) for a, b in zip(raster, got)):
        error = max(error, relative_error(raster[0], want[0]), relative_error(raster[1], want[1]), COARSE_TOL * 2)
    differ = float((got[2].sort(-1).values != want[2].sort(-1).values).any(-1).float().mean())
    if differ > SELECTION_TOL:
        error = max(error, differ, COARSE_TOL * 2)
    text = f"{b}x{h} heads, grid {grid}, tile {tile}: {cubes.count} cubes, top {count} (selection differs in {differ:.3g})"
    return Result(error, COARSE_TOL, text)


def _shapes(device):
    return tuple({"head_dim": d, "block_q": 64, "block_k": 64} for d in ((64, 128) if device.type == "cuda" else (64,)))


register(Variant(VARIANT, "vsa", "triton", _applies, _check, shapes=_shapes))


def _problem(device: torch.device, dtype: torch.dtype, d: int):
    """The gated backward's problem: ``(cubes, grad, gate, coarse)`` on partial cubes, two videos, grad and gate
    ``(B, H, N, D)`` views of ``(B, N, H, D)`` tensors."""
    from .naive import cubes_of

    big = device.type == "cuda"
    grid, tile = ((13, 30, 52), (4, 4, 4)) if big else ((5, 6, 7), (2, 2, 4))
    cubes = cubes_of(grid, tile)
    b, h = (2, 4) if big else (2, 2)
    g = torch.Generator().manual_seed(23)
    grad, gate = (torch.randn(b, cubes.perm.num_tokens, h, d, generator=g).to(device=device, dtype=dtype)
                  .transpose(1, 2) for _ in range(2))
    return cubes, grad, gate, torch.randn(b, h, cubes.count, d, generator=g).to(device)


def gated_reference(grad: torch.Tensor, gate: torch.Tensor, coarse: torch.Tensor, cubes):
    """float64 ``(d gate, d coarse)`` of the gated term: each raster row's cube from the permutation (its tiled
    position over the cube volume), the products per row and their sums per cube."""
    cube_of = (cubes.perm.inverse // cubes.volume).to(grad.device)
    g = grad.double()
    d_gate = g * coarse.double().index_select(2, cube_of)
    d_c = torch.zeros(coarse.shape, dtype=torch.float64, device=grad.device).index_add_(2, cube_of, g * gate.double())
    return d_gate, d_c


def _check_gated(device: torch.device, dtype: torch.dtype, shape: dict) -> Result:
    from .._selfchecks import FWD_TOL
    from .gated import gated_backward

    cubes, grad, gate, coarse = _problem(device, dtype, shape["head_dim"])
    with torch.no_grad():
        got = gated_backward(grad, gate, coarse, cubes)
    want = gated_reference(grad, gate, coarse, cubes)
    error = max(relative_error(a, b) for a, b in zip(got, want))
    text = (f"{grad.shape[0]}x{grad.shape[1]} heads, grid {cubes.perm.grid}, tile {cubes.perm.tile}: {cubes.count} "
            "cubes, gradient and gate (B, N, H, D)")
    return Result(error, FWD_TOL[dtype], text)


def _gated_dtypes(device):
    return (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.float16)


register(Variant(GATED_VARIANT, "vsa", "triton", _applies, _check_gated, dtypes=_gated_dtypes, shapes=_shapes))


def _check_gated_fwd(device: torch.device, dtype: torch.dtype, shape: dict) -> Result:
    """The gathered fine forward adding the gated term in its epilogue (:func:`.raster.raster_forward` with a gate)
    on :func:`_problem`'s partial cubes and two videos laid out ``(B, N, H, D)``, against the float64 sum of the
    twin's fine branch over the same selection (fp32, :func:`~.naive.fine_gathered`) and the gate times the launch's
    coarse rows; the selection must be the ungated call's and the coarse output taken in."""
    from .._selfchecks import FWD_TOL
    from .naive import fine_gathered
    from .raster import raster_forward

    cubes, gate, q, coarse = _problem(device, dtype, shape["head_dim"])
    k, v = q.flip(2), gate.flip(2)  # (q, k, v and the gate: four different (B, N, H, D) views)
    b, h, _, d = q.shape
    count, scale = max(1, cubes.count // 3), d ** -0.5
    with torch.no_grad():
        coarse, selection, _, _ = raster_forward(q, k, v, cubes, count, scale, True)
        taken, selection2, summed, _ = raster_forward(q, k, v, cubes, count, scale, True, gate)
        tiled = (cubes.perm.permute(x.float(), dim=-2) for x in (q, k, v))
        fine = cubes.perm.unpermute(fine_gathered(*tiled, cubes, selection, scale)[0], dim=-2)
    cube_of = (cubes.perm.inverse // cubes.volume).to(device)
    want = fine.double() + gate.double() * coarse.double().index_select(2, cube_of)
    error = relative_error(summed, want)
    if taken is not None or not torch.equal(selection, selection2):
        error = max(error, 2 * FWD_TOL[dtype])  # (the term not added in the launch, or another selection)
    text = (f"{b}x{h} heads, grid {cubes.perm.grid}, tile {cubes.perm.tile}: {cubes.count} cubes, top {count}, "
            "q, k, v and gate (B, N, H, D)")
    return Result(error, FWD_TOL[dtype], text)


register(Variant(GATED_FWD_VARIANT, "vsa", "triton", _applies, _check_gated_fwd, dtypes=_gated_dtypes,
                 shapes=_shapes))


def _check_spread(device: torch.device, dtype: torch.dtype, shape: dict) -> Result:
    """The gathered backward adding each cube mean's gradient to the cube's rows as it stores them
    (:func:`.raster.raster_train` with ``spread``) on :func:`_problem`'s partial cubes and two videos (one through the
    interpreter) laid out ``(B, N, H, D)``, against the same call adding them in PyTorch operators afterwards: dQ, dK and dV, the coarse
    output's gradient scaled by the cube volume so that the spread term weighs as much as the fine branch's."""
    from .._selfchecks import BWD_TOL
    from .raster import raster_train

    cubes, gate, q, _ = _problem(device, dtype, shape["head_dim"])
    if device.type != "cuda":  # (one video through the interpreter: its backward is the slow part of selftest)
        gate, q = gate[:1], q[:1]
    k, v = q.flip(2), gate.flip(2)
    b, h, _, d = q.shape
    count, scale = max(1, cubes.count // 3), d ** -0.5
    grads = []
    for spread in (True, False):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with torch.enable_grad():
            coarse, _, fine, _ = raster_train(*leaves, cubes, count, scale, True, spread)
            d_fine = torch.randn(fine.shape, generator=torch.Generator().manual_seed(29)).to(device, dtype)
            d_coarse = torch.randn(coarse.shape, generator=torch.Generator().manual_seed(31)).to(device)
            grads.append(torch.autograd.grad((fine, coarse), leaves, (d_fine, d_coarse * cubes.volume)))
    error = max(relative_error(a, b) for a, b in zip(*grads))
    text = (f"{b}x{h} heads, grid {cubes.perm.grid}, tile {cubes.perm.tile}: {cubes.count} cubes, top {count}, "
            "dQ dK dV, q, k, v (B, N, H, D)")
    return Result(error, BWD_TOL[dtype], text)


register(Variant(SPREAD_VARIANT, "vsa", "triton", _applies, _check_spread, dtypes=_gated_dtypes, shapes=_shapes))
