"""Block-sparse attention of a short sequence in one call of ATen's CPU flash kernel (forward, no autograd).

Every query block's visited key blocks are gathered into one buffer, padded to the widest
row of the layout: the kernel's batch is (batch, query block), each item holding one query
block and its ``C`` key blocks, with an additive mask for partial blocks, padded slots and
padding tokens. The gather reads raster tokens directly, so a tiled layout (a
:class:`~dit_accel.patterns.TilePermutation`'s ``order``) needs no permuted copy of q, k, v,
and the output is written back in raster order by one ``index_select``.

It does ``C / nK`` of dense attention's work with a few gathers and one call, which is what short
sparse sequences need: there, masked dense attention (every block) and the PyTorch twin's chunks
(several calls) both cost more. For longer sequences the gathered buffer grows as
``N * C * block_k`` and the twin's views and chunks win; :func:`one_pass_fits` says where.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..layout import BlockLayout
from ..request import tracing

__all__ = ["OnePass", "one_pass_fits", "blocks_to_tokens", "ONE_PASS_BYTES", "ONE_PASS_WIDTH"]

# Largest gathered K + V + mask (fp32 bytes) of one call, and the widest padded key row as a fraction
# of all key blocks. Measured on the project's 2-core CPU, one thread, fp32 forward (ms, one pass /
# masked dense / twin): tile (8, 8, 8) width 3 of 8, 4 heads of 64, 3.1 MB gathered: 2.85 / 4.55 /
# 3.25; tile (4, 12, 12) width 1 of 9, 4 heads of 32: 0.87 / 3.05 / 1.25. Wider rows lost or tied
# (width 3 of 5: 1.92 / 1.74 / 2.44), and so did larger buffers (GNA (8, 16, 16) width 9 of 32, 37 MB:
# 52 ms against the twin's 24): the kernel's items of one query block each cost more per key than
# one long sequence does.
ONE_PASS_BYTES = 4 << 20
ONE_PASS_WIDTH = 0.5


def one_pass_fits(layout: BlockLayout, *, batch: int, heads: int, head_dim: int) -> bool:
    """Whether :class:`OnePass` can run ``layout`` for ``(batch, heads, *, head_dim)`` inputs within
    :data:`ONE_PASS_BYTES` and with its padded width at most :data:`ONE_PASS_WIDTH` of the key blocks."""
    width = int(layout.kv_counts.max()) if layout.kv_counts.numel() else 0
    if width == 0 or width > ONE_PASS_WIDTH * layout.num_kv_blocks:
        return False
    n_q, keys = layout.num_q_blocks, width * layout.block_k
    gathered = 2 * batch * n_q * keys * heads * head_dim
    mask = batch * n_q * layout.num_heads * layout.block_q * keys
    return 4 * (gathered + mask) <= ONE_PASS_BYTES


class OnePass:
    """One gathered flash call for ``layout`` (see the module docstring); built once, called per step.

    Args:
        layout: on the CPU; its positions are raster tokens, or tiled positions when ``order`` is given.
        num_tokens: raster tokens ``N`` of q, k, v.
        order: LongTensor ``[P]``: the raster token at each layout position (``-1``: padding), or None
            when positions are tokens (``P = N``).

    Raises ValueError when a real query would see no key (the kernel would return NaN for it).
    """

    def __init__(self, layout: BlockLayout, num_tokens: int, order: Optional[torch.Tensor] = None):
        hl, n_q = layout.num_heads, layout.num_q_blocks
        bq, bk = layout.block_q, layout.block_k
        if order is not None and order.numel() == num_tokens and torch.equal(order.cpu(), torch.arange(num_tokens)):
            order = None  # tiles that are whole rows or frames: tiled order is raster order
        counts = layout.kv_counts.cpu().long()
        width = int(counts.max())
        # Raster token of every layout position, padded to whole blocks (-1: no token).
        positions = max(n_q * bq, layout.num_kv_blocks * bk)
        token = torch.full((positions,), -1, dtype=torch.long)
        if order is None:
            token[:num_tokens] = torch.arange(num_tokens)
        else:
            token[:order.numel()] = order.cpu()
        q_token = token[:n_q * bq].clone()
        q_token[layout.q_len:] = -1
        key_token_of = token.clone()
        key_token_of[layout.kv_len:] = -1

        slots = torch.arange(width)
        used = slots < counts[..., None]  # [Hl, nQ, C]
        blocks = torch.where(used, layout.kv_indices.cpu().long()[..., :width], 0)
        keys = (blocks[..., None] * bk + torch.arange(bk)).reshape(hl, n_q, width * bk)  # layout positions
        key_token = key_token_of[keys]  # [Hl, nQ, C * bk]
        allowed = (used[..., None] & (key_token >= 0).view(hl, n_q, width, bk)).reshape(hl, n_q, 1, width * bk)
        allowed = allowed.expand(hl, n_q, bq, width * bk).clone()
        ids = layout.kv_mask_ids.cpu().long()[..., :width]
        if layout.mask_table.numel():
            table = torch.cat([layout.mask_table.cpu(), torch.ones(1, bq, bk, dtype=torch.bool)])
            elements = table[torch.where(used & (ids >= 0), ids, table.shape[0] - 1)]  # [Hl, nQ, C, bq, bk]
            allowed &= elements.permute(0, 1, 3, 2, 4).reshape(hl, n_q, bq, width * bk)
        real_q = q_token >= 0
        real = real_q.view(1, n_q, bq)
        seen = allowed.any(-1)
        if bool((real & ~seen).any()):
            raise ValueError("the layout leaves some query without a key; OnePass cannot run it")
        allowed |= ~seen[..., None]  # padding queries (their output is dropped): any finite row
        self.layout_heads = hl
        self.n_q, self.block_q, self.width = n_q, bq, width * bk
        self._key_token = torch.where(key_token >= 0, key_token, 0)  # [Hl, nQ, C * bk]
        self._q_token = None if order is None and layout.q_len == n_q * bq else torch.where(real_q, q_token, 0)
        # Tiled position (or padded raster position) of each raster token, for the way back.
        place = torch.full((num_tokens,), -1, dtype=torch.long)
        place[q_token[real_q]] = real_q.nonzero().flatten()
        self._place = None if order is None and layout.q_len == num_tokens else place
        self._bias = None
        if not bool(allowed.all()):  # [nQ, Hl, bq, C * bk]: the kernel's batch is (batch, query block)
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
            self._bias = bias.transpose(0, 1).contiguous()
        self._indices: Dict[tuple, torch.Tensor] = {}  # (heads, what) -> flat (token, head) indices
        self._biases: Dict[int, torch.Tensor] = {}  # batch -> the mask repeated per batch item

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None):
        """``(o (B, H, N, D) in q's dtype, lse fp32 (B, H, N))`` for raster-order q, k, v ``(B, H, N, D)``
        (``scale``: default ``1/sqrt(D)``)."""
        b, h, n, d = q.shape
        dtype = q.dtype
        if dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        # (B, N * H, D) rows in SDPA's own memory order (the processors' q, k, v are views of it: no copy).
        k_rows, v_rows = (x.transpose(1, 2).reshape(b, n * h, d) for x in (k, v))
        index = self._index(h, "kv")
        k_g, v_g = (x.index_select(1, index).view(b * self.n_q, self.width, h, d).transpose(1, 2)
                    for x in (k_rows, v_rows))
        if self._q_token is None:
            q_g = q.transpose(1, 2).reshape(b * self.n_q, self.block_q, h, d).transpose(1, 2)
        else:
            q_rows = q.transpose(1, 2).reshape(b, n * h, d)
            q_g = q_rows.index_select(1, self._index(h, "q")).view(b * self.n_q, self.block_q, h, d).transpose(1, 2)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_g, k_g, v_g,
                                                                           attn_mask=self._mask(b), scale=scale)[:2]
        # o's memory is (B * nQ, bq, H, D): (B, H, N, D) tokens over (B, N, H, D) raster rows.
        eager = not tracing()
        o, lse = (blocks_to_tokens(x, b, self.n_q, self.block_q, eager) for x in (o, lse))
        if self._place is None:
            o, lse = o[:, :, :n], lse[:, :, :n]
        else:
            o, lse = o.transpose(1, 2).index_select(1, self._place).transpose(1, 2), lse.index_select(2, self._place)
        return (o if dtype == torch.float32 else o.to(dtype)), lse

    def _index(self, heads: int, what: str) -> torch.Tensor:
        """Flat ``token * heads + head`` rows, ordered (query block, key, head) for ``"kv"`` and (position,
        head) for ``"q"``."""
        index = self._indices.get((heads, what))
        if index is None:
            head = torch.arange(heads)
            if what == "q":
                index = (self._q_token[:, None] * heads + head).reshape(-1)
            else:  # [Hl, nQ, C * bk] -> [nQ, C * bk, H], the layout's head per model head
                tokens = self._key_token.permute(1, 2, 0)
                tokens = tokens.expand(-1, -1, heads) if self.layout_heads == 1 else tokens
                index = (tokens * heads + head).reshape(-1)
            index = self._indices.setdefault((heads, what), index)
        return index

    def _mask(self, batch: int) -> Optional[torch.Tensor]:
        if self._bias is None or batch == 1:
            return self._bias
        mask = self._biases.get(batch)
        if mask is None:
            mask = self._biases.setdefault(batch, self._bias.repeat(batch, 1, 1, 1))
        return mask


def blocks_to_tokens(x: torch.Tensor, b: int, n_q: int, block_q: int, eager: bool) -> torch.Tensor:
    """``(B * nQ, H, Bq[, D])`` per-block rows as ``(B, H, nQ * Bq[, D])`` tokens: one ``as_strided`` view when
    a query block's rows follow the previous block's in memory (the flash kernel's token-major output), else
    ``view``/``transpose``/``reshape`` (which copies when it must)."""
    st, shape = x.stride(), (b, x.shape[1], n_q * block_q) + tuple(x.shape[3:])
    if eager and st[0] == block_q * st[2]:
        return x.as_strided(shape, (n_q * st[0],) + st[1:], x.storage_offset())
    return x.view((b, n_q) + tuple(x.shape[1:])).transpose(1, 2).reshape(shape)
