"""Pure-PyTorch block-sparse attention: the CPU backend and the kernels' twin.

Only the key blocks a query block visits are gathered, never an ``N x N`` matrix:
query blocks (per layout head) are sorted by how many key blocks they visit and
cut into chunks whose gathered keys/values fit a memory budget. A chunk pads its
rows to the chunk's largest visit count with masked dummy slots. Chunks whose
blocks are all full, equal in count and in range run unmasked.

On CPU each chunk runs through ATen's fused flash-attention kernel (it returns the
log-sum-exp and has a backward); elsewhere through explicit fp32 matmuls and an
fp32 softmax. Gradients come from autograd through these torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .layout import BlockLayout

__all__ = ["torch_block_sparse_attention"]

# Bytes of gathered K/V (+ mask, or scores on the matmul path) per chunk.
CHUNK_BYTES = 256 << 20
# Start a new chunk when padding a row to the chunk's visit count would waste more than this.
_PAD_WASTE = 0.125


@dataclass(frozen=True)
class _Chunk:
    rows: torch.Tensor       # int64 [R]   flat row ids hl * nQ + q_block
    kv: torch.Tensor         # int64 [R*C] flat key-block ids hl * nK + kv_block (padded slots -> 0)
    mask_ids: torch.Tensor   # int64 [R, C] -1 full, -2 padded slot, else mask_table row
    width: int               # C, key blocks per row
    clean: bool              # no mask needed at all


@dataclass(frozen=True)
class _Plan:
    chunks: Tuple[_Chunk, ...]
    empty_rows: torch.Tensor  # int64 rows that visit nothing (o = 0, lse = -inf)
    inverse: torch.Tensor     # int64 [Hl*nQ]: position of each row in the concatenated chunk outputs


def _plan(layout: BlockLayout, rows_per_budget) -> _Plan:
    """Group rows by visit count; ``rows_per_budget(width)`` caps a chunk's row count."""
    counts = layout.kv_counts.cpu().long()
    indices = layout.kv_indices.cpu().long()
    mask_ids = layout.kv_mask_ids.cpu().long()
    hl, n_q = counts.shape
    n_k = layout.num_kv_blocks
    flat_counts = counts.reshape(-1)
    order = torch.sort(flat_counts, stable=True).indices
    ragged_kv_block = n_k - 1 if layout.kv_len % layout.block_k else -1

    counts_list = flat_counts[order].tolist()
    chunks: List[_Chunk] = []
    start = 0
    total = len(counts_list)
    while start < total and counts_list[start] == 0:
        start += 1
    empty_rows = order[:start]
    while start < total:
        first = counts_list[start]
        end = start + 1
        while end < total:
            width = counts_list[end]
            if end + 1 - start > rows_per_budget(width):
                break
            if width != first and (width - first) > _PAD_WASTE * width:
                break
            end += 1
        rows = order[start:end]
        width = counts_list[end - 1]
        h = rows // n_q
        qb = rows % n_q
        slot_ok = torch.arange(width)[None, :] < flat_counts[rows][:, None]
        kv_local = indices[h, qb, :width]
        ids = torch.where(slot_ok, mask_ids[h, qb, :width], torch.full_like(kv_local, -2))
        kv = torch.where(slot_ok, h[:, None] * n_k + kv_local, torch.zeros_like(kv_local))
        clean = bool((ids == -1).all()) and not bool(((kv_local == ragged_kv_block) & slot_ok).any())
        chunks.append(_Chunk(rows, kv.reshape(-1).contiguous(), ids, width, clean))
        start = end
    concat_order = torch.cat([torch.cat([c.rows for c in chunks]) if chunks else order[:0], empty_rows])
    inverse = torch.empty_like(concat_order)
    inverse[concat_order] = torch.arange(concat_order.numel())
    return _Plan(tuple(chunks), empty_rows, inverse)


