"""FlexAttention backend: a BlockLayout becomes a torch ``BlockMask``.

Partial blocks go to ``kv_num_blocks``/``kv_indices`` (FlexAttention applies the
``mask_mod`` there), full blocks to ``full_kv_num_blocks``/``full_kv_indices``
(run unmasked by the compiled kernel). The ``mask_mod`` looks the element up in
the layout's own tables, so it is exact everywhere (eager FlexAttention evaluates
it on every pair).

Eager (uncompiled) FlexAttention materialises the score matrix: on CPU use it at
small N; wrap the caller in ``torch.compile`` for the fused kernel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import BlockLayout

__all__ = ["flex_block_sparse_attention", "flex_unavailable_reason", "layout_to_block_mask"]


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        return None
    return module if hasattr(module, "flex_attention") and hasattr(module, "BlockMask") else None


def flex_unavailable_reason(device=None) -> Optional[str]:
    """``None`` when FlexAttention can run here, else why not and what to do."""
    if _flex_module() is None:
        return (f"torch.nn.attention.flex_attention is not available in torch {torch.__version__}; "
                "upgrade to torch >= 2.5 or use backend='torch'.")
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available to torch; use backend='torch' on this machine."
    return None


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
    module = _flex_module()
    if module is None:
        raise RuntimeError(flex_unavailable_reason())
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

    return module.BlockMask.from_kv_blocks(
        p_counts[None], p_idx[None], f_counts[None], f_idx[None], BLOCK_SIZE=(bq, bk),
        mask_mod=mask_mod, seq_lengths=(layout.q_len, layout.kv_len))


def flex_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``layout`` through FlexAttention; inputs already validated. Returns ``(o, lse)``.

    Rows with no allowed key give ``o = 0`` and ``lse = -inf``. Differentiable
    through FlexAttention's own backward on GPU; forward only on CPU.
    """
    module = _flex_module()
    if module is None:
        raise RuntimeError(flex_unavailable_reason())
    cache = layout.__dict__.setdefault("_flex_block_mask", {})
    if "mask" not in cache:
        cache["mask"] = layout_to_block_mask(layout)
    block_mask = cache["mask"]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and q.device.type == "cpu":
        # FlexAttention raises NotImplementedError for this; say what to do instead.
        raise RuntimeError("backend='flex' has no backward on CPU (FlexAttention limitation); use "
                           "backend='torch' for gradients on CPU, or run under torch.no_grad().")
    aux_cls = getattr(module, "AuxRequest", None)
    if aux_cls is not None:
        o, aux = module.flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=aux_cls(lse=True))
        lse = aux.lse
    else:
        o, lse = module.flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    return o, lse.float()
