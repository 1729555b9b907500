"""Triton block-sparse attention over a :class:`BlockLayout` (forward and backward).

Three GPU kernels (plus a small preprocess) implement FlashAttention-2 style attention restricted to the tiles a
layout visits. Each is the in-repo dense kernel (:mod:`dit_accel.kernels.dense`) plus a list lookup per tile,
written from the same tile steps (:mod:`dit_accel.kernels.dense.tiles`):

- ``_fwd_kernel``: a query tile per work item, kept in registers, its key tiles in one loop on sm_90 (persistent)
  and in a loop per kind elsewhere: *full* tiles (no mask code), length tiles (a column count: :mod:`.lengths`) and
  *partial* tiles (an element mask, one int64 word per row per 64 keys, loaded as a 1-D vector).
- ``_bwd_dkdv_kernel`` (:mod:`.bwd_kernels`): grid ``(key tiles, B*H)``, walks the *transposed* plan (only the query
  tiles that visit this key tile) and recomputes ``P`` from the saved log-sum-exp.
- ``_bwd_dq_kernel`` (:mod:`.bwd_kernels`): grid ``(query tiles, B*H)`` over the forward plan. These two own their
  outputs (no atomics);
  where its self-check passed and it timed faster, the one-pass backward of :mod:`.bwd_fused` (5 products per tile
  instead of 7, dQ by atomic adds) runs instead. A program per owned tile on every GPU: persistent variants of
  both, compiled for sm_90, spill at head dim 128 (dK/dV: 96-244 bytes) or lose a CTA per SM (dQ: 166 -> 248).

The *plan* (:func:`tile_plan`) is the layout at kernel-tile granularity, derived once per (layout, tile shape) and
cached: per query tile (key tile for dK/dV) the full and partial tiles of the other side, and for partial tiles an
offset into a table of bit-packed row masks (:func:`dit_accel.kernels.dense.tiles.row_bits`). A layout block larger
than the kernel tile is split into tiles, each classified on its own: a sub-tile of a partial block whose pairs are
all allowed runs unmasked, an all-masked one is skipped.

On sm_90, for 128-token query blocks at head dims <= 128 (fp16 / bf16), the forward can run warp-specialized
(:func:`_ws_forward`, opt-in, where :func:`.configs.ws_pays` says it wins): the full tiles in ``_fwd_kernel`` with
``WS`` (a producer warp group issuing TMA loads, two consumer warp groups of 64 query rows; Triton 3.9 builds these
partitions only for a branch-free loop), then the partial tiles in a ``RESUME`` pass of the one-loop kernel.

On sm_90 K and V (Q and dO for dK/dV; Q, K and V in the ws kernel) are loaded through TMA tensor descriptors when
their base and strides are 16-byte aligned and no stride is 0 (:func:`tma_ok`); otherwise, and on older GPUs,
through pointers with 64-bit tile offsets (no int32 overflow past ~419k tokens in the (B, N, H, D) layout).

Launchers (pure functions, no autograd and no input checks: :mod:`.ops` wraps them in custom ops, and
:func:`dit_accel.kernels.block_sparse_attention` has checked the inputs and chosen this backend):
:func:`triton_forward`, :func:`triton_backward`. Launch configurations: :mod:`.configs`.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple, TypeVar

import torch
import triton
import triton.language as tl

from ..dense.tiles import LOG2E_HOST as _LOG2E
from ..dense.tiles import (LOG2E, fwd_step, fwd_update, load_tile, row_bits, row_words,
                          slice_descriptors)
from ..dense.configs import tma_ok
from ..dense.triton import _bwd_preprocess_kernel, ensure_allocator
from .. import occupancy, selfcheck
from ..layout import UNIFORM_KV_ROWS, BlockLayout
from ..request import in_graph
from .lengths import VARIANT as LEN_VARIANT
from .lengths import (PARTIAL, bit_masked, column_offsets, fwd_epilogue, len_bias_table, len_step, length_bias, length_rows,
                      length_offsets, runs_lengths)
from .gather_tiles import gathered_epilogue, load_block, load_kv
from .bwd_fused import _bwd_dkdv_dq_kernel, one_pass_faster, one_pass_runs, run_fused
from .bwd_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel
from .launch_records import _BackwardLaunch, _BackwardStep, _Launch
from .configs import (GATHER_BWD_VARIANT, GATHER_VARIANT, KernelConfig, fused_config, fused_pointer, gather_config,
                      length_config, pointer_fallback, resume_config, rows_fit, select_config, ws_config, ws_enabled,
                      ws_pays)

__all__ = ["triton_forward", "triton_backward", "KERNELS", "TilePlan", "tile_plan", "work_order", "ws_schedule", "tma_ok"]

T = TypeVar("T")
#: The self-check's name of the warp-specialized forward (with its resume pass).
WS_VARIANT = "block_sparse.triton.fwd_ws"


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------

@triton.jit
def _fwd_item(
    Q, K, V, O, LSE, PLAN, BITS, LEN_BIAS, RIDX, pid_m, b, h,  # noqa: E741
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    plan_h, plan_r, w, bits_w,
    q_len, kv_len, head_dim, qk_scale, GATE, CROWS, sgb, sgh, sgn, scb, sch, scc, cube_vol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, RESUME: tl.constexpr, LENGTHS: tl.constexpr,
    GATHER: tl.constexpr, GATED: tl.constexpr,
):
    """One work item of the forward: query tile ``pid_m`` of batch ``b``, head ``h``.

    ``RESUME`` (TMA only): run the partial tiles alone, starting from the ``(O, LSE)`` that the
    warp-specialized kernel wrote for the full tiles (``acc = O``, ``m = LSE`` in base 2, ``l = 1``:
    a valid online-softmax state; ``l = 0`` where no key was seen). ``GATHER`` (pointer loads): q, k, v, o and
    lse in raster order, tiled position ``i`` being raster row ``RIDX[i]`` (:mod:`.gather`); with ``GATED`` too,
    o is VSA's gated sum (:func:`.gather_tiles.gathered_epilogue`).
    """
    row0 = pid_m * BLOCK_M
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    if TMA:  # K, V are tensor descriptors; the bases are unused
        k_base = q_base
        v_base = q_base
    else:
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = load_block(q_base, q_base, b, h, row0, q_len, sqn, head_dim, RIDX, BLOCK_M, BLOCK_D, False, True, EVEN_D,
                   GATHER)

    # This query tile's row of the plan: [n_full, n_partial, key tiles (w), bit offsets (w)], the
    # full tiles first.
    plan = PLAN + h.to(tl.int64) * plan_h + pid_m.to(tl.int64) * plan_r
    n_full = tl.load(plan)
    n_tot = n_full + tl.load(plan + 1)
    if LENGTHS:  # [n_full, n_length + n_partial, n_length, ...]: counts in place of the length tiles' offsets
        n_mask = n_full + tl.load(plan + 2)  # the first bit-masked tile
        tiles = plan + 3
    else:
        n_mask = n_full
        tiles = plan + 2
    bits = tiles + w

    if RESUME:
        start = n_full
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64)[:, None] * son
                      + offs_d[None, :], mask=(offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
        acc = acc.to(tl.float32)
        m_i = tl.load(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + offs_m, mask=offs_m < q_len,
                      other=float("-inf")) * LOG2E
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    else:
        start = 0
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TMA:
        # sm_90: one loop over full and partial tiles, so a query tile fills the pipeline once. The
        # next tile's index is read one iteration ahead, into a register: no load of K or V waits on
        # a load of the same iteration, so the pipeliner gives K and V the whole ring (num_stages
        # deep, not one less as when the index load takes a pipeline stage of its own). The partial
        # tiles come last and in a row: each loads the next one's mask words (and the offset of the
        # one after), used an iteration later; a full tile runs none of that code.
        rows = tl.arange(0, BLOCK_M)
        nxt = tl.load(tiles + start, mask=start < n_tot, other=0)
        lo, hi = row_words(BITS, tl.load(bits + n_mask, mask=n_mask < n_tot, other=0), rows, bits_w, BLOCK_N)
        off = tl.load(bits + n_mask + 1, mask=n_mask + 1 < n_tot, other=0)
        if LENGTHS:  # the plan lists first columns, a length tile's masked column count in the low bits
            ones = length_rows(q, BLOCK_M)
            offsets = length_offsets(BLOCK_N)
        for i in range(start, n_tot):  # loop: tiles
            cur = nxt
            col = cur & (PARTIAL - BLOCK_N) if LENGTHS else cur * BLOCK_N
            nxt = tl.load(tiles + i + 1, mask=i + 1 < n_tot, other=0)
            k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
            v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if LENGTHS:  # the tile's kind from its own entry: one test for a length tile, two for a full one
                r = cur & (BLOCK_N - 1)
                if r != 0:  # a length tile: all but its last r columns
                    s = length_bias(s, ones, LEN_BIAS, offsets, r, DOT_PRECISION)
                elif cur >= PARTIAL:  # a bit-masked tile
                    s, lo, hi, off = bit_masked(s, lo, hi, off, BITS, bits, i, n_tot, rows, bits_w, BLOCK_N)
            elif i >= n_full:  # a partial tile: its element mask
                s, lo, hi, off = bit_masked(s, lo, hi, off, BITS, bits, i, n_tot, rows, bits_w, BLOCK_N)
            acc, m_i, l_i = fwd_update(s, v, acc, m_i, l_i, qk_scale, DOT_PRECISION)
    else:
        # Pointer loads (sm_80 / 89, unaligned tensors, GATHER): a ragged last key tile needs row masks on its
        # loads, which only the partial tiles' loop carries, so full and partial tiles keep a loop each.
        for i in range(0, n_full):  # loop: full
            col = tl.load(tiles + i) * BLOCK_N
            k, v = load_kv(K, V, k_base, v_base, b, h, col, kv_len, skn, svn, head_dim, RIDX, BLOCK_N, BLOCK_D, TMA,
                           False, EVEN_D, GATHER)
            acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, 0, False, DOT_PRECISION)
        if LENGTHS:
            ones = length_rows(q, BLOCK_M)
            offsets = length_offsets(BLOCK_N)
            for i in range(n_full, n_mask):  # loop: lengths (none ragged: rows past kv_len stay partial)
                col = tl.load(tiles + i) * BLOCK_N
                k, v = load_kv(K, V, k_base, v_base, b, h, col, kv_len, skn, svn, head_dim, RIDX, BLOCK_N, BLOCK_D, TMA,
                               False, EVEN_D, GATHER)
                acc, m_i, l_i = len_step(q, k, v, acc, m_i, l_i, qk_scale, ones, LEN_BIAS, offsets,
                                         BLOCK_N - tl.load(bits + i), DOT_PRECISION)
        rows = tl.arange(0, BLOCK_M)
        for i in range(n_mask, n_tot):  # loop: partial
            col = tl.load(tiles + i) * BLOCK_N
            keep = row_bits(BITS, tl.load(bits + i), rows, bits_w, BLOCK_N)
            k, v = load_kv(K, V, k_base, v_base, b, h, col, kv_len, skn, svn, head_dim, RIDX, BLOCK_N, BLOCK_D, TMA,
                           True, EVEN_D, GATHER)
            acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, keep, True, DOT_PRECISION)
    if GATHER:
        gathered_epilogue(O, LSE, RIDX, b, h, row0, sob, soh, son, slb, slh, acc, m_i, l_i, q_len, head_dim,
                          GATE, CROWS, sgb, sgh, sgn, scb, sch, scc, cube_vol, BLOCK_M, BLOCK_D, GATED)
    else:
        fwd_epilogue(O, LSE, b, h, row0, sob, soh, son, slb, slh, acc, m_i, l_i, q_len, head_dim, BLOCK_M, BLOCK_D)


@triton.jit
def _fwd_item_ws(
    Q, K, V, O, LSE, PLAN, pid_m, b, h,  # noqa: E741
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, plan_h, plan_r,
    q_len, kv_len, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The full tiles of one work item in a warp-specialized loop (sm_90: a producer warp group
    issues the TMA loads, two consumer warp groups own 64 query rows each). Triton 3.9 builds the
    partitions only for a loop without branches whose results no other loop uses, over descriptors
    made in the kernel: the partial tiles run afterwards in the ``RESUME`` kernel."""
    row0 = pid_m * BLOCK_M
    qd, kd, vd = slice_descriptors(Q, K, V, b, h, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, q_len, kv_len,
                                   head_dim, BLOCK_M, BLOCK_N, BLOCK_D)
    q = qd.load([row0, 0])
    tiles = PLAN + h.to(tl.int64) * plan_h + pid_m.to(tl.int64) * plan_r
    n_full = tl.load(tiles)
    tiles += 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, n_full, warp_specialize=True):  # loop: full
        col = tl.load(tiles + i) * BLOCK_N
        k = kd.load([col, 0])
        v = vd.load([col, 0])
        acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, 0, False, DOT_PRECISION)
    fwd_epilogue(O, LSE, b, h, row0, sob, soh, son, slb, slh, acc, m_i, l_i, q_len, head_dim, BLOCK_M, BLOCK_D)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, PLAN, BITS, LEN_BIAS, ITEMS, RIDX,  # noqa: E741 (the attention output, named like Q, K, V)
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    plan_h, plan_r, w, bits_w, n_items, n_tiles,
    H, q_len, kv_len, head_dim, qk_scale, GATE, CROWS, sgb, sgh, sgn, scb, sch, scc, cube_vol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, WS: tl.constexpr = False, RESUME: tl.constexpr = False,
    LENGTHS: tl.constexpr = False, GATHER: tl.constexpr = False, GATED: tl.constexpr = False,
):
    # sm_90 (TMA) is persistent: as many programs as the GPU holds at once, each striding over ITEMS,
    # the host-built work order ((batch * H + head) * n_tiles + query tile, longest rows first).
    # Pointer loads (sm_80 / 89, unaligned tensors) keep a grid of (query tiles, B * H), one tile
    # per program: there the persistent loop's extra live values spill.
    # WS: the full tiles, warp-specialized (descriptors made here), the item loop not pipelined (it kept 3 Q tiles
    # in flight across items: +64 KB); RESUME (with TMA): the partial tiles of the items in ITEMS, after the WS kernel.
    # GATED (with GATHER): VSA's gated sum in the epilogue, from GATE and CROWS (unread otherwise: any pointers).
    if WS:
        for it in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=1):  # loop: items
            item = tl.load(ITEMS + it)
            bh = item // n_tiles
            b = bh // H
            _fwd_item_ws(Q, K, V, O, LSE, PLAN, item - bh * n_tiles, b, bh - b * H,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, plan_h, plan_r,
                         q_len, kv_len, head_dim, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    elif TMA:
        for it in range(tl.program_id(0), n_items, tl.num_programs(0)):  # loop: items
            item = tl.load(ITEMS + it)
            bh = item // n_tiles
            b = bh // H
            _fwd_item(Q, K, V, O, LSE, PLAN, BITS, LEN_BIAS, RIDX, item - bh * n_tiles, b, bh - b * H,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
                      plan_h, plan_r, w, bits_w, q_len, kv_len, head_dim, qk_scale,
                      GATE, CROWS, sgb, sgh, sgn, scb, sch, scc, cube_vol,
                      BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, RESUME, LENGTHS, False, False)
    else:
        pid_bh = tl.program_id(1)
        _fwd_item(Q, K, V, O, LSE, PLAN, BITS, LEN_BIAS, RIDX, tl.program_id(0), pid_bh // H, pid_bh % H,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
                  plan_h, plan_r, w, bits_w, q_len, kv_len, head_dim, qk_scale,
                  GATE, CROWS, sgb, sgh, sgn, scb, sch, scc, cube_vol,
                  BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, False, LENGTHS, GATHER, GATED)


KERNELS = {"fwd": _fwd_kernel, "bwd_preprocess": _bwd_preprocess_kernel, "bwd_dkdv": _bwd_dkdv_kernel,
           "bwd_dq": _bwd_dq_kernel, "bwd_dkdv_dq": _bwd_dkdv_dq_kernel}


from .tile_plans import TilePlan, _PlanCache, _identity, tile_plan, work_order  # noqa: E402,F401  (re-exported)

_PLANS = _PlanCache()


def _plan(layout: BlockLayout, tile_r: int, tile_c: int, transposed: bool, lengths: Optional[bool] = None
          ) -> TilePlan:
    return _PLANS.get(layout, (transposed, tile_r, tile_c, lengths),
                      lambda: tile_plan(layout, tile_r, tile_c, transposed, lengths))


def _work_order(layout: BlockLayout, plan: TilePlan, tile_r: int, tile_c: int, batch: int,
                heads: int) -> torch.Tensor:
    uniform = (tile_r, tile_c) == (layout.block_q, layout.block_k) and layout.derived.get(UNIFORM_KV_ROWS, False)
    return _PLANS.get(layout, ("items", tile_r, tile_c, batch, heads), lambda: work_order(plan, batch, heads, uniform))


# ---------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------
_CAPABILITY: Dict[torch.device, int] = {}  # CUDA device -> compute capability (fixed; one entry per GPU)


def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        arch = _CAPABILITY.get(device)
        if arch is None:
            major, minor = torch.cuda.get_device_capability(device)
            arch = _CAPABILITY[device] = major * 10 + minor
        return arch
    return 80  # interpreter: any valid config works


@functools.lru_cache(maxsize=256)
def _selected(kernel: str, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int, arch: int) -> KernelConfig:
    """:func:`select_config`, memoised: its answer depends on its arguments alone (frozen configs)."""
    return select_config(kernel, dtype, head_dim, block_q, block_k, arch)


def _config(kernel: str, q: torch.Tensor, layout: BlockLayout, streamed: Tuple[torch.Tensor, ...]) -> KernelConfig:
    """The launch configuration; TMA is dropped when the streamed tensors are not TMA-aligned."""
    cfg = _selected(kernel, q.dtype, q.shape[-1], layout.block_q, layout.block_k, _arch(q.device))
    if cfg.tma and not tma_ok(*streamed):
        cfg = pointer_fallback(cfg)
    return cfg


def _pad_d(cfg: KernelConfig, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Pointer kernels read whole ``block_d`` columns (no column masks in their loops): other head
    dims run on zero-padded copies, which change no score and no output column."""
    d = tensors[0].shape[-1]
    if cfg.tma or d == cfg.block_d:
        return tensors
    return tuple(torch.nn.functional.pad(t, (0, cfg.block_d - d)) for t in tensors)


def _streamed(cfg: KernelConfig, tensors: Tuple[torch.Tensor, ...], rows: int) -> Tuple[object, ...]:
    """The streamed operands as the kernel takes them: TMA descriptors of ``rows`` x block_d, or the tensors."""
    if not cfg.tma:
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cfg.block_d]) for t in tensors)


#: Programs of the persistent forward under the interpreter: a few, so each walks several items.
INTERPRETER_PROGRAMS = 3
_RESIDENT: Dict[tuple, int] = {}  # (config, device index) -> CTAs of the forward one SM holds at once


def _programs(device: torch.device, cfg: KernelConfig, n_items: int, warm: Callable[[], object]) -> int:
    """Grid of the persistent forward: the CTAs the GPU holds at once (SMs x CTAs per SM, the latter
    from the compiled kernel's registers and shared memory), at most one per item."""
    if not occupancy.on_gpu(device):
        return max(1, min(n_items, INTERPRETER_PROGRAMS))
    key = (cfg, device.index)
    if key not in _RESIDENT:
        # warm() compiles (or finds) the kernel for these arguments without running it: its handles are not
        # loaded, so its registers come from the cubin (occupancy.compiled_resources), not from n_regs.
        per_sm = occupancy.resident_ctas(_arch(device), warm())
        _RESIDENT[key] = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_items, _RESIDENT[key]))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _gate_args(o: torch.Tensor, lse: torch.Tensor, gated: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None
               ) -> Tuple[object, ...]:
    """The forward's ``GATE, CROWS``, their strides and ``cube_vol``: VSA's ``(gate, cube rows, tokens per cube)``
    (``(B, H, N, D)`` in raster order and fp32 ``(B, H, C, D)``, as the launch's batch and heads see them, last dims
    contiguous), or where no gated sum is asked for, placeholders of the same types that the kernel does not read."""
    if gated is None:
        return (o, lse, 0, 0, 0, 0, 0, 0, 1)
    gate, rows, volume = gated
    return (gate, rows, *_strides(gate), *_strides(rows), volume)


def _rebased(template, t: Optional[torch.Tensor]):
    """The TMA descriptor ``template`` over ``t``, without its constructor's checks: the launch signature
    (:func:`triton_forward`) holds ``t``'s shape, strides, dtype and base alignment, which ``template``
    was built and checked for (its fields are copied, so this follows TensorDescriptor's own)."""
    desc = object.__new__(type(template))
    desc.__dict__.update(template.__dict__)
    desc.base = t
    return desc


def _forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                    layout: BlockLayout, lengths: bool = False, rows: Optional[torch.Tensor] = None) -> _Launch:
    """The forward's configuration, tile plan, work order, strides, grid and descriptors for this call
    signature: a function of q/k/v's shapes, strides, dtypes, device and base alignment, of
    ``layout``, of ``o`` and ``lse`` (fresh tensors shaped like q), and of the row table ``rows`` (:mod:`.gather`:
    q, k, v, o, lse in raster order, the layout over tiled positions)."""
    b, h, _, d = q.shape
    n, m = (layout.q_len, layout.kv_len) if rows is not None else (q.shape[2], k.shape[2])
    given = (q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in given)
    cfg = _config("fwd", q, layout, (k, v))
    if rows is not None:
        cfg, lengths = gather_config(cfg, _arch(q.device)), False
    cfg = (length_config(cfg, _arch(q.device)) or cfg) if lengths else cfg
    lengths = cfg.lengths
    # (the one-loop kernel loads Q by pointers, ws by a descriptor; a gathered forward is pointers throughout)
    ws_ok = cfg.tma and tma_ok(q) and not lengths and rows is None
    plan = _plan(layout, cfg.block_m, cfg.block_n, transposed=False, lengths=bool(cfg.tma) if lengths else None)
    if lengths and cfg.tma:
        plan = _PLANS.get(layout, ("column_offsets", cfg.block_m, cfg.block_n),
                          lambda: column_offsets(plan, cfg.block_n))
    q, k, v = _pad_d(cfg, q, k, v)
    pad = q.shape[-1] != d
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if pad else o
    n_tiles = triton.cdiv(n, cfg.block_m)
    n_items = b * h * n_tiles
    items = _work_order(layout, plan, cfg.block_m, cfg.block_n, b, h) if cfg.tma else plan.plan  # unread
    table = len_bias_table(q.device, q.dtype, cfg.block_n)  # read only by a forward with lengths
    args = (plan.plan, plan.bits, table, items, plan.plan if rows is None else rows,  # (RIDX: unread without rows)
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), lse.stride(0), lse.stride(1),
            *plan.args(), n_items, n_tiles, h, n, m, q.shape[-1])
    kw = dict(**cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    descriptors = _streamed(cfg, (k, v), cfg.block_n) if cfg.tma else None
    if not cfg.tma:
        grid = (n_tiles, b * h)
    elif occupancy.on_gpu(q.device):  # persistent: the CTAs the GPU holds at once
        grid = (_programs(q.device, cfg, n_items,
                          lambda: _fwd_kernel.warmup(q, *descriptors, out, lse, *args, _LOG2E,
                                                     *_gate_args(out, lse), grid=(1,), **kw)),)
    else:
        grid = None
    prepare = pad or any(x is not y for x, y in zip((q, k, v), given))
    if descriptors is not None:  # templates: the launch must not keep this call's K and V alive
        descriptors = tuple(_rebased(desc, None) for desc in descriptors)
    return _Launch(cfg, args, grid, kw, n_items, prepare, pad, descriptors, ws_ok)


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------
@occupancy.on_inputs_device
def triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                   scale: float, lengths: Optional[bool] = None, rows: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward with the Triton kernel.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, H, M, D)``; fp16, bf16 or fp32 (one dtype), any strides, ``D <= 256``.
            ``N == layout.q_len`` and ``M == layout.kv_len``.
        layout: :class:`BlockLayout` on q's device with 1 (shared) or ``H`` heads; ``block_q``/``block_k`` in
            (64, 128, 256) on CUDA, also 16 or 32 under the interpreter.
        scale: softmax scale.
        lengths: run column-prefix tiles by a column count (:mod:`.lengths`): None where the layout has them and
            the variant passed its self-check, True / False forced.
        rows: a row table (:mod:`.gather`): int32 ``[layout.q_len]``, the raster token of each tiled position of
            the layout (``-1``: padding), for q, k, v in raster order (``N == M``, each raster token named once);
            ``o`` and ``lse`` come back in raster order, ``o`` laid out as ``(B, N, H, D)``. Pointer kernels only
            (sm_90 too), no length tiles; row offsets in 32 bits (:func:`.gather.gather_fits` must hold).

    Inputs are not checked here (:func:`dit_accel.kernels.block_sparse_attention` did). What a launch derives from
    the layout and the inputs' geometry (configuration, tile plan, work order, strides, grid, TMA descriptors) is
    built once per (layout, shapes, strides, dtypes, device, base alignment) and kept with the layout's tile plans
    (:class:`_PlanCache`, :func:`forward_launch`); a repeated call allocates its outputs and launches.

    Returns:
        ``o`` ``(B, H, N, D)`` in q's dtype (contiguous) and ``lse`` fp32 ``(B, H, N)`` natural log. Rows with no
        allowed key give ``o = 0`` and ``lse = -inf``.
    """
    b, h, n, d = q.shape
    dev = q.device
    if rows is None:
        o = torch.empty((b, h, n, d), dtype=q.dtype, device=dev)
    else:  # (as the gathered path's unpermute returns it: a pipeline's transpose(1, 2) is a view)
        o = torch.empty((b, n, h, d), dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=dev)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    if k.shape[2] == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    launch = forward_launch(q, k, v, o, lse, layout, lengths, rows)
    if launch.ws_ok and _ws_forward(*(_last_dim_contiguous(t) for t in (q, k, v)), o, lse, layout, launch.cfg,
                                      scale):
        return o, lse
    return launch_forward(launch, q, k, v, o, lse, scale)


def forward_launch(q, k, v, o, lse, layout: BlockLayout, lengths: Optional[bool] = None,
                   rows: Optional[torch.Tensor] = None) -> _Launch:
    """:func:`triton_forward`'s launch for this call signature (``o``, ``lse``: its outputs; ``rows``: its row
    table, kept by the launch, so its identity is part of the signature), kept with the layout."""
    dev = q.device
    signature = ("fwd", q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
                 dev, _arch(dev), q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16,
                 None if rows is None else (rows.data_ptr(), rows.numel()),
                 rows is None and runs_lengths(q, layout, lengths, _PLANS))
    return _PLANS.get(layout, signature, lambda: _forward_launch(q, k, v, o, lse, layout, signature[-1], rows))


def launch_forward(launch: _Launch, q, k, v, o, lse, scale: float, plan: Optional[torch.Tensor] = None,
                   gated: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None):
    """Run ``launch`` (for q, k, v) into ``o`` and ``lse``; ``plan``: another tile plan of its shape (vsa.fine);
    ``gated``: VSA's ``(gate, cube rows, tokens per cube)`` (:func:`_gate_args`), o then being its gated sum (a
    gathered launch over cube order, head dim unpadded)."""
    if gated is not None and (not launch.cfg.gather or launch.pad):
        raise ValueError(f"a gated sum needs a gathered forward with an unpadded head dim; {launch.cfg.name} is not")
    if launch.prepare:  # a last dim that is not contiguous, or a head dim the pointer kernel pads
        q, k, v = _pad_d(launch.cfg, *(_last_dim_contiguous(t) for t in (q, k, v)))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if launch.pad else o
    if launch.descriptors is not None:
        k, v = _rebased(launch.descriptors[0], k), _rebased(launch.descriptors[1], v)
    grid = launch.grid or (max(1, min(launch.n_items, INTERPRETER_PROGRAMS)),)
    # (pointer kernels: the unread items are the plan; without a row table, the unread RIDX too)
    args = launch.args if plan is None else (plan, *launch.args[1:3], launch.args[3] if launch.cfg.tma else plan,
                                             launch.args[4] if launch.cfg.gather else plan, *launch.args[5:])
    _fwd_kernel[grid](q, k, v, out, lse, *args, scale * _LOG2E, *_gate_args(out, lse, gated),
                      **{**launch.kw, "GATED": gated is not None})
    if out is not o:
        o.copy_(out[..., :o.shape[-1]])
    selfcheck.corrupt(GATHER_VARIANT if launch.cfg.gather else "block_sparse.triton.fwd", o)
    if launch.cfg.lengths:
        selfcheck.corrupt(LEN_VARIANT, o)
    return o, lse


def ws_schedule(plan: TilePlan, batch: int, heads: int, cfg: KernelConfig, arch: str = "h100", force: bool = False
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(items, resumed)`` of the warp-specialized forward, or None where :func:`ws_pays` says the
    one-loop kernel is faster for this plan (``force``: take ws regardless, for its self-check): ``items``
    is :func:`work_order`, ``resumed`` the items with partial tiles, in the same order (the resume pass).
    One host sync; cached with the plan."""
    full, part = plan.plan[..., 0].long(), plan.plan[..., 1].long()  # [Hl, R]
    reps = batch * (heads if full.shape[0] == 1 else 1)
    n_full, n_part, n_rows = (int(x) * reps for x in torch.stack([full.sum(), part.sum(), (part > 0).sum()]).tolist())
    if not force and not ws_pays(n_full, n_part, n_rows, cfg.block_m, cfg.block_n, arch):
        return None
    items = work_order(plan, batch, heads)
    bh = torch.arange(batch * heads, device=part.device)
    has_part = (part[bh % heads if part.shape[0] > 1 else torch.zeros_like(bh)] > 0).reshape(-1)
    return items, items[has_part[items.long()]]


