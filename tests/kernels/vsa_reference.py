"""A float64 brute force of VSA (METHODS.md, "VSA"), written from the text and sharing nothing with dit_accel.

Cube ids come from token coordinates, means from index_add over real tokens, and the fine branch is dense
attention under a per-query token mask built from the selection. Used by the kernel tests and the pipeline
tests (which add text keys and a padding mask around it).
"""

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def cube_ids(grid, tile):
    t, h, w = grid
    nt, nh, nw = (-(-g // c) for g, c in zip(grid, tile))
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    ids = ((tt // tile[0]) * nh + hh // tile[1]) * nw + ww // tile[2]
    return ids.flatten(), nt * nh * nw


def count_for(grid, tile, topk=None, sparsity=None):
    cubes = cube_ids(grid, tile)[1]
    k = topk if topk is not None else math.ceil((1 - sparsity) * cubes)  # FastVideo: no rounding
    return max(1, min(k, cubes))


def lower_index_top(scores, count):
    """The ``count`` best key cubes per row, ascending, by rank: a cube's rank counts the cubes scoring higher
    plus the equal ones at a lower index (FastVideo's tie order), so ties never depend on a sort's whim."""
    s = scores[..., :, None]  # [..., j, 1] against [..., 1, i]
    other = scores[..., None, :]
    idx = torch.arange(scores.shape[-1])
    rank = ((other > s) | ((other == s) & (idx[None, :] < idx[:, None]))).sum(-1)
    return torch.nonzero(rank < count)[:, -1].view(*scores.shape[:-1], count)


def vsa_pieces(q, k, v, grid, count, tile, scale=None):
    """``(mask (B, H, N, N) bool, coarse per token (B, H, N, D), selection, scores)`` in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    ids, c = cube_ids(grid, tile)
    sizes = torch.zeros(c, dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))

    def means(x):
        return torch.zeros(*x.shape[:2], c, x.shape[-1], dtype=torch.float64).index_add_(2, ids, x) / sizes[:, None]

    qc, kc, vc = means(q), means(k), means(v)
    scores = qc @ kc.transpose(-1, -2) * scale
    selection = lower_index_top(scores, count)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, selection, True)  # (B, H, Cq, Ck)
    mask = chosen[:, :, ids][:, :, :, ids]  # query's cube chose key's cube
    coarse = (torch.softmax(scores, -1) @ vc)[:, :, ids]
    return mask, coarse, selection, scores


def reference(q, k, v, grid, count, tile, gate=None, scale=None):
    """float64 VSA: ``(out, selection, scores)``."""
    mask, coarse, selection, scores = vsa_pieces(q, k, v, grid, count, tile, scale)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    out = torch.softmax(s, -1) @ v.double()
    if gate is not None:
        out = out + coarse * gate.double()
    return out, selection, scores


class VSAReference(TorchFunctionMode):
    """While active, a model's self/joint SDPA calls run float64 VSA (text keys always attended, text queries
    dense, a boolean key-padding mask honoured). ``gates``: a callable giving the i-th call's gate
    ``(B, H, N, D)`` or None; ``layers``: which call indices (mod ``every``) run VSA, the rest dense."""

    def __init__(self, grid, count, tile, text_position="none", gates=None, layers=None, every=1):
        super().__init__()
        self.grid, self.count, self.tile, self.position = grid, count, tile, text_position
        self.gates, self.layers, self.every, self.calls = gates, layers, every, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
        n, s = math.prod(self.grid), q.shape[2]
        if k.shape[2] != s or s < n:
            return func(*args, **kwargs)  # cross-attention
        index, self.calls = self.calls, self.calls + 1
        if self.layers is not None and index % self.every not in self.layers:
            return func(*args, **kwargs)
        video = slice(s - n, s) if self.position == "first" else slice(0, n)
        vq, vk, vv = q[:, :, video], k[:, :, video], v[:, :, video]
        vmask, coarse, _, _ = vsa_pieces(vq, vk, vv, self.grid, self.count, self.tile, call.get("scale"))
        b, h = q.shape[:2]
        allowed = torch.ones(b, h, s, s, dtype=torch.bool)
        allowed[:, :, video, video] = vmask
        if mask is not None:
            allowed &= mask.reshape(mask.shape[0], 1, 1, s).bool()
        scale = call.get("scale") or 1 / math.sqrt(q.shape[-1])
        scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores, -1) @ v.double()
        gate = None if self.gates is None else self.gates(index)
        if gate is not None:
            out[:, :, video] += coarse * gate.double()
        return out.to(q.dtype)
