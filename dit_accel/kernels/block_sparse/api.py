"""Public block-sparse attention entry point: check the inputs once, choose the backend once, run it."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import torch

from .. import autotune
from .._cache import LayoutCache, layout_on
from .select_backend import VERIFY_TOL, free_memory, memory_skips  # noqa: F401  (re-exported)
from ..backends import (VENDOR_BACKENDS, Request, check_backend_name, env_backend, env_value, forced_backend, resolve,
                        runs_twin)
from ..request import forward_ad, in_functorch, in_graph, records_grad, tracing
from ..checks import check_flag, check_qkv, check_scale, meta_outputs, sdpa_autocast, unit_stride
from ..layout import BlockLayout
from ..layout_checks import check_layout
from .. import limits

__all__ = ["block_sparse_attention", "block_sparse_backend", "layout_on", "prepare_layout", "block_sparse_tuner",
           "memory_skips", "free_memory",
           "dense_reason", "dense_reasons", "all_keys_visited", "live_keys", "timed_against_dense", "DENSE", "META"]

_DENSITY = LayoutCache("block_sparse.density")  # visited block fraction per layout (one host sync, once)


def prepare_layout(layout: BlockLayout, device, backend: str = "auto") -> BlockLayout:
    """``layout`` on ``device`` with what the backend that will run it derives from it built now
    (the PyTorch twin's chunk plan, FlexAttention's block mask), so a later call, traced by
    ``torch.compile`` or not, only reads them. Returns the device copy. ``backend`` is a name
    :func:`block_sparse_attention` takes (a misspelt one was accepted and prepared nothing)."""
    check_backend_name(backend)
    if not isinstance(layout, BlockLayout):  # (it failed with "'str' object has no attribute 'device'")
        raise TypeError(f"layout must be a dit_accel.kernels.BlockLayout; got {type(layout).__name__}")
    try:  # (torch's "Expected one of cpu, cuda, ... device type at start of device string", or its overload list)
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is invalid: a torch device such as 'cpu', 'cuda' or 'cuda:1' (the "
                         "device of the q, k, v the layout will run with)") from None
    layout = layout_on(layout, device)
    if forced_backend(backend) == "flex":
        from .flex import prepare

        prepare(layout)
    elif runs_twin(backend, device):
        from .naive import prepare

        prepare(layout)
    return layout


def _check(q, k, v, layout, scale) -> float:
    check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a dit_accel.kernels.BlockLayout; got {type(layout).__name__}. "
                        "Build one with BlockLayout.from_dense_mask(mask) or a dit_accel.patterns *_layout function.")
    check_layout(layout, transposed=records_grad(q, k, v))  # (its values once per layout)
    n, m, h = q.shape[2], k.shape[2], q.shape[1]
    if layout.q_len != n or layout.kv_len != m:
        if q.shape[1] == layout.q_len and k.shape[1] == layout.kv_len:  # (told to permute, or to rebuild the layout)
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} look like (B, N, H, D) tensors: the layout's "
                             f"q_len={layout.q_len}, kv_len={layout.kv_len} are their dim 1, and attention takes "
                             "(B, H, N, D) like scaled_dot_product_attention; pass q.transpose(1, 2), "
                             "k.transpose(1, 2), v.transpose(1, 2) (and transpose the output back).")
        if n != m and layout.q_len == m and layout.kv_len == n:  # (told to permute where q_len > N)
            raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}, but q has N={n} "
                             f"and k/v have M={m} tokens: queries and keys swapped. A token mask is [N, M] (queries, "
                             "keys): build the layout from mask.transpose(-1, -2).")
        # (a layout of gna_layout / tile_layout / radial_window_layout is longer: its tiled order pads the grid)
        tiled = (" A pattern's layout is in tiled order: pass perm.permute(q), perm.permute(k), perm.permute(v) "
                 "(perm, layout = tile_layout(...)), and perm.unpermute the output; or the raster q, k, v with "
                 "perm=perm.") if layout.q_len > n else ""
        raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}, but q has N={n} "
                         f"and k/v have M={m} tokens; build the layout for these lengths.{tiled}")
    if layout.num_heads not in (1, h):
        raise ValueError(f"layout has {layout.num_heads} heads; it must have 1 (shared by all heads) or H={h}.")
    if layout.device.type == "meta" and q.device.type != "meta":
        raise ValueError(f"layout is on the meta device (it holds no values) but q on {q.device}: build the layout "
                         "on a real device (the CPU, or q's)")
    return check_scale(scale, q.shape[-1])


@sdpa_autocast  # SDPA's casts, then the backends' own math outside the region
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                           perm=None):
    """Softmax attention restricted to the blocks (and element masks) of ``layout``.

    Equals dense attention with the mask ``layout.to_dense_mask()``, but only the
    listed key blocks are visited (full blocks unmasked, partial blocks with their
    element mask).

    Args:
        q: ``(B, H, N, D)`` queries, like :func:`torch.nn.functional.scaled_dot_product_attention`.
        k, v: ``(B, H, M, D)``; q, k, v share dtype (fp16, bf16, fp32) and device. The Triton
            kernels take ``D <= 256``; the PyTorch backend any ``D``.
        layout: :class:`BlockLayout` with ``q_len == N``, ``kv_len == M``, 1 or H heads;
            moved to q's device automatically (once per device).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the fp32 natural-log log-sum-exp ``(B, H, N)`` (for
            :func:`merge_attention`); ``-inf`` on rows that see no key.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere; ``$DIT_ACCEL_BACKEND``
            overrides), ``"triton"``, ``"torch"``, ``"flex"``, or a vendor kernel where its package is
            installed: ``"fa4"`` (FlashAttention-4), ``"cudnn"`` (cuDNN frontend), ``"natten"`` (NATTEN, GNA
            and Tile layouts); on CUDA ``auto`` times the verified ones (:mod:`.select_backend`). A forced backend that
            cannot run raises :class:`~dit_accel.kernels.backends.BackendUnavailable`
            saying why (see :func:`available_backends`). On CUDA, ``auto`` runs dense
            attention instead where the cost model (:mod:`dit_accel.kernels.cost`) says the
            sparse kernel would be slower than dense (short calls with few heads, where
            launches dominate), and only where every key token is visited by some query (see
            :func:`dense_reason`); :func:`block_sparse_backend` then answers :data:`DENSE`.
        perm: the :class:`~dit_accel.patterns.TilePermutation` a pattern's layout is over (``perm, layout =
            tile_layout(...)``, ``gna_layout``, ``radial_window_layout``) when q, k, v are in raster order: they are
            permuted into tiled order and ``o`` (and ``lse``) back. Without it q, k, v must be in the layout's own
            (tiled) order: a raster q is refused where the tiling pads the grid (other lengths), but where the grid
            divides into the tiles both orders have ``N`` tokens and nothing tells them apart, and raster tensors
            ran silently under the wrong pairs.

    Returns:
        ``o`` ``(B, H, N, D)`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``. Inside ``torch.autocast``
        q, k and v are cast as SDPA's are (:func:`~dit_accel.kernels.checks.autocast_qkv`): ``o`` in the region's dtype.
        Rows with no allowed key give ``o = 0``. Differentiable w.r.t. q, k, v. On meta tensors (shape
        inference) the inputs are checked and the outputs are meta tensors of these shapes; nothing runs.

    Example::

        >>> layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)  # mask [N, N] bool
        >>> o = block_sparse_attention(q, k, v, layout)
    """
    if perm is not None:
        return _in_raster_order(q, k, v, layout, perm, scale=scale, return_lse=return_lse, backend=backend)
    source = layout
    scale, name, layout = _call(q, k, v, layout, scale, backend, return_lse)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # (checked tensors; the twin needs it)
        q, k, v = unit_stride(q, k, v)
    if name == "triton":
        o, lse = _by_batch_chunks(_triton_path(), q, k, v, layout, scale)
    elif name == "torch":
        from .naive import torch_block_sparse_attention

        grad = return_lse and records_grad(q, k, v)
        o, lse = torch_block_sparse_attention(q, k, v, layout, scale, lse_grad=grad)
    elif name == DENSE:
        o, lse = _run_dense(q, k, v, scale, return_lse)
    elif name in VENDOR_BACKENDS:
        from .backends import call

        o, lse = call(name, q, k, v, layout, scale, return_lse, source=source)
    elif name == META:
        o, lse = meta_outputs(q, k, v)
    else:
        from .flex import flex_block_sparse_attention

        o, lse = flex_block_sparse_attention(q, k, v, layout, scale, return_lse=return_lse)
    return (o, lse) if return_lse else o


def _in_raster_order(q, k, v, layout, perm, *, scale, return_lse: bool, backend: str):
    """:func:`block_sparse_attention` of raster ``q``, ``k``, ``v`` under ``layout`` over ``perm``'s tiled order."""
    from ...patterns.permutation import TilePermutation

    if not isinstance(perm, TilePermutation):
        raise TypeError(f"perm must be the TilePermutation the layout is over (perm, layout = tile_layout(...)), or "
                        f"None for q, k, v already in the layout's order; got {type(perm).__name__}")
    if isinstance(layout, BlockLayout) and (layout.q_len, layout.kv_len) != (perm.num_padded, perm.num_padded):
        raise ValueError(f"perm {perm} orders {perm.num_padded} positions, but the layout was built for "
                         f"q_len={layout.q_len}, kv_len={layout.kv_len}: pass the permutation returned with it")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] != perm.num_tokens:
            raise ValueError(f"{name} {tuple(x.shape)} has {x.shape[2]} tokens (dim 2), but perm is over grid "
                             f"{perm.grid} ({perm.num_tokens} raster tokens): with perm, q, k, v are (B, H, N, D) "
                             "in raster order")
    q, k, v = (perm.permute(x, dim=2) if isinstance(x, torch.Tensor) else x for x in (q, k, v))
    out = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse, backend=backend)
    if isinstance(out, tuple):  # (return_lse, as checked by the call)
        return perm.unpermute(out[0], dim=2), perm.unpermute(out[1], dim=-1)
    return perm.unpermute(out, dim=2)


def _by_batch_chunks(run: Callable, q, k, v, layout: BlockLayout, scale: float):
    """``run(q, k, v, layout, scale)`` in launches of at most :data:`~..limits.GRID_AXIS_LIMIT` (batch, head) pairs
    (:func:`~..limits.in_grid_slices`; VSA's fine branch folds the batch into the heads): one launch past it failed
    on a GPU with a raw CUDA launch error."""
    def part(q_, k_, v_, heads):
        shared = layout.num_heads == 1 or heads == (0, q.shape[1])
        return run(q_, k_, v_, layout if shared else layout.select(heads=heads), scale)

    return limits.in_grid_slices(part, q, k, v)


@functools.cache
def _triton_path():
    """:func:`.ops.triton_block_sparse_attention`, imported on first use (that registers the custom ops)
    and then bound: an import statement in the call path costs a microsecond per call."""
    from .ops import triton_block_sparse_attention

    return triton_block_sparse_attention


def block_sparse_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                         backend: str = "auto", return_lse: bool = True) -> str:
    """The backend :func:`block_sparse_attention` runs for these arguments: ``"triton"``, ``"torch"``,
    ``"flex"`` or :data:`DENSE` (for stats and sidecars; the same cached decision the call takes)."""
    return _call(q, k, v, layout, scale=None, backend=backend, return_lse=return_lse)[1]


def _call(q, k, v, layout, scale, backend: str, return_lse: bool):
    """``(scale, backend name, layout on q's device)`` for one call.

    Eager calls decide once per (layout, argument signature) and keep the answer in the layout's
    ``derived`` dict: a repeated call skips the input checks, the backend table and the device
    lookup (about 15 us of a stubbed launch's 50 on a CPU, see ``dit_accel.eval.host_path``). The
    signature holds everything those steps read: the tensors' types, shapes, dtypes and devices,
    whether autograd records, ``scale``, ``backend``, ``return_lse`` and the environment overrides.
    Traced calls, calls under torch.func transforms, tensor subclasses and non-layouts take the checked path
    every time (a vmap call took an eager call's answer: a forced ``flex``, which vmap cannot run, failed deep
    in torch's FlexAttention trace instead of being refused)."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor \
            or type(layout) is not BlockLayout or tracing() or in_functorch():
        return _decide(q, k, v, layout, scale, backend, return_lse)
    grad = records_grad(q, k, v)
    # (a forward-mode tangent does not take an eager gradient's backend)
    grad = grad and (3 if forward_ad(q, k, v) else 1)
    # (and a backward under torch.use_deterministic_algorithms(True) does not take another's vendor backend)
    grad = grad and (grad + 3 if torch.are_deterministic_algorithms_enabled() else grad)
    device = q.device
    # (the types too: True == 1 would take scale=1's or return_lse=True's checked answer, unchecked)
    slot = ("block_sparse.call", (backend, env_value(), autotune.enabled() if device.type == "cuda" else None,
                                  scale, type(scale), return_lse, type(return_lse), grad, q.shape, q.dtype, device,
                                  k.shape, k.dtype, k.device, v.shape, v.dtype, v.device))
    try:
        hit = layout.derived.get(slot)
    except TypeError:  # an unhashable scale: the checks below say what is wrong with it
        return _decide(q, k, v, layout, scale, backend, return_lse)
    if hit is None:
        hit = layout.derived.setdefault(slot, _decide(q, k, v, layout, scale, backend, return_lse))
    return hit


#: Per layout: the backend an eager ``auto`` call chose for a shape (:func:`_shape_key`), which a traced or
#: captured call of that shape reuses (it may not time anything, so it could not choose the same way).
_EAGER = LayoutCache("block_sparse.eager_choice")


def _shape_key(q, k, return_lse: bool, grad: bool):
    """What a decision depends on besides the layout, in a form a traced call reads as constants (None when a
    shape is symbolic: then the traced call decides without it). ``grad``: whether the call records a backward;
    a no-grad eager call's choice (forward timed alone, a backend that has no backward) is not a training
    step's."""
    shapes = (*q.shape, *k.shape)
    if not all(type(x) is int for x in shapes):
        return None
    return (shapes, q.dtype, q.device.type, return_lse, bool(grad))


#: The "backend" of a call on meta tensors: checked, then only shaped (no values to compute with).
META = "meta (shapes only)"


def _decide(q, k, v, layout, scale, backend: str, return_lse: bool):
    scale = _check(q, k, v, layout, scale)
    check_flag("return_lse", return_lse)
    if q.device.type == "meta":  # (shape inference: init_empty_weights, a model on the meta device)
        check_backend_name(backend)
        return scale, META, layout
    cuda = q.device.type == "cuda"
    grad = records_grad(q, k, v)
    key = _shape_key(q, k, return_lse, grad) if cuda and backend == "auto" and env_backend() is None else None
    if in_graph():
        hit = None if key is None else _EAGER.peek(layout, key)
        if hit is not None:  # the eager call's choice: the same kernel runs compiled (or captured) and eager
            return scale, hit, (layout if hit == DENSE else layout_on(layout, q.device))
        return _decide_eager(q, k, v, layout, scale, backend, return_lse)  # (times nothing in a graph)
    out = _decide_eager(q, k, v, layout, scale, backend, return_lse)
    if key is not None:
        _EAGER.get(layout, key, lambda: out[1])
    if cuda:
        _STATIC.get(out[2], "pinned", lambda: _static_for_graphs(out[2]))
    return out


_STATIC = LayoutCache("block_sparse.static")


def _static_for_graphs(layout: BlockLayout) -> bool:
    """Mark a CUDA layout's tensors as static inputs of compiled graphs (``torch._dynamo.mark_static_address``):
    CUDA graphs (``mode="reduce-overhead"``) then address them where they are instead of copying them into
    graph-owned buffers, which would give the launchers' per-layout caches new tensors (a re-plan, whose host
    sync a capture cannot take) and cost a copy per replay."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is None:
        return False
    for name in BlockLayout.TENSORS:
        t = getattr(layout, name)
        if t.is_cuda:
            try:
                mark(t, guard=False)
            except Exception:  # an older torch: the capture re-plans without a sync (triton.tile_plan)
                return False
    return True


def _decide_eager(q, k, v, layout, scale: float, backend: str, return_lse: bool):
    """The decision itself (checked inputs, ``scale`` resolved): timing only outside traced and captured calls."""
    tuner = density = None
    if backend == "auto" and q.device.type == "cuda" and not in_graph():
        # On CUDA, auto times Triton against FlexAttention once per shape class (kernels/autotune.py);
        # the density bucket is part of the class, read once per layout.
        density = _DENSITY.get(layout, "visited", lambda: float(layout.density()))
        tuner = block_sparse_tuner(q, k, v, layout, scale, density, return_lse=return_lse)  # vendors too
    request = Request.of(q, k, v, layout.block_q, layout.block_k, density=density)
    name = resolve("block_sparse", backend, request, tuner)
    device_layout = layout_on(layout, q.device)
    if name in VENDOR_BACKENDS and backend == "auto" and env_backend() is None:
        # A vendor choice is per shape class; this layout may not convert (cuDNN: element masks): next in line.
        from .select_backend import layout_fallback

        name = layout_fallback(name, device_layout, request, return_lse, source=layout)
    if backend == "auto" and _dense_applies(q.device) and env_backend() is None and not in_graph() \
            and not request.forward_ad:  # (the dense kernel's backward drops a tangent too)
        reason = dense_reason(layout, batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[-1], dtype=q.dtype,
                              return_lse=return_lse, needs_grad=request.needs_grad, arch=_arch(q.device))
        if _eligible(layout, q.dtype, q.shape[-1], return_lse, request.needs_grad) and autotune.enabled():
            reason = _measured_reason(q, k, v, device_layout, scale, name, return_lse, reason)
        if reason is not None:
            _REASONS.get(layout, "reasons", list).append(reason)
            return scale, DENSE, layout
    return scale, name, device_layout


# ------------------------------------------------------------------ never slower than dense (CUDA)
#: The backend name of a call that ``auto`` ran as dense attention because the sparse kernel would lose.
DENSE = "dense (sparse modelled slower)"
_LIVE = LayoutCache("block_sparse.live_keys")


def _dense_applies(device: torch.device) -> bool:
    """Whether ``auto`` considers dense attention on ``device``: CUDA only (the CPU paths have their own
    choice, ``plans.LayoutPlan._short``, and are left as they are)."""
    return device.type == "cuda"


def _arch(device: torch.device) -> str:
    from ..cost import arch_for_device

    return arch_for_device(torch.cuda.get_device_name(device) if device.type == "cuda" else str(device))


def live_keys(layout: BlockLayout) -> torch.Tensor:
    """bool ``[Hl, kv_len]``: whether each key token is allowed to some query, per layout head (on the layout's
    device; computed once per layout)."""
    def build() -> torch.Tensor:
        bk = layout.block_k
        cols = torch.cat([layout.mask_table.any(dim=1),  # [P, bk]: columns a partial tile allows
                          torch.ones(1, bk, dtype=torch.bool, device=layout.device)])
        slots = torch.arange(layout.q_indices.shape[-1], device=layout.device)
        visits = slots < layout.q_counts[..., None]  # [Hl, nK, max_q]
        ids = torch.where(layout.q_mask_ids >= 0, layout.q_mask_ids, cols.shape[0] - 1).long()
        live = (cols[ids] & visits[..., None]).any(dim=2)  # [Hl, nK, bk]
        return live.flatten(1)[:, :layout.kv_len]

    return _LIVE.get(layout, "live", build)


def all_keys_visited(layout: BlockLayout) -> bool:
    """Whether every key token (``< kv_len``) is allowed to some query, in every layout head (:func:`live_keys`):
    then dense attention over these keys is the unmasked original of the pattern (padding keys a tiled layout
    never visits would otherwise take softmax mass). Computed once per layout."""
    return _LIVE.get(layout, "all", lambda: bool(live_keys(layout).all()))


def _eligible(layout: BlockLayout, dtype: torch.dtype, head_dim: int, return_lse: bool, needs_grad: bool) -> bool:
    """Whether dense attention may replace this call at all (see :func:`dense_reason`)."""
    return (dtype in (torch.float16, torch.bfloat16) and not (return_lse and needs_grad) and head_dim <= 256
            and all_keys_visited(layout))


#: Milliseconds of ``fn()`` for the measured dense-or-sparse check (CUDA events; tests replace it).
_time_ms = None
_REASONS = LayoutCache("block_sparse.dense_reasons")


def timed_against_dense(run_sparse: Callable, q, k, v, scale, return_lse: bool) -> Optional[Tuple[float, float]]:
    """``(sparse ms, dense ms)``: ``run_sparse(q, k, v)`` and dense attention on the fastest dense kernel, each on
    these inputs detached and without autograd (CUDA events; tests replace :data:`_time_ms`); None where either
    cannot be timed here. The measured half of ``auto``'s dense-or-sparse choice, for a kernel call
    (:func:`dense_reason`) and for a plan's whole sparse path (``plans.plan.LayoutPlan``)."""
    timer = _time_ms or (lambda fn: autotune.cuda_event_timer(fn, 2, 5, device=q.device))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    try:
        with torch.no_grad():
            return timer(lambda: run_sparse(qd, kd, vd)), timer(lambda: _run_dense(qd, kd, vd, scale, return_lse))
    except Exception:  # either cannot be timed here: the caller's default stands
        return None


def _measured_reason(q, k, v, layout, scale: float, sparse: str, return_lse: bool, modelled: Optional[str]):
    """Time the sparse call and the dense one on these very inputs, once per (layout, call signature),
    when the autotuner is on (``DIT_ACCEL_AUTOTUNE``): the measurement overrides the model. The reason
    for dense, or None for sparse."""
    times = timed_against_dense(lambda q, k, v: block_sparse_attention(q, k, v, layout, scale=scale, backend=sparse),
                                q, k, v, scale, return_lse)
    if times is None:  # the model's answer stands when either cannot be timed here
        return modelled
    sparse_ms, dense_ms = times
    if dense_ms < sparse_ms:
        return (f"measured: sparse [{sparse}] {sparse_ms:.3f} ms > dense {dense_ms:.3f} ms at N={layout.q_len}, "
                f"M={layout.kv_len}, {q.shape[0]}x{q.shape[1]} heads" + (f" (model: {modelled})" if modelled else ""))
    return None


def dense_reasons(layout: BlockLayout) -> list:
    """Why ``auto`` ran ``layout``'s calls as dense attention, one sentence per call signature (for inspection)."""
    return list(_REASONS.get(layout, "reasons", list))


def dense_reason(layout: BlockLayout, *, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 return_lse: bool, needs_grad: bool, arch: str = "h200") -> Optional[str]:
    """Why ``auto`` runs dense attention instead of ``layout`` (a sentence), or None to run sparse.

    Dense runs when the cost model (:mod:`dit_accel.kernels.cost`, one per architecture) gives the
    sparse kernel a longer time than dense attention at this shape (SDPA; the in-repo dense Triton
    kernel when the log-sum-exp is asked for), for half-precision inputs, where every key is visited
    by some query (:func:`all_keys_visited`), and not when an ``lse`` gradient is needed (the dense
    kernel's backward takes none). On a GPU with the autotuner on, ``auto`` then times both on the
    call's inputs once per (layout, call signature), and the measurement decides
    (:func:`dense_reasons` keeps the sentences)."""
    from .. import cost

    if not isinstance(layout, BlockLayout):  # (it failed with "'str' object has no attribute 'num_heads'")
        raise TypeError(f"layout must be a dit_accel.kernels.BlockLayout; got {type(layout).__name__}")
    if dtype not in (torch.float16, torch.bfloat16) or (return_lse and needs_grad) or head_dim > 256:
        return None
    contender = "triton" if return_lse else "sdpa"
    sparse = cost.block_sparse_time(cost.tile_counts(layout, heads=heads, batch=batch), head_dim=head_dim,
                                    arch=arch, backward=needs_grad)
    dense = cost.dense_time(layout.q_len, layout.kv_len, heads, batch=batch, head_dim=head_dim, arch=arch,
                            contender=contender, backward=needs_grad)
    if sparse <= dense or not all_keys_visited(layout):
        return None
    return (f"cost model ({cost.constants(arch).name}): sparse {sparse * 1e3:.3f} ms > dense {contender} "
            f"{dense * 1e3:.3f} ms at N={layout.q_len}, M={layout.kv_len}, {batch}x{heads} heads")


def _run_dense(q, k, v, scale: float, return_lse: bool):
    """Dense attention on the fastest measured dense kernel, with its lse when asked
    (:mod:`dit_accel.kernels.dense.choice`: SDPA, SDPA's flash / cuDNN / efficient ops, the in-repo kernel)."""
    return _dense_run()(q, k, v, scale, return_lse)


@functools.cache
def _dense_run():
    from ..dense.choice import run

    return run


def block_sparse_tuner(q, k, v, layout, scale: float, density: Optional[float] = None,
                       timer: Optional[Callable] = None, free: Optional[Callable] = None,
                       return_lse: bool = False) -> Callable[[Sequence[str]], str]:
    """A tuner for :func:`dit_accel.kernels.backends.resolve`: given the backends that can run, time each
    through :func:`block_sparse_attention` on these very inputs (without autograd), planning cost included,
    and return the cheapest, once per shape class (:func:`.select_backend.measured_tuner`: a contender whose
    scores would not fit in free memory is not tried, and the choice is stored only after its output on this
    call matched the PyTorch twin)."""
    from .select_backend import measured_tuner

    return measured_tuner(q, k, v, layout, scale, density, attention=block_sparse_attention, return_lse=return_lse,
                          timer=timer, free=free)
