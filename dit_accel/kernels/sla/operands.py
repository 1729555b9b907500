"""The fused SLA forward's global-sum operands in one Triton launch (one program per (batch, head)).

The global-sums kernel (:func:`~.triton.global_sums`) leaves fp32 partial sums per 1024-key chunk:
``phi(K)^T V`` ``(B*H, C, Dp, Dp)``, ``sum(phi(K))`` ``(B*H, C, Dp)`` and ``max|phi(K)|`` ``(B*H, C)``. The
forward kernel takes them reduced over the chunks, with ``phi(K)^T V`` divided by a power of two per
(batch, head) (``2^(ceil(log2(peak)) - 14)``, so it fits fp16) and split into ``hi + lo`` in the input
dtype. :func:`~.triton._global_operands` does that with about fifteen small torch operations (as many
launches on a GPU); this kernel does it in one, adding the chunks in order. Without the global sums
(``C = 0``) it writes the neutral operands (zeros, a power of one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["global_operands", "KERNELS", "ROWS"]

#: Rows of ``phi(K)^T V`` per step.
ROWS = 16


@triton.jit
def _sla_operands_kernel(KV_P, KSUM_P, KMAX_P, KV, POWER, KSUM, KMAX, N_CHUNKS, WITH_KV: tl.constexpr,
                         WITH_KMAX: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, ROWS)
    peak = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    kmax = tl.zeros([1], dtype=tl.float32)
    if WITH_KV:
        for c in range(0, N_CHUNKS):
            ksum += tl.load(KSUM_P + (bh * N_CHUNKS + c) * BLOCK_D + cols)
    if WITH_KMAX:
        for c in range(0, N_CHUNKS):
            kmax = tl.maximum(kmax, tl.load(KMAX_P + bh * N_CHUNKS + c + tl.arange(0, 1)))
    tl.store(KSUM + bh * BLOCK_D + cols, ksum)
    tl.store(KMAX + bh + tl.arange(0, 1), kmax)
    # Pass 1: the chunk sums of phi(K)^T V, kept in chunk 0's slot, and their peak |value|.
    base = KV_P + bh * N_CHUNKS * BLOCK_D * BLOCK_D
    if WITH_KV:
        for r0 in tl.static_range(0, BLOCK_D, ROWS):
            offs = (r0 + rows)[:, None] * BLOCK_D + cols[None, :]
            kv = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for c in range(0, N_CHUNKS):
                kv += tl.load(base + c * BLOCK_D * BLOCK_D + offs)
            if N_CHUNKS > 1:
                tl.store(base + offs, kv)
            peak = tl.maximum(peak, tl.abs(kv))
        tl.debug_barrier()  # pass 2 reads rows other threads summed
    top = tl.max(tl.max(peak, axis=1), axis=0)
    # A power of two, built from its exponent bits: exact to divide by and to multiply back.
    e = tl.maximum(tl.ceil(tl.log2(top)), -112.0).to(tl.int32)
    power = ((e - 14 + 127) << 23).to(tl.float32, bitcast=True)
    power = tl.where(top > 0, power, 1.0)
    tl.store(POWER + bh + tl.arange(0, 1), tl.zeros([1], dtype=tl.float32) + power)
    out = KV + bh * 2 * BLOCK_D * BLOCK_D
    for r0 in tl.static_range(0, BLOCK_D, ROWS):
        offs = (r0 + rows)[:, None] * BLOCK_D + cols[None, :]
        if WITH_KV:
            kv = tl.load(base + offs) / power
        else:
            kv = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        hi = kv.to(KV.dtype.element_ty)
        tl.store(out + offs, hi)
        tl.store(out + BLOCK_D * BLOCK_D + offs, (kv - hi.to(tl.float32)).to(KV.dtype.element_ty))


KERNELS = {"operands": _sla_operands_kernel}


def aot_source(dtype: torch.dtype, block_d: int):
    """``(kernel, signature, constexprs, attrs)`` of the operands kernel for ``triton.compile(ASTSource(...))``."""
    from ..dense.configs import aot_signature

    types = {"KV_P": "*fp32", "KSUM_P": "*fp32", "KMAX_P": "*fp32", "KV": "*DT", "POWER": "*fp32", "KSUM": "*fp32",
             "KMAX": "*fp32"}
    constexprs = dict(WITH_KV=True, WITH_KMAX=True, BLOCK_D=block_d, ROWS=ROWS)
    return aot_signature(_sla_operands_kernel, types, constexprs, (), dtype)


def global_operands(kv_p, ksum_p, kmax_p, n_chunks: int, with_kv: bool, with_kmax: bool, bh: int, block_d: int,
                    dtype: torch.dtype, device):
    """``(kv hi/lo (B*H, 2*block_d, block_d) in dtype, power (B*H,), ksum (B*H, block_d), kmax (B*H,))``, the
    last three fp32, from the global-sums kernel's chunk partials (``n_chunks`` of them; 0: no global sums,
    then the partials are not read and any live tensors may be passed). ``with_kv``: ``phi(K)^T V`` and
    ``sum(phi(K))`` reduced, ``phi(K)^T V`` split (else zeros with a power of one); ``with_kmax``: ``max|phi(K)|``
    reduced (else zeros). The chunk-0 slot of ``kv_p`` is overwritten with the reduced sum."""
    kv = torch.empty((bh, 2 * block_d, block_d), dtype=dtype, device=device)
    stats = torch.empty(bh * (block_d + 2), dtype=torch.float32, device=device)  # one allocation, three parts
    ksum, power, kmax = stats[:bh * block_d].view(bh, block_d), stats[bh * block_d:bh * (block_d + 1)], \
        stats[bh * (block_d + 1):]
    KERNELS["operands"][(bh,)](kv_p, ksum_p, kmax_p, kv, power, ksum, kmax, n_chunks,
                               WITH_KV=bool(with_kv and n_chunks), WITH_KMAX=bool(with_kmax and n_chunks),
                               BLOCK_D=block_d, ROWS=ROWS, num_warps=4 if block_d == 64 else 8)
    return kv, power, ksum, kmax
