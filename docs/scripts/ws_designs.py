"""Designs of the warp-specialized block-sparse forward, to tell which part of the shipped one goes wrong on triton 3.6.

The shipped kernel (``dit_accel.kernels.block_sparse.triton._fwd_item_ws``) differs from the dense ws kernel
(``dit_accel.kernels.dense.triton._dense_fwd_kernel`` with ``WS``) in two ways, and each is a known trigger of
wrong results in Triton's warp specialization (triton-lang/triton#8311: a ws loop nested in outer loops, reading
one operand through plain pointers, gave wrong output):

- its ws loop sits inside the persistent loop over work items (``for it in range(program_id, n_items, programs)``);
- each iteration reads the key tile's index through a pointer (``tl.load(tiles + i)``) before its TMA loads.

Built for sm_90, the persistent kernel's item loop was software-pipelined too: Triton kept the Q tiles of the next
items in flight (3 deep at 3 stages, 210 KB of shared memory against 146 KB without), beside the inner loop's
warp-specialized partitions. The probe kernel here keeps the shipped loop body (descriptors made in the kernel,
:func:`fwd_step`, the same epilogue) and switches each difference on or off:

- ``PERSISTENT``: the persistent item loop (else one work item per program, a grid of items);
- ``ITEM_STAGES``: that loop's pipeline depth (1: not software-pipelined, the ``flat`` designs);
- ``PRELOAD``: the row's tile indices read into registers before the ws loop (``MAX_TILES`` of them), each
  iteration picking its own with a masked sum (no pointer load inside the loop).

Only layouts whose visited tiles are all full run here (the probe's layouts). Run by
``docs/scripts/ws_probe.py``; on a CPU the interpreter runs them (tests/eval/test_gpu_scripts.py checks them against
fp32 attention) and ``triton.compile`` builds them for sm_90.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from dit_accel.kernels.block_sparse.lengths import fwd_epilogue
from dit_accel.kernels.block_sparse.triton import _fwd_item_ws
from dit_accel.kernels.dense.tiles import LOG2E_HOST, fwd_step, slice_descriptors

#: name -> (PERSISTENT, PRELOAD, the item loop flat). ``pipelined`` is the package's kernel up to 293ebb5 (its item loop
#: software-pipelined, the Q tiles of the next items in flight); ``flat`` is the package's since (the item loop not
#: pipelined: ``tl.range(..., num_stages=1)``), which ws_probe runs through the package itself.
DESIGNS: Dict[str, Tuple[bool, bool, bool]] = {
    "pipelined": (True, False, False),
    "flat": (True, False, True),
    "grid": (False, False, False),
    "grid-preload": (False, True, False),
    "pipelined-preload": (True, True, False),
}


@triton.jit
def _item(Q, K, V, O, LSE, PLAN, pid_m, b, h,  # noqa: E741
          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, plan_h, plan_r,
          q_len, kv_len, head_dim, qk_scale,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
          PRELOAD: tl.constexpr, MAX_TILES: tl.constexpr):
    """One work item: the package's (``_fwd_item_ws``), or with the tile indices read before the ws loop."""
    if not PRELOAD:
        _fwd_item_ws(Q, K, V, O, LSE, PLAN, pid_m, b, h,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, plan_h, plan_r,
                     q_len, kv_len, head_dim, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    else:
        row0 = pid_m * BLOCK_M
        qd, kd, vd = slice_descriptors(Q, K, V, b, h, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, q_len, kv_len,
                                       head_dim, BLOCK_M, BLOCK_N, BLOCK_D)
        q = qd.load([row0, 0])
        tiles = PLAN + h.to(tl.int64) * plan_h + pid_m.to(tl.int64) * plan_r
        n_full = tl.load(tiles)
        slots = tl.arange(0, MAX_TILES)
        listed = tl.load(tiles + 2 + slots, mask=slots < n_full, other=0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for i in tl.range(0, n_full, warp_specialize=True):  # loop: full
            col = tl.sum(tl.where(slots == i, listed, 0)) * BLOCK_N
            k = kd.load([col, 0])
            v = vd.load([col, 0])
            acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, 0, False, DOT_PRECISION)
        fwd_epilogue(O, LSE, b, h, row0, sob, soh, son, slb, slh, acc, m_i, l_i, q_len, head_dim, BLOCK_M, BLOCK_D)


@triton.jit
def probe_kernel(
    Q, K, V, O, LSE, PLAN, ITEMS,  # noqa: E741
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, plan_h, plan_r, n_items, n_tiles,
    H, q_len, kv_len, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr, PRELOAD: tl.constexpr, MAX_TILES: tl.constexpr, ITEM_STAGES: tl.constexpr,
):
    """``PERSISTENT``: programs stride over ``ITEMS`` (``ITEM_STAGES``: that loop's pipeline depth, None for the
    compiler's default: pipelined); else one item a program, no loop around the ws one."""
    if PERSISTENT:
        for it in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=ITEM_STAGES):  # loop: items
            _item_at(Q, K, V, O, LSE, PLAN, ITEMS, it, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                     slb, slh, plan_h, plan_r, n_tiles, H, q_len, kv_len, head_dim, qk_scale,
                     BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, PRELOAD, MAX_TILES)
    else:
        _item_at(Q, K, V, O, LSE, PLAN, ITEMS, tl.program_id(0), sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob,
                 soh, son, slb, slh, plan_h, plan_r, n_tiles, H, q_len, kv_len, head_dim, qk_scale,
                 BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, PRELOAD, MAX_TILES)


