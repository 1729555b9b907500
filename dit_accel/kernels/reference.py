"""Dense fp32 masked attention: the oracle every backend is tested against."""

from __future__ import annotations

import torch

from .checks import check_scale, in_autocast, no_autocast

__all__ = ["dense_attention_reference"]


def dense_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None = None, scale: float | None = None):
    """Plain softmax attention in fp32, restricted to ``mask``.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, H, M, D)``.
        mask: bool ``[N, M]`` or ``[H, N, M]`` (True = allowed), or ``None`` for dense.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``(o, lse)``: o fp32 ``(B, H, N, D)``, lse fp32 ``(B, H, N)`` (natural log).
        A row with no allowed key gives ``o = 0`` and ``lse = -inf``.

    In fp32 inside a ``torch.autocast`` region too. Materialises the ``N x M`` score matrix: for tests and small sizes only.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if not isinstance(t, torch.Tensor) and (name != "mask" or t is not None):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (B, H, N, D) tensors")
    if k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1] or k.shape[:2] != q.shape[:2]:
        # (matmul would broadcast a batch or head of 1: an output of k's batch, or k/v shared by every head)
        raise ValueError(f"k and v must be (B, H, M, D) matching q {tuple(q.shape)}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}. Repeat k/v heads for grouped-query attention")
    # The kernels' rule (a bool, a string, 0, a negative or NaN scale ran here as float() read it).
    scale = check_scale(scale, q.shape[-1])
    if in_autocast(q):  # (the oracle is fp32: inside a region its matmuls ran in bf16, 0.26 off at |s| ~ 9)
        with no_autocast(q.device.type):
            return dense_attention_reference(q, k, v, mask, scale)
    q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (True = allowed); got {mask.dtype}")
        n, m = scores.shape[-2:]
        heads_ok = mask.dim() == 2 or mask.shape[0] in (1, q.shape[1])
        if mask.dim() not in (2, 3) or mask.shape[-2:] != (n, m) or not heads_ok:
            raise ValueError(f"mask must be [N, M] = [{n}, {m}] or [H, N, M] with H in (1, {q.shape[1]}); "
                             f"got {tuple(mask.shape)}")
        if mask.dim() == 3:
            mask = mask[None]
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Empty rows: lse = -inf; subtract 0 instead so exp gives exact zeros, not NaN.
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])
    return torch.matmul(probs, v), lse
