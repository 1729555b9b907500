"""The block-sparse forward on raster-order tensors: tiled positions read and written through a row table.

A Tile or GNA layout is built over a *tiled* token order (:mod:`dit_accel.patterns.permutation`), in which a window
is a few contiguous blocks. The plan's *gathering path* copies q, k and v into that order and the output back: on a
GPU four memory-bound passes around one compute-bound kernel, 8 q-sized units of traffic per call (BENCHMARKS
section 6, MODELLED). The *gathered forward* has the kernel read the raster tensors where they are instead: the
row table (``TilePermutation.row_table``) holds, per tiled position, the raster token it stands for (``-1`` for a padded
position), and every tile the pointer kernel loads (q, each visited k and v tile, one table read for both) and the
output and lse it stores go through it (:mod:`.gather_tiles`). A tiled position is a raster row, so each row of a
tile is still one contiguous ``head_dim`` load; a padded position loads zeros and stores nothing, as the gathering
path's zero rows (the layout never lets a query attend to them). Row offsets inside a (batch, head) slice are 32-bit
(:func:`gather_fits`), formed in the kernel from the stride (whose divisibility keeps the loads 16-byte copies); a
full tile's keys load without a row test (no tiled layout lets a query see a padded key: :func:`padding_unseen`);
where the addresses would spill at a configuration's pipeline depth it runs one stage less
(:data:`.configs.GATHER_STAGES`).

The kernel is the pointer one-loop forward (``_fwd_kernel`` with ``GATHER``): TMA tiles are boxes of consecutive
rows, which a row table is not, and a gathered row costs its own address (more integer instructions per tile). So
the gathered forward is a trade (no passes against a heavier tile loop, and on sm_90 pointer loads for TMA ones),
decided per shape class by timing both on the call's inputs (:func:`gather_faster`), and only after the variant's
first-use self-check (:data:`VARIANT`) passed. A call that records a backward reads raster order in its backward
too: the two-pass kernels (``bwd_kernels.py`` with ``GATHER``) load q, k, v and dO and store dQ, dK and dV through
the same table, and the preprocess reads o and dO through it, writing lse and delta per tiled position (the
gathering path's backward gathers dO and scatters the three gradients back: 16 units a training call at Wan 480p,
with the forward's passes); decided apart (self-check
:data:`BWD_VARIANT`, timed forward and backward together), with the one-pass backward left to the gathering path.
This module imports no triton (the plans call it).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from .. import selfcheck
from ..checks import check_scale
from ..request import env_switch, records_grad, tracing
from .configs import GATHER_BWD_VARIANT, GATHER_VARIANT, rows_fit

__all__ = ["VARIANT", "BWD_VARIANT", "ENV_GATHER", "gathered_forward", "gather_fits", "padding_unseen",
           "gather_forced", "gather_runs", "gather_faster", "raster_faster", "rows_fit", "raster_allowed",
           "kept_choice"]

#: The self-check's names of the forward, and of the two-pass backward, reading and writing raster order through a
#: row table.
VARIANT, BWD_VARIANT = GATHER_VARIANT, GATHER_BWD_VARIANT
#: The switch of :func:`gather_forced`.
ENV_GATHER = "DIT_ACCEL_GATHER"


def gathered_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scale: float, perm
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` in raster order of raster ``q``, ``k``, ``v`` under ``layout``, a layout over ``perm``'s tiled
    positions: the Triton forward reading and writing through the row table, and where autograd records, the
    two-pass backward through it too (no input checks: the caller's; ``scale`` None: ``1 / sqrt(D)``)."""
    rows, scale = perm.row_table(q.device), check_scale(scale, q.shape[-1])
    if records_grad(q, k, v):
        from .ops import _EagerBlockSparse

        return _EagerBlockSparse.apply(q, k, v, layout, scale, rows)
    return _launchers()[0](q, k, v, layout, scale, rows=rows)


def padding_unseen(layout, perm) -> bool:
    """Whether no query of ``layout`` (over ``perm``'s tiled positions) attends to a padded position, as the
    gathered kernel assumes (a full tile's keys load without a row test). A tiled layout never lets one; checked
    once per call signature by the plans (:func:`~.api.live_keys` is kept with the layout)."""
    from .api import live_keys

    padded = perm.row_table(layout.device) < 0
    return not bool(live_keys(layout)[:, padded].any())