def _ws_forward(q, k, v, o, lse, layout: BlockLayout, cfg: KernelConfig, scale: float, force: bool = False) -> bool:
    """sm_90: the full tiles in the warp-specialized kernel, then the partial tiles in the resume pass (the one-loop
    kernel started from the first's O and LSE). False (nothing run) where there is no ws configuration, the cost
    model prefers the one-loop kernel for this layout (unless ``force``), or the ws variant failed its self-check."""
    ws = ws_config(cfg, _arch(q.device))
    if ws is None or not (force or ws_enabled()) or in_graph():  # opt-in (configs.WS_OFF_REASON); its schedule
        return False                                                  # needs a host sync: one-loop in graphs
    b, h, n, d = q.shape
    plan = _plan(layout, ws.block_m, ws.block_n, transposed=False)
    sched = _PLANS.get(layout, ("ws", ws.block_m, ws.block_n, b, h, force),
                       lambda: ws_schedule(plan, b, h, ws, force=force))
    if sched is None or not selfcheck.usable_fast(WS_VARIANT, q.device, q.dtype, d, layout.block_q, layout.block_k):
        return False
    items, resumed = sched
    ensure_allocator(q.device)
    n_tiles = triton.cdiv(n, ws.block_m)
    tail = (*_strides(q), *_strides(k), *_strides(v), *_strides(o), lse.stride(0), lse.stride(1), *plan.args())
    sizes = (n_tiles, h, n, k.shape[2], q.shape[-1], scale * _LOG2E)
    for c, kd, vd, todo in ((ws, k, v, items), (resume_config(ws), *_streamed(cfg, (k, v), ws.block_n), resumed)):
        if todo.numel() == 0:
            continue
        args = (q, kd, vd, o, lse, plan.plan, plan.bits, len_bias_table(q.device, q.dtype, c.block_n), todo, todo,
                *tail, todo.numel(), *sizes, *_gate_args(o, lse))
        kw = dict(**c.constexprs(), num_warps=c.num_warps, num_stages=c.num_stages)
        grid = (_programs(q.device, c, todo.numel(), lambda: _fwd_kernel.warmup(*args, grid=(1,), **kw)),)
        _fwd_kernel[grid](*args, **kw)
    selfcheck.corrupt(WS_VARIANT, o)
    return True


