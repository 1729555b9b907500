"""FlexAttention backend: a BlockLayout becomes a torch ``BlockMask``.

Partial blocks go to ``kv_num_blocks``/``kv_indices`` (FlexAttention applies the
``mask_mod`` there), full blocks to ``full_kv_num_blocks``/``full_kv_indices``
(run unmasked by the compiled kernel). The ``mask_mod`` looks the element up in
the layout's own tables, so it is exact everywhere (eager FlexAttention evaluates
it on every pair).

Eager (uncompiled) FlexAttention materialises the score matrix: on CPU use it at
small N; wrap the caller in ``torch.compile`` for the fused kernel (build the block
mask first with :func:`prepare`). Compiled FlexAttention on CPU is forward-only and
cannot return the log-sum-exp, so the lse is requested only when asked for.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.nn.attention import flex_attention as _flex

from .._cache import LayoutCache
from ..layout import BlockLayout
from ..request import tracing

__all__ = ["flex_block_sparse_attention", "layout_to_block_mask", "kernel_options", "prepare", "flex_function",
           "materialises"]

# One BlockMask per layout (its mask_mod closes over the layout's tables).
_BLOCK_MASKS = LayoutCache("block_sparse.flex")


def _split_full_partial(layout: BlockLayout):
    """kv lists split into (partial, full) parts: counts ``[Hl, nQ]``, indices ``[Hl, nQ, nK]``."""
    slots = torch.arange(layout.kv_indices.shape[-1], device=layout.device)
    valid = slots < layout.kv_counts[..., None]
    parts = []
    for want_full in (False, True):
        sel = valid & ((layout.kv_mask_ids < 0) == want_full)
        # Selected slots first, keeping their ascending order; the rest become 0.
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices
        idx = torch.where(torch.gather(sel, -1, order), torch.gather(layout.kv_indices, -1, order), 0)
        padded = torch.zeros(*idx.shape[:-1], layout.num_kv_blocks, dtype=torch.int32, device=layout.device)
        padded[..., : idx.shape[-1]] = idx
        parts.append((sel.sum(-1).to(torch.int32), padded))
    return parts


def layout_to_block_mask(layout: BlockLayout):
    """The layout as a FlexAttention ``BlockMask`` (batch 1, ``Hl`` heads, broadcast over both)."""
    (p_counts, p_idx), (f_counts, f_idx) = _split_full_partial(layout)
    visited, mask_ids = layout.block_masks()
    bq, bk = layout.block_q, layout.block_k
    table = torch.cat([layout.mask_table, torch.ones(1, bq, bk, dtype=torch.bool, device=layout.device)])
    # Element lookup table: -1 (full) -> last row of ones; unvisited blocks handled by `visited`.
    ids = torch.where(mask_ids >= 0, mask_ids, table.shape[0] - 1).long()
    shared = layout.num_heads == 1
    kv_len = layout.kv_len

    def mask_mod(b, h, q_idx, kv_idx):
        hh = 0 if shared else h
        qb, kb = q_idx // bq, kv_idx // bk
        inside = table[ids[hh, qb, kb], q_idx % bq, kv_idx % bk]
        return inside & visited[hh, qb, kb] & (kv_idx < kv_len)

    return _flex.BlockMask.from_kv_blocks(
        p_counts[None], p_idx[None], f_counts[None], f_idx[None], BLOCK_SIZE=(bq, bk),
        mask_mod=mask_mod, seq_lengths=(layout.q_len, layout.kv_len))


def kernel_options(layout: BlockLayout, device) -> Optional[dict]:
    """FlexAttention's tile sizes for ``layout`` on CUDA: its blocks, which compiled FlexAttention's tiles must
    divide (its Hopper default tile of 128 queries refuses the 64-token blocks). None elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    return {"BLOCK_M": layout.block_q, "BLOCK_N": layout.block_k}


def _block_mask(layout: BlockLayout):
    return _BLOCK_MASKS.get(layout, "block_mask", lambda: layout_to_block_mask(layout))


def prepare(layout: BlockLayout) -> None:
    """Build ``layout``'s BlockMask now (``torch.compile`` then traces calls without building it)."""
    _block_mask(layout)


def flex_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                scale: float, return_lse: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run ``layout`` through FlexAttention; inputs already checked. Returns ``(o, lse or None)``.

    Rows with no allowed key give ``o = 0`` and ``lse = -inf``. Differentiable
    through FlexAttention's own backward on GPU; forward only on CPU. The log-sum-exp
    is requested only when ``return_lse`` (compiled FlexAttention on CPU cannot return it).
    """
    block_mask = _block_mask(layout)
    if return_lse and q.device.type == "cpu" and tracing():
        raise NotImplementedError(
            "backend='flex' cannot return the log-sum-exp under torch.compile on CPU (compiled FlexAttention "
            "on CPU is forward-only and has no return_lse); call it with return_lse=False, or use backend='torch'.")
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        # FlexAttention on CPU refuses an input that requires grad even under torch.no_grad(), where nothing records
        q, k, v = q.detach(), k.detach(), v.detach()
    options = kernel_options(layout, q.device)
    flex = flex_function(q.device)
    if not return_lse:
        return flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options), None
    if hasattr(_flex, "AuxRequest"):  # torch >= 2.9
        o, aux = flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options,
                      return_aux=_flex.AuxRequest(lse=True))
        return o, aux.lse.float()
    o, lse = flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options, return_lse=True)
    return o, lse.float()


_COMPILED: list = []


def flex_function(device: torch.device):
    """FlexAttention as it should run on ``device``: compiled on CUDA (its fused kernel, which never holds the
    N x M scores; compiled once per shape by ``torch.compile``), eager elsewhere and inside a graph being traced
    (the outer compile fuses it). Eager FlexAttention materialises the scores:
    :func:`materialises` tells the autotuner which one runs."""
    if not materialises(device):
        if not _COMPILED:
            _COMPILED.append(torch.compile(_flex.flex_attention, dynamic=False))
        return _COMPILED[0]
    return _flex.flex_attention


def materialises(device: torch.device) -> bool:
    """Whether FlexAttention on ``device`` holds the whole (B, H, N, M) score matrix (eager: off CUDA)."""
    return device.type != "cuda" or tracing()