@triton.jit
def _item_at(Q, K, V, O, LSE, PLAN, ITEMS, it, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,  # noqa: E741
             slb, slh, plan_h, plan_r, n_tiles, H, q_len, kv_len, head_dim, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
             PRELOAD: tl.constexpr, MAX_TILES: tl.constexpr):
    item = tl.load(ITEMS + it)
    bh = item // n_tiles
    b = bh // H
    _item(Q, K, V, O, LSE, PLAN, item - bh * n_tiles, b, bh - b * H,
          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, plan_h, plan_r,
          q_len, kv_len, head_dim, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, PRELOAD, MAX_TILES)


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


#: (id of the layout, tile, items) -> (the layout, kept alive; its tile plan, the work items, MAX_TILES)
_PREPARED: Dict[tuple, tuple] = {}


def run_design(design: str, q, k, v, layout, block_m: int, block_n: int, num_warps: int, num_stages: int,
               programs: int = 132):
    """``(o, lse)`` of the probe kernel in ``design`` on ``layout`` (every visited tile full), bf16/fp16/fp32
    ``(B, H, N, D)`` inputs with ``D`` a power of two >= 16."""
    from dit_accel.kernels.block_sparse.tile_plans import tile_plan
    from dit_accel.kernels.dense.triton import ensure_allocator

    persistent, preload, flat = DESIGNS[design]
    b, h, n, d = q.shape
    n_tiles = triton.cdiv(n, block_m)
    key = (id(layout), block_m, block_n, b * h * n_tiles)
    if key not in _PREPARED:  # (the plan once per layout: timed calls launch the kernel alone)
        plan = tile_plan(layout, block_m, block_n, False)
        if int(plan.plan[..., 1].sum()):
            raise ValueError("the probe's designs run layouts whose visited tiles are all full")
        items = torch.arange(b * h * n_tiles, dtype=torch.int32, device=q.device)
        _PREPARED[key] = (layout, plan, items, max(16, triton.next_power_of_2(int(plan.plan[..., 0].max()))))
    _, plan, items, max_tiles = _PREPARED[key]
    o = torch.empty_like(q)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    head, row = (0 if plan.plan.shape[0] == 1 else plan.plan.stride(0)), plan.plan.stride(1)
    ensure_allocator(q.device)
    grid = (min(programs, items.numel()),) if persistent else (items.numel(),)
    precision = "ieee" if q.dtype == torch.float32 and q.device.type == "cpu" else "tf32"
    probe_kernel[grid](q, k, v, o, lse, plan.plan, items, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                       lse.stride(0), lse.stride(1), head, row, items.numel(), n_tiles, h, n, k.shape[2], d,
                       d ** -0.5 * LOG2E_HOST, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, DOT_PRECISION=precision,
                       PERSISTENT=persistent, PRELOAD=preload, MAX_TILES=max_tiles,
                       ITEM_STAGES=1 if flat else None, num_warps=num_warps,
                       num_stages=num_stages)
    return o, lse


def compile_design(design: str, block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int = 128,
                   max_tiles: int = 256, arch: int = 90) -> dict:
    """Build ``design`` for ``sm_<arch>`` ahead of time (bf16): whether Triton made warp-specialized partitions
    (``ttg.warp_specialize`` in its TTGIR), whether its PTX moves registers between them (``setmaxnreg``), its
    shared memory and warps."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dit_accel.kernels.block_sparse.configs import _ARG_TYPES, _DIV16
    from dit_accel.kernels.compile import _jit_function
    from dit_accel.kernels.dense.configs import aot_signature

    persistent, preload, flat = DESIGNS[design]
    fn = _jit_function(probe_kernel)
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": head_dim, "DOT_PRECISION": "tf32",
                  "PERSISTENT": persistent, "PRELOAD": preload, "MAX_TILES": max_tiles,
                  "ITEM_STAGES": 1 if flat else None}
    _, signature, constexprs, attrs = aot_signature(fn, {**_ARG_TYPES, "ITEMS": "*i32"}, constexprs, _DIV16,
                                                    torch.bfloat16)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages})
    return {"warp_specialized": "ttg.warp_specialize" in ck.asm["ttgir"], "setmaxnreg": "setmaxnreg" in ck.asm["ptx"],
            "shared": int(ck.metadata.shared), "warps": int(ck.metadata.num_warps)}
