"""Sparse self-attention and joint (video + text) attention on SDPA-shaped tensors.

Given the q, k, v that a Diffusers processor hands to
``torch.nn.functional.scaled_dot_product_attention`` (``(B, H, S, D)``), compute
what dit_accel promises (METHODS.md, "Text tokens"):

- pure video self-attention: the plan's sparse pattern over video tokens;
- joint attention ``[text, video]`` or ``[video, text]``: video queries get the
  sparse pattern over video keys merged by log-sum-exp with dense attention over
  the *valid* text keys; text queries attend densely to every valid key.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["attend_with_lse", "video_attention", "joint_attention"]

# Queries per chunk of the dense text branch: bounds its fp32 score buffer.
_TEXT_CHUNK = 4096


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
                    scale: float):
    """Dense attention with its log-sum-exp, in fp32, chunked over queries.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, H, M, D)`` (M small: text tokens).
        key_valid: bool ``(B or 1, M)`` or None (all valid).
    Returns:
        ``o`` (q's dtype) and ``lse`` fp32 ``(B, H, N)``; rows without a valid key give 0 and ``-inf``.
    """
    kf, vf = k.float(), v.float()
    bias = None
    if key_valid is not None:
        bias = torch.zeros(key_valid.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~key_valid.to(q.device), float("-inf"))[:, None, None, :]
    outs, lses = [], []
    for start in range(0, q.shape[2], _TEXT_CHUNK):
        s = torch.matmul(q[:, :, start:start + _TEXT_CHUNK].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def video_attention(q, k, v, plan, *, backend: str, scale: Optional[float], proj=None):
    """Sparse attention among video tokens in raster order.

    Returns ``(o, lse, o_linear, density)``: ``o``/``lse`` of the softmax part, the
    projected linear branch (SLA only, else None) and the visited density
    (float, or a tensor for SLA, never synced here).
    """
    if plan.kind == "sla":
        from ..kernels.sla import sla_attention

        o, lse, o_lin, info = sla_attention(q, k, v, plan.method, proj, scale=scale, backend=backend,
                                            return_parts=True)
        return o, lse, o_lin, info.get("density")
    from ..kernels import block_sparse_attention

    layout = plan.layout.to(q.device)
    if plan.perm is not None:  # tiled order: windows become contiguous blocks
        q, k, v = (plan.perm.permute(x, dim=-2) for x in (q, k, v))
    o, lse = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend=backend)
    if plan.perm is not None:
        o = plan.perm.unpermute(o, dim=-2)
        lse = plan.perm.unpermute(lse, dim=-1)
    return o, lse, None, plan.density


def joint_attention(q, k, v, plan, *, num_video: int, text_first: bool, key_mask: Optional[torch.Tensor],
                    scale: Optional[float], backend: str, dense_sdpa: Callable, proj=None):
    """Joint attention over ``[text, video]`` (``text_first``) or ``[video, text]``.

    Args:
        q, k, v: ``(B, H, S, D)``, ``S = num_video + num_text``.
        key_mask: bool key-padding mask broadcastable to ``(B, 1, 1, S)`` (True = attend) or None.
        dense_sdpa: the original ``scaled_dot_product_attention`` (text queries use it).
        proj: SLA projection of the layer (SLA plans only).
    Returns ``(o (B, H, S, D), density)``.
    """
    s = q.shape[2]
    num_text = s - num_video
    video = slice(num_text, s) if text_first else slice(0, num_video)
    text = slice(0, num_text) if text_first else slice(num_video, s)
    scale_value = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]

    text_valid = None
    if key_mask is not None:
        text_valid = key_mask.reshape(key_mask.shape[0], key_mask.shape[-1])[:, text]

    o_sparse, lse_sparse, o_lin, density = video_attention(qv, kv, vv, plan, backend=backend, scale=scale, proj=proj)
    if num_text > 0:
        from ..kernels import merge_attention

        o_text, lse_text = attend_with_lse(qv, k[:, :, text], v[:, :, text], text_valid, scale_value)
        o_video, _ = merge_attention(o_sparse, lse_sparse, o_text, lse_text)
        # Text queries: dense over every valid key, exactly as the model would.
        o_tq = dense_sdpa(q[:, :, text], k, v, attn_mask=key_mask, scale=scale)
    else:
        o_video, o_tq = o_sparse, q[:, :, :0]
    if o_lin is not None:
        o_video = o_video + o_lin.to(o_video.dtype)
    o_video = o_video.to(q.dtype)
    o = torch.cat([o_tq.to(q.dtype), o_video] if text_first else [o_video, o_tq.to(q.dtype)], dim=2)
    return o, density
