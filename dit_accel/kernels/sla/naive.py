"""The PyTorch twin of the fused SLA kernel: the CPU path and the test oracle.

It gathers only the critical key blocks per query block, so memory is
``O(N * kc * Bk)``, never ``N x N``; the linear branch uses per-block
``phi(K_j)^T V_j`` sums. Everything is fp32 and differentiable by autograd.

The sparse branch has two paths. :func:`_sparse_branch_torch` (explicit scores,
softmax and matmuls; autograd through everything, the lse included) is the
reference. Without autograd on CPU, :func:`_sparse_branch_fused` runs instead: slices
of query blocks, their critical K/V blocks gathered by one ``index_select`` each,
through ATen's CPU flash-attention kernel (no score tensor).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._util import cdiv as _cdiv
from ..block_sparse.naive import CHUNK_BYTES, HAS_CPU_FLASH, SLICES_PER_THREAD, gather, in_threads, pad_blocks, slice_bytes
from ..block_sparse.one_pass import blocks_to_tokens
from ..request import records_grad, tracing
from .common import MARGINAL, SLABlocks, SLAParams, feature_map

__all__ = ["sla_torch"]



def _sparse_branch_torch(q, k, v, critical, block_q, block_k, scale):
    """Softmax attention of each query block over its critical key blocks (fp32, differentiable)."""
    b, h, nq_tok, d = q.shape
    nk_tok = k.shape[-2]
    n_q, n_k, kc = critical.shape[2], _cdiv(nk_tok, block_k), critical.shape[-1]
    pad_q, pad_k = n_q * block_q - nq_tok, n_k * block_k - nk_tok
    qb = F.pad(q, (0, 0, 0, pad_q)).view(b, h, n_q, block_q, d)
    kb = F.pad(k, (0, 0, 0, pad_k)).view(b, h, n_k, block_k, d)
    vb = F.pad(v, (0, 0, 0, pad_k)).view(b, h, n_k, block_k, d)
    # Gather only the critical blocks: [B, H, nQ, kc * Bk, D]. Gathering from the un-expanded
    # [B, H, nK, Bk, D] keeps the backward's scatter at the size of K, not nQ times it.
    idx = critical.long().reshape(b, h, n_q * kc, 1, 1).expand(b, h, n_q * kc, block_k, d)
    kg = torch.gather(kb, 2, idx).view(b, h, n_q, kc * block_k, d)
    vg = torch.gather(vb, 2, idx).view(b, h, n_q, kc * block_k, d)
    tok = critical.long()[..., None] * block_k + torch.arange(block_k, device=q.device)
    valid = (tok < nk_tok).flatten(3, 4)[..., None, :]  # [B, H, nQ, 1, kc * Bk]
    s = (qb @ kg.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ vg
    return o.reshape(b, h, n_q * block_q, d)[:, :, :nq_tok], lse.reshape(b, h, -1)[:, :, :nq_tok]


def _use_fused(q, k, v) -> bool:
    grad = records_grad(q, k, v)
    return q.device.type == "cpu" and HAS_CPU_FLASH and not grad


def _sparse_branch_fused(q, k, v, critical, block_q, block_k, scale, chunk_bytes: Optional[int] = None):
    """:func:`_sparse_branch_torch` without a score tensor, forward only (q, k, v fp32, no autograd).
    Slices of query blocks whose gathered K/V, Q and output fit ``chunk_bytes`` (default: the
    block-sparse twin's :func:`~dit_accel.kernels.block_sparse.naive.slice_bytes`)."""
    b, h, nq_tok, d = q.shape
    nk_tok = k.shape[-2]
    n_q, n_k, kc = critical.shape[2], _cdiv(nk_tok, block_k), critical.shape[-1]
    bh = b * h
    per_block = 4 * bh * (2 * kc * block_k * d + 2 * block_q * d)
    whole = not (nq_tok % block_q or nk_tok % block_k)
    if whole and per_block * n_q <= (chunk_bytes or CHUNK_BYTES):  # within every slice budget: no thread count asked
        return _one_pass(q, k, v, critical, block_q, block_k, scale)
    # Several torch threads: slices of the one-thread size, shared out between threads (as the
    # block-sparse twin does with its gathered slices), when there are enough of them.
    workers = 1 if tracing() else torch.get_num_threads()
    step = max(1, (chunk_bytes or CHUNK_BYTES) // per_block)
    if workers == 1 or -(-n_q // step) < SLICES_PER_THREAD * workers:
        workers, step = 1, max(1, (chunk_bytes or slice_bytes()) // per_block)
    if step >= n_q and whole:
        return _one_pass(q, k, v, critical, block_q, block_k, scale)
    qb = pad_blocks(q, block_q).reshape(bh, n_q, block_q, d)
    kb = pad_blocks(k, block_k).reshape(bh * n_k, block_k, d)
    vb = pad_blocks(v, block_k).reshape(bh * n_k, block_k, d)
    # Flat key-block rows of kb per (b*h, query block): [BH, nQ * kc].
    rows = critical.reshape(bh, n_q * kc) + _row_offsets(b, h, n_k, q.device).view(bh, 1)
    bias = None
    if nk_tok % block_k:  # keys past nk_tok in the ragged last block: additive -inf
        tok = critical.reshape(bh, n_q, kc, 1).long() * block_k + torch.arange(block_k, device=q.device)
        bias = torch.zeros(tok.shape, device=q.device).masked_fill_(tok >= nk_tok, float("-inf"))
        bias = bias.reshape(bh, n_q, 1, kc * block_k)

    def attend(q0: int, q1: int):
        """Query blocks ``q0:q1`` against their gathered critical blocks: ``(o, lse)``."""
        idx = rows[:, q0 * kc:q1 * kc].reshape(-1)
        k_c = gather(kb, 0, idx, "k").view(bh, q1 - q0, kc * block_k, d)  # reused buffers: no autograd here
        v_c = gather(vb, 0, idx, "v").view(bh, q1 - q0, kc * block_k, d)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qb[:, q0:q1], k_c, v_c, attn_mask=None if bias is None else bias[:, q0:q1], scale=scale)[:2]

    if step >= n_q:  # one slice (short sequences): its output is the result, no buffer to fill
        o, lse = attend(0, n_q)
    else:
        o = qb.new_empty(qb.shape)
        lse = qb.new_empty(qb.shape[:3])

        def run(starts):
            for q0 in starts:
                q1 = min(n_q, q0 + step)
                o[:, q0:q1], lse[:, q0:q1] = attend(q0, q1)

        starts = list(range(0, n_q, step))
        if workers > 1:
            in_threads(run, [starts[i * len(starts) // workers:(i + 1) * len(starts) // workers]
                             for i in range(workers)])
        else:
            run(starts)
    return o.reshape(b, h, n_q * block_q, d)[:, :, :nq_tok], lse.reshape(b, h, n_q * block_q)[:, :, :nq_tok]


def _one_pass(q, k, v, critical, block_q, block_k, scale):
    """:func:`_sparse_branch_fused` in one flash call, for whole blocks that fit one slice (short sequences).

    The kernel's batch is (batch, query block) and its heads are the heads, so q laid out as the
    processors make it (``(B, N, H, D)`` memory) enters as a view, and the output leaves in that
    memory order, SDPA's own (the caller's transpose back to tokens is free). The critical K/V blocks
    are gathered by one ``index_select`` each from ``(B * H * nK)`` rows.

    Eager, each of those views is one ``as_strided`` where the strides allow it, not a chain of
    ``view``/``transpose``/``reshape``: a short call is mostly per-op cost, and inside a small model
    (tiny-wan, 320 tokens) the nine ops fewer per call took 4-6% off its time (302 -> 283 us, 336 -> 323 us)."""
    b, h, n, d = q.shape
    n_q, kc = critical.shape[2], critical.shape[3]
    n_k = k.shape[2] // block_k
    rows = (critical + _row_offsets(b, h, n_k, q.device)).view(-1)  # (B, H, nQ, kc) flat key-block rows
    width = kc * block_k
    eager = not tracing()

    def gather_blocks(x):  # (B * nQ, H, kc * Bk, D): a view for batch 1, a copy otherwise
        blocks = x.reshape(b * h * n_k, block_k, d).index_select(0, rows)  # (B, H, nQ, kc * Bk, D) memory
        if b == 1 and eager:
            return blocks.as_strided((n_q, h, width, d), (width * d, n_q * width * d, d, 1))
        return blocks.view(b, h, n_q, width, d).transpose(1, 2).reshape(b * n_q, h, width, d)

    # (views rather than Tensor.unflatten, a Python-level method: this runs on every short SLA call)
    sb, sh, sn, sd = q.stride()
    if eager and (b == 1 or sb == n * sn):  # (batch, query block) is one stride: block_q tokens
        q_b = q.as_strided((b * n_q, h, block_q, d), (block_q * sn, sh, sn, sd), q.storage_offset())
    else:
        q_b = q.view(b, h, n_q, block_q, d).transpose(1, 2).reshape(b * n_q, h, block_q, d)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_b, gather_blocks(k), gather_blocks(v), scale=scale)[:2]
    return blocks_to_tokens(o, b, n_q, block_q, eager), blocks_to_tokens(lse, b, n_q, block_q, eager)


_OFFSETS: dict = {}


def _row_offsets(b: int, h: int, n_k: int, device) -> torch.Tensor:
    """``(B, H, 1, 1)`` first key-block row of each (batch, head) in ``(B * H * nK)`` rows (made once per shape)."""
    if tracing():
        return (torch.arange(b * h, device=device) * n_k).view(b, h, 1, 1)
    key = (b, h, n_k, device)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        offsets = _OFFSETS[key] = (torch.arange(b * h, device=device) * n_k).view(b, h, 1, 1)
    return offsets


def _linear_branch_torch(q, k, v, blocks: SLABlocks, method: SLAParams):
    """Linear attention over the marginal blocks (or all tokens), fp32, differentiable."""
    b, h, nq_tok, d = q.shape
    nk_tok = k.shape[-2]
    qf = feature_map(q, method.feature_map)
    kf = feature_map(k, method.feature_map)
    if method.linear_tokens == "all":
        hs = kf.transpose(-1, -2) @ v  # [B, H, D, D]
        zs = kf.sum(-2)  # [B, H, D]
        num = qf @ hs
        den = (qf * zs[:, :, None]).sum(-1)
        return num / (den + method.linear_eps)[..., None]
    bq, bk = method.block_q, method.block_k
    n_q, n_k = blocks.classes.shape[-2:]
    pad_k = n_k * bk - nk_tok
    kfb = F.pad(kf, (0, 0, 0, pad_k)).view(b, h, n_k, bk, d)  # padded keys: phi rows are 0
    vb = F.pad(v, (0, 0, 0, pad_k)).view(b, h, n_k, bk, d)
    h_blk = kfb.transpose(-1, -2) @ vb  # [B, H, nK, D, D] = phi(K_j)^T V_j
    z_blk = kfb.sum(-2)  # [B, H, nK, D]
    marg = (blocks.classes == MARGINAL).float()  # [B, H, nQ, nK]
    h_q = torch.einsum("bhqk,bhkde->bhqde", marg, h_blk)  # per query block
    z_q = torch.einsum("bhqk,bhkd->bhqd", marg, z_blk)
    qfb = F.pad(qf, (0, 0, 0, n_q * bq - nq_tok)).view(b, h, n_q, bq, d)
    num = qfb @ h_q
    den = (qfb * z_q[:, :, :, None]).sum(-1)
    o = num / (den + method.linear_eps)[..., None]
    return o.reshape(b, h, n_q * bq, d)[:, :, :nq_tok]


def sla_torch(q, k, v, blocks, method, scale, with_linear, fused: Optional[bool] = None):
    """``(o_sparse, lse, o_linear or None)``. ``fused``: the sparse branch through
    :func:`_sparse_branch_fused` (default: on CPU when nothing needs gradients)."""
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    fused = _use_fused(q, k, v) if fused is None else fused
    branch = _sparse_branch_fused if fused else _sparse_branch_torch
    o_s, lse = branch(q, k, v, blocks.critical, method.block_q, method.block_k, scale)
    o_l = _linear_branch_torch(q, k, v, blocks, method) if with_linear else None
    return (o_s if dtype == torch.float32 else o_s.to(dtype)), lse, o_l
