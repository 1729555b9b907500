"""The one-pass block-sparse backward: five tensor-core products per tile, dQ accumulated atomically.

The two-pass backward of :mod:`.triton` recomputes ``S`` and ``dP`` in each pass: 4 products per tile in its
dK/dV kernel (``K Q^T``, ``P^T dO``, ``V dO^T``, ``dS^T Q``) and 3 in its dQ kernel (``Q K^T``, ``dO V^T``,
``dS K``), 7 in all. ``_bwd_dkdv_dq_kernel`` walks the transposed plan once (grid: key tiles x B*H, the
query tiles that visit each key tile) and adds the fifth product ``dS K`` to the dK/dV step: each key tile's
share of dQ goes to an fp32 buffer with ``tl.atomic_add`` (relaxed: only the sum is read, after the kernel).

It has never run on a GPU, so it runs behind its first-use self-check (variant :data:`FUSED_VARIANT`,
:mod:`dit_accel.kernels.selfcheck`); where that fails, or where no configuration is shipped for the target
(:func:`.configs.fused_config`), the two-pass backward runs. The launcher (:func:`.triton.triton_backward`)
prepares the inputs as it does for the two-pass kernels and calls :func:`run_fused`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .. import selfcheck
from ..dense.tiles import load_tile, row_bits

__all__ = ["FUSED_VARIANT", "run_fused", "one_pass_runs", "one_pass_faster"]

#: The self-check's name of the one-pass backward.
FUSED_VARIANT = "block_sparse.triton.bwd_dkdv_dq"


@triton.jit
def _fused_step(k, v, q, do, lse, delta, dk, dv, qk_scale, keep,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (key tile, query tile) pair: dK and dV accumulate in registers, this tile's dQ share is returned.

    The five products each stand on a line of their own: the SASS test counts them by source line."""
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    if MASKED:
        st = tl.where(keep, st, float("-inf"))
    pt = tl.math.exp2(st * qk_scale - lse[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
    dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
    return dk, dv, dq


@triton.jit
def _bwd_dkdv_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, DQ32, PLAN, BITS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    plan_h, plan_r, w, bits_w,
    H, q_len, kv_len, head_dim, sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    col0 = pid_n * BLOCK_N
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if TMA:  # Q, dO are tensor descriptors; the bases are unused
        q_base = k_base
        do_base = k_base
    else:
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    # Keys past kv_len load as zeros: their dS entries meet zero rows of K in dS K, so they add nothing to dQ.
    k = load_tile(k_base, k_base, b, h, col0, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, False, True, EVEN_D)
    v = load_tile(v_base, v_base, b, h, col0, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, False, True, EVEN_D)
    rows_at = pid_bh.to(tl.int64) * q_len  # LSE2 / DELTA rows of this (batch, head)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dq_base = DQ32 + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + offs_m[:, None] * sgn + offs_d[None, :]
    d_ok = (offs_d < head_dim)[None, :]

    plan = PLAN + h.to(tl.int64) * plan_h + pid_n.to(tl.int64) * plan_r
    n_full = tl.load(plan)
    n_part = tl.load(plan + 1)
    full = plan + 2
    part = full + n_full
    bits = full + w + n_full  # the partial tiles' bit offsets
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # As in the two-pass dK/dV kernel: the next query tile's index is read one iteration ahead.
    nxt = tl.load(full, mask=n_full > 0, other=0)
    for i in range(0, n_full):  # loop: full
        row = nxt * BLOCK_M
        nxt = tl.load(full + i + 1, mask=i + 1 < n_full, other=0)
        q = load_tile(Q, q_base, b, h, row, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, TMA, False, EVEN_D)
        do = load_tile(DO, do_base, b, h, row, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, TMA, False, EVEN_D)
        lse = tl.load(LSE2 + rows_at + row + offs_m)
        delta = tl.load(DELTA + rows_at + row + offs_m)
        dk, dv, dq = _fused_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, DOT_PRECISION)
        if EVEN_D:  # a full tile's query rows all exist
            tl.atomic_add(dq_base + row.to(tl.int64) * sgn, dq, sem="relaxed")
        else:
            tl.atomic_add(dq_base + row.to(tl.int64) * sgn, dq, mask=d_ok, sem="relaxed")
    keys = tl.arange(0, BLOCK_N)
    nxt = tl.load(part, mask=n_part > 0, other=0)
    nxt_bits = tl.load(bits, mask=n_part > 0, other=0)
    for i in range(0, n_part):  # loop: partial
        row = nxt * BLOCK_M
        keep = row_bits(BITS, nxt_bits, keys, bits_w, BLOCK_M)
        nxt = tl.load(part + i + 1, mask=i + 1 < n_part, other=0)
        nxt_bits = tl.load(bits + i + 1, mask=i + 1 < n_part, other=0)
        q = load_tile(Q, q_base, b, h, row, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        do = load_tile(DO, do_base, b, h, row, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        m_ok = row + offs_m < q_len  # rows past q_len: lse = +inf, so P = 0
        lse = tl.load(LSE2 + rows_at + row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + rows_at + row + offs_m, mask=m_ok, other=0.0)
        dk, dv, dq = _fused_step(k, v, q, do, lse, delta, dk, dv, qk_scale, keep, True, DOT_PRECISION)
        tl.atomic_add(dq_base + row.to(tl.int64) * sgn, dq, mask=m_ok[:, None] & d_ok, sem="relaxed")

    offs_n = col0 + keys
    mask = (offs_n < kv_len)[:, None] & d_ok
    rows = offs_n.to(tl.int64)[:, None]
    # dK / dV are allocated like K / V: same strides.
    dk_ptrs = DK + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rows * skn + offs_d[None, :]
    dv_ptrs = DV + b.to(tl.int64) * svb + h.to(tl.int64) * svh + rows * svn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


def run_fused(step, q, k, v, do, lse2: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
              dv: torch.Tensor, scale: float, log2e: float) -> None:
    """Launch the one-pass backward: ``step`` is the launcher's cached ``(args, grid, kw, descriptors)`` (the
    transposed plan and strides after q, k, v, do's); ``q`` and ``do`` are the descriptors where ``kw`` asks
    for TMA. Writes ``dk``, ``dv`` and ``dq`` (whose fp32 buffer is summed here, then scaled and cast)."""
    args, grid, kw, _ = step
    dq32 = torch.zeros(dq.shape, dtype=torch.float32, device=dq.device)
    _bwd_dkdv_dq_kernel[grid](q, k, v, do, lse2, delta, dk, dv, dq32, *args[:14], *dq32.stride()[:3], *args[14:],
                              scale, scale * log2e, **kw)
    dq.copy_(dq32.mul_(scale))
    selfcheck.corrupt(FUSED_VARIANT, dq)


def one_pass_runs(shipped: bool, asked: Optional[bool], device: torch.device, dtype: torch.dtype, head_dim: int,
                  block_q: int, block_k: int) -> bool:
    """Whether a backward call runs the one-pass kernel: ``asked`` None (the default) where a configuration
    ships (``shipped``) and, on a GPU, its self-check passed (never unasked on the interpreter, where the tests
    check it and the two-pass kernels stay the reference path), unless ``torch.use_deterministic_algorithms``
    is on (atomic adds sum dQ in no fixed order); True or False as asked. A forced one-pass call without a
    shipped configuration raises ValueError naming what ships."""
    if asked is None:
        if not shipped or device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
            return False
        return selfcheck.usable_fast(FUSED_VARIANT, device, dtype, head_dim, block_q, block_k)
    if asked and not shipped:
        raise ValueError(f"one_pass=True: no one-pass backward configuration ships for {dtype} at head dim "
                         f"{head_dim} with these layout blocks and inputs on this target (fp16 / bf16: head dims <= 64 "
                         "on sm_80 and sm_90, 65-128 on sm_90 with 128-token key blocks and 16-byte aligned q and "
                         "do; any on the interpreter); pass one_pass=None to take the two-pass backward")
    return bool(asked)


def one_pass_faster(layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run: Callable[[bool], object],
                    timer=None, gpu: Optional[bool] = None) -> bool:
    """Whether a call that would run the one-pass backward by default (a configuration ships and its self-check
    passed) keeps it: on a GPU, eager, with the autotuner on, the one-pass and two-pass backwards are timed on
    the call's own inputs once per shape class (:func:`dit_accel.kernels.autotune.choose`, family
    ``block_sparse.backward``: stored with the other choices, listed by ``dit-accel info``) and the faster runs;
    elsewhere the default stands. ``run(one)`` runs the backward with ``one_pass=one``. The launcher asks once
    per (layout, call signature)."""
    from .. import autotune
    from ..request import Request, in_graph

    gpu = q.device.type == "cuda" if gpu is None else gpu
    if not gpu or in_graph() or not autotune.enabled():
        return True
    request = Request.of(q, k, v, layout.block_q, layout.block_k)
    shape = autotune.ShapeClass.of("block_sparse.backward", request, float(layout.density()))
    contenders = {"one-pass": lambda: run(True), "two-pass": lambda: run(False)}
    return autotune.choose(shape, contenders, timer=timer or autotune.timer_on(q.device), warmup=2,
                           repeats=5) != "two-pass"
