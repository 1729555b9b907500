"""The in-repo dense FlashAttention-2 Triton kernels (forward and backward).

They are the yardstick of the sparse kernels: :mod:`dit_accel.kernels.sass` compiles
each shipped block-sparse / SLA configuration next to the dense kernel with the same
tile, warps, stages, dtype and target and compares the SASS of their inner loops, and
``dit-accel bench kernels`` times them as the dense GPU baseline. Both are written from
the same tile steps (:mod:`.tiles`), so the sparse kernels' extra work per tile is only
what sparsity needs (a list lookup, and bit masks on partial tiles).

Kernels: ``_dense_fwd_kernel`` (grid: query tiles x B*H; all full key tiles in one
unmasked loop, the ragged last one masked after it), ``_dense_dkdv_kernel`` and
``_dense_dq_kernel`` (FlashAttention-2's two backward passes, no atomics). The
``bwd_preprocess`` kernel (``delta = rowsum(dO * O)``) is shared with the block-sparse
backward.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import occupancy, selfcheck
from .tiles import LN2, LOG2E, dkdv_step, dq_step, fwd_step, load_tile, slice_descriptors
from .tiles import LOG2E_HOST as _LOG2E

__all__ = ["dense_forward", "dense_backward", "KERNELS", "ensure_allocator"]


@triton.jit
def _dense_fwd_kernel(
    Q, K, V, O, LSE,  # noqa: E741 (the attention output, named like Q, K, V)
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    H, q_len, kv_len, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, WS: tl.constexpr = False, EVEN_N: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WS:
        # sm_90 warp specialization (Triton 3.9): a producer warp group issues the TMA loads, two
        # consumer warp groups own 64 query rows each, with setmaxnreg moving registers to them. Triton
        # builds this only for one loop whose Q, K and V come from descriptors made in the kernel, with
        # no other loop or branch using its results: the ragged last key tile runs in the same loop,
        # masked on every tile when EVEN_N (kv_len % BLOCK_N == 0) is False.
        qd, kd, vd = slice_descriptors(Q, K, V, b, h, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, q_len, kv_len,
                                       head_dim, BLOCK_M, BLOCK_N, BLOCK_D)
        q = qd.load([row0, 0])
        for t in tl.range(0, tl.cdiv(kv_len, BLOCK_N), warp_specialize=True):  # loop: full
            col = t * BLOCK_N
            k = kd.load([col, 0])
            v = vd.load([col, 0])
            if EVEN_N:
                acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, 0, False, DOT_PRECISION)
            else:
                keep = (col + tl.arange(0, BLOCK_N) < kv_len)[None, :]
                acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, keep, True, DOT_PRECISION)
    else:
        acc, m_i, l_i = _dense_fwd_loops(Q, K, V, q_base, b, h, row0, acc, m_i, l_i, skb, skh, skn, svb, svh, svn,
                                         sqn, q_len, kv_len, head_dim, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D,
                                         TMA, DOT_PRECISION)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64)[:, None] * son + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :])
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _dense_fwd_loops(Q, K, V, q_base, b, h, row0, acc, m_i, l_i, skb, skh, skn, svb, svh, svn, sqn,
                     q_len, kv_len, head_dim, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The forward without warp specialization: full key tiles unmasked, the ragged last one after."""
    if TMA:  # K, V are tensor descriptors; the bases are unused
        k_base = q_base
        v_base = q_base
    else:
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = load_tile(q_base, q_base, b, h, row0, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    n_full = kv_len // BLOCK_N
    for t in range(0, n_full):  # loop: full
        col = t * BLOCK_N
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
        acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, 0, False, DOT_PRECISION)
    # The ragged last key tile, as a loop of at most one step: code after a loop raises register
    # pressure more than a second loop does.
    for t in range(n_full, tl.cdiv(kv_len, BLOCK_N)):  # loop: tail
        col = t * BLOCK_N
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        keep = (col + tl.arange(0, BLOCK_N) < kv_len)[None, :]
        acc, m_i, l_i = fwd_step(q, k, v, acc, m_i, l_i, qk_scale, keep, True, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _dense_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
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
    k = load_tile(k_base, k_base, b, h, col0, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, False, True, EVEN_D)
    v = load_tile(v_base, v_base, b, h, col0, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, False, True, EVEN_D)
    rows_at = pid_bh.to(tl.int64) * q_len
    offs_m = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_full = q_len // BLOCK_M
    for t in range(0, n_full):  # loop: full
        row = t * BLOCK_M
        q = load_tile(Q, q_base, b, h, row, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, TMA, False, EVEN_D)
        do = load_tile(DO, do_base, b, h, row, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, TMA, False, EVEN_D)
        lse = tl.load(LSE2 + rows_at + row + offs_m)
        delta = tl.load(DELTA + rows_at + row + offs_m)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, DOT_PRECISION)
    for t in range(n_full, tl.cdiv(q_len, BLOCK_M)):  # loop: tail (rows past q_len: lse = +inf, so P = 0)
        row = t * BLOCK_M
        q = load_tile(Q, q_base, b, h, row, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        do = load_tile(DO, do_base, b, h, row, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        m_ok = row + offs_m < q_len
        lse = tl.load(LSE2 + rows_at + row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + rows_at + row + offs_m, mask=m_ok, other=0.0)
        dk, dv = dkdv_step(k, v, q, do, lse, delta, dk, dv, qk_scale, 0, False, DOT_PRECISION)

    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n < kv_len)[:, None] & (offs_d < head_dim)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    dk_ptrs = DK + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rows * skn + offs_d[None, :]
    dv_ptrs = DV + b.to(tl.int64) * svb + h.to(tl.int64) * svh + rows * svn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dense_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, q_len, kv_len, head_dim, sm_scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    if TMA:  # K, V are tensor descriptors; the bases are unused
        k_base = q_base
        v_base = q_base
    else:
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = load_tile(q_base, q_base, b, h, row0, q_len, sqn, head_dim, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    do = load_tile(do_base, do_base, b, h, row0, q_len, sdn, head_dim, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    lse = tl.load(LSE2 + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = kv_len // BLOCK_N
    for t in range(0, n_full):  # loop: full
        col = t * BLOCK_N
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, False, EVEN_D)
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, 0, False, DOT_PRECISION)
    for t in range(n_full, tl.cdiv(kv_len, BLOCK_N)):  # loop: tail
        col = t * BLOCK_N
        k = load_tile(K, k_base, b, h, col, kv_len, skn, head_dim, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        v = load_tile(V, v_base, b, h, col, kv_len, svn, head_dim, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        keep = (col + tl.arange(0, BLOCK_N) < kv_len)[None, :]
        dq = dq_step(q, do, lse, delta, k, v, dq, qk_scale, keep, True, DOT_PRECISION)

    offs_d = tl.arange(0, BLOCK_D)
    dq_ptrs = DQ + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d < head_dim)[None, :])


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, LSE, DLSE, DELTA, LSE2, RIDX,  # noqa: E741 (the attention output, named like Q, K, V)
    sob, soh, son, sdb, sdh, sdn, slb, slh,
    H, q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, GATHER: tl.constexpr = False,
):
    """``delta = rowsum(dO * O) - dlse`` and the base-2 ``lse`` (``+inf`` on rows without keys),
    both as contiguous ``(B*H, q_len)`` fp32 buffers, so the backward loops read them as they are.
    ``GATHER``: O, dO, lse and dlse are in raster order and the buffers' rows are tiled positions, each read from
    the raster row the row table ``RIDX`` names (-1: padding, whose lse2 is +inf and delta 0: P = 0 there)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    if GATHER:
        src = tl.load(RIDX + offs_m, mask=m_ok, other=-1)
        src_ok = src >= 0
    else:
        src = offs_m
        src_ok = m_ok
    mask = src_ok[:, None] & (offs_d < head_dim)[None, :]
    rows = src.to(tl.int64)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * son + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    lse_at = b * slb + h * slh + src
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:  # d lse / d s = P: an lse gradient g shifts delta to delta - g
        delta -= tl.load(DLSE + lse_at, mask=src_ok, other=0.0)
    lse = tl.load(LSE + lse_at, mask=src_ok, other=float("-inf"))
    out = pid_bh.to(tl.int64) * q_len + offs_m
    tl.store(DELTA + out, delta, mask=m_ok)
    tl.store(LSE2 + out, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=m_ok)


KERNELS = {"fwd": _dense_fwd_kernel, "bwd_dkdv": _dense_dkdv_kernel, "bwd_dq": _dense_dq_kernel,
           "bwd_preprocess": _bwd_preprocess_kernel}


# --------------------------------------------------------------------------- launchers
def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 80  # interpreter: any valid config works


class _Scratch:
    """Global scratch for the descriptors a kernel makes itself, allocated on one device (the launch's, which
    need not be the current one)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=self.device)


