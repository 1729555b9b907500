"""Generalized neighborhood attention (GNA), NATTEN semantics (METHODS.md), on the separable machinery.

:func:`check_gna_args` holds the shape-free rules (``dit_accel.GNA`` calls it when
the config is built); :func:`gna_relations` adds the grid rules and gives the
per-dimension relations from which :func:`gna_mask` and :func:`gna_layout` derive.
A kernel size per attention head (``kernel_size=((9, 24, 24), (3, 48, 48))``) gives
a mask per head and a per-head layout (:func:`~.separable.stack_heads`).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..kernels.layout import BlockLayout
from .checks import as_grid, bool_or_tuple, check_mask_memory, int_or_tuple, per_dim, per_dim_bool, per_head
from .permutation import TilePermutation, permutation_for
from .separable import Band, kron, relation_1d, separable_layout, stack_heads

__all__ = ["gna_mask", "gna_layout", "check_gna_args", "gna_relations", "heads_layout", "kernels_at_density",
           "fitted_relations"]

IntOrTuple = Union[int, Sequence[int]]


def check_gna_args(kernel_size, stride=1, dilation=1, is_causal=False, *, owner: str = ""):
    """Shape-free GNA rules; returns the values normalised (ints stay ints, sequences become tuples).

    ``kernel_size >= 2``, ``stride >= 1``, ``dilation >= 1`` per dimension; per-dimension
    tuples of one length; ``stride <= kernel_size`` wherever both are known. ``kernel_size``
    may hold one kernel size per attention head (each checked against the shared stride,
    dilation and causality); it is returned as a tuple of per-head kernel sizes.
    """
    heads = per_head(kernel_size)
    if heads is not None:
        for h, k in enumerate(heads):  # (a head's own per-head sizes passed here, then failed at plan time)
            if per_head(k) is not None:
                raise TypeError(f"{owner}kernel_size[{h}]={k!r} is invalid: a head's kernel size is an int or a "
                                "tuple of ints, one per grid dimension; per-head kernel sizes are one level deep, "
                                "e.g. kernel_size=((9, 24, 24), (3, 48, 48))")
        checked = [check_gna_args(k, stride, dilation, is_causal, owner=owner) for k in heads]
        return (tuple(c[0] for c in checked),) + checked[0][1:]
    values = {"kernel_size": int_or_tuple(owner, "kernel_size", kernel_size, minimum=2),
              "stride": int_or_tuple(owner, "stride", stride, minimum=1),
              "dilation": int_or_tuple(owner, "dilation", dilation, minimum=1),
              "is_causal": bool_or_tuple(owner, "is_causal", is_causal)}
    lengths = {len(v) for v in values.values() if isinstance(v, tuple)}
    if len(lengths) > 1:
        given = {name: v for name, v in values.items() if isinstance(v, tuple)}
        raise ValueError(f"{owner or 'GNA '}per-dimension tuples must all have the same length; got {given}. "
                         "Use ints for settings shared by every dimension.")
    n = lengths.pop() if lengths else 1
    ks = per_dim("kernel_size", values["kernel_size"], n)
    st = per_dim("stride", values["stride"], n)
    if any(s > k for k, s in zip(ks, st)):
        raise ValueError(f"{owner}stride={values['stride']!r} is invalid: stride must be <= "
                         f"kernel_size={values['kernel_size']!r} in every dimension")
    return values["kernel_size"], values["stride"], values["dilation"], values["is_causal"]


def gna_relations(grid, kernel_size, stride=1, dilation=1, is_causal=False, *, compact: bool = False):
    """``(grid, relations)``: GNA arguments (one kernel size) checked against ``grid``, one ``[L, L]``
    relation per dimension; with ``compact``, one :class:`~.separable.Band` per dimension (the rule, for block
    layouts of long extents: a 1-D grid of 100k tokens has a 10 GB relation)."""
    grid = as_grid(grid)
    if per_head(kernel_size) is not None:
        raise ValueError(f"kernel_size={kernel_size!r} holds per-head kernel sizes; gna_relations takes one")
    check_gna_args(kernel_size, stride, dilation, is_causal)
    nd = len(grid)
    ks, st = per_dim("kernel_size", kernel_size, nd, minimum=2), per_dim("stride", stride, nd)
    dl, ca = per_dim("dilation", dilation, nd), per_dim_bool("is_causal", is_causal, nd)
    for d in range(nd):
        if ks[d] * dl[d] > grid[d]:
            # Kernels are >= 2, so an extent-1 dimension (a single latent frame) cannot take one.
            advice = ("GNA needs at least 2 tokens along every dimension: use Tile (window 1 on that dimension) "
                      "or more frames" if grid[d] < 2 else "use a smaller kernel_size or dilation")
            # (fit=True runs such a grid as it is: that dimension attended whole, a single frame included)
            advice += ", or GNA(..., fit=True) to clamp the kernel to the grid"
            raise ValueError(f"kernel_size*dilation = {ks[d]}*{dl[d]} = {ks[d] * dl[d]} exceeds the grid extent "
                             f"{grid[d]} along dimension {d} of grid={grid}; the limit is kernel_size*dilation <= "
                             f"extent: {advice}")
    return grid, [(Band if compact else relation_1d)(grid[d], ks[d], st[d], dl[d], ca[d]) for d in range(nd)]


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
        Every query sees exactly ``prod(kernel_size)`` keys when non-causal. With a
        kernel size per head (a tuple of them), ``[H, N, N]``.

    Materialises ``N x N``: for inspection and tests. Kernels use :func:`gna_layout`, which never does.

    Example::

        >>> gna_mask((7,), 3)[0].nonzero().flatten().tolist()
        [0, 1, 2]
    """
    heads = per_head(kernel_size)
    if heads is not None:
        check_gna_args(kernel_size, stride, dilation, is_causal)  # (each head one kernel size: named if not)
    check_mask_memory("gna_mask", as_grid(grid), "gna_layout", heads=len(heads or ()) or 1, copies=2 if heads else 1)
    if heads is not None:
        return torch.stack([kron(gna_relations(grid, k, stride, dilation, is_causal)[1]) for k in heads])
    return kron(gna_relations(grid, kernel_size, stride, dilation, is_causal)[1])


