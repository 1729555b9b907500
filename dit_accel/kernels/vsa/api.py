"""VSA (video sparse attention, FastVideo semantics): the public op ``vsa_attention``.

The coarse branch (cube means, softmax attention between them, top-k key cubes per query cube) is ``C x C``
fp32 work for ``C`` cubes (``N / 64`` at the default tile): on CUDA two Triton launches (:mod:`.triton`,
forward only, under the self-check ``vsa.triton.coarse``), else and under autograd the PyTorch twin (a training
call reading raster order, :mod:`.raster`: the launches' means under autograd); the selection is the same either
way: picked inside the coarse launch or by the twin's ``top_cubes`` (ascending, exact ties to the lower index).
The fine branch is a :class:`~dit_accel.kernels.BlockLayout` whose blocks are the cubes, one layout head
per (batch, head), run by :func:`~dit_accel.kernels.block_sparse_attention` (its backends and their
self-checks): no second block-sparse kernel. A partial edge cube's real tokens come first (packed cube order),
so its padded key positions are the tail of the cube, masked by a column count (a column-prefix mask, the
length of the cube), and never take softmax mass. :mod:`.naive` is the twin the tests check both against.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..._util import is_int, is_number
from ..backends import check_backend_name, runs_twin
from ..block_sparse import block_sparse_attention
from ..checks import check_flag, check_qkv, check_scale, sdpa_autocast
from ..request import BackendUnavailable, in_functorch, kernel_backward, lasting_caches, records_grad, tracing
from ..layout import BlockLayout
from . import fine as fine_path
from . import raster
from .layouts import cube_masks as _cube_masks
from .layouts import layout_of_rows as _layout_of_rows
from .layouts import on_whole_grid, token_views
from .layouts import vsa_layout
from .naive import CubeRows, Cubes, coarse_attention, cubes_of, fine_gathered, selected_count

__all__ = ["vsa_attention", "vsa_parts", "vsa_parts_rows", "check_vsa_config", "check_vsa_grid", "vsa_layout",
           "VSAResult", "gated_coarse", "DEFAULT_TILE"]

DEFAULT_TILE = (4, 4, 4)


def _as_ints(x):
    """A 1-D integer numpy array or tensor as a list (``np.array(latents.shape[2:]) // patch``): one was told it
    was not "positive ints"; anything else unchanged."""
    if isinstance(x, torch.Tensor):
        ints = not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    else:
        ints = isinstance(x, np.ndarray) and x.dtype.kind in "iu"
    return x.tolist() if ints and x.ndim == 1 else x


def check_vsa_config(topk, sparsity, tile, *, owner: str = "") -> Tuple[Optional[int], Optional[float],
                                                                       Tuple[int, int, int]]:
    """Shape-free rules: exactly one of ``topk`` (an int >= 1) and ``sparsity`` (a number in [0, 1)), and
    ``tile`` three positive ints (an int means a cube). Returns them normalised."""
    if (topk is None) == (sparsity is None):
        raise ValueError(f"{owner}topk={topk!r}, sparsity={sparsity!r}: give exactly one of them, topk (key cubes "
                         "kept per query cube, an int >= 1) or sparsity (the fraction of key cubes skipped, in "
                         "[0, 1), e.g. 0.9)")
    if topk is not None and (not is_int(topk) or int(topk) < 1):
        raise ValueError(f"{owner}topk={topk!r} is invalid: expected an int >= 1 (key cubes kept per query cube)")
    if sparsity is not None:
        if not is_number(sparsity) or not math.isfinite(sparsity) or not 0.0 <= float(sparsity) < 1.0:  # (numpy too)
            raise ValueError(f"{owner}sparsity={sparsity!r} is invalid: expected a number in [0, 1) (the fraction "
                             "of key cubes skipped; 1 would keep none, and at least one is always kept)")
        sparsity = float(sparsity)
    tile = _as_ints(tile)
    if is_int(tile):
        tile = (int(tile),) * 3
    if not isinstance(tile, (tuple, list)) or len(tile) != 3 or not all(is_int(t) and int(t) >= 1 for t in tile):
        raise ValueError(f"{owner}tile={tile!r} is invalid: expected three positive ints (T, H, W) such as "
                         "(4, 4, 4) (FastVideo's default) or (4, 8, 8)")
    return (None if topk is None else int(topk)), sparsity, tuple(int(t) for t in tile)


def check_vsa_grid(grid, *, owner: str = "") -> Tuple[int, int, int]:
    """A video token grid ``(T, H, W)`` of positive ints (a grid smaller than the tile is fine: one cube)."""
    if isinstance(grid, torch.Size):
        grid = tuple(grid)
    grid = _as_ints(grid)
    if not isinstance(grid, (tuple, list)) or not all(is_int(g) and int(g) >= 1 for g in grid):
        raise ValueError(f"{owner}grid={grid!r} is invalid: expected the video token grid (T, H, W) of positive ints")
    if len(grid) != 3:
        raise ValueError(f"{owner}grid={tuple(grid)} is invalid: VSA cuts a video token grid (T, H, W) into cubes; "
                         "for an image grid (H, W) pass (1, H, W) with a tile such as (1, 8, 8), or use Tile/GNA")
    return tuple(int(g) for g in grid)


class VSAResult(NamedTuple):
    """:func:`vsa_parts`: ``fine`` (q's dtype) and its fp32 ``lse`` ``(B, H, N)`` in raster order, the ``coarse``
    output per query cube (fp32 ``(B, H, Cq, D)``, None unless asked; :meth:`gated` spreads it over the rows), the
    ``selection`` int64 ``(B, H, Cq, k)`` of key cubes per query cube (cube order), ``density``, the fraction of
    cube pairs the fine branch visits (``k / C``), and the ``cubes`` and row ``order`` the parts were cut by.
    Asked with ``tiled_fine`` on a grid of whole cubes, ``fine`` is the tiled output viewed in raster order,
    ``(B, H, T/t, t, H/h, h, W/w, w, D)`` (:func:`_raster_nested`): for :meth:`gated` with ``add_fine`` only.
    ``summed``: ``fine`` is already ``fine + coarse * gate`` of the gate given to :func:`vsa_parts` (the fine launch
    added it, :func:`.raster.raster_forward`), ``coarse`` None: for :meth:`gated` with ``add_fine`` only."""

    fine: torch.Tensor
    lse: torch.Tensor
    coarse: Optional[torch.Tensor]
    selection: torch.Tensor
    density: float
    cubes: Cubes
    order: object  # the grid's permutation, or a ring rank's CubeRows
    summed: bool = False

    def gated(self, gate: torch.Tensor, dtype: torch.dtype, *, add_fine: bool = False) -> torch.Tensor:
        """``coarse * gate`` per raster row (each row takes its cube's coarse row), plus ``fine`` with ``add_fine``:
        computed in fp32 and rounded once to ``dtype``, without a token-sized fp32 tensor where the grid's
        dimensions divide by the cube's (the cube rows broadcast over a view of the tokens)."""
        if self.summed:  # (the fine launch wrote the sum of the gate it was given, in q's dtype)
            if not add_fine or dtype != self.fine.dtype:
                raise ValueError("these parts hold the gated sum already: ask gated(gate, fine's dtype, add_fine=True)")
            return self.fine
        return gated_coarse(self.coarse, gate, self.cubes, self.order, dtype, self.fine if add_fine else None)


def _fused_coarse(q_t, k_t, v_t, with_coarse: bool, backend: str) -> bool:
    """Whether the coarse branch runs the Triton launches (:mod:`.triton`): on CUDA for ``auto``, wherever Triton
    runs for a forced ``triton`` (the interpreter included), and only when no gradient flows through the coarse
    output (the launches are forward only) and the variant passed its self-check."""
    from ..backends import forced_backend, triton_reason

    forced = forced_backend(backend) or "auto"
    device = q_t.device
    if forced not in ("auto", "triton") or (forced == "auto" and device.type != "cuda"):
        return False
    if with_coarse and records_grad(q_t, k_t, v_t):
        return False
    if triton_reason(device) is not None or tracing():
        return False
    from .. import selfcheck
    from .selfchecks import VARIANT

    shape = {"head_dim": q_t.shape[-1], "block_q": 64, "block_k": 64}
    return selfcheck.gate([VARIANT], device, q_t.dtype, shape, forced=forced == "triton")


@lasting_caches
@sdpa_autocast  # (the plans' entry: VSA's own math outside a caller's autocast region, as vsa_attention's)
def vsa_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int, int], count: int,
              tile: Tuple[int, int, int], scale: float, *, with_coarse: bool = True,
              backend: str = "auto", cubes: Optional[Cubes] = None, tiled_fine: bool = False,
              gate: Optional[torch.Tensor] = None) -> VSAResult:
    """VSA's branches for checked inputs (raster order, ``count`` key cubes per query cube): the plans call
    this on every layer call (with their ``cubes``, built once); :func:`vsa_attention` is the checked
    public entry point. ``tiled_fine``: the caller reads ``fine`` only through :meth:`VSAResult.gated` with
    ``add_fine``, so on a grid of whole cubes it is left in tiled order (see :class:`VSAResult`). An eager call
    may read q, k and v in raster order instead of copying them into cube order (:mod:`.raster`: at inference the
    same parts, bit for bit; a training call's within rounding, its backward reading raster order too). ``gate``
    (with ``with_coarse``): the gate of the caller's ``gated(gate, q's dtype, add_fine=True)``, which such an
    inference call may add in the fine launch where its variant passed the self-check (``summed``)."""
    cubes = cubes_of(grid, tile) if cubes is None else cubes
    if _reads_raster(q, k, v, cubes, count, scale, with_coarse, backend, tiled_fine):
        if records_grad(q, k, v):
            coarse, selection, fine, lse = raster.raster_train(q, k, v, cubes, count, scale, with_coarse)
        else:
            gate = gate if with_coarse and _fused_gate(gate, q) else None
            coarse, selection, fine, lse = raster.raster_forward(q, k, v, cubes, count, scale, with_coarse, gate)
        return VSAResult(fine, lse, coarse, selection, count / cubes.count, cubes, cubes.perm,
                         summed=gate is not None and coarse is None)
    return _cube_order(q, k, v, cubes, count, scale, with_coarse, backend, tiled_fine)


def _fused_gate(gate: Optional[torch.Tensor], q: torch.Tensor) -> bool:
    """Whether an inference call's fine launch may add ``gate``'s term (:func:`.raster.raster_forward`): a plain
    gate like q (its dtype, last dim contiguous), nothing recording its gradient, a head dim the kernel does not
    pad (64, 128, 256), where the variant passed its self-check (:func:`.gated.gated_kernel_runs`)."""
    from ..block_sparse.configs import unpadded

    if gate is None or gate.shape != q.shape or gate.dtype != q.dtype or gate.stride(-1) != 1 or records_grad(gate) \
            or not unpadded(q.shape[-1]):
        return False
    from .gated import FWD_VARIANT, gated_kernel_runs

    return gated_kernel_runs(gate, FWD_VARIANT)


def _cube_order(q, k, v, cubes: Cubes, count: int, scale: float, with_coarse: bool, backend: str,
                tiled_fine: bool) -> VSAResult:
    """:func:`vsa_parts` through copies of q, k, v in cube order."""
    perm = cubes.perm
    cut = tuple(_by_cube(perm.permute(x, dim=-2), cubes) for x in (q, k, v))
    q_t, k_t, v_t = (x.flatten(2, 3) for x in cut)
    if _fused_coarse(q_t, k_t, v_t, with_coarse, backend):
        from .triton import coarse_triton

        coarse, _, selection = coarse_triton(q_t, k_t, v_t, cubes, count, scale, with_coarse)
    else:
        coarse, _, selection = coarse_attention(*cut, cubes, count, scale, with_coarse)
    return _fine_branch(q_t, k_t, v_t, cubes, perm, coarse, selection, scale, backend, tiled_fine)


#: Class key (:func:`_raster_key`) -> whether its calls read raster order (:mod:`.raster`).
_RASTER_CHOICES: Dict[tuple, bool] = {}
_RASTER_CHOICES_MAX = 64


def _raster_key(q, k, v, cubes: Cubes, count: int, with_coarse: bool, backend: str, forced) -> tuple:
    from .. import autotune
    from ..request import env_value

    return (cubes.perm.grid, cubes.perm.tile, count, with_coarse, backend, forced, env_value(), autotune.enabled(),
            records_grad(q, k, v), q.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device)


def _reads_raster(q, k, v, cubes: Cubes, count: int, scale: float, with_coarse: bool, backend: str,
                  tiled_fine: bool) -> bool:
    """Whether this call of :func:`vsa_parts` on raster ``q``, ``k``, ``v`` takes :func:`.raster.raster_forward`
    (the rule in :mod:`.raster`'s docstring), decided by the class's first eager call."""
    from ..block_sparse.gather import gather_fits, gather_forced, kept_choice, raster_allowed
    from ..limits import grid_fits

    forced = gather_forced()
    # (the raster launches put B*H on the grid's second axis: past its limit the cube-order path splits them)
    if not raster_allowed(q, forced) or k.shape != q.shape or v.shape != q.shape or not grid_fits(q) \
            or not gather_fits(*raster.launched(q, k, v)):
        return False
    key = _raster_key(q, k, v, cubes, count, with_coarse, backend, forced)
    return kept_choice(_RASTER_CHOICES, key, lambda: _raster_decision(
        q, k, v, cubes, count, scale, with_coarse, backend, forced, tiled_fine), _RASTER_CHOICES_MAX)


def _raster_decision(q, k, v, cubes: Cubes, count: int, scale: float, with_coarse: bool, backend: str, forced,
                     tiled_fine: bool) -> bool:
    """The class's first eager call: the cube-order path runs once (deciding the fine branch's backend), then the
    raster path is taken where both branches run Triton, the gathered forward (for a training call, its backward
    too) passed its self-check, and it timed faster (a training call: forward and backward, on detached copies;
    ``forced``: without timing)."""
    from ..block_sparse.gather import gather_runs, raster_faster

    b, h, n, d = q.shape
    grad = records_grad(q, k, v)
    # (the launches pool and select on a training call too: its gradient takes the means, :mod:`.raster`)
    if not _fused_coarse(q, k, v, with_coarse and not grad, backend):
        return False
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]

    def run(gather: bool):
        if gather:
            coarse, _, fine_out, _ = (raster.raster_train if grad else raster.raster_forward)(
                *leaves, cubes, count, scale, with_coarse)
        else:
            parts = _cube_order(*leaves, cubes, count, scale, with_coarse, backend, tiled_fine)
            coarse, fine_out = parts.coarse, parts.fine
        if grad:  # (a gated call's output is made of both)
            outs = [x for x in (coarse, fine_out) if x is not None]
            torch.autograd.grad(outs, leaves, [torch.ones_like(x) for x in outs], allow_unused=True)

    run(False)
    fine = backend if backend != "auto" else chosen_fine_backend(
        cubes.perm.grid, (1, b * h, cubes.perm.num_padded, d), grad, q.dtype)
    vol = cubes.volume
    if fine != "triton" or not gather_runs(q.device, q.dtype, d, vol, vol, forced, grad):
        return False
    return bool(forced) or raster_faster(raster.TRAIN_FAMILY if grad else raster.FAMILY, q, vol, vol,
                                         count / cubes.count, run)