_SCRATCH: Dict[torch.device, _Scratch] = {}  # one per device (a handful of GPUs: bounded)


def ensure_allocator(device: torch.device) -> None:
    """Kernels that make TMA descriptors themselves (the warp-specialized ones, SLA's TMA forward) need global
    scratch from ``triton.set_allocator``: set a torch one on ``device`` (the inputs' device) unless the
    caller has set their own. Call it right before such a launch: it re-targets this module's allocator when
    the previous launch was on another device."""
    if not occupancy.on_gpu(device):
        return
    from triton.runtime import _allocation

    var = getattr(_allocation, "_allocator", None)
    current = None if var is None else var.get()
    if isinstance(current, _Scratch) and current.device == device:
        return
    if current is None or isinstance(current, (_Scratch, getattr(_allocation, "NullAllocator", ()))):
        scratch = _SCRATCH.get(device)
        if scratch is None:
            scratch = _SCRATCH[device] = _Scratch(device)
        triton.set_allocator(scratch)


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _config(kernel: str, q: torch.Tensor, streamed: Tuple[torch.Tensor, ...]):
    """The block-sparse kernels' configuration for a 128-block layout, on the dense kernel (same tiles)."""
    from .configs import tile_rules, tma_ok

    select_config = tile_rules()[0]
    cfg = select_config(kernel, q.dtype, q.shape[-1], 128, 128, _arch(q.device))
    if cfg.tma and not tma_ok(*streamed):
        cfg = dataclasses.replace(cfg, tma=False, even_d=True)
    return cfg


