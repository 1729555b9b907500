"""Exact log-sum-exp merge of two attention results over disjoint key sets."""

from __future__ import annotations

import torch

__all__ = ["merge_attention"]


def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Combine attention over key set A with attention over a disjoint key set B.

    ``O = (e^{lse_a} O_a + e^{lse_b} O_b) / (e^{lse_a} + e^{lse_b})``, computed stably.

    Args:
        o_a, o_b: ``(B, H, N, D)`` outputs (any float dtype; the result has o_a's dtype, computed in fp32, or
            fp64 for fp64 inputs).
        lse_a, lse_b: ``(B, H, N)`` natural-log sum-exp of each part; ``-inf`` marks
            a row that saw no key in that part (its output is ignored).

    Returns:
        ``(o, lse)`` as if attention had run over the union of both key sets.
        Rows empty on both sides give ``o = 0`` and ``lse = -inf`` (never NaN). A row with a NaN lse on
        either side, or ``+inf`` on both, gives NaN (``o`` and ``lse``); ``+inf`` on one side keeps that side.

    Example::

        o_v, lse_v = block_sparse_attention(q, k_video, v_video, layout, return_lse=True)
        o_t, lse_t = dense_attention_reference(q, k_text, v_text)
        o, lse = merge_attention(o_v, lse_v, o_t, lse_t)
    """
    for name, t in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}. Outputs and lse come from "
                            "block_sparse_attention(..., return_lse=True)")
        if t.device != o_a.device:
            raise ValueError(f"{name} is on {t.device} but o_a is on {o_a.device}; move all four to one device")
    if o_a.shape != o_b.shape:
        raise ValueError(f"o_a and o_b must have the same shape; got {tuple(o_a.shape)} and {tuple(o_b.shape)}")
    if lse_a.shape != o_a.shape[:-1] or lse_b.shape != o_b.shape[:-1]:
        raise ValueError(f"lse_a and lse_b must have shape {tuple(o_a.shape[:-1])} (o without its last dim); "
                         f"got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}")
    # fp32 at least; fp64 kept (a reference computed in fp64 lost its precision here)
    acc = torch.float64 if torch.float64 in (o_a.dtype, lse_a.dtype) else torch.float32
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    # A NaN lse (a NaN query, a diverged layer) or +inf on both sides has no merged value: the row is NaN, as
    # attention over the union gives, not the other side's output or 0. A +inf on one side (its sum overflowed)
    # outweighs any finite one: the limit of the formula, that side alone. Both by where(): no sync, no NaN
    # reaching exp() (whose backward would spread it).
    big_a, big_b = torch.isposinf(lse_a), torch.isposinf(lse_b)
    bad = torch.isnan(lse_a) | torch.isnan(lse_b) | (big_a & big_b)
    big = big_a | big_b
    lse_a = torch.where(bad | big, torch.where(big_a & ~bad, 0.0, float("-inf")), lse_a)
    lse_b = torch.where(bad | big, torch.where(big_b & ~bad, 0.0, float("-inf")), lse_b)
    top = torch.maximum(lse_a, lse_b)
    # Both sides -inf: shift by 0 so the weights are exp(-inf) = 0 rather than NaN.
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    denom = torch.where(total > 0, total, torch.ones_like(total))
    # -inf where both sides are empty; log(denom), not log(total): log(0)'s infinite slope times the zero weights
    # gave lse_a and lse_b a NaN gradient there (a merged lse fed onward: a second merge, a loss).
    lse = torch.where(total > 0, top + torch.log(denom), float("-inf"))
    # A side with weight 0 (lse = -inf) is ignored even if its output holds NaN, as SDPA gives
    # for fully masked rows: its output is zeroed by where() before the product, not after it (after, the
    # product's backward gave that row's lse_a and lse_b the NaN gradient 0 * NaN).
    part_a = torch.where((w_a > 0)[..., None], o_a.to(acc), 0.0) * (w_a / denom)[..., None]
    part_b = torch.where((w_b > 0)[..., None], o_b.to(acc), 0.0) * (w_b / denom)[..., None]
    o = torch.where(bad[..., None], float("nan"), part_a + part_b)
    lse = torch.where(bad, float("nan"), torch.where(big, float("inf"), lse))
    return o.to(o_a.dtype), lse
