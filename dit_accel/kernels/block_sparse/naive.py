"""Pure-PyTorch block-sparse attention: the CPU backend and the kernels' twin.

Only the key blocks a query block visits are touched, never an ``N x N`` matrix.
A plan, built once per layout (held in this module's :class:`LayoutCache`;
:func:`prepare` builds it ahead), sorts the query-block rows into *chunks* of
*units*. A unit is G query blocks of one layout head with the same key-block list
and the same element masks; it attends to its C key blocks in one piece. A chunk
holds units of equal G, C and element masks, so one mask row serves the whole
chunk (broadcast, never repeated per unit) and chunks without partial blocks
need no mask at all. Two kinds of chunk:

- *runs*: consecutive rows whose key blocks form one contiguous range moving by
  a fixed step (banded / 1-D window layouts). K and V are overlapping strided
  views, so nothing is copied.
- *gathered*: the units' K/V blocks are copied into one buffer per slice; a unit
  whose key blocks are one contiguous range alone in its slice is a view instead.

A call cuts each chunk into slices of about :func:`slice_bytes` (Python ints from
the shapes: the plan does not depend on batch, heads or head dim). Eager calls on
CPU that need no gradient gather into one buffer per thread, kept between calls
(:class:`_Scratch`): a fresh buffer per slice page-faults as it is first written,
which cost more than the copy itself (radial attention at N = 8192: 310-350 ms
per call with fresh buffers, 200-210 ms with the reused one). With more than one
torch thread such calls share their gathered slices out between that many threads,
each running its ops on one OpenMP thread (:func:`in_threads`). Otherwise, with more
threads, slices grow: every op is a parallel region whose barrier, on a busy machine,
can wait a scheduler time slice for a thread. On CPU each slice runs through ATen's fused flash-attention
kernel (it returns the log-sum-exp and has a backward, but ignores a gradient on
the lse, so callers that differentiate lse get the matmul path); elsewhere
through explicit fp32 matmuls and an fp32 softmax. Gradients come from autograd.

With the plan prepared, a call makes no host synchronisation and fills no cache,
so ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._cache import LayoutCache
from ..layout import BlockLayout
from ..request import forward_ad, tracing

__all__ = ["torch_block_sparse_attention", "prepare", "dense_is_faster", "sparse_cost_ratio"]

# Bytes per slice on one thread (gathered K/V, Q and output, plus scores on the matmul path): about
# what one core's L2 holds, so a gathered slice is still cached when attention reads it. Measured at
# N = 8192, 1 thread, gathering into the reused buffer (twin ms at 1 / 2 / 8 MiB slices): radial 0.109
# 167 / 172 / 209, GNA 0.282 208 / 215 / 239, SLA topk 0.2 309 / 302 / 384, tile 0.117 156 / 148 / 147.
CHUNK_BYTES = 2 << 20
# Bytes per slice per thread with more than one thread (fewer, larger parallel regions; on this
# project's shared 2-core machine 32 MiB slices at 2 threads ran radial 0.109 in half the time of 8 MiB).
CHUNK_BYTES_PER_THREAD = 16 << 20
# Inference calls with several torch threads share their gathered slices between threads only when
# there are at least this many per thread (fewer: the split is uneven; one thread with its OpenMP team
# was faster on a tile layout of 2,340 tokens with 11 slices at two threads: 11.5 ms against 14.5 ms).
SLICES_PER_THREAD = 8
# Shortest run of rows worth a strided (copy-free) chunk.
_MIN_RUN = 4
# Additive fp32 chunk masks are kept up to this many bytes per layout; past it a mask is kept
# as bool and turned additive on each call (one elementwise op per chunk).
_MASK_CACHE_BYTES = 32 << 20
# Chunk plans per layout.
_PLANS = LayoutCache("block_sparse.torch")


@dataclass(frozen=True)
class _Mask:
    """Element mask shared by every unit of a chunk.

    ``allowed`` bool ``[1, 1, R, C*bk]`` with R = G*bq, or 1 when every query row has the same
    mask (only key-range masking); ``additive`` the same as fp32 0 / -inf when cached
    (None past the cache budget); ``row_ok`` bool ``[R]`` rows with at least one allowed
    key, or None when all have one.
    """

    allowed: torch.Tensor
    additive: Optional[torch.Tensor]
    row_ok: Optional[torch.Tensor]


@dataclass(frozen=True)
class _Chunk:
    rows: torch.Tensor          # int64 [U*G] flat rows hl * nQ + q_block, unit-major
    kv: torch.Tensor            # int64 [U*C] flat key blocks hl * nK + kv_block
    units: int                  # U
    group: int                  # G, query blocks per unit
    width: int                  # C, key blocks per unit
    mask: Optional[_Mask]       # None: every visited block full and in range
    # Set for runs: (first row, first flat key block, step); G = 1 and rows are consecutive.
    run: Optional[Tuple[int, int, int]] = None
    first_row: Optional[int] = None  # rows are first_row, first_row + 1, ...: sliced, not gathered
    first_kv: Optional[int] = None   # U = 1 and key blocks consecutive from first_kv: a view, not a copy

    @property
    def gathered(self) -> bool:
        """Whether a slice copies its K/V blocks (neither a run nor one range: no view serves it)."""
        return self.run is None and self.first_kv is None


@dataclass(frozen=True)
class _Plan:
    chunks: Tuple[_Chunk, ...]
    # Outputs come out chunk by chunk and are concatenated, with one zero row last when some rows
    # visit nothing; ``gather[row]`` is where each row's output sits there (None: in order already).
    gather: Optional[torch.Tensor]
    has_empty: bool


def prepare(layout: BlockLayout) -> None:
    """Build ``layout``'s chunk plan now (``torch.compile`` then traces calls without building it)."""
    _plan_of(layout)