def _by_cube(x_t: torch.Tensor, cubes: Cubes) -> torch.Tensor:
    """Tiled ``(B, H, C * V, D)`` viewed as ``(B, H, C, V, D)``: both branches take views of this one tensor, so a
    training call's gradients from the coarse branch's cube sums (expanded over each cube) and from the fine branch
    meet there, added in one pass (:class:`~.naive._CubeSums`)."""
    return x_t.unflatten(2, (x_t.shape[2] // cubes.volume, cubes.volume))


#: The fine branch's shape class (the grid's cubes, the selection's shape, the inputs' shapes, dtype, device, whether
#: autograd records, the backend asked for and the environment's overrides) -> the backend ``auto`` chose for its
#: first layout. Each call builds a new layout from its selection; deciding again per layout (the layout's density
#: read back, the cost model, the tuner) cost about 10 ms of host time per call on an H200 (``bench gpu``,
#: 2026-11-27), longer than the fine launch itself. A later call of the class runs that backend by name: no host
#: sync, and a CUDA-graph capture runs what the eager calls ran.
_FINE_BACKENDS: Dict[tuple, str] = {}
_FINE_BACKENDS_MAX = 64


def _fine_backend(q, k, v, layout: BlockLayout, backend: str, cubes: Cubes) -> str:
    """The backend the fine branch's call runs: ``backend`` itself unless it is ``auto`` on CUDA (eager or
    captured, not traced), where the class's first eager call decides (:data:`_FINE_BACKENDS`)."""
    known = _known_backend(q, k, v, backend, cubes, layout.kv_indices.shape)
    return known if known is not None else _decided_backend(q, k, v, layout, backend, cubes)


def _known_backend(q, k, v, backend: str, cubes: Cubes, rows_shape) -> Optional[str]:
    """:func:`_fine_backend` without the layout: None where ``auto`` has not decided for the class yet."""
    if backend != "auto" or q.device.type != "cuda" or tracing():
        return backend
    return _FINE_BACKENDS.get(_fine_key(q, k, v, cubes, rows_shape))


def _decided_backend(q, k, v, layout: BlockLayout, backend: str, cubes: Cubes) -> str:
    """``auto``'s choice for the class of a fine branch on CUDA that has none yet, decided on ``layout`` by its first
    eager call and kept (``backend`` itself inside a capture, or where dense attention was modelled faster)."""
    from ..block_sparse.api import DENSE, block_sparse_backend
    from ..request import in_graph

    if in_graph():
        return backend
    name = block_sparse_backend(q, k, v, layout, backend, return_lse=True)
    if name == DENSE:  # (modelled slower than dense for this layout: the next layout may differ)
        return backend
    if len(_FINE_BACKENDS) >= _FINE_BACKENDS_MAX:
        _FINE_BACKENDS.clear()
    _FINE_BACKENDS[_fine_key(q, k, v, cubes, layout.kv_indices.shape)] = name
    return name


def _fine_key(q, k, v, cubes: Cubes, rows_shape) -> tuple:
    """:data:`_FINE_BACKENDS`' key of a fine branch on folded q, k, v over key cube rows of ``rows_shape``."""
    from .. import autotune
    from ..request import env_value

    return (cubes.perm.grid, cubes.perm.tile, tuple(rows_shape), tuple(q.shape), tuple(k.shape), q.dtype, q.device,
            records_grad(q, k, v), env_value(), autotune.enabled())


def chosen_fine_backend(grid, q_shape, grad: bool, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """The backend ``auto`` last chose (:data:`_FINE_BACKENDS`) for fine branches on ``grid`` whose folded queries
    are ``q_shape`` ``(1, B * H, padded tokens, D)`` (of ``dtype``, or any), with or without a gradient; None where
    none was chosen."""
    found = [name for key, name in _FINE_BACKENDS.items()
             if key[0] == tuple(grid) and key[3] == tuple(q_shape) and key[7] == grad and dtype in (None, key[5])]
    return found[-1] if found else None


def _row_cubes(order, volume: int, device) -> torch.Tensor:
    """The cube of each raster row that ``order`` returns (the grid's permutation, or a share's
    :class:`~.naive.CubeRows`, whose cubes count from its first), as an index on ``device``."""
    tiled = order.scatter if isinstance(order, CubeRows) else order._indices(device)[1]
    return torch.div(tiled, volume, rounding_mode="floor")


def _fine_branch(q_t, k_t, v_t, cubes: Cubes, order, coarse, selection, scale: float, backend: str,
                 tiled_fine: bool = False) -> VSAResult:
    """The fine branch of the selected cubes on tiled ``q_t`` (every query cube, or a ring rank's) against every
    key cube, and every part back in raster order through ``order`` (the grid's permutation, or the share's
    :class:`~.naive.CubeRows`); with ``tiled_fine`` on a grid of whole cubes, ``fine`` as :func:`_raster_nested`'s
    view instead."""
    b, h, n_q, d = q_t.shape
    if tracing() and runs_twin(backend, q_t.device):
        # The twin reads its block lists on the host, which a trace cannot: the gathered form, tensor ops only.
        fine, lse = fine_gathered(q_t, k_t, v_t, cubes, selection, scale)
    else:
        n_k = k_t.shape[2]
        # batch folded into heads: one layout head per (batch, head)
        q_f, k_f, v_f = q_t.reshape(1, b * h, n_q, d), k_t.reshape(1, b * h, n_k, d), v_t.reshape(1, b * h, n_k, d)
        rows = selection.reshape(b * h, *selection.shape[2:])
        name = _known_backend(q_f, k_f, v_f, backend, cubes, rows.shape)
        ran = fine_path.fine_rows(q_f, k_f, v_f, cubes, rows, scale) if name == "triton" else None  # (no layout)
        if ran is None:
            layout = _layout_of_rows(cubes, selection)  # (the coarse branch's rows are ascending)
            name = name if name is not None else _decided_backend(q_f, k_f, v_f, layout, backend, cubes)
            ran = block_sparse_attention(q_f, k_f, v_f, layout, scale=scale, return_lse=True, backend=name)
            if name == "triton":
                fine_path.remember(q_f, k_f, v_f, cubes, rows, layout, _cube_masks(cubes, q_f.device)[0])
        fine, lse = ran
    nested = _raster_nested(fine.view(b, h, n_q, d), cubes) if tiled_fine and order is cubes.perm else None
    fine = nested if nested is not None else order.unpermute(fine.view(b, h, n_q, d), dim=-2)
    lse = order.unpermute(lse.view(b, h, n_q), dim=-1)
    return VSAResult(fine, lse, coarse, selection, selection.shape[-1] / cubes.count, cubes, order)


def _raster_nested(fine_t: torch.Tensor, cubes: Cubes) -> Optional[torch.Tensor]:
    """Tiled ``(B, H, N, D)`` on a grid of whole cubes (every dimension a multiple of the cube's) as a view in raster
    order with each grid dimension split into (cubes, extent): ``(B, H, T/t, t, H/h, h, W/w, w, D)``, what
    :func:`gated_coarse` reads raster rows through, so the way back to raster order is no pass of its own. None
    where a dimension does not divide (tiled order then holds padding)."""
    perm = cubes.perm
    if perm.num_padded != perm.num_tokens:
        return None
    b, h, _, d = fine_t.shape
    return fine_t.view(b, h, *perm.num_tiles, *perm.tile, d).permute(0, 1, 2, 5, 3, 6, 4, 7, 8)


def gated_coarse(coarse: torch.Tensor, gate: torch.Tensor, cubes: Cubes, order, dtype: torch.dtype,
                 fine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``coarse[cube of r] * gate[r] (+ fine[r])`` for every raster row ``r`` of ``gate`` ``(B, H, N, D)`` (``order``
    says which rows: the grid's permutation, or a ring rank's :class:`~.naive.CubeRows`), from ``coarse`` per query
    cube ``(B, H, Cq, D)``: in fp32, rounded once to ``dtype``, laid out like ``gate`` (or ``fine``).

    On the whole grid the token axis is viewed as the grid, each dimension that the cube's extent divides split
    into (cubes, extent), so the cube rows broadcast over their tokens; only a dimension that does not divide
    gathers the cube rows to token resolution along it (Wan 480p's (21, 30, 52) at (4, 4, 4): a fp32 tensor a
    quarter of the tokens' size; FastWan's (16, 28, 52): none). The result is written straight in ``dtype``, one
    pass over gate and fine, with or without autograd (:class:`_Gated`)."""
    n = gate.shape[2]
    whole = on_whole_grid(coarse, cubes, order)
    grad = records_grad(*(x for x in (coarse, gate, fine) if x is not None))
    if grad and whole and (fine is None or fine.dim() == 4):
        from .gated import gated_kernel_runs

        if gated_kernel_runs(gate):  # (the whole grid in raster order: the backward in one launch, .gated)
            return _GatedCubes.apply(coarse, gate, fine, cubes, dtype)  # (it makes the token views itself)
    if not whole:  # a ring rank's rows: each row gathers its cube's row (fp32, token-sized)
        c, tokens = coarse.index_select(2, _row_cubes(order, cubes.volume, coarse.device)), (n,)
    else:
        c, tokens = token_views(coarse, cubes, order)
    if grad:
        return _Gated.apply(c, gate, fine, tokens, dtype)
    return _gated(c, gate, fine, tokens, dtype)


def _gated(c, gate, fine, tokens, dtype) -> torch.Tensor:
    out = torch.empty_like(gate if fine is None or fine.dim() > 4 else fine, dtype=dtype)
    if fine is None:
        torch.mul(c, gate.unflatten(2, tokens), out=out.unflatten(2, tokens))
    else:
        torch.addcmul(_nested(fine, tokens), c, gate.unflatten(2, tokens), out=out.unflatten(2, tokens))
    return out


def _nested(x: torch.Tensor, tokens) -> torch.Tensor:
    """``(B, H, N, D)`` rows split as ``tokens``; a :func:`_raster_nested` view (split already) as it is."""
    return x if x.dim() > 4 else x.unflatten(2, tokens)


class _Gated(torch.autograd.Function):
    """:func:`gated_coarse` under autograd: the forward written in ``dtype`` in one pass, as without autograd; the
    backward gives the fine output the incoming gradient itself (its dtype's: the fp32 sum's gradient rounded back
    is the same values), the gate ``grad * c`` written in its dtype in one pass, and the cube rows the sum of
    ``grad * gate`` over each cube's tokens in fp32. Autograd's own formulas widened the gradient, multiplied it by
    1 and cast each result back: about three times the traffic."""

    @staticmethod
    def forward(ctx, c, gate, fine, tokens, dtype):
        ctx.tokens, ctx.fine_dim = tokens, None if fine is None else fine.dim()
        ctx.save_for_backward(c, gate)
        return _gated(c, gate, fine, tokens, dtype)

    @staticmethod
    @kernel_backward("VSA's gated coarse branch")
    def backward(ctx, grad):
        c, gate = ctx.saved_tensors
        tokens = ctx.tokens
        g = grad.unflatten(2, tokens)
        d_c = d_gate = d_fine = None
        if ctx.needs_input_grad[0]:  # (0 + grad * gate with a fp32 zero: the product in fp32, no widened copy first)
            zero = c.new_zeros((1,) * c.dim())
            d_c = torch.addcmul(zero, g, gate.unflatten(2, tokens)).sum_to_size(c.shape)
        if ctx.needs_input_grad[1]:
            d_gate = torch.empty_like(gate)
            torch.mul(g, c, out=d_gate.unflatten(2, tokens))
        if ctx.fine_dim is not None and ctx.needs_input_grad[2]:
            d_fine = grad if ctx.fine_dim == 4 else g  # (a nested fine view takes the gradient split like it)
        return d_c, d_gate, d_fine, None, None


class _GatedCubes(torch.autograd.Function):
    """:func:`gated_coarse` under autograd on the whole grid, fine (if any) in raster order: the forward as
    :class:`_Gated`'s, on the cube rows' token views made inside it; the backward in one launch
    (:func:`.gated.gated_backward`: the gate's and the cube rows' gradients), the fine output taking the incoming
    gradient itself."""

    @staticmethod
    def forward(ctx, coarse, gate, fine, cubes, dtype):
        ctx.cubes, ctx.with_fine = cubes, fine is not None
        ctx.save_for_backward(coarse, gate)
        c, tokens = token_views(coarse, cubes, cubes.perm)
        return _gated(c, gate, fine, tokens, dtype)

    @staticmethod
    @kernel_backward("VSA's gated coarse branch")
    def backward(ctx, grad):
        from .gated import gated_backward

        coarse, gate = ctx.saved_tensors
        need_c, need_gate, need_fine = ctx.needs_input_grad[:3]
        d_gate = d_c = None
        if need_c or need_gate:
            d_gate, d_c = gated_backward(grad, gate, coarse, ctx.cubes, with_dgate=need_gate, with_dc=need_c)
            d_c = None if d_c is None else d_c.to(coarse.dtype)  # (fp32 sums: the twin's coarse rows are fp32)
        return d_c, d_gate, (grad if ctx.with_fine and need_fine else None), None, None


@lasting_caches
@sdpa_autocast  # SDPA's casts, then VSA's own math outside the region
def vsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, *, topk: Optional[int] = None,
                  sparsity: Optional[float] = None, tile=DEFAULT_TILE, gate: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None, backend: str = "auto", return_selection: bool = False):
    """Video sparse attention (FastVideo's VSA): ``out = coarse * gate + fine`` (METHODS.md, "VSA").

    The token grid ``(T, H, W)`` is cut into cubes of ``tile`` tokens (t-major, then h, then w; edge cubes
    are partial and hold only their real tokens). *Coarse*: softmax attention between the cube means of
    q, k and v (scale ``scale``), each token taking its cube's row. *Selection*: per (batch, head, query
    cube), the top-k key cubes by coarse score (an exact tie to the lower cube index, as FastVideo's kernel).
    *Fine*: exact softmax attention of each query over the real tokens of its selected key cubes. Gradients
    flow through both branches and the gate, not through the selection.

    Args:
        q, k, v: ``(B, H, N, D)`` in raster token order (``idx = t*H*W + h*W + w``), ``N = T*H*W``; float16,
            bfloat16 or float32, one device.
        grid: the video token grid ``(T, H, W)``.
        topk: key cubes kept per query cube (an int >= 1, clamped to the cube count). Or
        sparsity: fraction of key cubes skipped, in [0, 1): ``k = ceil((1 - sparsity) * cubes)``, at least 1.
            Give exactly one of ``topk`` and ``sparsity``.
        tile: cube shape, three positive ints: ``(4, 4, 4)`` (64 tokens, FastVideo's default) or ``(4, 8, 8)``.
        gate: ``(B, H, N, D)`` like q (the checkpoint's ``to_gate_compress`` projection of the hidden states), or
            None: a zero gate, so the output is the fine branch alone (the training-free default). FastVideo's
            raw op without a gate computes ``coarse + fine``: pass ``torch.ones_like(q)`` for that.
        scale: softmax scale of both branches, default ``1/sqrt(D)``.
        backend: the fine branch's block-sparse backend (``"auto"``, ``"torch"``, ``"triton"``, ``"flex"``, ...).
        return_selection: also return the selection, int64 ``(B, H, C, k)`` key cube indices per query cube,
            ascending; equal fp32 scores go to the lower index on every device and backend (all-zero keys, say).
            Means equal only in exact arithmetic (constant tokens over cubes of other sizes) can round apart, and
            the Triton coarse launch sums in another order than the twin, so such a tie may pick other cubes there.

    Returns:
        ``out`` ``(B, H, N, D)`` in q's dtype (inside ``torch.autocast``: q, k, v cast as SDPA's are, ``out`` in the
        region's dtype) (and the selection with ``return_selection=True``); on meta tensors
        (shape inference) meta tensors of these shapes, nothing computed.

    Example::

        >>> q, k, v = (torch.randn(1, 2, 5 * 6 * 7, 64) for _ in range(3))
        >>> out = dit_accel.vsa_attention(q, k, v, (5, 6, 7), sparsity=0.75)   # 8 cubes, 2 kept per query cube
    """
    topk, sparsity, tile = check_vsa_config(topk, sparsity, tile)
    grid = check_vsa_grid(grid)
    check_qkv(q, k, v)
    check_flag("return_selection", return_selection)
    if in_functorch():  # (else torch's "must override the setup_context staticmethod", or a storage or scatter error)
        raise BackendUnavailable(
            "vsa_attention cannot run under torch.func transforms (grad, vmap, jacrev), on any backend: its branches "
            "are autograd.Functions and kernels that take plain tensors; take the gradient with torch.autograd.grad "
            "and batch along q's batch dim instead of vmap")
    n = math.prod(grid)
    if q.shape[2] != n or k.shape[2] != n:
        if q.shape[1] == n and k.shape[1] == n:  # (told to split text tokens off, which were not there)
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} look like (B, N, H, D) tensors: grid={grid} "
                             f"holds {n} tokens, their dim 1, and vsa_attention takes (B, H, N, D) like "
                             "scaled_dot_product_attention; pass q.transpose(1, 2), k.transpose(1, 2), "
                             "v.transpose(1, 2) (and transpose the output back)")
        raise ValueError(f"q has {q.shape[2]} and k/v {k.shape[2]} tokens, but grid={grid} holds {n}: q, k and v are "
                         "the grid's video tokens alone, in raster order (split text tokens off first)")
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or gate.shape != q.shape or not gate.is_floating_point():
            got = (f"a {gate.dtype} tensor of shape {tuple(gate.shape)}" if isinstance(gate, torch.Tensor)
                   else type(gate).__name__)
            raise ValueError(f"gate must be a float tensor shaped like q {tuple(q.shape)} (per token, head and "
                             f"channel) or None; got {got}{_gate_layout_hint(gate, q)}")
        if gate.device != q.device:
            raise ValueError(f"gate is on {gate.device} but q on {q.device}: move it to q's device")
    scale = check_scale(scale, q.shape[-1])
    cubes = cubes_of(grid, tile)
    count = selected_count(cubes.count, topk, sparsity)
    _check_cube_blocks(q, backend, grid, tile, cubes.volume)
    if q.device.type == "meta":  # (shape inference: the twin's ops; the launchers read tables on the host)
        check_backend_name(backend)
        backend = "torch"
    parts = vsa_parts(q, k, v, grid, count, tile, scale, with_coarse=gate is not None, backend=backend,
                      cubes=cubes, tiled_fine=gate is not None, gate=gate)
    out = parts.fine if gate is None else parts.gated(gate, q.dtype, add_fine=True)
    return (out, parts.selection) if return_selection else out


def _gate_layout_hint(gate, q: torch.Tensor) -> str:
    """How to lay a gate in the hidden states' layout out like q: ``to_gate_compress`` gives ``(B, N, H*D)``, and a
    ``(B, N, H, D)`` view of it is the layout Diffusers' processors hold q in before their transpose."""
    b, h, n, d = q.shape
    if not isinstance(gate, torch.Tensor):
        return ""
    if gate.shape == (b, n, h * d):
        return (f": that is the (B, N, H*D) layout of to_gate_compress's output; pass "
                f"gate.unflatten(-1, ({h}, {d})).transpose(1, 2)")
    if gate.shape == (b, n, h, d):
        return ": that is (B, N, H, D); pass gate.transpose(1, 2)"
    return ""


def _check_cube_blocks(q: torch.Tensor, backend: str, grid, tile, volume: int) -> None:
    """A forced ``triton`` fine branch runs blocks of one cube: a cube of a size its kernels do not take was refused
    from inside with "rebuild the layout with blocks of 64 or 128", a layout this call's user never built."""
    from ..backends import BackendUnavailable, forced_backend
    from ..limits import GPU_LAYOUT_BLOCKS, INTERPRETER_LAYOUT_BLOCKS

    if forced_backend(backend) != "triton" or q.device.type == "meta":
        return
    allowed = GPU_LAYOUT_BLOCKS if q.device.type == "cuda" else INTERPRETER_LAYOUT_BLOCKS
    if volume not in allowed:
        raise BackendUnavailable(
            f"attention backend 'triton' cannot run VSA on {q.device}: tile={tile} on grid={grid} gives cubes of "
            f"{volume} tokens, and its kernels take cubes of {', '.join(map(str, allowed))} tokens; use tile "
            "(4, 4, 4) or (4, 8, 8) on a grid at least that large, or backend='torch' (or 'auto').")


@lasting_caches
@sdpa_autocast
def vsa_parts_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: CubeRows, cubes: Cubes, count: int,
                   scale: float, *, with_coarse: bool = True, backend: str = "auto") -> VSAResult:
    """VSA's branches for the query rows of ``part`` (:func:`~.naive.cube_rows`: raster rows that fill whole
    cubes, a ring rank's share), exactly the rows of :func:`vsa_parts` on the whole grid.

    ``q`` ``(B, H, stop - start, D)`` holds those rows, ``k`` and ``v`` ``(B, H, N, D)`` the whole grid (raster
    order). A query cube's mean needs only its own rows; the coarse scores, the selection and the fine branch
    need every key cube, which ``k`` and ``v`` hold. The coarse branch runs the PyTorch twin
    (:func:`~.naive.coarse_attention` on the share's query cubes; the Triton launches pool one grid's cubes for
    queries and keys alike); the fine branch is a rectangular :class:`~dit_accel.kernels.BlockLayout` (the
    share's query cubes x every key cube) run by :func:`~dit_accel.kernels.block_sparse_attention`. The
    ``selection`` is ``(B, H, share's cubes, count)``; ``coarse``, ``fine`` and ``lse`` cover the rows.
    """
    rows = part.rows[1] - part.rows[0]
    if q.shape[2] != rows or k.shape[2] != cubes.perm.num_tokens:
        raise ValueError(f"q has {q.shape[2]} tokens and k/v {k.shape[2]}, expected the {rows} rows "
                         f"{part.rows[0]}..{part.rows[1] - 1} and all {cubes.perm.num_tokens} tokens of the grid")
    cut = (_by_cube(part.permute(q), cubes),) + tuple(_by_cube(cubes.perm.permute(x, dim=-2), cubes) for x in (k, v))
    coarse, _, selection = coarse_attention(*cut, cubes, count, scale, with_coarse, first_query=part.cubes[0])
    return _fine_branch(*(x.flatten(2, 3) for x in cut), cubes, part, coarse, selection, scale, backend)
