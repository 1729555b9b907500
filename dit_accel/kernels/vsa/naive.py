"""VSA's PyTorch twin: the exact semantics (METHODS.md, "VSA"), in any float dtype (float64 for checks).

Cubes are the tiles of :class:`~dit_accel.patterns.permutation.PackedTilePermutation` (t-major, then h, then
w; raster order inside a cube): an edge cube's real tokens come first and its padding last (FastVideo's cubes of
variable size), so a partial key cube's validity is a length, the first ``size`` positions. A padded
position is never part of a mean, a softmax or a selection count, so an edge cube holds only its real tokens.

The twin gathers each query cube's selected key cubes (memory ``B*H*Np*k*V``, linear in the selected
count). :mod:`.api` runs the fine branch on the block-sparse backends instead, and the coarse branch through
:func:`coarse_attention` (CPU, autograd) or :mod:`.triton`; the tests check both against a brute force.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ...patterns.permutation import PackedTilePermutation, TilePermutation
from ..request import records_grad

__all__ = ["Cubes", "cubes_of", "cube_sizes", "cube_tile", "MAX_CUBE_TOKENS", "MAX_CUBES", "selected_count", "top_cubes", "coarse_attention", "CubeRows", "cube_rows", "vsa_parts_naive", "fine_gathered",
           "vsa_naive", "VSAParts"]


class Cubes(NamedTuple):
    """The cube partition of a grid: the permutation, cube volume ``V``, cube count and real tokens per cube."""

    perm: TilePermutation
    volume: int
    count: int
    real: torch.Tensor  # bool [count, V]: which tiled positions of each cube are real tokens
    sizes: torch.Tensor  # int64 [count]: real tokens per cube (>= 1)


#: Tokens per cube at most (after :func:`cube_tile`'s clamp): the fine branch's block is one cube and a partial
#: cube's element mask is ``volume x volume``, so a cube past this is refused rather than sized into memory.
MAX_CUBE_TOKENS = 4096

#: Cubes per grid at most: the coarse branch scores every pair of cubes (``C x C`` fp32 per batch and head, 17 GB
#: at this count) and its pool launch puts the cubes on a launch-grid axis that holds at most 65,535 programs.
MAX_CUBES = 65535


def cube_tile(grid: Tuple[int, ...], tile: Tuple[int, ...]) -> Tuple[int, ...]:
    """``tile`` clamped to ``grid`` per dimension: the partial-cube rule already makes a tile longer than the grid
    along a dimension one cube of the grid's extent there (same cubes, same tokens, same results), and the
    clamp keeps every size (padding, cube volume, masks) bounded by the grid, never by the tile. A dimension is
    clamped to the grid's extent rounded up to a power of two, so a power-of-two cube stays one (the block
    sizes the Triton block-sparse kernels take: (2, 4, 8) on a width of 7 keeps its 64-token cubes)."""
    return tuple(min(int(t), 1 << (int(g) - 1).bit_length()) for t, g in zip(tile, grid))


def cubes_of(grid: Tuple[int, ...], tile: Tuple[int, ...]) -> Cubes:
    """The cubes of ``tile`` on ``grid`` (both 3-D, checked by the caller; the tile clamped to the grid,
    :func:`cube_tile`). ValueError when a clamped cube holds more than :data:`MAX_CUBE_TOKENS` tokens or the grid
    takes more than :data:`MAX_CUBES` cubes.

    Kept per (grid, tile): ``vsa_attention`` asks on every call, and building the permutation (a sort of every
    token on the host) and its device copies again each time cost milliseconds per call at Wan's grids."""
    return _cubes(tuple(int(g) for g in grid), tuple(int(t) for t in tile))