def _chunk_mask(layout: BlockLayout, chunk: _Chunk, device) -> torch.Tensor:
    """bool ``[R, block_q, C*block_k]``: slot valid, element mask of partial blocks, key in range."""
    bq, bk = layout.block_q, layout.block_k
    table = layout.mask_table.to(device)
    full = torch.ones(1, bq, bk, dtype=torch.bool, device=device)
    empty = torch.zeros(1, bq, bk, dtype=torch.bool, device=device)
    table = torch.cat([table, empty, full])  # id -1 -> full, -2 -> empty (padded slot)
    ids = chunk.mask_ids.to(device)
    tiles = table[torch.where(ids >= 0, ids, table.shape[0] + ids)]  # [R, C, bq, bk]
    n_k = layout.num_kv_blocks
    kv_block = (chunk.kv.to(device) % n_k).view(ids.shape)
    key_pos = kv_block[..., None] * bk + torch.arange(bk, device=device)  # [R, C, bk]
    tiles = tiles & (key_pos < layout.kv_len)[:, :, None, :]
    r, c = ids.shape
    return tiles.permute(0, 2, 1, 3).reshape(r, bq, c * bk)


def _pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = -x.shape[2] % block
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _use_fused(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def torch_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                 scale: float, *, lse_grad: bool = False, fused: bool | None = None,
                                 chunk_bytes: int = CHUNK_BYTES) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention in plain PyTorch; inputs already validated.

    Args:
        q: ``(B, H, q_len, D)``; k, v: ``(B, H, kv_len, D)``; layout on any device, ``Hl`` 1 or H.
        lse_grad: the caller differentiates through lse. ATen's fused kernel ignores lse's
            gradient, so this selects the matmul path.
        fused: use ATen's CPU flash kernel per chunk (default: on CPU when present and
            ``lse_grad`` is False).
        chunk_bytes: memory budget per chunk.

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

    bytes_per_key = b * g * bk * 4 * (2 * d + (bq if not fused else 0)) + bq * bk * 4
    budget = max(1, chunk_bytes // bytes_per_key)

    cache = layout.__dict__.setdefault("_torch_plans", {})
    key = (budget,)
    if key not in cache:
        cache[key] = _plan(layout, lambda width: max(1, budget // max(width, 1)))
    plan: _Plan = cache[key]

    # Heads split as (g, hl): head = g_idx * hl + hl_idx, matching both Hl = 1 and Hl = H.
    qb = _pad_blocks(q, bq).reshape(b * g, hl * n_q, bq, d)
    kb = _pad_blocks(k, bk).reshape(b * g, hl * n_k, bk, d)
    vb = _pad_blocks(v, bk).reshape(b * g, hl * n_k, bk, d)
    dev = q.device

    outs, lses = [], []
    for chunk in plan.chunks:
        rows, kv = chunk.rows.to(dev), chunk.kv.to(dev)
        r, c = rows.numel(), chunk.width
        q_c = qb.index_select(1, rows)                                    # [BG, R, bq, D]
        k_c = kb.index_select(1, kv).reshape(b * g, r, c * bk, d)         # [BG, R, C*bk, D]
        v_c = vb.index_select(1, kv).reshape(b * g, r, c * bk, d)
        allowed = None if chunk.clean else _chunk_mask(layout, chunk, dev)  # [R, bq, C*bk]
        if fused:
            bias = None
            if allowed is not None:
                bias = torch.zeros(allowed.shape, dtype=torch.float32, device=dev)
                bias = bias.masked_fill_(~allowed, float("-inf"))[None]
            o_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_c, k_c, v_c, attn_mask=bias, scale=scale)
        else:
            scores = torch.matmul(q_c, k_c.transpose(-1, -2)) * scale
            if allowed is not None:
                scores = scores.masked_fill(~allowed[None], float("-inf"))
            lse_c = torch.logsumexp(scores, dim=-1)
            shift = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
            o_c = torch.matmul(torch.exp(scores - shift[..., None]), v_c)
        if allowed is not None:
            # A row whose visited keys are all masked: o is 0 already, lse must be -inf.
            lse_c = torch.where(allowed.any(-1)[None], lse_c, torch.full_like(lse_c, float("-inf")))
        outs.append(o_c)
        lses.append(lse_c)
    n_empty = plan.empty_rows.numel()
    if n_empty:
        outs.append(q.new_zeros(b * g, n_empty, bq, d))
        lses.append(q.new_full((b * g, n_empty, bq), float("-inf")))
    inverse = plan.inverse.to(dev)
    o = torch.cat(outs, dim=1).index_select(1, inverse)
    lse = torch.cat(lses, dim=1).index_select(1, inverse)
    o = o.reshape(b, h, n_q * bq, d)[:, :, : layout.q_len]
    lse = lse.reshape(b, h, n_q * bq)[:, :, : layout.q_len]
    return o.to(out_dtype), lse
