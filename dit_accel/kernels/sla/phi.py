"""phi, the linear branch's feature map, on an fp32 Triton tile: the device functions every SLA kernel that takes the
features calls (the forward and its global sums, the backward's glue)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["phi_stats", "phi", "phi_tile"]


@triton.jit
def phi_stats(x, ok, feature):
    """Softmax statistics of an fp32 tile over its ``ok`` entries: the row max ``m`` and ``l = sum(exp(x - m))``
    (``m = 0``, ``l = 1`` for the other features and for rows with no ``ok`` entry)."""
    m = tl.max(tl.where(ok, x, float("-inf")), 1)
    m = tl.where((m == float("-inf")) | (feature != 0), 0.0, m)
    l_sum = tl.sum(tl.where(ok, tl.exp(x - m[:, None]), 0.0), 1)
    return m, tl.where((l_sum == 0.0) | (feature != 0), 1.0, l_sum)


@triton.jit
def phi(x, ok, m, l_sum, feature):
    """phi of an fp32 tile on the head dim (``feature``: 0 softmax from :func:`phi_stats`' ``m``, ``l_sum``;
    1 elu + 1; 2 relu), fp32, zero outside ``ok`` (rows past N, padded columns). Branch-free, one exp per
    element (a branch inside a loop of tensor-core products serialises them on sm_90, ptxas C7515), and per
    element the same operations whatever the tile's width: a column chunk gives the whole tile's values."""
    e = tl.exp(tl.where(feature == 0, x - m[:, None], tl.minimum(x, 0.0)))
    f = tl.where(feature == 0, e / l_sum[:, None], tl.where(feature == 1, tl.where(x > 0, x + 1.0, e),
                                                            tl.maximum(x, 0.0)))
    return tl.where(ok, f, 0.0)


@triton.jit
def phi_tile(x, ok, feature):
    """:func:`phi` of a whole-row tile (its own softmax statistics)."""
    m, l_sum = phi_stats(x, ok, feature)
    return phi(x, ok, m, l_sum, feature)
