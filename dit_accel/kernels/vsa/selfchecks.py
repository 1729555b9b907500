"""VSA's Triton variant and its self-check problem (registered with :mod:`dit_accel.kernels.selfcheck`).

``vsa.triton.coarse``: the cube pooling and the coarse attention + selection launches (:mod:`.triton`)
against the twin's :func:`~.naive.coarse_attention` on partial cubes (a grid that is no multiple of the tile),
more cube rows than one program holds, and a ragged last block of key cubes, pooled from cube order and from
raster order through the row table (which must give the same bits). The coarse output and the scores must
agree within :data:`COARSE_TOL` (relative, fp32 both sides); the selections (the launch's own,
ascending, against torch.topk of the twin's scores, compared as sets) may differ in at most
:data:`SELECTION_TOL` of the query cubes (fp32 sums in another order can turn a near-tie), else the error
reported is that fraction. Both problems have fewer cubes than ``NK_MAX``, so the launch selects.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..selfcheck import Result, Variant, register, relative_error

__all__ = ["COARSE_TOL", "SELECTION_TOL", "VARIANT"]

COARSE_TOL = 1e-4
SELECTION_TOL = 0.01
VARIANT = "vsa.triton.coarse"


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
