"""The PyTorch twin of the fused SLA kernel: the CPU path and the test oracle.

It gathers only the critical key blocks per query block, so memory is
``O(N * kc * Bk)``, never ``N x N``; the linear branch uses per-block
``phi(K_j)^T V_j`` sums. Everything is fp32 and differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._util import cdiv as _cdiv
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


def sla_torch(q, k, v, blocks, method, scale, with_linear):
    qf, kf, vf = q.float(), k.float(), v.float()
    o_s, lse = _sparse_branch_torch(qf, kf, vf, blocks.critical, method.block_q, method.block_k, scale)
    o_l = _linear_branch_torch(qf, kf, vf, blocks, method) if with_linear else None
    return o_s.to(q.dtype), lse, o_l
