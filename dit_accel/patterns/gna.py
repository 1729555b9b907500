"""Generalized neighborhood attention (GNA), NATTEN semantics, as index math.

Everything in :mod:`dit_accel.patterns` that is a window derives from one
function, :func:`_relation_1d`: the allowed relation ``M[L, L]`` of a single
grid dimension (tiny). A token pair is allowed iff it is allowed along every
dimension, so the token mask is the Kronecker product of the per-dimension
relations (raster order ``idx = t*H*W + h*W + w``), and a block layout over
box-shaped blocks is the Kronecker product of per-dimension sub-relations.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

__all__ = ["gna_mask"]

IntOrTuple = Union[int, Sequence[int]]


# ------------------------------------------------------------------ arguments
def _as_grid(grid) -> Tuple[int, ...]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, (tuple, list, torch.Size)) or not 1 <= len(grid) <= 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid):
        raise ValueError(f"grid={grid!r} is invalid: expected 1 to 3 positive ints, (L,), (H, W) or (T, H, W)")
    return tuple(int(v) for v in grid)


def _per_dim(name: str, value, ndim: int, *, minimum: int = 1) -> Tuple[int, ...]:
    """Broadcast an int or validate a per-dimension tuple of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    elif isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) != ndim:
            raise ValueError(f"{name}={tuple(value)!r} has {len(value)} values but the grid has {ndim} "
                             f"dimensions; pass one int or one value per grid dimension")
        value = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name}={value!r} is invalid: expected an int or a tuple of {ndim} ints")
    if any(v < minimum for v in value):
        raise ValueError(f"{name}={value!r} is invalid: every value must be >= {minimum}")
    return value


def _per_dim_bool(name: str, value, ndim: int) -> Tuple[bool, ...]:
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, (tuple, list)) and all(isinstance(v, bool) for v in value):
        if len(value) != ndim:
            raise ValueError(f"{name}={tuple(value)!r} has {len(value)} values but the grid has {ndim} "
                             f"dimensions; pass one bool or one per grid dimension")
        return tuple(value)
    raise TypeError(f"{name}={value!r} is invalid: expected a bool or a tuple of {ndim} bools")


def _gna_args(grid, kernel_size, stride, dilation, is_causal):
    """Validate GNA arguments against the grid; returns per-dimension tuples."""
    grid = _as_grid(grid)
    nd = len(grid)
    ks = _per_dim("kernel_size", kernel_size, nd, minimum=2)
    st = _per_dim("stride", stride, nd, minimum=1)
    dl = _per_dim("dilation", dilation, nd, minimum=1)
    ca = _per_dim_bool("is_causal", is_causal, nd)
    for d in range(nd):
        if st[d] > ks[d]:
            raise ValueError(f"stride={st!r} is invalid: stride must be <= kernel_size={ks!r} "
                             f"(dimension {d}: {st[d]} > {ks[d]})")
        if ks[d] * dl[d] > grid[d]:
            raise ValueError(f"kernel_size*dilation = {ks[d]}*{dl[d]} = {ks[d] * dl[d]} exceeds the grid extent "
                             f"{grid[d]} along dimension {d} of grid={grid}; the limit is kernel_size*dilation <= "
                             f"extent: use a smaller kernel_size or dilation")
    return grid, ks, st, dl, ca


# ----------------------------------------------------------------- the rule
def _window_1d(extent: int, kernel: int, stride: int, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query key window ``[start, end)`` on one undilated dimension (METHODS.md 1-D rule).

    Accepts ``kernel == 1`` and ``kernel <= extent`` (internal callers such as
    sliding-tile windows of one tile); the public API validates ``kernel >= 2``.
    """
    i = torch.arange(extent)
    group = i // stride
    if causal:
        leader = torch.clamp(group * stride + stride - 1, max=extent - 1)
        return torch.clamp(leader - (kernel - 1), min=0), i + 1
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1  # even kernels take one more key on the left
    leader = torch.clamp(group * stride + stride // 2, max=extent - 1)
    centre = torch.clamp(leader, min=left, max=extent - 1 - right)  # pushed inward at borders
    return centre - left, centre + right + 1


def _relation_1d(extent: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False) -> torch.Tensor:
    """Allowed relation of one dimension, bool ``[extent, extent]`` (query, key).

    Dilation splits the dimension into ``dilation`` interleaved groups; queries
    and keys must share a group and the rule applies to coordinates inside it.
    """
    x = torch.arange(extent)
    g, inner = x % dilation, x // dilation
    allowed = torch.zeros(extent, extent, dtype=torch.bool)
    for r in range(dilation):
        members = x[g == r]
        start, end = _window_1d(members.numel(), kernel, stride, causal)
        keys = inner[members]
        allowed[members[:, None], members[None, :]] = (start[:, None] <= keys[None, :]) & (keys[None, :] < end[:, None])
    return allowed


def _kron(relations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token mask ``[N, N]`` (raster order) from per-dimension relations: allowed iff allowed along every dim."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for rel in relations:
        n, m = mask.shape
        mask = (mask[:, None, :, None] & rel[None, :, None, :]).reshape(n * rel.shape[0], m * rel.shape[1])
    return mask


def _gna_relations(grid, kernel_size, stride, dilation, is_causal):
    grid, ks, st, dl, ca = _gna_args(grid, kernel_size, stride, dilation, is_causal)
    return grid, [_relation_1d(grid[d], ks[d], st[d], dl[d], ca[d]) for d in range(len(grid))]


# ------------------------------------------------------------------- public
def gna_mask(grid, kernel_size: IntOrTuple, stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
             is_causal: Union[bool, Sequence[bool]] = False) -> torch.Tensor:
    """Token mask of generalized neighborhood attention (NATTEN semantics).

    Args:
        grid: token grid ``(L,)``, ``(H, W)`` or ``(T, H, W)``; ``N = prod(grid)``.
        kernel_size: window per dimension, ``>= 2`` (int or one per dimension).
        stride: query group size per dimension, ``1 <= stride <= kernel_size``.
        dilation: per dimension, ``>= 1``; ``kernel_size * dilation <= extent``.
        is_causal: bool or one per dimension; a causal dimension never lets a
            query see a key with a larger coordinate.

    Returns:
        bool ``[N, N]`` in raster order (``idx = t*H*W + h*W + w``), True = allowed.
        Every query sees exactly ``prod(kernel_size)`` keys when non-causal.

    Materialises ``N x N``: for inspection and tests. Kernels use
    :func:`dit_accel.patterns.gna_layout`, which never does.

    Example::

        >>> gna_mask((7,), 3)[0].nonzero().flatten().tolist()
        [0, 1, 2]
    """
    _, rels = _gna_relations(grid, kernel_size, stride, dilation, is_causal)
    return _kron(rels)