@functools.lru_cache(maxsize=32)
def _cubes(grid: Tuple[int, ...], tile: Tuple[int, ...]) -> Cubes:
    clamped = cube_tile(grid, tile)
    if math.prod(clamped) > MAX_CUBE_TOKENS:
        raise ValueError(f"VSA: tile={tuple(tile)} on the video token grid {tuple(grid)} makes cubes of "
                         f"{clamped} = {math.prod(clamped)} tokens, more than {MAX_CUBE_TOKENS} (the fine branch "
                         "runs one cube as one block): use a smaller tile such as (4, 4, 4) (FastVideo's default) or "
                         "(4, 8, 8)")
    count = math.prod(-(-g // t) for g, t in zip(grid, clamped))
    if count > MAX_CUBES:
        hint = math.prod(-(-g // t) for g, t in zip(grid, cube_tile(grid, (4, 4, 4))))
        raise ValueError(f"VSA: tile={tuple(tile)} cuts the video token grid {tuple(grid)} into {count:,} cubes, more "
                         f"than {MAX_CUBES:,} (the coarse branch scores every pair of cubes, {count:,}^2 fp32 = "
                         f"{count * count * 4 / 1e9:,.1f} GB per batch and head): use a larger tile such as (4, 4, 4) "
                         f"(FastVideo's default, {hint:,} cubes here)")
    volume = math.prod(clamped)
    perm = PackedTilePermutation(tuple(grid), clamped, volume)
    real = (perm.order >= 0).view(count, volume)
    return Cubes(perm, volume, count, real, real.sum(-1))


def selected_count(cubes: int, topk: Optional[int], sparsity: Optional[float]) -> int:
    """Key cubes kept per query cube: ``topk``, or ``ceil((1 - sparsity) * cubes)``, clamped to ``[1, cubes]``.

    The one place the count is computed (plans, calibration candidates and costs go through a plan). The
    product is FastVideo's, in the same double precision and without rounding: where ``(1 - s) * C`` lands a
    hair above an integer (s = 0.7 at 1,440 cubes gives 432.00000000000006) FastVideo keeps one cube more,
    and a checkpoint trained under its rule must run the same pattern here."""
    if topk is not None:
        k = int(topk)
    else:
        k = math.ceil((1 - float(sparsity)) * float(cubes))
    return max(1, min(k, cubes))


def top_cubes(scores: torch.Tensor, count: int) -> torch.Tensor:
    """int64 ``(..., count)``: the ``count`` largest ``scores`` per row, listed ascending, an exact tie going to
    the lower index (FastVideo's fused kernel's order, and the Triton launch's, :mod:`.triton`); ``-0.0`` ties
    ``+0.0`` and NaN ranks above every number, as there. ``torch.topk`` breaks ties by no stated rule, so a
    plan could select other cubes on a CPU than on a GPU; a stable descending sort keeps the lower index first."""
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices
    return order[..., :count].sort(dim=-1).values


# (grid, tile, device, dtype, inverse) -> real tokens per cube (or their reciprocals) on that device.
_SIZES: Dict[tuple, torch.Tensor] = {}


def cube_sizes(cubes: Cubes, device, dtype=torch.float32, *, inverse: bool = False) -> torch.Tensor:
    """``cubes.sizes`` (or ``1 / sizes``) in ``dtype`` on ``device``, made once per grid, tile, device and dtype:
    a call copies nothing from the host, so a captured CUDA graph replays it and no call waits on a copy."""
    key = (cubes.perm.grid, cubes.perm.tile, str(torch.device(device)), dtype, inverse)
    found = _SIZES.get(key)
    if found is None:
        sizes = cubes.sizes.to(torch.float64)
        found = _SIZES[key] = (1.0 / sizes if inverse else sizes).to(dtype).to(device)
    return found


def _cube_means(x: torch.Tensor, cubes: Cubes, dtype, first: int = 0) -> torch.Tensor:
    """``(B, H, C', D)`` means over each cube's real tokens of ``x`` in tiled order ``(B, H, C' * V, D)`` (or its
    view ``(B, H, C', V, D)``), which holds the cubes ``first .. first + C' - 1`` (padding holds zeros after the
    permutation, so a sum over the cube is the sum of its real tokens)."""
    x5 = x if x.dim() == 5 else x.unflatten(2, (x.shape[2] // cubes.volume, cubes.volume))
    c = x5.shape[2]
    if records_grad(x5):
        sums = _CubeSums.apply(x5, dtype)
    else:
        sums = x5.sum(3, dtype=dtype)  # (widened as summed: no copy of x in dtype)
    return sums / cube_sizes(cubes, x.device, dtype)[first:first + c, None]


class _CubeSums(torch.autograd.Function):
    """Sums over each cube's tokens of ``x5`` ``(B, H, C', V, D)`` in ``dtype``, whose gradient is the sums' cast to
    x's dtype and *expanded* over the cube, not materialised: where the fine branch's gradient meets it at ``x5``
    (:func:`~.api.vsa_parts` hands both branches views of one ``x5``), autograd adds the two in one pass. Autograd's
    own sum backward widened, expanded and cast it into a token-sized copy first (two passes more per q, k, v)."""

    @staticmethod
    def forward(ctx, x5, dtype):
        ctx.x_dtype, ctx.x_shape = x5.dtype, x5.shape
        return x5.sum(3, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.x_dtype).unsqueeze(3).expand(ctx.x_shape), None


def coarse_attention(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cubes: Cubes, count: int,
                     scale: float, with_output: bool = True, dtype=None, *, first_query: int = 0):
    """The coarse branch on tiled inputs: ``(coarse (B, H, Cq, D) or None, scores (B, H, Cq, C), selection)``.

    Tiled inputs are ``(B, H, C * V, D)``, or ``(B, H, C, V, D)`` views of them. ``k_t`` and ``v_t`` hold every
    cube; ``q_t`` every cube too (``Cq = C``), or the consecutive query cubes
    ``first_query .. first_query + Cq - 1`` (a ring rank's share, :class:`CubeRows`): a query cube's row needs
    only its own mean and every key cube's. Scores are ``mean(q) . mean(k) * scale`` per cube pair;
    ``selection`` int64 ``(B, H, Cq, count)`` holds the ``count`` top-scoring key cubes per query cube, ascending
    (:func:`top_cubes`: exact ties to the lower index). Computed in ``dtype`` (default: fp32, or float64 for float64 inputs),
    differentiable except the selection.
    """
    dtype = dtype or (torch.float64 if q_t.dtype == torch.float64 else torch.float32)
    qc, kc = _cube_means(q_t, cubes, dtype, first_query), _cube_means(k_t, cubes, dtype)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    selection = top_cubes(scores, count)
    coarse = None
    if with_output:
        coarse = torch.matmul(torch.softmax(scores, dim=-1), _cube_means(v_t, cubes, dtype))
    return coarse, scores, selection


class CubeRows(NamedTuple):
    """Raster tokens ``rows = (start, stop)`` that are exactly the real tokens of the consecutive cubes
    ``cubes = (first, stop_cube)`` (a ring rank's share, :func:`cube_rows`), with the index maps between them."""

    rows: Tuple[int, int]
    cubes: Tuple[int, int]
    gather: torch.Tensor  # int64 [cubes * V]: row offset of each tiled position; stop - start for padding
    scatter: torch.Tensor  # int64 [stop - start]: tiled position of each row, counted from the first cube

    def to(self, device) -> "CubeRows":
        return self._replace(gather=self.gather.to(device), scatter=self.scatter.to(device))

    def permute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """The rows ``[..., stop - start, ...]`` -> their cubes in tiled order, padding zero, along ``dim``."""
        zero = x.new_zeros(x.shape[:dim % x.dim()] + (1,) + x.shape[dim % x.dim() + 1:])
        return torch.cat([x, zero], dim).index_select(dim, self.gather)

    def unpermute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of :meth:`permute` (padding dropped)."""
        return x.index_select(dim, self.scatter)


def cube_rows(cubes: Cubes, rows: Tuple[int, int]) -> Optional[CubeRows]:
    """The cubes whose real tokens are exactly the raster tokens ``rows = (start, stop)``, or None when the rows
    cut a cube (or are empty). Whole frames ``f0 .. f1 - 1`` qualify when ``f0`` is a multiple of the tile's
    depth and ``f1`` one too or the last frame; so do whole rows of cubes inside a frame for a tile of depth 1."""
    start, stop = int(rows[0]), int(rows[1])
    perm, vol = cubes.perm, cubes.volume
    if not 0 <= start < stop <= perm.num_tokens:
        return None
    tiled = perm.inverse[start:stop]
    first, last = int(tiled.min()) // vol, int(tiled.max()) // vol + 1
    order = perm.order[first * vol:last * vol]
    # Every row lands in these cubes; they are the rows' own iff every real token in them is one of the rows.
    if not bool(((order < 0) | ((order >= start) & (order < stop))).all()):
        return None
    gather = torch.where(order >= 0, order - start, stop - start)
    return CubeRows((start, stop), (first, last), gather, tiled - first * vol)


class VSAParts(NamedTuple):
    """VSA's parts in raster order: ``fine`` (q's dtype), its fp32/float64 ``lse`` ``(B, H, N)``, ``coarse``
    per token (or None) and the ``selection`` (key cubes per (batch, head, query cube), cube order)."""

    fine: torch.Tensor
    lse: torch.Tensor
    coarse: Optional[torch.Tensor]
    selection: torch.Tensor


def vsa_parts_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int, int], count: int,
                    tile: Tuple[int, int, int], scale: float, with_coarse: bool = True) -> VSAParts:
    """Both branches of VSA on raster-order ``(B, H, N, D)`` inputs (N = prod(grid)), unchecked.

    ``count`` key cubes per query cube (see :func:`selected_count`). The fine branch is exact softmax
    attention of each query over the real tokens of its selected key cubes.
    """
    cubes = cubes_of(grid, tile)
    perm, vol = cubes.perm, cubes.volume
    q_t, k_t, v_t = (perm.permute(x, dim=-2) for x in (q, k, v))
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    coarse, _, sel = coarse_attention(q_t, k_t, v_t, cubes, count, scale, with_coarse, dtype)
    fine, lse = fine_gathered(q_t, k_t, v_t, cubes, sel, scale)
    fine, lse = perm.unpermute(fine, dim=-2), perm.unpermute(lse, dim=-1)
    coarse_tok = None
    if coarse is not None:  # each token gets its own cube's row
        coarse_tok = perm.unpermute(coarse.repeat_interleave(vol, dim=2), dim=-2)
    return VSAParts(fine, lse, coarse_tok, sel)


def fine_gathered(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cubes: Cubes, selection: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fine branch on tiled inputs by gathering each query cube's selected key cubes: ``(fine in q's dtype,
    lse)``, both tiled, computed in fp32 (float64 for float64). ``q_t`` holds ``Cq`` query cubes (every cube, or a
    ring rank's), ``selection`` ``(B, H, Cq, count)``. Tensor operations only, no host read, so a traced call takes
    it (:mod:`.api` runs the block-sparse backends otherwise, whose PyTorch twin reads its block lists)."""
    b, h, n_q, d = q_t.shape
    vol, count = cubes.volume, selection.shape[-1]
    c = n_q // vol
    dtype = torch.float64 if q_t.dtype == torch.float64 else torch.float32
    # Gather the selected key cubes of every query cube: (B, H, Cq, count*V, D).
    kv_index = selection[..., None] * vol + torch.arange(vol, device=q_t.device)  # (B, H, Cq, count, V)
    kv_index = kv_index.reshape(b, h, c * count * vol)
    k_sel = k_t.to(dtype).gather(2, kv_index[..., None].expand(-1, -1, -1, d)).view(b, h, c, count * vol, d)
    v_sel = v_t.to(dtype).gather(2, kv_index[..., None].expand(-1, -1, -1, d)).view(b, h, c, count * vol, d)
    key_real = cubes.real.to(q_t.device).view(-1)[kv_index].view(b, h, c, 1, count * vol)
    s = torch.matmul(q_t.to(dtype).view(b, h, c, vol, d), k_sel.transpose(-1, -2)) * scale
    s = s.masked_fill(~key_real, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # every query cube has >= 1 real key: finite
    fine = torch.matmul(torch.exp(s - lse[..., None]), v_sel)  # (B, H, Cq, V, D)
    return fine.reshape(b, h, n_q, d).to(q_t.dtype), lse.reshape(b, h, n_q)


def vsa_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int, int], count: int,
              tile: Tuple[int, int, int] = (4, 4, 4), gate: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, selection)``: ``out = coarse * gate + fine`` (the fine branch alone without a gate), unchecked.

    Example::

        out, sel = vsa_naive(q, k, v, (5, 6, 7), selected_count(8, None, 0.5), (4, 4, 4))
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    parts = vsa_parts_naive(q, k, v, grid, count, tile, scale, with_coarse=gate is not None)
    out = parts.fine
    if gate is not None:
        out = (out.to(parts.coarse.dtype) + parts.coarse * gate.to(parts.coarse.dtype)).to(q.dtype)
    return out, parts.selection
