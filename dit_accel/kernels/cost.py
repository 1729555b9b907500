"""The one cost model of the attention kernels: modelled GPU seconds from static facts.

**A model, not a measurement.** Every figure this module returns is a prediction. The
constants of the ``"h100"`` entry are a least-squares-style fit to the H100 rows that
BENCHMARKS.md section 10 measured (bf16, head dim 128, batch 1, forward); the ``"h200"`` entry
fits the kernels that ship today, measured on an H200 (:data:`_H200`), and is what ``auto``
decides with on every GPU (:func:`arch_for_device`); the other entries model kernel variants
(issue 27), and say which constants they change and why.

The block-sparse forward kernel runs one CTA per (batch, head, query block); a CTA walks the
``n`` key tiles its query block visits. With ``S = sms x ctas_per_sm`` CTA slots::

    time = per_call + (CTAs / S) x (per_cta + n_mean x per_tile)
         = per_call + (CTAs x per_cta + full x per_tile + partial x per_partial_tile) / S

``per_call`` is everything paid once per call (host path, launches, the launch tail),
``per_cta`` what a CTA pays besides its tiles (pipeline fill, Q load, epilogue, scheduling),
``per_tile`` one visited 64 x 64 key tile at head dim 128 (tiles of other sizes and head dims
scale with their FLOPs). Dense attention takes the same form with every tile visited.
Counting is cheap: :func:`tile_counts` reads ``kv_counts`` / ``kv_mask_ids`` (``O(Hl x nQ x
max_kv)``), with no dense ``[nQ, nK]`` matrix.

Origins of the H100 constants (:data:`CONSTANTS` ``["h100"]``):

============================  ===========  ===============================================
constant                      value        origin
============================  ===========  ===============================================
sms, ctas_per_sm              132, 2       H100 SXM; 2 CTAs of the 64 x 64, 4-warp, 3-stage
                                           sm_90 forward config fit in one SM's 227 KB
per_call_s                    526 us       fit, section 10's 17 block-sparse H100 rows
per_cta_s                     10.6 us      fit, same rows
per_tile_s                    1.39 us      fit, same rows (15 within 6%; FLUX 1024 px
                                           at 0.2 6.7%, at 0.1 13%: 0.6 ms calls)
per_partial_tile_s            1.39 us      = per_tile_s: the rows cannot separate them (480p
                                           has 50% partial tiles, FLUX none, one fit holds);
                                           section 7: both loops are tensor-bound (1,024
                                           cycles), so equal is also what the SASS says
dense_per_call_s              20 us        assumed (one cuDNN/flash launch from eager torch)
dense_per_tile_s              0.91 us      fit, SDPA at 480p, 720p, FLUX 1024 and 4K
                                           (section 10; within 5%); ~600 TFLOP/s
triton_dense_per_call_s       50 us        assumed (the Python launcher)
triton_dense_per_tile_s       1.047 us     fit, the dense Triton kernel at 480p and 720p
                                           (0.86x and 0.90x SDPA; FLUX 1024 is 19% off)
dense_backward_factor         2.64         measured: SDPA forward + backward / forward =
                                           41.62 / 11.43 ms at 480p (``bench_sla``)
backward_tile_factor          2.5          assumed: FlashAttention-2 backward does 5 tile
                                           matmuls to the forward's 2
sla_per_call_s                500 us       assumed (the block-sparse per-call term, rounded)
sla_per_tile_s                2.87 us      fit, SLA 5% vs 20% at 480p and 720p (809f028)
sla_per_token_s               6.75 ns      fit, same four rows (feature maps, casts, glue
                                           per token and head)
sla_per_block_pair_s          0.164 ns     fit, same four rows (pooled scores and top-k per
                                           query-block x key-block pair and head)
============================  ===========  ===============================================

The SLA constants are four numbers fitted to four rows: they reproduce those rows and are a
guess elsewhere (FLUX 4K at 5% models 28.8 ms; an older commit measured 31.6 ms).

Modelled kernel variants (cumulative; ``kernel=`` of :func:`block_sparse_time`), from static
facts of the kernels other engineers are building:

- ``"host"``: the per-call host cost down to 50 us (the eager path cached, item 2 of issue 27).
- ``"persistent"``: + one persistent CTA per slot walking a work list: the pipeline fills once
  per CTA lifetime, not once per query block; per query block there remain the Q load, the
  epilogue (O and LSE stores) and the row bookkeeping, taken as 2.3 us (assumed: a 64 x 128
  bf16 tile in and out at a CTA's share of HBM bandwidth, plus the tail of the last wave).
- ``"ring3"``: + a 3-deep K/V ring (or 128-token query blocks), which hides the index-driven
  K/V loads: the sparse tile then runs at the dense Triton kernel's per-tile rate
  (``triton_dense_per_tile_s``; section 7's SASS gives the sparse loop 1.08x the dense one's
  instructions, and both are tensor-bound, so the rate is the pipeline's, not the loop's).
- ``"ws"``: + a warp-specialized schedule for the full tiles (sm_90, compiled: a producer warp
  group lowered to 40 registers and two consumer warp groups of 64 query rows raised to 232 by
  setmaxnreg, 12 warps and one CTA per SM, a 3-deep K/V ring of 128 x 64 tiles at d128, no spill,
  per-tile SASS equal to the in-repo dense kernel's warp-specialized loop): full tiles at SDPA's
  per-tile rate (``dense_per_tile_s``). Triton 3.9 cannot warp-specialize a loop with a branch, so
  partial tiles run afterwards in a resume pass of the one-loop kernel, at ``"ring3"``'s rate
  (``per_partial_tile_s``); :func:`dit_accel.kernels.block_sparse.configs.ws_pays` charges that pass
  one per-CTA term per query block with partial tiles and picks ws only where it wins.

Each variant is its own :class:`GpuConstants` in :data:`CONSTANTS` (``"h100/persistent"``
and so on), with its ``source`` saying it is modelled.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

__all__ = ["GpuConstants", "CONSTANTS", "KERNELS", "TileCounts", "tile_counts", "sla_counts", "constants",
           "block_sparse_time", "dense_time", "sla_time", "ideal_fraction", "work_vs_dense", "arch_for_device",
           "kernels_for"]

_TILE = 64  # the constants are per 64 x 64 tile at head dim 128
_HEAD_DIM = 128


@dataclass(frozen=True)
class GpuConstants:
    """Per-architecture constants of the cost model (seconds; see the module docstring for origins)."""

    name: str
    sms: int
    ctas_per_sm: int
    per_call_s: float
    per_cta_s: float
    per_tile_s: float
    per_partial_tile_s: float
    dense_per_call_s: float
    dense_per_tile_s: float
    triton_dense_per_call_s: float
    triton_dense_per_tile_s: float
    dense_backward_factor: float
    backward_tile_factor: float
    sla_per_call_s: float
    sla_per_tile_s: float
    sla_per_token_s: float
    sla_per_block_pair_s: float
    ring_depth: int
    source: str
    modelled_kernel: bool = False  # True: the constants model a kernel that was never measured
    #: The backward's own per-call cost (its two launches, autograd's glue); None: ``per_call_s`` again.
    backward_per_call_s: Optional[float] = None
    #: VSA's coarse branch (pooling, coarse attention, top-k) per token and per (query cube, key cube) pair and head,
    #: at head dim 128, where fitted (:func:`vsa_coarse_time`); None: priced with SLA's and the dense constants.
    vsa_coarse_per_token_s: Optional[float] = None
    vsa_coarse_per_pair_s: Optional[float] = None

    @property
    def slots(self) -> int:
        """CTAs resident at once (``sms x ctas_per_sm``)."""
        return self.sms * self.ctas_per_sm


_H100 = GpuConstants(
    name="h100", sms=132, ctas_per_sm=2,
    per_call_s=526e-6, per_cta_s=10.6e-6, per_tile_s=1.39e-6, per_partial_tile_s=1.39e-6,
    dense_per_call_s=20e-6, dense_per_tile_s=0.91e-6,
    triton_dense_per_call_s=50e-6, triton_dense_per_tile_s=1.047e-6,
    dense_backward_factor=2.64, backward_tile_factor=2.5,
    sla_per_call_s=500e-6, sla_per_tile_s=2.87e-6, sla_per_token_s=6.75e-9, sla_per_block_pair_s=0.164e-9,
    ring_depth=3,  # num_stages of the shipped sm_90 64 x 64 forward config (a software pipeline, not a ring)
    source="fit to BENCHMARKS.md section 10, H100 80GB HBM3, bf16, d=128, batch 1, forward "
           "(17 block-sparse rows, 4 SDPA rows, 2 dense Triton rows, 4 SLA rows); see dit_accel.kernels.cost")

#: Modelled kernel variants, cumulative, in order (``kernel=`` of :func:`block_sparse_time`).
KERNELS = ("current", "host", "persistent", "ring3", "ws")


def _variants(base: GpuConstants) -> Dict[str, GpuConstants]:
    host = dataclasses.replace(base, name=f"{base.name}/host", per_call_s=50e-6, sla_per_call_s=50e-6,
                               modelled_kernel=True,
                               source=f"MODELLED from {base.name}: per-call host cost 50 us")
    persistent = dataclasses.replace(host, name=f"{base.name}/persistent", per_cta_s=2.3e-6, modelled_kernel=True,
                                     source=f"MODELLED from {host.name}: persistent CTAs, one pipeline fill per "
                                            "CTA lifetime; 2.3 us per query block left (Q load, epilogue)")
    ring3 = dataclasses.replace(persistent, name=f"{base.name}/ring3", per_tile_s=base.triton_dense_per_tile_s,
                                per_partial_tile_s=base.triton_dense_per_tile_s, ring_depth=3, modelled_kernel=True,
                                source=f"MODELLED from {persistent.name}: 3-deep K/V ring, tiles at the dense "
                                       "Triton kernel's per-tile rate")
    ws = dataclasses.replace(ring3, name=f"{base.name}/ws", per_tile_s=base.dense_per_tile_s,
                             per_partial_tile_s=base.triton_dense_per_tile_s, modelled_kernel=True,
                             source=f"MODELLED from {ring3.name}: warp-specialized full tiles at SDPA's per-tile "
                                    "rate; partial tiles in the resume pass at ring3's")
    return {"current": base, "host": host, "persistent": persistent, "ring3": ring3, "ws": ws}


#: The shipped kernels (persistent CTAs, the cached host path; the ws forward is opt-in and ran in none of
#: these rows) measured on an H200 (``dit-accel bench gpu``, 2026-11-26, commit 651d71b, BENCHMARKS.md
#: section 10): the forward constants fit the 7 forward rows of Tile, Tile-128, GNA and radial at FLUX
#: 1024 px (24 heads) and Wan 2.1 1.3B 480p (12 heads), each within 11%; the backward's per-call cost and
#: tile factor the 7 forward + backward rows (within 10%); the dense ones SDPA (cuDNN) and the in-repo dense
#: kernel on the same shapes. The CTA term fits to zero (a persistent kernel pays its pipeline fill once per
#: CTA lifetime). SLA's constants are the H100's (not refitted: two SLA rows cannot fix four constants).
_H200 = dataclasses.replace(
    _H100, name="h200",
    per_call_s=112e-6, per_cta_s=0.0, per_tile_s=1.222e-6, per_partial_tile_s=1.327e-6,
    backward_per_call_s=580e-6, backward_tile_factor=3.87,
    dense_per_call_s=20e-6, dense_per_tile_s=0.90e-6, dense_backward_factor=2.9,
    triton_dense_per_call_s=50e-6, triton_dense_per_tile_s=1.045e-6,
    vsa_coarse_per_token_s=7.32e-10, vsa_coarse_per_pair_s=8.27e-11,
    source="fit to the H200 rows of 2026-11-26 (dit-accel bench gpu, commit 651d71b), bf16, d=128, batch 1: "
           "7 block-sparse forward rows, 7 forward + backward rows, 2 SDPA and 2 dense Triton rows; SLA "
           "constants from h100; VSA's coarse branch fitted to its 2 rows of 2026-11-28 (2e62cde); see "
           "dit_accel.kernels.cost")

#: ``arch`` and ``arch/kernel`` -> constants. ``"h100"`` and ``"h200"`` are measured fits; the others are modelled.
CONSTANTS: Dict[str, GpuConstants] = {"h200": _H200}
for _kernel, _c in _variants(_H100).items():
    CONSTANTS["h100" if _kernel == "current" else f"h100/{_kernel}"] = _c


def _key(arch: str, kernel: str) -> str:
    return arch if kernel == "current" else f"{arch}/{kernel}"


def kernels_for(arch: str) -> List[str]:
    """The kernel variants of :data:`KERNELS` that ``arch`` has constants for (``h100``: all; ``h200``: its fit)."""
    return [k for k in KERNELS if _key(arch, k) in CONSTANTS]


def constants(arch: str = "h100", kernel: str = "current") -> GpuConstants:
    """The constants of ``arch`` (a key of :data:`CONSTANTS`) for a kernel variant of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    key = _key(arch, kernel)
    if key not in CONSTANTS:
        known = sorted({k.split('/')[0] for k in CONSTANTS})
        if arch in known:
            modelled = [a for a in known if kernel in kernels_for(a)]
            raise ValueError(f"arch={arch!r} has only its measured kernel ('current'); the modelled variant "
                             f"{kernel!r} exists for {', '.join(modelled)}")
        raise ValueError(f"no cost-model constants for arch={arch!r} (have: {', '.join(known)})")
    return CONSTANTS[key]