def _ws_config(cfg, q: torch.Tensor):
    """sm_90 (capability 9.x), TMA-aligned Q, K, V, fp16 / bf16 at head dim <= 128: the warp-specialized
    forward (one CTA of a producer and two consumer warp groups per SM); else None."""
    from .configs import tile_rules, tma_ok

    _, ws_config, ws_enabled = tile_rules()

    # Q too: the ws kernel makes a descriptor of each (cfg.tma checked K and V only); opt-in, as the sparse one
    return ws_config(cfg, _arch(q.device)) if cfg.tma and ws_enabled() and tma_ok(q) else None


def _constexprs(kernel, cfg) -> dict:
    """The constexprs of ``cfg`` that ``kernel`` takes: the block-sparse configuration the dense kernels share
    also carries the sparse forward's own (RESUME, LENGTHS), and a compiled launch refuses a keyword its kernel
    does not declare (the interpreter drops it)."""
    return {key: val for key, val in cfg.constexprs().items() if key in kernel.arg_names}


def _pad_d(cfg, *tensors):
    """Pointer kernels read whole ``block_d`` columns: other head dims run on zero-padded copies."""
    d = tensors[0].shape[-1]
    if cfg.tma or d == cfg.block_d:
        return tensors
    return tuple(torch.nn.functional.pad(t, (0, cfg.block_d - d)) for t in tensors)


def _streamed(cfg, tensors, rows):
    if not cfg.tma:
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cfg.block_d]) for t in tensors)