def _plan_of(layout: BlockLayout) -> _Plan:
    return _PLANS.get(layout, "plan", lambda: _build_plan(layout))


# ----------------------------------------------------------------------------- cost model
# Measured on the project's shared 2-core CPU, one thread, fp32 forward (docs/cpu_bench.md): time of
# the twin over dense SDPA's is about density * (_COST_BASE + _COST_GATHER * gathered lists per query
# row + _COST_PARTIAL * partial-block share) + _CALL_SECONDS / dense time, dense time about
# _DENSE_SECONDS * batch*heads * q_len * kv_len * head_dim. Fitted to tile, GNA (strided and stride 1)
# and radial at N = 8192 (densities 0.09-0.52) and band / window layouts at N = 320..5120; near the
# break-even (radial 0.465: measured 1.04, GNA stride 1 0.517: 0.96) the measurements are within noise.
_COST_BASE = 1.3
_COST_GATHER = 1.0
_COST_PARTIAL = 0.4
_CALL_SECONDS = 3.5e-4
_DENSE_SECONDS = 9e-11


def sparse_cost_ratio(layout: BlockLayout, *, batch_heads: int = 1, head_dim: int = 64) -> float:
    """Estimated time of this module's block-sparse attention over dense SDPA's on CPU (< 1: sparse wins).

    From the layout alone: visited density, the share of partial blocks, how many distinct key-block
    lists must be gathered (rows whose keys are one contiguous range are read as views; rows sharing
    a list share one gather), and the fixed cost of a call against dense attention's time at
    ``q_len x kv_len`` for ``batch_heads`` (batch times heads) heads of ``head_dim``.
    """
    counts, idx, ids = layout.kv_counts.cpu().long(), layout.kv_indices.cpu().long(), layout.kv_mask_ids.cpu()
    visited = counts > 0
    first = idx[..., 0]
    last = idx.gather(-1, (counts - 1).clamp(min=0)[..., None])[..., 0]
    gathered = visited & (last - first != counts - 1)
    if bool(gathered.any()):
        head = torch.arange(counts.shape[0])[:, None].expand_as(counts)
        keys = torch.cat([head[..., None], counts[..., None], idx, ids.long()], dim=-1)[gathered]
        lists = torch.unique(keys, dim=0).shape[0]
    else:
        lists = 0
    rows = max(int(visited.sum()), 1)
    efficiency = _COST_BASE + _COST_GATHER * lists / rows + _COST_PARTIAL * layout.partial_fraction()
    dense_seconds = _DENSE_SECONDS * batch_heads * layout.q_len * layout.kv_len * head_dim
    return layout.density() * efficiency + _CALL_SECONDS / dense_seconds