def arch_for_device(name: str) -> str:
    """The constants ``auto`` decides with on a GPU named ``name`` (``torch.cuda.get_device_name``).

    ``"h200"``, the fit to the kernels that ship, for every GPU: the ``"h100"`` fit is of an older kernel
    (526 us per call before the persistent kernel and the cached host path; it modelled FLUX 1024 px Tile
    at 0.64 ms where the H200 measured 0.16), and the H100 has the H200's SMs and clocks (attention is
    bound by them, not by memory). On other GPUs the ratios between kernels, which is what ``auto`` asks,
    carry over better than the absolute times."""
    return "h200"


@dataclass(frozen=True)
class TileCounts:
    """What the model needs of a layout: CTAs and visited tiles, summed over batch and heads."""

    ctas: int
    full_tiles: float
    partial_tiles: float
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    heads: int
    batch: int = 1

    @property
    def tiles(self) -> float:
        return self.full_tiles + self.partial_tiles

    @property
    def tiles_per_q_block(self) -> float:
        return self.tiles / max(self.ctas, 1)


def tile_counts(layout, *, heads: Optional[int] = None, batch: int = 1) -> TileCounts:
    """Count CTAs and visited full/partial tiles of a :class:`~dit_accel.kernels.layout.BlockLayout`.

    ``heads`` defaults to the layout's own head count; a shared layout (one layout head) is counted
    ``heads`` times, a per-head layout must have ``heads`` layout heads."""
    hl = layout.num_heads
    heads = hl if heads is None else int(heads)
    if hl not in (1, heads):
        raise ValueError(f"layout has {hl} heads; cannot count it for heads={heads}")
    total = int(layout.kv_counts.sum())
    partial = int((layout.kv_mask_ids >= 0).sum())
    per = batch * (heads // hl)
    return TileCounts(ctas=batch * heads * layout.num_q_blocks, full_tiles=float(per * (total - partial)),
                      partial_tiles=float(per * partial), block_q=layout.block_q, block_k=layout.block_k,
                      q_len=layout.q_len, kv_len=layout.kv_len, heads=heads, batch=batch)


def sla_counts(n_tokens: int, method, *, heads: int, batch: int = 1) -> TileCounts:
    """:class:`TileCounts` of an SLA call's sparse branch (``topk`` critical blocks per query block)."""
    from .sla.common import SLAParams, sla_block_counts

    params = SLAParams.of(method)
    n_k, n_crit, _, _ = sla_block_counts(n_tokens, params)
    n_q = math.ceil(n_tokens / params.block_q)
    ctas = batch * heads * n_q
    return TileCounts(ctas=ctas, full_tiles=float(ctas * n_crit), partial_tiles=0.0, block_q=params.block_q,
                      block_k=params.block_k, q_len=n_tokens, kv_len=n_tokens, heads=heads, batch=batch)


def _counts(layout, heads, batch) -> TileCounts:
    if isinstance(layout, TileCounts):
        return layout
    return tile_counts(layout, heads=heads, batch=batch)


def _tile_scale(block_q: int, block_k: int, head_dim: int) -> float:
    """One ``block_q x block_k`` tile at ``head_dim`` in 64 x 64 x 128 tiles (FLOPs)."""
    return block_q * block_k * head_dim / (_TILE * _TILE * _HEAD_DIM)


def block_sparse_time(layout, *, batch: int = 1, head_dim: int = 128, arch: str = "h100", kernel: str = "current",
                      backward: bool = False, heads: Optional[int] = None) -> float:
    """Modelled seconds of one block-sparse attention call (forward, or forward + backward).

    ``layout`` is a ``BlockLayout`` (``heads`` defaults to its head count: pass the model's head
    count for a shared layout) or a :class:`TileCounts`. A model, not a measurement.
    """
    c, n = constants(arch, kernel), _counts(layout, heads, batch)
    scale = _tile_scale(n.block_q, n.block_k, head_dim)
    cta_scale = n.block_q / _TILE  # the per-CTA term (fill, epilogue) grows with the query block
    tiles = (n.full_tiles * c.per_tile_s + n.partial_tiles * c.per_partial_tile_s) * scale
    body = (n.ctas * c.per_cta_s * cta_scale + tiles) / c.slots
    if backward:
        body += (n.ctas * c.per_cta_s * cta_scale + c.backward_tile_factor * tiles) / c.slots
        backward_call = c.per_call_s if c.backward_per_call_s is None else c.backward_per_call_s
        return c.per_call_s + backward_call + body
    return c.per_call_s + body


def dense_time(num_q: int, num_k: int, heads: int, *, batch: int = 1, head_dim: int = 128, arch: str = "h100",
               contender: str = "sdpa", backward: bool = False) -> float:
    """Modelled seconds of one dense attention call. ``contender``: ``"sdpa"`` (PyTorch's cuDNN/flash
    path; also used for ``"flash"``, ``"cudnn"`` and ``"flash-attn"``, which were not measured apart) or
    ``"triton"`` (the in-repo dense kernel). A model, not a measurement."""
    c = constants(arch)
    if contender in ("sdpa", "flash", "cudnn", "flash-attn"):
        per_call, per_tile = c.dense_per_call_s, c.dense_per_tile_s
    elif contender == "triton":
        per_call, per_tile = c.triton_dense_per_call_s, c.triton_dense_per_tile_s
    else:
        raise ValueError(f"contender must be 'sdpa', 'flash', 'cudnn', 'flash-attn' or 'triton'; got {contender!r}")
    tiles = batch * heads * (num_q / _TILE) * (num_k / _TILE) * head_dim / _HEAD_DIM
    fwd = per_call + tiles * per_tile / c.slots
    return fwd * (1 + c.dense_backward_factor) if backward else fwd


def sla_time(layout, *, batch: int = 1, head_dim: int = 128, arch: str = "h100", heads: Optional[int] = None,
             backward: bool = False, kernel: str = "current") -> float:
    """Modelled seconds of one fused SLA call (sparse and linear branch, classification and glue).

    ``layout``: :func:`sla_counts` of the call, or a ``BlockLayout`` of its critical blocks. ``kernel``: a variant
    of :data:`KERNELS`, whose per-call term is charged (``"host"`` and after: 50 us, against the current kernel's
    500 us; before, every variant was charged 500 us here while calibration charged the variant's). Backward:
    forward + ``dense_backward_factor`` times the tile term (assumed; SLA's measured forward + backward at
    480p, 37.5 ms against 5.9 forward, is far from it: the model does not cover SLA's backward).
    """
    c, n = constants(arch, kernel), _counts(layout, heads, batch)
    scale = _tile_scale(n.block_q, n.block_k, head_dim)
    n_q, n_k = math.ceil(n.q_len / n.block_q), math.ceil(n.kv_len / n.block_k)
    tiles = n.tiles * c.sla_per_tile_s * scale / c.slots
    glue = n.batch * n.heads * (n.q_len * c.sla_per_token_s * head_dim / _HEAD_DIM + n_q * n_k * c.sla_per_block_pair_s)
    fwd = c.sla_per_call_s + tiles + glue
    return fwd + c.dense_backward_factor * (tiles + glue) if backward else fwd


#: Launches of VSA's coarse branch besides its fine block-sparse call (cube pooling; coarse attention with the
#: top-k), each priced as a dense launch (``dense_per_call_s``). Assumed, not measured.
VSA_COARSE_LAUNCHES = 2


def vsa_coarse_time(tokens: int, cubes: int, *, heads: int = 1, batch: int = 1, head_dim: int = 128,
                    arch: str = "h100") -> float:
    """Modelled seconds of VSA's coarse branch without its launches (add ``VSA_COARSE_LAUNCHES x
    dense_per_call_s``): pooling every token into its cube, and scoring, attending and ranking every (query cube,
    key cube) pair. Where ``arch`` has VSA's own constants (``"h200"``: fitted to the coarse-and-select launches at
    Wan 1.3B 480p and FastWan's shape, 0.71 and 0.38 ms back to back, 2e62cde), a term per token and one per cube
    pair; else priced with SLA's per-token and per-block-pair constants (the same passes: pooled scores and top-k)
    and the coarse softmax attention as dense tiles, which gave 3.46 ms at Wan 1.3B 480p. A model, not a
    measurement."""
    c = constants(arch)
    scale = head_dim / _HEAD_DIM
    if c.vsa_coarse_per_token_s is not None:
        return batch * heads * scale * (tokens * c.vsa_coarse_per_token_s + cubes * cubes * c.vsa_coarse_per_pair_s)
    glue = batch * heads * (tokens * c.sla_per_token_s * scale + cubes * cubes * c.sla_per_block_pair_s)
    tiles = batch * heads * (cubes / _TILE) ** 2 * scale * c.dense_per_tile_s / c.slots
    return glue + tiles


def vsa_counts(plan, *, heads: int = 1, batch: int = 1) -> TileCounts:
    """:class:`TileCounts` of a VSA call's fine launch (a :class:`~dit_accel.plans.vsa.VSAPlan`): a CTA per query
    cube, ``plan.count`` key cube tiles each (cube x cube tiles); tiles of key cubes with padding are partial,
    in the share such cubes hold of all cubes (the selection is made per call, so the expected share)."""
    cubes = plan.cubes
    partial = float((~cubes.real.all(-1)).float().mean())  # share of key cubes with padding
    ctas = batch * heads * cubes.count
    visited = float(ctas * plan.count)
    return TileCounts(ctas=ctas, full_tiles=visited * (1 - partial), partial_tiles=visited * partial,
                      block_q=cubes.volume, block_k=cubes.volume, q_len=cubes.perm.num_padded,
                      kv_len=cubes.perm.num_padded, heads=heads, batch=batch)


def vsa_time(plan, *, heads: int = 1, batch: int = 1, head_dim: int = 128, arch: str = "h100",
             kernel: str = "current") -> float:
    """Modelled seconds of one VSA call (forward) on ``plan``'s grid, its three launches together: cube pooling
    and coarse attention with the fused top-k selection (:func:`vsa_coarse_time` plus
    :data:`VSA_COARSE_LAUNCHES` dense launches), and the fine block-sparse launch over the selected cubes
    (:func:`block_sparse_time` of :func:`vsa_counts`). A model, not a measurement: the coarse branch is fitted on
    ``"h200"`` (:func:`vsa_coarse_time`); the fine launch's tiles take the block-sparse rate, which the H200's
    graph replays match per tile (4.6-4.8 ns for the fitted 4.6), but not the fine branch's per-call planning
    launches (0.5-1.0 ms of GPU time at FastWan's and Wan 1.3B's shapes at 2e62cde, fewer since; BENCHMARKS 10.5)."""
    c = constants(arch)
    coarse = VSA_COARSE_LAUNCHES * c.dense_per_call_s + vsa_coarse_time(
        plan.cubes.perm.num_tokens, plan.cubes.count, heads=heads, batch=batch, head_dim=head_dim, arch=arch)
    fine = block_sparse_time(vsa_counts(plan, heads=heads, batch=batch), head_dim=head_dim, arch=arch, kernel=kernel)
    return coarse + fine


def work_vs_dense(density: float, padded_tokens: int, tokens: int) -> float:
    """The work of a layout relative to dense attention on the real tokens: ``density x (Np / N)^2``
    (padded blocks cost time that dense attention on ``N`` tokens never spends)."""
    return density * (padded_tokens / tokens) ** 2


def ideal_fraction(sparse_s: float, dense_s: float, density: float) -> float:
    """Fraction of the ``1 / density`` ideal reached: ``(dense_s / sparse_s) x density``.

    Pass as ``density`` the pattern's true density (visited token pairs / N^2), as ``bench kernels`` does: the
    padded blocks' work (:func:`work_vs_dense`) is a cost the kernel pays, not part of the ideal (issue 72).
    A fraction in ``(0, 1]`` for a kernel no faster than its ideal."""
    if sparse_s <= 0 or dense_s <= 0 or not 0 < density:
        raise ValueError(f"need positive times and density; got {sparse_s}, {dense_s}, {density}")
    return dense_s / sparse_s * density