def gna_layout(grid, kernel_size, stride=1, dilation=1, is_causal=False, *, tile=None, block_q: int = 64,
               block_k: int = 64) -> Tuple[TilePermutation, BlockLayout]:
    """Block layout of :func:`gna_mask` over tiled token order, built without ``N x N``.

    Args:
        grid, kernel_size, stride, dilation, is_causal: as in :func:`gna_mask`.
        tile: token tile of the permutation (int or one per dimension); its volume
            must be a multiple of ``block_q`` and ``block_k`` and every block must
            be a box inside it. ``None`` picks the tile under which the pattern costs least
            (:func:`~dit_accel.patterns.permutation.least_work_tile`).
        block_q, block_k: kernel block sizes.

    Returns:
        ``(perm, layout)``: ``layout.q_len == layout.kv_len == perm.num_padded``.
        Run attention on ``perm.permute(q)``, ``perm.permute(k)``,
        ``perm.permute(v)`` and ``perm.unpermute`` the output. Padded keys are
        never allowed. Blocks are full, skipped, or partial with a deduplicated
        element mask; with stride a multiple of the tile and window starts on
        tile borders there are no partial blocks. Per-head kernel sizes give a
        per-head layout (``layout.num_heads`` = number of kernel sizes).

    Example::

        perm, layout = gna_layout((30, 48, 80), (18, 24, 24), stride=(6, 8, 8), tile=(6, 8, 8), block_q=128)
    """
    heads = per_head(kernel_size)
    if heads is not None:
        check_gna_args(kernel_size, stride, dilation, is_causal)  # (each head one kernel size: named if not)
    kernels = tuple(tuple(k) if isinstance(k, list) else k for k in (heads or (kernel_size,)))
    grid = as_grid(grid)
    # Bands (the rule), not L x L relations: a long 1-D grid's layout is built from index math alone.
    relations = {k: gna_relations(grid, k, stride, dilation, is_causal, compact=True)[1] for k in dict.fromkeys(kernels)}
    if heads is not None:  # (without a tile: the least-padding one)
        return heads_layout(grid, kernels, [relations[k] for k in kernels], tile, block_q=block_q, block_k=block_k)
    perm = permutation_for(grid, tile, block_q, block_k, relations[kernels[0]])  # (without a tile: least work)
    return perm, separable_layout(perm, relations[kernels[0]], block_q, block_k)


def heads_layout(grid, kernels, relations, tile=None, *, block_q: int = 64,
                 block_k: int = 64) -> Tuple[TilePermutation, BlockLayout]:
    """``(perm, per-head layout)`` of per-head relations already built (``relations[h]``: head ``h``'s, one per
    dimension; a ``fit=True`` GNA's clamped kernels), as :func:`gna_layout` lays out per-head kernel sizes. Heads
    of one kernel size (``kernels[h]``) share its layout; ``tile`` None: the least-padding tile."""
    perm = permutation_for(as_grid(grid), tile, block_q, block_k, None)
    layouts = {}
    for kernel, rels in zip(kernels, relations):
        if kernel not in layouts:
            layouts[kernel] = separable_layout(perm, rels, block_q, block_k)
    return perm, stack_heads([layouts[k] for k in kernels])