def dense_is_faster(layout: BlockLayout, *, batch_heads: int = 1, head_dim: int = 64) -> bool:
    """Whether dense attention is expected to be at least as fast as the PyTorch twin on ``layout`` (CPU).

    ``sparse_cost_ratio(layout, ...) >= 1``: true for layouts too dense to pay off (e.g. radial or
    GNA stride 1 near 0.4-0.5 visited density) and for small ``N`` where a call's fixed cost
    outweighs the skipped blocks. Pure: reads the layout, changes nothing.

    Example::

        >>> if dense_is_faster(layout, batch_heads=q.shape[0] * q.shape[1], head_dim=q.shape[-1]):
        ...     o = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.to_dense_mask())
    """
    return sparse_cost_ratio(layout, batch_heads=batch_heads, head_dim=head_dim) >= 1.0


# ----------------------------------------------------------------------------- plan
@dataclass
class _Rows:
    """The layout's visit lists as Python data (plan time only)."""

    n_q: int
    n_k: int
    lists: List[Tuple[int, ...]]   # per flat row: key blocks
    masks: List[Tuple[Tuple[int, bool], ...]]  # per flat row: (mask id, is the ragged last block) per key block


def _read_rows(layout: BlockLayout) -> _Rows:
    """Key-block lists and mask signatures per flat row; the ragged last key block counts as masked."""
    counts = layout.kv_counts.cpu().tolist()
    indices = layout.kv_indices.cpu().tolist()
    ids = layout.kv_mask_ids.cpu().tolist()
    n_k = layout.num_kv_blocks
    ragged = n_k - 1 if layout.kv_len % layout.block_k else -1
    lists, masks = [], []
    for h, per_head in enumerate(counts):
        for qb, c in enumerate(per_head):
            keys = tuple(indices[h][qb][:c])
            lists.append(tuple(h * n_k + kb for kb in keys))
            masks.append(tuple((m, kb == ragged) for kb, m in zip(keys, ids[h][qb][:c])))
    return _Rows(layout.num_q_blocks, n_k, lists, masks)


def _find_runs(rows: _Rows) -> List[Tuple[int, int, int]]:
    """Runs ``(first_row, n_rows, step)``: >= _MIN_RUN consecutive rows of one head with equal mask
    signatures and one contiguous key range each, its start moving by a constant ``step >= 1``
    (rows with the same range are better served as one unit: its queries attend together)."""
    def contiguous(r):
        keys = rows.lists[r]
        return bool(keys) and keys[-1] - keys[0] == len(keys) - 1

    runs, r, total = [], 0, len(rows.lists)
    while r < total:
        end = r + 1
        if contiguous(r):
            step = None
            while end < total and end % rows.n_q and contiguous(end) and rows.masks[end] == rows.masks[r]:
                d = rows.lists[end][0] - rows.lists[end - 1][0]
                if d < 1 or (step is not None and d != step):
                    break
                step, end = d, end + 1
        if end - r >= _MIN_RUN:
            runs.append((r, end - r, step))
            r = end
        else:
            r += 1
    return runs


def _units(rows: _Rows, free: List[int]) -> Dict[tuple, List[List[int]]]:
    """Rows with identical (key-block list, mask signature) become one unit; units are collected
    per chunk key ``(G, C, signature)``, so a chunk's units share one mask."""
    same: Dict[tuple, List[int]] = {}
    for r in free:
        if rows.lists[r]:  # rows that visit nothing keep o = 0, lse = -inf
            same.setdefault((rows.lists[r], rows.masks[r]), []).append(r)
    chunks: Dict[tuple, List[List[int]]] = {}
    for (keys, sig), members in same.items():
        chunks.setdefault((len(members), len(keys), sig), []).append(members)
    return chunks