@occupancy.on_inputs_device
def dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with the in-repo Triton kernel: ``(o, lse)``, like the block-sparse ``triton_forward``.

    q ``(B, H, N, D)``, k/v ``(B, H, M, D)`` (``M >= 1``), fp16 / bf16 / fp32, ``D <= 256``, on a
    CUDA device (or the CPU under ``TRITON_INTERPRET=1``); inputs are not checked.
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = _config("fwd", q, (k, v))
    ws = _ws_config(cfg, q)
    extra = {}
    if ws is not None:
        cfg = ws
        extra["EVEN_N"] = m % cfg.block_n == 0  # else every tile carries the key mask (one loop)
        ensure_allocator(q.device)
    kw = _constexprs(_dense_fwd_kernel, cfg)
    q, k, v = _pad_d(cfg, q, k, v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    kd, vd = (k, v) if cfg.ws else _streamed(cfg, (k, v), cfg.block_n)
    _dense_fwd_kernel[(triton.cdiv(n, cfg.block_m), b * h)](
        q, kd, vd, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), lse.stride(0), lse.stride(1),
        h, n, m, q.shape[-1], scale * _LOG2E, **kw, **extra, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return selfcheck.corrupt("dense.triton.fwd", o if o.shape[-1] == d else o[..., :d].contiguous()), lse


@occupancy.on_inputs_device
def bwd_preprocess(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                   dlse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(delta, lse2)`` of a backward in one launch: ``rowsum(dO * O) - dlse`` (fp32 accumulation) and the base-2
    lse (``+inf`` where lse is ``-inf``), contiguous ``(B*H, N)`` fp32. ``o``, ``do``: ``(B, H, N, D)`` in one
    dtype, last dim contiguous; ``lse``, ``dlse``: ``(B, H, N)`` (made fp32, and contiguous where the kernel,
    which reads both with lse's strides, needs it)."""
    from .configs import tile_rules

    select_config = tile_rules()[0]

    b, h, n, d = o.shape
    lse = lse.float()
    if dlse is not None:
        dlse = dlse.float()
    if lse.stride(-1) != 1 or (dlse is not None and dlse.stride() != lse.stride()):
        lse = lse.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
    pre = select_config("bwd_preprocess", o.dtype, d, 128, 128, _arch(o.device))
    delta = torch.empty((b * h, n), dtype=torch.float32, device=o.device)
    lse2 = torch.empty_like(delta)
    _bwd_preprocess_kernel[(triton.cdiv(n, pre.block_m), b * h)](
        o, do, lse, lse if dlse is None else dlse, delta, lse2, lse2, *_strides(o), *_strides(do), lse.stride(0),
        lse.stride(1), h, n, d, BLOCK_M=pre.block_m, BLOCK_D=pre.block_d, HAS_DLSE=dlse is not None,
        num_warps=pre.num_warps, num_stages=pre.num_stages)
    return delta, lse2


@occupancy.on_inputs_device
def dense_backward(do, q, k, v, o, lse, scale: float, dlse: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`dense_forward` (FlashAttention-2's two passes, no atomics); ``dlse``, the
    gradient w.r.t. ``lse`` (a merge differentiates it), enters the preprocess as ``delta - dlse``."""
    b, h, n, d = q.shape
    m = k.shape[2]
    q, k, v = (t.contiguous() for t in (q, k, v))
    do, o = do.to(q.dtype).contiguous(), o.to(q.dtype).contiguous()
    if selfcheck.faulted("dense.triton.bwd_dlse"):  # $DIT_ACCEL_FAULT: the lse's gradient dropped, as before
        dlse = None
    delta, lse2 = bwd_preprocess(o, do, lse, dlse)
    cfg, cfg_q = _config("bwd_dkdv", q, (q, do)), _config("bwd_dq", q, (k, v))
    if not (cfg.tma and cfg_q.tma):  # a pointer kernel among them: odd head dims run padded
        q, k, v, do = _pad_d(dataclasses.replace(cfg, tma=False), q, k, v, do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    sizes = (h, n, m, q.shape[-1], scale, scale * _LOG2E)
    qd, dod = _streamed(cfg, (q, do), cfg.block_m)
    _dense_dkdv_kernel[(triton.cdiv(m, cfg.block_n), b * h)](
        qd, k, v, dod, lse2, delta, dk, dv, *strides, *sizes,
        **_constexprs(_dense_dkdv_kernel, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = cfg_q
    kd, vd = _streamed(cfg, (k, v), cfg.block_n)
    _dense_dq_kernel[(triton.cdiv(n, cfg.block_m), b * h)](
        q, kd, vd, do, lse2, delta, dq, *strides, *sizes,
        **_constexprs(_dense_dq_kernel, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dq, dk, dv = (g if g.shape[-1] == d else g[..., :d].contiguous() for g in (dq, dk, dv))
    return selfcheck.corrupt("dense.triton.bwd", dq), dk, dv