def kernels_at_density(grid, density: float, visited: Callable[[Tuple[int, ...]], Optional[float]], *,
                       keep: int = 8, rounds: int = 3, close: float = 1.05, reach: float = 1.25) -> Tuple[int, ...]:
    """Stride-1 kernel sizes whose visited density on ``grid`` (``visited(kernel_size)``, a plan's block density;
    None: dense) is nearest ``density``: what :meth:`dit_accel.GNA.at_density` runs.

    Windows are ranked by token density ``prod(k_d / g_d)`` (cube-like first) and the ``keep`` nearest are
    priced by ``visited``. Partial blocks make the visited density exceed the token density (Wan 480p at 0.1:
    0.16), so each further round ranks again for the token density the best one's excess says reaches the
    target, until one lands within ``close`` of it or ``rounds`` end. A later round's window counts only when it
    lands within ``reach`` of the target: where none does (a grid of a few blocks, whose densities are coarse),
    the first round's stays, whose token density is the target's (a later one's can be a thin strip). A target at
    or above what the whole grid's window visits (a causal one's, about half per causal dimension) gets that
    window, the densest there is.
    """
    windows = list(itertools.product(*[range(2, max(g, 2) + 1) for g in grid]))
    whole = windows[-1]
    most = visited(whole) or 1.0
    if most <= density:  # (causal grids: 0.3 asked on (8, 32, 32), whose densest window visits 0.22, ran 0.18)
        return whole

    def ranked(goal: float):
        scored = []
        for ks in windows:
            fr = [math.log(min(k, g) / g) for k, g in zip(ks, grid)]
            spread = sum((f - sum(fr) / len(fr)) ** 2 for f in fr)
            scored.append((abs(sum(fr) - math.log(goal)) + 0.02 * spread, ks))
        scored.sort()
        return [ks for _, ks in scored[:keep]]

    seen, goal, first = {whole: most}, density, None
    for _ in range(rounds):
        for ks in ranked(goal):
            if ks not in seen:
                seen[ks] = visited(ks) or 1.0
        best = min(seen, key=lambda ks: abs(math.log(seen[ks] / density)))
        first = first or best
        if abs(math.log(seen[best] / density)) <= math.log(close):
            break
        goal = min(1.0, goal * density / seen[best])
    return best if abs(math.log(seen[best] / density)) <= math.log(reach) else first


def clamp_to_grid(grid, kernel_size, stride, dilation):
    """GNA's per-dimension ``(kernel_size, stride, dilation)`` with every kernel that reaches past its extent of
    ``grid`` (``kernel x dilation > extent``) set to the whole extent, undilated, its stride at most that: the
    widest window that fits (``GNA(fit=True)``); None where every kernel fits as it is."""
    over = [d for d in range(len(grid)) if kernel_size[d] * dilation[d] > grid[d]]
    if not over:
        return None
    ks, st, dl = list(kernel_size), list(stride), list(dilation)
    for d in over:
        ks[d], dl[d] = grid[d], 1
        st[d] = min(st[d], ks[d])
    return tuple(ks), tuple(st), tuple(dl)


def fitted_relations(grid, kernel_size, stride=1, dilation=1, is_causal=False):
    """``GNA(fit=True)``'s pattern of one kernel size on ``grid``: ``(grid, relations, kernel sizes, dimensions
    clamped)`` with every kernel longer than its extent clamped (:func:`clamp_to_grid`; causality kept), or None
    where every kernel fits as it is."""
    grid = as_grid(grid)
    nd = len(grid)
    ks, st = per_dim("kernel_size", kernel_size, nd, minimum=2), per_dim("stride", stride, nd)
    dl, ca = per_dim("dilation", dilation, nd), per_dim_bool("is_causal", is_causal, nd)
    clamped = clamp_to_grid(grid, ks, st, dl)
    if clamped is None:
        return None
    over = [d for d in range(nd) if clamped[0][d] != ks[d] or clamped[2][d] != dl[d]]
    ks, st, dl = clamped
    # A single latent frame: GNA's kernels are >= 2, so that relation is built here.
    rels = [relation_1d(g, g, 1, 1, False) if g < 2 else gna_relations((g,), k, s, d_, c)[1][0]
            for g, k, s, d_, c in zip(grid, ks, st, dl, ca)]
    return grid, rels, tuple(ks), over