def _build_plan(layout: BlockLayout) -> _Plan:
    """Runs first, the other rows as units grouped into chunks by (G, C, mask signature)."""
    rows = _read_rows(layout)
    masks = _MaskBuilder(layout)
    chunks: List[_Chunk] = []
    in_run = set()
    for first, n_rows, step in _find_runs(rows):
        in_run.update(range(first, first + n_rows))
        keys, sig = rows.lists[first], rows.masks[first]
        chunks.append(_make_chunk(layout, [[r] for r in range(first, first + n_rows)], [keys] * n_rows,
                                  masks.get(1, sig), run=(first, keys[0], step)))
    free = [r for r in range(len(rows.lists)) if r not in in_run]
    for (group, _, sig), units in _units(rows, free).items():
        chunks.append(_make_chunk(layout, units, [rows.lists[u[0]] for u in units], masks.get(group, sig)))
    return _Plan(tuple(chunks), *_output_order(chunks, len(rows.lists), layout.device))


def _output_order(chunks: List[_Chunk], n_rows: int, device) -> Tuple[Optional[torch.Tensor], bool]:
    """``(gather, has_empty)`` of :class:`_Plan`: the position of each row in the chunks' concatenated
    outputs; rows no chunk computes point at the zero row appended after them."""
    order = torch.cat([c.rows.cpu() for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
    gather = torch.full((n_rows,), order.numel(), dtype=torch.long)
    gather[order] = torch.arange(order.numel())
    has_empty = order.numel() < n_rows
    if not has_empty and torch.equal(gather, torch.arange(n_rows)):
        return None, False
    return gather.to(device), has_empty


def _make_chunk(layout, units: List[List[int]], lists: List[Tuple[int, ...]], mask: Optional[_Mask],
                run=None) -> _Chunk:
    flat_rows = [r for unit in units for r in unit]
    flat_kv = [kb for keys in lists for kb in keys]
    consecutive = flat_rows == list(range(flat_rows[0], flat_rows[0] + len(flat_rows)))
    one_range = len(units) == 1 and flat_kv == list(range(flat_kv[0], flat_kv[0] + len(flat_kv)))
    dev = layout.device
    return _Chunk(torch.tensor(flat_rows, device=dev), torch.tensor(flat_kv, device=dev), len(units),
                  len(units[0]), len(lists[0]), mask, run,
                  first_row=flat_rows[0] if consecutive else None,
                  first_kv=flat_kv[0] if one_range and run is None else None)


class _MaskBuilder:
    """One :class:`_Mask` per distinct (G, mask signature) of a plan; additive copies up to the budget."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self.built: Dict[tuple, Optional[_Mask]] = {}
        self.cached_bytes = 0

    def get(self, group: int, sig: Tuple[Tuple[int, bool], ...]) -> Optional[_Mask]:
        key = (group, sig)
        if key not in self.built:
            self.built[key] = self._build(group, sig)
        return self.built[key]

    def _build(self, group: int, sig: Tuple[Tuple[int, bool], ...]) -> Optional[_Mask]:
        if all(m < 0 and not ragged for m, ragged in sig):
            return None
        lay = self.layout
        bq, bk = lay.block_q, lay.block_k
        table = torch.cat([lay.mask_table.cpu(), torch.ones(1, bq, bk, dtype=torch.bool)])
        tiles = table[torch.tensor([m if m >= 0 else table.shape[0] - 1 for m, _ in sig])]  # [C, bq, bk]
        # Ragged last key block: keys past kv_len are masked (the layout need not mark them).
        ragged = torch.tensor([r for _, r in sig])
        tiles[ragged] &= torch.arange(bk) < lay.kv_len % bk
        allowed = tiles.permute(1, 0, 2).reshape(bq, len(sig) * bk)  # [bq, C*bk]
        if bool((allowed == allowed[:1]).all()):
            allowed = allowed[:1]
        elif group > 1:
            allowed = allowed.repeat(group, 1)
        row_ok = allowed.any(-1)
        row_ok = None if bool(row_ok.all()) else row_ok.to(lay.device)
        additive = None
        size = allowed.numel() * 4
        if self.cached_bytes + size <= _MASK_CACHE_BYTES:
            additive = _additive(allowed).to(lay.device)
            self.cached_bytes += size
        return _Mask(allowed[None, None].to(lay.device), None if additive is None else additive[None, None], row_ok)


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed,
                                                                                               float("-inf"))


# ----------------------------------------------------------------------------- call
def pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` ``[B, H, N, D]`` zero-padded to whole blocks of ``block`` tokens (x itself when they fit)."""
    pad = -x.shape[2] % block
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _window_view(blocks: torch.Tensor, first: int, step: int, rows: int, width: int) -> torch.Tensor:
    """Overlapping view ``[BG, rows, width*bk, D]`` of blocks ``[BG, nB, bk, D]`` (contiguous):
    row i sees blocks ``first + i*step`` .. ``+ width-1``."""
    bg, _, bk, d = blocks.shape
    # [BG, rows, bk, D, width] -> [BG, rows, width, bk, D]: (width, bk) merge into one stride-D axis.
    windows = blocks[:, first:first + step * (rows - 1) + width].unfold(1, width, step)
    return windows.permute(0, 1, 4, 2, 3).reshape(bg, rows, width * bk, d)


class _Windows(torch.autograd.Function):
    """:func:`_window_view` whose backward adds the window gradients back with ``width``
    strided adds (autograd's generic overlapping as_strided backward is far slower)."""

    @staticmethod
    def forward(ctx, blocks, first: int, step: int, rows: int, width: int):
        ctx.geometry = (blocks.shape, first, step, rows, width)
        return _window_view(blocks, first, step, rows, width)

    @staticmethod
    def backward(ctx, grad):
        shape, first, step, rows, width = ctx.geometry
        bg, _, bk, d = shape
        grad = grad.reshape(bg, rows, width, bk, d)
        out = grad.new_zeros(shape)
        for j in range(width):
            out[:, first + j:first + j + step * (rows - 1) + 1:step] += grad[:, :, j]
        return out, None, None, None, None


def _window(blocks: torch.Tensor, first: int, step: int, rows: int, width: int) -> torch.Tensor:
    if blocks.requires_grad and torch.is_grad_enabled():
        return _Windows.apply(blocks, first, step, rows, width)
    return _window_view(blocks, first, step, rows, width)


class _Scratch(threading.local):
    """Per-thread gather buffers, grown as needed and reused by every slice and call of the thread.

    Only for eager CPU calls without autograd: a gathered slice is consumed by its attention
    before the next slice overwrites the buffer, and nothing keeps a view of it.
    """

    def __init__(self) -> None:
        self.buffers: Dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            # (a normal tensor, under torch.inference_mode too: one made there is an inference tensor, and the
            # thread's next call outside it, under no_grad, raised "Inplace update to inference tensor outside
            # InferenceMode is not allowed" from its first gather)
            with torch.inference_mode(False):
                buffer = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


_SCRATCH = _Scratch()


def gather(x: torch.Tensor, dim: int, index: torch.Tensor, scratch: Optional[str] = None) -> torch.Tensor:
    """``x.index_select(dim, index)``; with ``scratch`` (a buffer name; eager, no autograd) into that buffer
    of the thread's :class:`_Scratch`, valid until the thread's next gather into the same name."""
    if scratch is None or tracing():
        return x.index_select(dim, index)
    shape = list(x.shape)
    shape[dim] = index.numel()
    return torch.index_select(x, dim, index, out=_SCRATCH.take(scratch, tuple(shape), x))


# ATen's CPU flash-attention kernel (with its log-sum-exp), which the fused CPU paths call directly.
HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _use_fused(device: torch.device) -> bool:
    return device.type == "cpu" and HAS_CPU_FLASH


def slice_bytes() -> int:
    """The slice budget for this process's thread count (:data:`CHUNK_BYTES` under ``torch.compile``,
    which cannot trace ``torch.get_num_threads``)."""
    if tracing():
        return CHUNK_BYTES
    threads = torch.get_num_threads()
    return CHUNK_BYTES if threads == 1 else CHUNK_BYTES_PER_THREAD * threads


def _units_per_slice(chunk: _Chunk, bg: int, bq: int, bk: int, d: int, fused: bool, chunk_bytes: int) -> int:
    """Units of ``chunk`` whose buffers (gathered Q, K, V, output; scores on the matmul path) fit ``chunk_bytes``."""
    rows, keys = chunk.group * bq, chunk.width * bk
    unit_bytes = 4 * bg * (2 * keys * d + 2 * rows * d + (0 if fused else 2 * rows * keys))
    return max(1, chunk_bytes // unit_bytes)


def torch_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                 scale: float, *, lse_grad: bool = False, fused: bool | None = None,
                                 chunk_bytes: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention in plain PyTorch; inputs already checked.

    Args:
        q: ``(B, H, q_len, D)``; k, v: ``(B, H, kv_len, D)``; layout on q's device, ``Hl`` 1 or H.
        lse_grad: the caller differentiates through lse. ATen's fused kernel ignores lse's
            gradient, so this selects the matmul path.
        fused: use ATen's CPU flash kernel per slice (default: on CPU when present and
            ``lse_grad`` is False).
        chunk_bytes: memory budget per slice (default :func:`slice_bytes`).

    Returns:
        ``(o, lse)``: o ``(B, H, q_len, D)`` in q's dtype, lse fp32 ``(B, H, q_len)``.
    """
    b, h, _, d = q.shape
    hl, n_q, n_k = layout.num_heads, layout.num_q_blocks, layout.num_kv_blocks
    bq, bk = layout.block_q, layout.block_k
    bg = b * (h // hl)
    # (ATen's fused CPU kernel has no forward-mode derivative: a tangent takes the matmul path)
    fused = (_use_fused(q.device) and not lse_grad and not forward_ad(q, k, v)) if fused is None else fused
    plan = _plan_of(layout)
    scratch = q.device.type == "cpu" and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                            or v.requires_grad))
    workers = 1 if not scratch or tracing() else torch.get_num_threads()

    # Heads split as (g, hl): head = g_idx * hl + hl_idx, matching both Hl = 1 and Hl = H.
    qb = pad_blocks(q.float(), bq).reshape(bg, hl * n_q, bq, d)
    kb, vb = _kv_blocks(k, v, bg, (hl * n_k, bk, d), scratch)

    def cut(chunks, budget: int) -> list:
        return [(chunk, u0, min(chunk.units, u0 + step)) for chunk in chunks
                for step in [_units_per_slice(chunk, bg, bq, bk, d, fused, budget)]
                for u0 in range(0, chunk.units, step)]

    # With several threads, gathered slices are shared out between threads (see in_threads) when there
    # are enough of them; chunks read through views run on this thread with its whole OpenMP team.
    shared = cut([c for c in plan.chunks if c.gathered], chunk_bytes or CHUNK_BYTES) if workers > 1 else []
    if len(shared) < SLICES_PER_THREAD * workers:
        shared = []
    jobs = cut([c for c in plan.chunks if not (shared and c.gathered)], chunk_bytes or slice_bytes())
    if scratch:  # each slice's output straight into place (no concatenation, no reordering pass)
        o = qb.new_zeros(qb.shape) if plan.has_empty else torch.empty_like(qb)
        lse = qb.new_full(qb.shape[:3], float("-inf")) if plan.has_empty else qb.new_empty(qb.shape[:3])

        def run(group):
            for chunk, u0, u1 in group:
                _place(o, lse, chunk, u0, u1, *_run_slice(qb, kb, vb, chunk, u0, u1, scale, fused, True))

        run(jobs)
        if shared:
            in_threads(run, _split(shared, workers))
    else:
        outs: List[torch.Tensor] = []
        lses: List[torch.Tensor] = []
        for chunk, u0, u1 in jobs:
            o_c, lse_c = _run_slice(qb, kb, vb, chunk, u0, u1, scale, fused, False)
            outs.append(o_c)
            lses.append(lse_c)
        o, lse = _assemble(plan, outs, lses, qb)
    o = o.reshape(b, h, n_q * bq, d)[:, :, : layout.q_len]
    lse = lse.reshape(b, h, n_q * bq)[:, :, : layout.q_len]
    if not plan.chunks:  # (always: under vmap an input that requires grad reads requires_grad False)
        o, lse = _tied(o, lse, q, k, v)
    return o.to(q.dtype), lse


def _tied(o: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``o`` and ``lse`` of a layout that visits no key block, unchanged in value but part of the graph of q, k and
    v, with a zero gradient for each (as the Triton kernels give): they were built by ``new_zeros`` and came back
    with no ``grad_fn``, so ``backward()`` or ``torch.autograd.grad`` on them raised "does not require grad". A
    ``where`` on a False condition, not ``x * 0``: an inf or NaN input would make the product NaN."""
    never = torch.zeros((), dtype=torch.bool, device=o.device)
    tie = sum(torch.where(never, t[0, 0, 0, 0].float(), 0.0) for t in (q, k, v))
    return o + tie, lse + tie


def _kv_blocks(k: torch.Tensor, v: torch.Tensor, bg: int, blocks: Tuple[int, int, int], scratch: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V as blocks ``[BG, Hl*nK, bk, D]``: views of the caller's tensors where their strides allow one (whole
    blocks; batch 1 of Diffusers' transposed (B, N, H, D) layout included), else one copy of both, K over V on the
    batch axis (into the thread's scratch buffer in an eager call with ``scratch``), zero-padded to whole blocks."""
    bk = blocks[1]
    kf, vf = k.float(), v.float()
    # (a traced call neither views nor reads the eager scratch)
    eager_whole = k.shape[2] % bk == 0 and not tracing()
    if eager_whole:
        kb, vb = _view_or_none(kf, (bg, *blocks)), _view_or_none(vf, (bg, *blocks))
        if kb is not None and vb is not None:
            return kb, vb
    if eager_whole and scratch:
        kv = torch.cat([kf, vf], out=_SCRATCH.take("k;v", (2 * k.shape[0], *k.shape[1:]), kf))
    else:
        kv = pad_blocks(torch.cat([kf, vf]), bk)
    kvb = kv.reshape(2 * bg, *blocks)
    return kvb[:bg], kvb[bg:]


def _view_or_none(x: torch.Tensor, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """``x.view(shape)`` (no copy), or None where ``x``'s strides allow no such view."""
    try:
        return x.view(shape)
    except RuntimeError:
        return None


def _place(o: torch.Tensor, lse: torch.Tensor, chunk: _Chunk, u0: int, u1: int, o_c: torch.Tensor,
           lse_c: torch.Tensor) -> None:
    """Write units ``u0:u1`` of ``chunk`` (``o_c``, ``lse_c``) into their rows of ``o`` and ``lse``."""
    if chunk.first_row is not None:
        r0 = chunk.first_row + u0 * chunk.group
        o[:, r0:r0 + o_c.shape[1]] = o_c
        lse[:, r0:r0 + o_c.shape[1]] = lse_c
    else:
        rows = chunk.rows[u0 * chunk.group:u1 * chunk.group]
        o.index_copy_(1, rows, o_c)
        lse.index_copy_(1, rows, lse_c)


def _split(jobs: list, parts: int) -> List[list]:
    """``jobs`` (chunk, u0, u1) cut into at most ``parts`` consecutive groups of about equal work."""
    cost = [(u1 - u0) * chunk.group * max(chunk.width, 1) for chunk, u0, u1 in jobs]
    total, groups, current, done = sum(cost), [], [], 0
    for job, c in zip(jobs, cost):
        current.append(job)
        done += c
        if done * parts >= total * (len(groups) + 1) and len(groups) < parts - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def in_threads(run, groups: List[list]) -> None:
    """``run(group)`` for every group at once: the first in this thread, the others in a pool, each
    thread's ops on one OpenMP thread (the team size is per thread: other threads keep theirs).

    Why: ATen's copies (the gathers, the in-place writes) gain nothing from a second OpenMP thread, and
    every op is a parallel region with a barrier; threads that each run whole slices keep both cores
    busy (radial attention at N = 8192, two threads: 119 -> 84 ms per call, docs/cpu_bench.md).
    """
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < len(groups) - 1:
            _POOL_SIZE = len(groups) - 1
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="dit_accel-twin")
        pool = _POOL

    def one_thread(group):
        torch.set_num_threads(1)
        run(group)

    threads = torch.get_num_threads()
    futures = [pool.submit(one_thread, group) for group in groups[1:]]
    try:
        torch.set_num_threads(1)
        run(groups[0])
    finally:
        wait(futures)
        torch.set_num_threads(threads)
    for future in futures:
        future.result()


def _assemble(plan: _Plan, outs: List[torch.Tensor], lses: List[torch.Tensor], qb: torch.Tensor):
    """The slices' outputs ``[BG, rows, bq, D]`` and lse ``[BG, rows, bq]`` in row order; rows that
    visit nothing get o = 0 and lse = -inf."""
    bg, _, bq, d = qb.shape
    if plan.has_empty:
        outs = outs + [qb.new_zeros(bg, 1, bq, d)]
        lses = lses + [qb.new_full((bg, 1, bq), float("-inf"))]
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
    if plan.gather is not None:
        o, lse = o.index_select(1, plan.gather), lse.index_select(1, plan.gather)
    return o, lse


def _slice_qkv(qb, kb, vb, chunk: _Chunk, u0: int, u1: int, scratch: bool = False):
    """Q ``[BG, U, G*bq, D]`` and K, V ``[BG, U, C*bk, D]`` of units ``u0:u1``: views where the
    blocks are consecutive, else gathered copies (into the thread's :class:`_Scratch` with ``scratch``)."""
    bg, _, bq, d = qb.shape
    bk = kb.shape[2]
    units, grp, c = u1 - u0, chunk.group, chunk.width
    if chunk.first_row is not None:
        r0 = chunk.first_row + u0 * grp
        q_c = qb[:, r0:r0 + units * grp]
    else:
        q_c = gather(qb, 1, chunk.rows if units == chunk.units else chunk.rows[u0 * grp:u1 * grp],
                     "q" if scratch else None)
    q_c = q_c.reshape(bg, units, grp * bq, d)
    if chunk.run is not None:
        _, kv0, step = chunk.run
        return q_c, _window(kb, kv0 + u0 * step, step, units, c), _window(vb, kv0 + u0 * step, step, units, c)
    if chunk.first_kv is not None:
        first = chunk.first_kv
        return (q_c, kb[:, first:first + c].reshape(bg, 1, c * bk, d),
                vb[:, first:first + c].reshape(bg, 1, c * bk, d))
    kv = chunk.kv if units == chunk.units else chunk.kv[u0 * c:u1 * c]
    return (q_c, gather(kb, 1, kv, "k" if scratch else None).reshape(bg, units, c * bk, d),
            gather(vb, 1, kv, "v" if scratch else None).reshape(bg, units, c * bk, d))


def _attend(q_c, k_c, v_c, mask: Optional[_Mask], scale: float, fused: bool):
    """``(o, lse)`` of each unit's queries over its keys, masked by the chunk's shared mask."""
    if fused:
        bias = None if mask is None else (mask.additive if mask.additive is not None else _additive(mask.allowed))
        o_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_c, k_c, v_c, attn_mask=bias,
                                                                               scale=scale)
    else:
        scores = torch.matmul(q_c, k_c.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask.allowed, float("-inf"))
        lse_c = torch.logsumexp(scores, dim=-1)
        shift = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
        o_c = torch.matmul(torch.exp(scores - shift[..., None]), v_c)
    if mask is not None and mask.row_ok is not None:
        # A row whose visited keys are all masked: o is 0 already, lse must be -inf.
        lse_c = torch.where(mask.row_ok, lse_c, torch.full_like(lse_c, float("-inf")))
    return o_c, lse_c


def _run_slice(qb, kb, vb, chunk: _Chunk, u0: int, u1: int, scale: float, fused: bool, scratch: bool = False):
    """Units ``u0:u1`` of ``chunk``: ``(o [BG, U*G, bq, D], lse [BG, U*G, bq])`` of their query blocks."""
    bg, _, bq, d = qb.shape
    o_c, lse_c = _attend(*_slice_qkv(qb, kb, vb, chunk, u0, u1, scratch), chunk.mask, scale, fused)
    n_rows = (u1 - u0) * chunk.group
    return o_c.reshape(bg, n_rows, bq, d), lse_c.reshape(bg, n_rows, bq)