def _spread_args(spread, placeholder: torch.Tensor) -> Tuple[tuple, tuple, dict, dict]:
    """The two-pass kernels' ``ADDK, ADDV`` / ``ADDQ``, their strides and ``cube_vol``, and their switches:
    :func:`triton_backward`'s ``spread`` (each ``(B, H, C, D)`` fp32 contiguous, or None), or placeholders that
    the kernels do not read."""
    if spread is None:
        return (placeholder, placeholder, 0, 0, 0, 1), (placeholder, 0, 0, 0, 1), {}, {}
    add_q, add_k, add_v, volume = spread
    shared = (*_strides(next(t for t in (add_q, add_k, add_v) if t is not None)), volume)
    k_or, v_or, q_or = (placeholder if t is None else t for t in (add_k, add_v, add_q))
    return ((k_or, v_or, *shared), (q_or, *shared), {"ADD_K": add_k is not None, "ADD_V": add_v is not None},
            {"ADD_Q": add_q is not None})


def _backward_launch(q, k, v, do, o, lse, dlse, layout: BlockLayout, rows: Optional[torch.Tensor] = None
                     ) -> _BackwardLaunch:
    """What :func:`triton_backward` derives from its inputs' geometry and ``layout``: configurations, tile plans,
    strides, grids and descriptor templates (q, k, v, do, o last-dim contiguous and in q's dtype; lse, dlse fp32;
    ``rows``: the row table of raster-order inputs, :mod:`.gather`)."""
    b, h, n, d = q.shape
    m = k.shape[2]
    dev = q.device
    cfg_kv, cfg_q = _config("bwd_dkdv", q, layout, (q, do)), _config("bwd_dq", q, layout, (k, v))
    if rows is not None:  # pointer loads through the row table, over the layout's tiled positions
        cfg_kv, cfg_q = (gather_config(c, _arch(dev)) for c in (cfg_kv, cfg_q))
        n, m = layout.q_len, layout.kv_len
    pre_cfg = _selected("bwd_preprocess", o.dtype, d, layout.block_q, layout.block_k, _arch(dev))
    pre = ((triton.cdiv(n, pre_cfg.block_m), b * h),  # (lse2 and delta per tiled position with a row table)
           (*_strides(o), *_strides(do), lse.stride(0), lse.stride(1), h, n, d),
           dict(BLOCK_M=pre_cfg.block_m, BLOCK_D=pre_cfg.block_d, HAS_DLSE=dlse is not None, GATHER=rows is not None,
                num_warps=pre_cfg.num_warps, num_stages=pre_cfg.num_stages))
    pad = None if cfg_kv.tma and cfg_q.tma else pointer_fallback(cfg_kv)  # a pointer kernel: odd head dims pad
    if pad is not None:
        q, k, v, do = _pad_d(pad, q, k, v, do)
        if q.shape[-1] == d:
            pad = None
    # dK / dV share K / V's strides (and dQ Q's): allocated alike; odd strides get dense copies.
    copies = any(torch.empty_like(t).stride() != t.stride() for t in (q, k, v))
    if copies:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    fused = None if rows is not None else fused_config(q.dtype, d, layout.block_q, layout.block_k, _arch(dev),
                                                           dev.type == "cuda")
    if fused is not None and fused.tma and (pad is not None or not tma_ok(q, do)):
        fused = fused_pointer(fused, _arch(dev))  # inputs prepared for pointer kernels (None: two-pass)
    steps = []
    for cfg, owned, streamed in ((cfg_kv, m, (q, do)), (cfg_q, n, (k, v)), (fused, m, (q, do))):
        if cfg is None:
            steps.append(None)
            continue
        dkdv = cfg.kernel.startswith("bwd_dkdv")
        tile_r, tile_c = (cfg.block_n, cfg.block_m) if dkdv else (cfg.block_m, cfg.block_n)
        plan = _plan(layout, tile_r, tile_c, transposed=dkdv)
        if cfg is fused:
            args = (plan.plan, plan.bits, *strides, *plan.args(), h, n, m, q.shape[-1])
        else:  # (the row table, or the plan in its unread place)
            args = (plan.plan, plan.bits, plan.plan if rows is None else rows, *strides, *plan.args(), h, n, m,
                    q.shape[-1])
        kw = dict(**cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        descriptors = _streamed(cfg, streamed, tile_c) if cfg.tma else None
        if descriptors is not None:  # templates: the launch must not keep this call's tensors alive
            descriptors = tuple(_rebased(desc, None) for desc in descriptors)
        steps.append(_BackwardStep(args, (triton.cdiv(owned, tile_r), b * h), kw, descriptors))
    return _BackwardLaunch(pre, pad, copies, tuple(steps[:2]), steps[2])


@occupancy.on_inputs_device
def triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, layout: BlockLayout, scale: float, dlse: Optional[torch.Tensor] = None,
                    one_pass: Optional[bool] = None, rows: Optional[torch.Tensor] = None, spread=None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_forward` w.r.t. q, k, v.

    Args:
        do: upstream gradient ``(B, H, N, D)`` (any float dtype; cast to q's dtype).
        q, k, v, layout, scale: exactly as given to :func:`triton_forward`.
        o, lse: its outputs (``lse`` fp32 natural log ``(B, H, N)``).
        dlse: optional gradient w.r.t. ``lse`` ``(B, H, N)``; it enters as ``delta - dlse`` (``d lse_i / d s_ij =
            P_ij``), at no extra kernel cost.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like q, k, v (strided like them when last-dim contiguous). ``dk``/``dv``
        come from a kernel that walks the transposed plan (only the query tiles that visit each key tile); ``dq``
        from one over the forward plan, or, in the one-pass backward (:mod:`.bwd_fused`), from the first kernel's
        atomic adds. ``one_pass``: None runs the one-pass backward where a configuration ships and its self-check
        passed on this GPU (never on the interpreter), True forces it (ValueError where none ships), False the
        two-pass one.
        rows: the row table of raster-order ``q``, ``k``, ``v``, ``do``, ``o`` and ``lse``, as given to
            :func:`triton_forward` (:mod:`.gather`); the gradients come back in raster order, from the two-pass
            kernels reading and writing through it (``one_pass=True`` is refused: none ships for it).
        spread: with ``rows`` and a head dim the kernels do not pad (:func:`.configs.unpadded`), VSA's ``(add_q, add_k,
            add_v, tokens per cube)``: fp32 ``(B, H, C, D)`` contiguous (or None), each cube's row added to the
            gradient's rows of that cube (tiled positions in cube order) before they are rounded.
    """
    b, h, n, d = q.shape
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dev = q.device
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    do = _last_dim_contiguous(do.to(q.dtype))
    if rows is not None and not rows_fit(do):  # (32-bit row offsets: gather_fits checked q, k, v and o, not dO)
        do = do.contiguous()
    o = _last_dim_contiguous(o.to(q.dtype))
    lse = lse.to(torch.float32)
    if dlse is not None:
        dlse = torch.nan_to_num(dlse.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if dlse.stride() != lse.stride():  # the preprocess reads both with lse's strides
            lse, dlse = lse.contiguous(), dlse.contiguous()
    signature = ("bwd", q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), do.stride(), o.stride(),
                 lse.stride(), dlse is None, q.dtype, dev, _arch(dev),
                 q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, do.data_ptr() % 16,
                 None if rows is None else (rows.data_ptr(), rows.numel()))
    launch = _PLANS.get(layout, signature, lambda: _backward_launch(q, k, v, do, o, lse, dlse, layout, rows))

    one = one_pass_runs(launch.fused is not None, one_pass, dev, q.dtype, d, layout.block_q, layout.block_k)
    if one and one_pass is None:  # the default where a configuration ships: kept where it timed faster
        one = _PLANS.get(layout, ("one_pass",) + signature, lambda: one_pass_faster(layout, q, k, v, lambda one: (
            triton_backward(do, q, k, v, o, lse, layout, scale, dlse, one_pass=one))))
    grid, args, kw = launch.pre
    delta = torch.empty((b * h, n if rows is None else layout.q_len), dtype=torch.float32, device=dev)
    lse2 = torch.empty_like(delta)
    _bwd_preprocess_kernel[grid](o, do, lse, dlse if dlse is not None else lse, delta, lse2,
                                 lse2 if rows is None else rows, *args, **kw)
    if launch.pad is not None:
        q, k, v, do = _pad_d(launch.pad, q, k, v, do)
    if launch.copies:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv, qs = launch.fused if one else launch.steps[0], launch.steps[1]
    launch.ran.add(one)
    qd, dod = (q, do) if kv.descriptors is None else (_rebased(kv.descriptors[0], q), _rebased(kv.descriptors[1], do))
    if spread is not None and (rows is None or launch.pad is not None or kv is launch.fused
                               or not layout.block_q == layout.block_k == spread[3]):
        raise ValueError("spread needs the two-pass kernels reading a row table, at a head dim they do not pad, "
                         "over a layout whose blocks are the cubes")
    if kv is launch.fused:
        run_fused(kv, qd, k, v, dod, lse2, delta, dq, dk, dv, scale, _LOG2E)
    else:
        add_kv, add_q, on_kv, on_q = _spread_args(spread, delta)
        _bwd_dkdv_kernel[kv.grid](qd, k, v, dod, lse2, delta, dk, dv, *kv.args, scale, scale * _LOG2E, *add_kv,
                                  **{**kv.kw, **on_kv})
        kd, vd = (k, v) if qs.descriptors is None else (_rebased(qs.descriptors[0], k), _rebased(qs.descriptors[1], v))
        _bwd_dq_kernel[qs.grid](q, kd, vd, do, lse2, delta, dq, *qs.args, scale, scale * _LOG2E, *add_q,
                                **{**qs.kw, **on_q})
    if dq.shape[-1] != d:
        dq, dk, dv = (g[..., :d].contiguous() for g in (dq, dk, dv))
    selfcheck.corrupt("block_sparse.triton.bwd" if rows is None else GATHER_BWD_VARIANT, dq)
    return dq, dk, dv