def gather_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether every row offset inside a (batch, head) slice of q, k, v and the output fits the gathered kernel's
    32 bits: ``N * (token stride) + D < 2**31`` (Wan 2.1 14B at 720p, 75,600 tokens of 40 x 128 in the (B, N, H, D)
    layout: 3.9e8)."""
    n, d = q.shape[-2], q.shape[-1]
    out_stride = q.shape[1] * d  # the output's, laid out as (B, N, H, D)
    return max(q.stride(-2), k.stride(-2), v.stride(-2), out_stride) * n + d < 2 ** 31



@functools.cache
def _launchers():
    """``(triton_forward,)``, imported on first use (importing this module imports no triton)."""
    from .triton import triton_forward

    return (triton_forward,)


def gather_forced() -> Optional[bool]:
    """``$DIT_ACCEL_GATHER``: ``1`` (``true``, ``on``, ``yes``) takes the gathered forward wherever the Triton
    kernel runs an inference call of a permuted layout, the interpreter included (a GPU still checks it first);
    ``0`` (``false``, ``off``, ``no``) never; unset or empty: the default (:func:`gather_runs`). ValueError
    naming the variable on anything else."""
    return env_switch(ENV_GATHER, "read raster order in the kernel wherever it runs", "always gather into tiled order",
                      "on a GPU, after the variant's self-check")


def raster_allowed(q: torch.Tensor, forced: Optional[bool]) -> bool:
    """What every raster-order choice asks first, whatever the method: not switched off (``forced``,
    :func:`gather_forced`), on a GPU unless forced, eager (a traced call gathers: the gathered launch is no custom
    op) and on plain tensors."""
    return forced is not False and (forced is not None or q.device.type == "cuda") \
        and not tracing() and type(q) is torch.Tensor


def kept_choice(choices: dict, key, decide: Callable[[], bool], limit: Optional[int] = None) -> bool:
    """``choices[key]``, worked out by ``decide()`` on the key's first eager call and kept (``limit``: at most so
    many, the dict emptied when full). Inside a CUDA graph capture, which may not time or synchronise, an undecided
    key answers False (the gathering path) and stays undecided; a decided one gives the eager answer."""
    from ..request import in_graph

    hit = choices.get(key)
    if hit is None:
        if in_graph():
            return False
        hit = decide()
        if limit is not None and len(choices) >= limit:
            choices.clear()
        choices[key] = hit
    return hit


def gather_runs(device: torch.device, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int,
                forced: Optional[bool] = None, backward: bool = False) -> bool:
    """Whether a call of a permuted layout that runs the Triton kernel may read raster order (``backward``: a
    training call, whose backward does too): ``forced`` (:func:`gather_forced`) False never; None on a GPU where
    the variants passed their first-use self-checks (never on the interpreter, where the gathering path stays
    the reference); True wherever they pass them, raising :class:`~dit_accel.kernels.selfcheck.VariantFailed`
    where one failed."""
    if forced is False or (forced is None and device.type != "cuda"):
        return False
    shape = {"head_dim": head_dim, "block_q": block_q, "block_k": block_k}
    return selfcheck.gate([VARIANT, BWD_VARIANT] if backward else [VARIANT], device, dtype, shape,
                          forced=bool(forced))


def gather_faster(layout, q: torch.Tensor, run: Callable[[bool], object], timer=None,
                  family: str = "block_sparse.gather") -> bool:
    """Whether a call takes the gathered forward: eager and with the autotuner on, the gathered forward and the
    gathering path are timed on the call's own inputs once per shape class (:func:`dit_accel.kernels.autotune.choose`,
    family ``block_sparse.gather``, stored with the other choices) and the faster runs; traced, or with the autotuner
    off, the gathering path stands. Timed on every GPU: the gathered loop costs more instructions per tile than the
    pointer kernel's (1.03-1.08x on sm_80 / 89 at d128, 1.04-1.10x against sm_90's pointer kernel: BENCHMARKS
    section 7, STATIC), which the passes it saves outweigh only below some density. ``run(gather)`` runs a path;
    a training call's (forward and backward) is stored under ``family`` ``block_sparse.gather_train``."""
    return raster_faster(family, q, layout.block_q, layout.block_k, float(layout.density()), run, timer)


def raster_faster(family: str, q: torch.Tensor, block_q: int, block_k: int, density: float,
                  run: Callable[[bool], object], timer=None) -> bool:
    """:func:`gather_faster` for any raster-order path against its gathering one (``family``: the autotune
    family the choice is stored under; VSA's is ``vsa.gather``)."""
    from .. import autotune
    from ..request import Request, in_graph

    if in_graph() or not autotune.enabled():
        return False
    shape = autotune.ShapeClass.of(family, Request.of(q, q, q, block_q, block_k), density)
    contenders = {"gather": lambda: run(True), "permute": lambda: run(False)}
    return autotune.choose(shape, contenders, timer=timer or autotune.timer_on(q.device), warmup=2,
                           repeats=5) == "gather"
