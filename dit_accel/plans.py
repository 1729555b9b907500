"""What one attention call runs for a (method, grid): a :class:`Plan`, and ``Plan.run(q, k, v)``.

A method config turns a token grid into a plan once (``method.plan(grid)``); every
attention call on that grid then runs ``plan.run``. The pipelines' hooks and
``dit-accel bench fidelity`` share this one execution path:

- :class:`DensePlan`: plain attention (``Dense()``, or a pattern that covers the grid;
  ``reason`` says which).
- :class:`LayoutPlan`: a block layout, with tokens permuted to tiled order when the
  pattern needs it; block-sparse kernel; inverse permutation.
- :class:`SLAPlan`: sparse-linear attention (blocks chosen per call from q and k).

``run`` takes SDPA-shaped ``(B, H, S, D)`` tensors. With text tokens in the
sequence (joint attention), video queries attend sparsely to video keys plus
densely to the valid text keys, merged exactly by log-sum-exp, and text queries
attend densely to every valid key (METHODS.md, "Text tokens").
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .kernels import block_sparse_attention, merge_attention, sla_attention
from .kernels.block_sparse.api import layout_on
from .kernels.layout import BlockLayout

__all__ = ["Plan", "DensePlan", "LayoutPlan", "SLAPlan", "attend_with_lse"]

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


class Plan:
    """What a (method, grid) runs. Subclasses implement :meth:`attend` on video tokens.

    Attributes:
        method: the config that made the plan. grid: the token grid.
        density: visited block fraction of video-video attention (None: per call, SLA).
        dense_reason: why the plan is dense attention (None for sparse plans).
    """

    kind = "abstract"

    def __init__(self, method, grid: Tuple[int, ...], *, density: Optional[float] = None,
                 dense_reason: Optional[str] = None, token_density: Optional[float] = None):
        self.method = method
        self.grid = tuple(grid)
        self.density = density
        self.dense_reason = dense_reason
        self.token_density = token_density

    @property
    def is_dense(self) -> bool:
        return self.dense_reason is not None

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def attend(self, q, k, v, *, scale: Optional[float], backend: str, proj=None):
        """Attention among video tokens (raster order): ``(o, lse, o_extra or None, density)``.

        ``o_extra`` is added to the merged output (SLA's projected linear branch);
        ``density`` is a float or a 0-d tensor (never synced here).
        """
        raise NotImplementedError

    def run(self, q, k, v, *, num_text: int = 0, text_first: bool = False, key_mask: Optional[torch.Tensor] = None,
            scale: Optional[float] = None, backend: str = "auto", proj=None,
            sdpa: Callable = F.scaled_dot_product_attention):
        """Attention over ``[text, video]`` (``text_first``), ``[video, text]`` or video alone.

        Args:
            q, k, v: ``(B, H, S, D)`` with ``S = num_tokens + num_text``.
            key_mask: bool key-padding mask broadcastable to ``(B, 1, 1, S)`` (True = attend) or None.
            scale: softmax scale (default ``1/sqrt(D)``). backend: the kernel backend.
            proj: the layer's SLA projection (SLA plans only).
            sdpa: dense attention for text queries (the caller's original SDPA).
        Returns ``(o (B, H, S, D), density)``.
        """
        s = q.shape[2]
        video = slice(num_text, s) if text_first else slice(0, s - num_text)
        text = slice(0, num_text) if text_first else slice(s - num_text, s)
        o_video, lse, extra, density = self.attend(q[:, :, video], k[:, :, video], v[:, :, video], scale=scale,
                                                   backend=backend, proj=proj)
        if num_text == 0:
            return (o_video if extra is None else (o_video + extra.to(o_video.dtype))).to(q.dtype), density
        text_valid = None if key_mask is None else key_mask.reshape(key_mask.shape[0], key_mask.shape[-1])[:, text]
        scale_value = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        o_text, lse_text = attend_with_lse(q[:, :, video], k[:, :, text], v[:, :, text], text_valid, scale_value)
        o_video, _ = merge_attention(o_video, lse, o_text, lse_text)
        if extra is not None:
            o_video = o_video + extra.to(o_video.dtype)
        o_tq = sdpa(q[:, :, text], k, v, attn_mask=key_mask, scale=scale).to(q.dtype)  # text: dense over all keys
        parts = [o_tq, o_video.to(q.dtype)] if text_first else [o_video.to(q.dtype), o_tq]
        return torch.cat(parts, dim=2), density

    def describe(self) -> dict:
        """What the plan runs, for stats and sidecars."""
        out = {"kind": "dense" if self.is_dense else self.kind, "grid": list(self.grid), "density": self.density}
        if self.token_density is not None:
            out["token_density"] = self.token_density
        if self.is_dense:
            out["dense_reason"] = self.dense_reason
        return out

    def __repr__(self) -> str:
        extra = f", dense: {self.dense_reason}" if self.is_dense else f", density={self.density}"
        return f"{type(self).__name__}({self.method!r}, grid={self.grid}{extra})"


class DensePlan(Plan):
    """Dense attention; ``reason`` says why (``"Dense()"``, ``"the window covers the grid"``, ...)."""

    kind = "dense"

    def __init__(self, method, grid, reason: str):
        super().__init__(method, grid, density=1.0, dense_reason=reason, token_density=1.0)

    def attend(self, q, k, v, *, scale, backend, proj=None):
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        o, lse = attend_with_lse(q, k, v, None, scale)
        return o, lse, None, 1.0


class LayoutPlan(Plan):
    """A block layout over the video tokens, in tiled order when ``perm`` is given (raster order otherwise)."""

    kind = "layout"

    def __init__(self, method, grid, layout: BlockLayout, perm=None, *, token_density: Optional[float] = None):
        super().__init__(method, grid, density=layout.density(), token_density=token_density)
        self.layout = layout
        self.perm = perm
        self._layouts: Dict[torch.device, BlockLayout] = {}  # per-device copies, made once

    def layout_on(self, device) -> BlockLayout:
        device = torch.device(device)
        if device not in self._layouts:
            self._layouts[device] = layout_on(self.layout, device)
        return self._layouts[device]

    def attend(self, q, k, v, *, scale, backend, proj=None):
        layout = self.layout_on(q.device)
        if self.perm is not None:  # tiled order: windows become contiguous blocks
            q, k, v = (self.perm.permute(x, dim=-2) for x in (q, k, v))
        o, lse = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend=backend)
        if self.perm is not None:
            o, lse = self.perm.unpermute(o, dim=-2), self.perm.unpermute(lse, dim=-1)
        return o, lse, None, self.density


class SLAPlan(Plan):
    """Sparse-linear attention with ``params`` (:class:`dit_accel.kernels.SLAParams`); blocks chosen per call."""

    kind = "sla"

    def __init__(self, method, grid, params):
        super().__init__(method, grid)
        self.params = params

    def attend(self, q, k, v, *, scale, backend, proj=None):
        o, lse, o_lin, info = sla_attention(q, k, v, self.params, proj, scale=scale, backend=backend,
                                            return_parts=True)
        return o, lse, (o_lin if proj is not None else None), info["density"]
