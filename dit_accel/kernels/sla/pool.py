"""SLA's block pooling in one Triton launch: the classification's only pass over q and k.

:func:`pool_blocks` returns what :func:`~.common._pooled` (the PyTorch twin, the CPU path and the oracle)
returns: the fp32 mean of each query block of q, and the fp32 mean of each key block of the smoothed keys
``k - mean_tokens(k)``. One program pools ``PER_PROGRAM`` query blocks and as many key blocks of one
(batch, head), reading each token once (fp32 accumulation, any strides, the ragged last block divided by
its real token count). Centring needs the mean over all keys, which no program has alone: each program
also writes its key blocks' fp32 sum, takes a ticket (an atomic counter per (batch, head)) and the
program that takes the last ticket adds the partial sums in program order (deterministic), divides by the
key count and subtracts the mean from the head's key-block means (``nK x D`` values, not k again).

Divisions are correctly rounded (``div_rn``), as torch's are, so on inputs whose sums are exact the
pooled values equal the twin's bit for bit (the classification tests use that); otherwise the fp32
sums differ from torch's in summation order only.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from ..._util import cdiv as _cdiv
from .. import occupancy
from .._cache import bounded_get

__all__ = ["pool_blocks", "KERNELS", "PER_PROGRAM", "ROWS"]

#: Query (and key) blocks per program: a Wan 480p head (512 blocks) gets 128 programs.
PER_PROGRAM = 4
#: Token rows read per step (SLA's blocks, 64 or 128 tokens, are whole numbers of steps).
ROWS = 64
#: Rows of the key-block means the centring program reads per step.
CENTRE_ROWS = 32


@triton.jit
def _block_sum(base, start, n, stride_n, stride_d, rows, cols, col_ok, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """fp32 sum over the real tokens ``[start, min(start + BLOCK, n))`` of one (batch, head)'s ``(n, D)``."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for r in tl.static_range(0, BLOCK, ROWS):
        tok = start + r + rows
        ptrs = base + tok.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
        x = tl.load(ptrs, mask=(tok < n)[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    return acc


@triton.jit
def _sla_pool_kernel(Q, K, QB, KB, PART, TICKET,
                     stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     H, NQ, NK, D, N_QB, N_KB,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     PER_PROGRAM: tl.constexpr, ROWS: tl.constexpr, CENTRE_ROWS: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rows = tl.arange(0, ROWS)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    k_part = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(PER_PROGRAM):
        blk = chunk * PER_PROGRAM + i
        if blk < N_QB:
            start = blk * BLOCK_Q
            s = _block_sum(q_base, start, NQ, stride_qn, stride_qd, rows, cols, col_ok, BLOCK_Q, ROWS)
            count = tl.minimum(NQ - start, BLOCK_Q).to(tl.float32)
            tl.store(QB + (bh.to(tl.int64) * N_QB + blk) * D + cols, tl.math.div_rn(s, count), mask=col_ok)
        if blk < N_KB:
            start = blk * BLOCK_K
            s = _block_sum(k_base, start, NK, stride_kn, stride_kd, rows, cols, col_ok, BLOCK_K, ROWS)
            count = tl.minimum(NK - start, BLOCK_K).to(tl.float32)
            tl.store(KB + (bh.to(tl.int64) * N_KB + blk) * D + cols, tl.math.div_rn(s, count), mask=col_ok)
            k_part += s
    tl.store(PART + (bh.to(tl.int64) * n_chunks + chunk) * D + cols, k_part, mask=col_ok)
    # Every thread's stores before the ticket (its release publishes them to the last program).
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET + bh, 1, sem="acq_rel", scope="gpu")
    if ticket == n_chunks - 1:
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(0, n_chunks):  # program order: the same sum on every run
            total += tl.load(PART + (bh.to(tl.int64) * n_chunks + c) * D + cols, mask=col_ok, other=0.0,
                             cache_modifier=".cg")
        mean = tl.math.div_rn(total, NK.to(tl.float32))
        j = tl.arange(0, CENTRE_ROWS)
        for j0 in range(0, N_KB, CENTRE_ROWS):
            ptrs = KB + (bh.to(tl.int64) * N_KB + j0 + j)[:, None] * D + cols[None, :]
            ok = (j0 + j < N_KB)[:, None] & col_ok[None, :]
            kb = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(ptrs, kb - mean[None, :], mask=ok)


KERNELS = {"pool": _sla_pool_kernel}


def aot_source(dtype: torch.dtype, block_q: int, block_d: int):
    """``(kernel, signature, constexprs, attrs)`` of the pooling kernel for ``triton.compile(ASTSource(...))``
    (static GPU checks without a GPU, in a process without TRITON_INTERPRET; sizes and strides as 32-bit ints,
    like the JIT's typical launch)."""
    from ..dense.configs import aot_signature

    types = {"Q": "*DT", "K": "*DT", "QB": "*fp32", "KB": "*fp32", "PART": "*fp32", "TICKET": "*i32"}
    constexprs = dict(BLOCK_Q=block_q, BLOCK_K=64, BLOCK_D=block_d, PER_PROGRAM=PER_PROGRAM, ROWS=ROWS,
                      CENTRE_ROWS=CENTRE_ROWS)
    return aot_signature(_sla_pool_kernel, types, constexprs, (), dtype)


@occupancy.on_inputs_device
def pool_blocks(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(qb, kb)``: fp32 ``(B, H, cdiv(Nq, block_q), D)`` query-block means and ``(B, H, cdiv(Nk, block_k), D)``
    means of the key blocks of ``k - mean_tokens(k)``, in one launch (module docstring). ``q``, ``k``: any
    strides, fp16 / bf16 / fp32; ``block_q``, ``block_k``: multiples of :data:`ROWS`. Not checked here
    (the SLA entry points check their inputs)."""
    b, h, nq, d = q.shape
    key = (q.shape, q.stride(), k.shape, k.stride(), block_q, block_k)
    launch = bounded_get(_LAUNCHES, key, lambda: _pool_launch(q, k, block_q, block_k))
    grid, n_qb, n_kb, args, kw = launch
    dev = q.device
    qb = torch.empty((b, h, n_qb, d), dtype=torch.float32, device=dev)
    kb = torch.empty((b, h, n_kb, d), dtype=torch.float32, device=dev)
    part = torch.empty((b * h, grid[0], d), dtype=torch.float32, device=dev)
    ticket = torch.zeros((b * h,), dtype=torch.int32, device=dev)
    KERNELS["pool"][grid](q, k, qb, kb, part, ticket, *args, **kw)
    return qb, kb


def _pool_launch(q, k, block_q: int, block_k: int):
    """``(grid, nQ, nK, scalar arguments, constexprs)`` of a pooling launch: what depends only on the shapes,
    strides and block sizes (:data:`_LAUNCHES`)."""
    if block_q % ROWS or block_k % ROWS or block_q <= 0 or block_k <= 0:
        raise ValueError(f"the SLA pooling kernel takes block sizes that are multiples of {ROWS} (SLA allows 64 "
                         f"and 128), got block_q={block_q}, block_k={block_k}; use backend='torch' for others")
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    n_qb, n_kb = _cdiv(nq, block_q), _cdiv(nk, block_k)
    n_chunks = _cdiv(max(n_qb, n_kb), PER_PROGRAM)
    args = (*q.stride(), *k.stride(), h, nq, nk, d, n_qb, n_kb)
    kw = dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=triton.next_power_of_2(d), PER_PROGRAM=PER_PROGRAM,
              ROWS=ROWS, CENTRE_ROWS=CENTRE_ROWS, num_warps=4)
    return (n_chunks, b * h), n_qb, n_kb, args, kw


#: Launch arguments per (q, k shapes and strides, block sizes); plain values only, bounded.
_LAUNCHES: Dict[tuple, tuple] = {}
