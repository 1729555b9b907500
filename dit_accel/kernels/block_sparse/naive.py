"""Pure-PyTorch block-sparse attention: the CPU backend and the kernels' twin.

Only the key blocks a query block visits are touched, never an ``N x N`` matrix.
A plan, built once per layout (held in this module's explicit :class:`LayoutCache`; :func:`prepare`
builds it ahead), sorts the query-block rows (per layout head) into chunks:

- *runs*: consecutive rows whose key blocks form one contiguous range moving by
  a fixed step (banded / 1-D window layouts). K and V are overlapping strided
  views, so nothing is copied.
- *units*: rows with identical key-block lists (every query block of a tile,
  clamped windows at borders) share one gathered copy of their K/V blocks.
  Units are sorted by visit count and cut into chunks within a memory budget;
  a chunk pads its lists to its largest count with masked dummy slots.

A call runs each chunk in slices of units that fit its memory budget (the plan does
not depend on batch, heads or head dim). Chunks whose blocks are all full, equal in
count and in range run unmasked; others get an additive mask built from
``mask_table`` and the ragged bounds.
On CPU each chunk runs through ATen's fused flash-attention kernel (it returns
the log-sum-exp and has a backward, but ignores a gradient on the lse, so
callers that differentiate lse get the matmul path); elsewhere through explicit
fp32 matmuls and an fp32 softmax. Gradients come from autograd through these ops.

With the plan prepared, a call makes no host synchronisation and reads no cache it
would have to fill, so ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._cache import LayoutCache
from ..layout import BlockLayout

__all__ = ["torch_block_sparse_attention", "prepare"]

# Bytes of gathered K/V (+ mask, or scores on the matmul path) per chunk.
CHUNK_BYTES = 256 << 20
# Start a new chunk when padding a row to the chunk's visit count would waste more than this.
_PAD_WASTE = 0.125
# Shortest run of rows worth a strided (copy-free) chunk.
_MIN_RUN = 4
# Chunk masks are cached with the layout's plan up to this many bytes in all.
_MASK_CACHE_BYTES = 64 << 20
# Chunk plans per layout.
_PLANS = LayoutCache("block_sparse.torch")
# Units per chunk the plan allows: a call slices chunks further to its own budget.
_PLAN_UNIT_BYTES = 64 * 4 * (2 * 64 + 64)  # key-block slot bytes at batch x heads 1, head dim 64, block 64


@dataclass(frozen=True)
class _Chunk:
    rows: torch.Tensor       # int64 [U*G] flat row ids hl * nQ + q_block
    kv: torch.Tensor         # int64 [U*C] flat key-block ids hl * nK + kv_block (padded slots -> 0)
    mask_ids: torch.Tensor   # int64 [U, C] -1 full, -2 padded slot, else mask_table row
    width: int               # C, key blocks per row
    clean: bool              # no mask needed at all
    # Set for a run of consecutive rows whose key blocks are one contiguous range that
    # moves by a fixed step per row: (first row, first flat key block, step). K/V are then
    # overlapping strided views, not gathered copies.
    run: Optional[Tuple[int, int, int]] = None
    uniform: bool = False    # every row has the same element mask: build and broadcast one row
    group: int = 1           # G rows share each key-block list (rows are unit-major)
    rows_ok: bool = True     # every query row has at least one allowed key (no lse fix-up needed)


@dataclass(frozen=True)
class _Plan:
    chunks: Tuple[_Chunk, ...]
    empty_rows: torch.Tensor  # int64 rows that visit nothing (o = 0, lse = -inf)
    masks: dict = field(default_factory=dict)  # (chunk, device, fused) -> (mask, row_ok), filled lazily


def _find_runs(counts: torch.Tensor, indices: torch.Tensor, max_rows) -> List[Tuple[int, int, int, int]]:
    """Runs ``(flat_row, rows, start_block, step)`` of >= _MIN_RUN rows, same head, equal count,
    contiguous key blocks, start advancing by a constant ``step >= 0``."""
    hl, n_q = counts.shape
    width = indices.shape[-1]
    slot = torch.arange(width)
    first = indices[..., 0]
    contiguous = ((indices == first[..., None] + slot) | (slot >= counts[..., None])).all(-1) & (counts > 0)
    runs = []
    counts_l, first_l, contig_l = counts.tolist(), first.tolist(), contiguous.tolist()
    for h in range(hl):
        i = 0
        while i < n_q:
            if not contig_l[h][i]:
                i += 1
                continue
            j = i + 1
            step = None
            while (j < n_q and contig_l[h][j] and counts_l[h][j] == counts_l[h][i]
                   and j - i < max_rows(counts_l[h][i])):
                d = first_l[h][j] - first_l[h][j - 1]
                if d < 0 or (step is not None and d != step):
                    break
                step = d
                j += 1
            if j - i >= _MIN_RUN:
                runs.append((h * n_q + i, j - i, first_l[h][i], step or 0))
            i = j if j - i >= _MIN_RUN else i + 1
    return runs


def _make_chunk(layout, rows, flat_counts, indices, mask_ids, n_q, n_k, ragged_kv_block, run=None) -> _Chunk:
    """``rows`` int64 ``[U, G]``: U units of G rows each sharing one key-block list."""
    lead = rows[:, 0]
    width = int(flat_counts[lead].max())
    h, qb = lead // n_q, lead % n_q
    slot_ok = torch.arange(width)[None, :] < flat_counts[lead][:, None]
    kv_local = indices[h, qb, :width]
    ids = torch.where(slot_ok, mask_ids[h, qb, :width], torch.full_like(kv_local, -2))
    kv = torch.where(slot_ok, h[:, None] * n_k + kv_local, torch.zeros_like(kv_local))
    ragged = (kv_local == ragged_kv_block) & slot_ok
    clean = bool((ids == -1).all()) and not bool(ragged.any())
    uniform = bool((ids == ids[:1]).all()) and bool((ragged == ragged[:1]).all())
    chunk = _Chunk(rows.reshape(-1).contiguous(), kv.reshape(-1).contiguous(), ids, width, clean, run, uniform,
                   group=rows.shape[1])
    if not clean:  # decided here, on the host, so a call never syncs to ask
        chunk = dataclasses.replace(chunk, rows_ok=bool(_chunk_mask(layout, chunk, "cpu").any(-1).all()))
    return chunk


def _group_rows(rows: torch.Tensor, flat_counts, indices, mask_ids, n_q) -> List[torch.Tensor]:
    """Rows with identical (head, key-block list, mask ids) -> one ``[G]`` tensor per distinct list.

    Tile layouts repeat lists a lot (every query block of a tile, clamped windows at
    borders): gathering K/V once per list instead of once per row saves most copies.
    """
    groups = {}
    for r in rows.tolist():
        h, qb = divmod(r, n_q)
        c = int(flat_counts[r])
        key = (h, tuple(indices[h, qb, :c].tolist()), tuple(mask_ids[h, qb, :c].tolist()))
        groups.setdefault(key, []).append(r)
    return [torch.tensor(g) for g in groups.values()]


def _plan(layout: BlockLayout, rows_per_budget) -> _Plan:
    """Strided runs first; the other rows grouped by identical key-block lists, the groups
    sorted by (size, visit count) and gathered in chunks.

    ``rows_per_budget(width)`` caps a chunk's number of distinct lists.
    """
    counts = layout.kv_counts.cpu().long()
    indices = layout.kv_indices.cpu().long()
    mask_ids = layout.kv_mask_ids.cpu().long()
    hl, n_q = counts.shape
    n_k = layout.num_kv_blocks
    flat_counts = counts.reshape(-1)
    ragged_kv_block = n_k - 1 if layout.kv_len % layout.block_k else -1
    chunks: List[_Chunk] = []

    in_run = torch.zeros(hl * n_q, dtype=torch.bool)
    for row0, n_rows, first, step in _find_runs(counts, indices, rows_per_budget):
        rows = torch.arange(row0, row0 + n_rows)
        in_run[rows] = True
        head = row0 // n_q
        chunks.append(_make_chunk(layout, rows[:, None], flat_counts, indices, mask_ids, n_q, n_k, ragged_kv_block,
                                  run=(row0, head * n_k + first, step)))

    rest = (~in_run).nonzero().flatten()
    empty_rows = rest[flat_counts[rest] == 0]
    groups = _group_rows(rest[flat_counts[rest] > 0], flat_counts, indices, mask_ids, n_q)
    groups.sort(key=lambda g: (g.numel(), int(flat_counts[g[0]])))
    start, total = 0, len(groups)
    while start < total:
        size, first = groups[start].numel(), int(flat_counts[groups[start][0]])
        end = start + 1
        while end < total and groups[end].numel() == size:
            width = int(flat_counts[groups[end][0]])
            if end + 1 - start > rows_per_budget(width) or (width - first) > _PAD_WASTE * width:
                break
            end += 1
        rows = torch.stack(groups[start:end])
        chunks.append(_make_chunk(layout, rows, flat_counts, indices, mask_ids, n_q, n_k, ragged_kv_block))
        start = end
    return _Plan(tuple(chunks), empty_rows)


def _chunk_mask(layout: BlockLayout, chunk: _Chunk, device) -> torch.Tensor:
    """bool ``[R, block_q, C*block_k]`` (R = 1 for uniform chunks): slot valid, element mask
    of partial blocks, key in range."""
    bq, bk = layout.block_q, layout.block_k
    ids, kv = chunk.mask_ids, chunk.kv
    if chunk.uniform:
        ids, kv = ids[:1], kv[: chunk.width]
    table = layout.mask_table.to(device)
    full = torch.ones(1, bq, bk, dtype=torch.bool, device=device)
    empty = torch.zeros(1, bq, bk, dtype=torch.bool, device=device)
    table = torch.cat([table, empty, full])  # id -1 -> full, -2 -> empty (padded slot)
    ids = ids.to(device)
    tiles = table[torch.where(ids >= 0, ids, table.shape[0] + ids)]  # [R, C, bq, bk]
    n_k = layout.num_kv_blocks
    kv_block = (kv.to(device) % n_k).view(ids.shape)
    key_pos = kv_block[..., None] * bk + torch.arange(bk, device=device)  # [R, C, bk]
    tiles = tiles & (key_pos < layout.kv_len)[:, :, None, :]
    r, c = ids.shape
    return tiles.permute(0, 2, 1, 3).reshape(r, bq, c * bk)


def _cached_mask(plan: "_Plan", i: int, layout: BlockLayout, chunk: _Chunk, device, fused: bool):
    """``(mask, row_ok)`` for chunk ``i``, cached on the plan (up to ``_MASK_CACHE_BYTES``; never
    filled while torch.compile traces, where the mask is part of the graph).

    fused: additive fp32 bias ``[1, U, G*bq, C*bk]`` (0 / -inf; U = 1 when uniform); else
    bool "masked out". row_ok: bool ``[1, U, G*bq]`` rows with at least one allowed key,
    or None if all have one (``chunk.rows_ok``).
    """
    key = (i, str(device), fused)
    hit = plan.masks.get(key)
    if hit is not None:
        return hit
    allowed = _chunk_mask(layout, chunk, device)
    if chunk.group > 1:  # the G query blocks of a unit share the unit's element masks
        allowed = allowed.repeat(1, chunk.group, 1)
    allowed = allowed[None]
    if fused:
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))
    else:
        mask = ~allowed
    row_ok = None if chunk.rows_ok else allowed.any(-1)
    if not torch.compiler.is_compiling():
        size = mask.numel() * mask.element_size()
        cached = sum(m.numel() * m.element_size() for m, _ in plan.masks.values())
        if cached + size <= _MASK_CACHE_BYTES:
            plan.masks[key] = (mask, row_ok)
    return mask, row_ok


def _pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = -x.shape[2] % block
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _window_view(blocks: torch.Tensor, first: int, step: int, rows: int, width: int) -> torch.Tensor:
    """Overlapping view ``[BG, rows, width*bk, D]`` of blocks ``[BG, nB, bk, D]`` (contiguous):
    row i sees blocks ``first + i*step`` .. ``+ width-1``."""
    bg, _, bk, d = blocks.shape
    if step == 0:
        return blocks[:, first:first + width].reshape(bg, 1, width * bk, d).expand(bg, rows, width * bk, d)
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
            if step == 0:
                out[:, first + j] += grad[:, :, j].sum(1)
            else:
                out[:, first + j:first + j + step * (rows - 1) + 1:step] += grad[:, :, j]
        return out, None, None, None, None


def _window(blocks: torch.Tensor, first: int, step: int, rows: int, width: int) -> torch.Tensor:
    if blocks.requires_grad and torch.is_grad_enabled():
        return _Windows.apply(blocks, first, step, rows, width)
    return _window_view(blocks, first, step, rows, width)


def _use_fused(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def prepare(layout: BlockLayout) -> None:
    """Build ``layout``'s chunk plan now (``torch.compile`` then traces calls without building it)."""
    _plan_of(layout)


def _plan_of(layout: BlockLayout) -> _Plan:
    return _PLANS.get(layout, "plan", lambda: _plan(layout, lambda width: max(1, _budget(_PLAN_UNIT_BYTES, width))))


def _budget(bytes_per_slot: int, width: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Units of ``width`` key-block slots that fit ``chunk_bytes``."""
    return max(1, chunk_bytes // (bytes_per_slot * max(width, 1)))


def torch_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                 scale: float, *, lse_grad: bool = False, fused: bool | None = None,
                                 chunk_bytes: int = CHUNK_BYTES) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention in plain PyTorch; inputs already checked.

    Args:
        q: ``(B, H, q_len, D)``; k, v: ``(B, H, kv_len, D)``; layout on any device, ``Hl`` 1 or H.
        lse_grad: the caller differentiates through lse. ATen's fused kernel ignores lse's
            gradient, so this selects the matmul path.
        fused: use ATen's CPU flash kernel per chunk (default: on CPU when present and
            ``lse_grad`` is False).
        chunk_bytes: memory budget per chunk slice.

    Returns:
        ``(o, lse)``: o ``(B, H, q_len, D)`` in q's dtype, lse fp32 ``(B, H, q_len)``.
    """
    b, h, _, d = q.shape
    hl, n_q, n_k = layout.num_heads, layout.num_q_blocks, layout.num_kv_blocks
    bq, bk = layout.block_q, layout.block_k
    g = h // hl
    fused = (_use_fused(q.device) and not lse_grad) if fused is None else fused
    out_dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()

    plan = _plan_of(layout)
    bytes_per_slot = b * g * bk * 4 * (2 * d + (bq if not fused else 0)) + bq * bk * 4

    # Heads split as (g, hl): head = g_idx * hl + hl_idx, matching both Hl = 1 and Hl = H.
    qb = _pad_blocks(q, bq).reshape(b * g, hl * n_q, bq, d)
    kb = _pad_blocks(k, bk).reshape(b * g, hl * n_k, bk, d)
    vb = _pad_blocks(v, bk).reshape(b * g, hl * n_k, bk, d)
    # Strided windows assume dense block storage.
    kb, vb = kb.contiguous(), vb.contiguous()
    dev = q.device

    rows_total = hl * n_q
    o = q.new_zeros(b * g, rows_total, bq, d)
    lse = q.new_full((b * g, rows_total, bq), float("-inf"))
    for i, chunk in enumerate(plan.chunks):
        c, grp = chunk.width, chunk.group
        mask, row_ok = (None, None) if chunk.clean else _cached_mask(plan, i, layout, chunk, dev, fused)
        units = chunk.rows.numel() // grp
        step_units = _budget(bytes_per_slot * grp, c, chunk_bytes)
        for u0 in range(0, units, step_units):
            u1 = min(units, u0 + step_units)
            part = (slice(None), slice(u0, u1)) if mask is not None and mask.shape[1] > 1 else (slice(None),)
            o, lse = _run_units(qb, kb, vb, o, lse, chunk, u0, u1, scale, fused,
                                None if mask is None else mask[part], None if row_ok is None else row_ok[part])
    o = o.reshape(b, h, n_q * bq, d)[:, :, : layout.q_len]
    lse = lse.reshape(b, h, n_q * bq)[:, :, : layout.q_len]
    return o.to(out_dtype), lse


def _run_units(qb, kb, vb, o, lse, chunk: _Chunk, u0: int, u1: int, scale: float, fused: bool, mask, row_ok):
    """Units ``u0:u1`` of ``chunk``: attention of their query blocks to their key blocks, written into o, lse."""
    bg, _, bq, d = qb.shape
    bk = kb.shape[2]
    c, grp = chunk.width, chunk.group
    units = u1 - u0
    if chunk.run is not None:  # G = 1: a unit is a row
        row0, kv0, step = chunk.run
        r0 = row0 + u0
        q_c = qb[:, r0:r0 + units]
        k_c = _window(kb, kv0 + u0 * step, step, units, c)
        v_c = _window(vb, kv0 + u0 * step, step, units, c)
    else:
        rows = chunk.rows[u0 * grp:u1 * grp].to(qb.device)
        kv = chunk.kv[u0 * c:u1 * c].to(qb.device)
        # A unit's G query blocks attend together to its one gathered key list.
        q_c = qb.index_select(1, rows).reshape(bg, units, grp * bq, d)       # [BG, U, G*bq, D]
        k_c = kb.index_select(1, kv).reshape(bg, units, c * bk, d)           # [BG, U, C*bk, D]
        v_c = vb.index_select(1, kv).reshape(bg, units, c * bk, d)
    if fused:
        o_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_c, k_c, v_c, attn_mask=mask,
                                                                               scale=scale)
    else:
        scores = torch.matmul(q_c, k_c.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        lse_c = torch.logsumexp(scores, dim=-1)
        shift = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
        o_c = torch.matmul(torch.exp(scores - shift[..., None]), v_c)
    if row_ok is not None:
        # A row whose visited keys are all masked: o is 0 already, lse must be -inf.
        lse_c = torch.where(row_ok, lse_c, torch.full_like(lse_c, float("-inf")))
    # Write into the output in place (autograd records the slice copies).
    n_rows = units * grp
    if chunk.run is not None:
        o[:, r0:r0 + n_rows] = o_c
        lse[:, r0:r0 + n_rows] = lse_c
        return o, lse
    o_c, lse_c = o_c.reshape(bg, n_rows, bq, d), lse_c.reshape(bg, n_rows, bq)
    o = o.index_copy(1, rows, o_c) if o.requires_grad or o_c.requires_grad else o.index_copy_(1, rows, o_c)
    lse = lse.index_copy(1, rows, lse_c) if lse_c.requires_grad else lse.index_copy_(1, rows, lse_c)
    return o, lse
