"""SLA pieces shared by the PyTorch twin and the fused kernel: parameters, block classification, feature maps.

Semantics (METHODS.md, section SLA), per ``(batch, head)``:

1. Classify block pairs from pooled scores: ``k_s = k - mean_tokens(k)``,
   ``score = mean_pool(q, Bq) @ mean_pool(k_s, Bk)^T``; per query block the top
   ``ceil(topk * nK)`` key blocks (``rounding="floor"``: the reference's
   ``int(topk * nK)``; at least 1 either way) are *critical*, the bottom
   ``floor(negligible * nK)`` are *negligible*, the rest *marginal*.
2. Sparse branch: exact softmax attention over the critical blocks only.
3. Linear branch: ``O_l = phi(q) H / (phi(q) . z + eps)`` with
   ``H = sum phi(K_j)^T V_j`` and ``z = sum colsum(phi(K_j))`` over the marginal
   blocks (``linear_tokens="marginal"``) or over all tokens (``"all"``);
   ``eps = linear_eps`` (1e-6; the reference code uses 1e-5).
4. ``O = O_s + proj(O_l)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..._util import cdiv as _cdiv, is_int
from ...patterns.checks import number_in, share_beside
from ..request import tracing

__all__ = ["SLAParams", "SLABlocks", "sla_block_counts", "sla_density", "sla_visited", "sla_classify", "classify_pooled",
           "feature_map", "fp32_features", "rounded_features", "true_columns", "chunk_totals", "FEATURE_IDS", "MARGINAL", "CRITICAL", "NEGLIGIBLE",
           "LINEAR_EPS", "REFERENCE_LINEAR_EPS", "FEATURE_MAPS", "LINEAR_TOKENS", "ROUNDINGS"]

# Values of the int8 class map.
MARGINAL, CRITICAL, NEGLIGIBLE = 0, 1, 2

# Guards the linear branch's division when phi(q) . z is (close to) zero.
LINEAR_EPS = 1e-6
# The reference code's value (thu-ml/SLA and TurboDiffusion: ``1e-5 + phi(q) . z``).
REFERENCE_LINEAR_EPS = 1e-5

FEATURE_MAPS = ("softmax", "elu", "relu")
FEATURE_IDS = {name: i for i, name in enumerate(FEATURE_MAPS)}  # the kernels' runtime feature-map argument
LINEAR_TOKENS = ("marginal", "all")
ROUNDINGS = ("ceil", "floor")  # critical-block count: ceil(topk * nK), or the reference's int(topk * nK)


@dataclass(frozen=True)
class SLAParams:
    """The kernels' view of an SLA configuration (plain values; ``dit_accel.SLA`` converts to it).

    Args:
        topk: fraction of key blocks kept for softmax attention, in ``(0, 1]``.
        negligible: fraction of key blocks skipped, in ``[0, 1 - topk]``.
        block_q: query block size (64 or 128). block_k: key block size (64 or 128).
        feature_map: ``"softmax"``, ``"elu"`` or ``"relu"``.
        linear_tokens: ``"marginal"`` (paper) or ``"all"`` (later reference code).
        rounding: ``"ceil"`` or ``"floor"`` (reference) critical-block count, at least 1.
        linear_eps: epsilon of the linear branch's denominator.
    """

    topk: float
    negligible: float = 0.0
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    linear_tokens: str = "marginal"
    rounding: str = "ceil"
    linear_eps: float = LINEAR_EPS

    def __post_init__(self) -> None:
        # The rules of dit_accel.SLA (block sizes: any positive int, which the PyTorch twin runs): without them a
        # negative topk ran one block, a misspelt linear_tokens or rounding ran the default, a NaN or a string
        # failed deep in the block counts.
        topk = number_in("topk", self.topk, 0.0, 1.0, owner="SLAParams.", lo_open=True)
        negligible = share_beside("negligible", self.negligible, topk, owner="SLAParams.")  # (as SLA checks it)
        values = dict(topk=topk, negligible=negligible,
                      linear_eps=number_in("linear_eps", self.linear_eps, 0.0, 1.0, owner="SLAParams.", lo_open=True))
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"SLAParams.{name}={value!r} is invalid: expected a positive int such as 64 or 128")
            values[name] = int(value)
        for name, allowed in (("feature_map", FEATURE_MAPS), ("linear_tokens", LINEAR_TOKENS), ("rounding", ROUNDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SLAParams.{name}={getattr(self, name)!r} is invalid: must be one of "
                                 f"{', '.join(map(repr, allowed))}")
        for name, value in values.items():  # (plain Python numbers: numpy ones broke the twin's slices)
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, config) -> "SLAParams":
        """An :class:`SLAParams` from itself or any object with the same attributes (e.g. ``dit_accel.SLA``);
        ``rounding`` and ``linear_eps`` may be absent (their defaults apply)."""
        if isinstance(config, cls):
            return config
        names = _PARAM_NAMES  # not dataclasses.fields(): torch.compile traces this
        missing = [name for name in names if not hasattr(config, name) and name not in ("rounding", "linear_eps")]
        if missing:
            raise TypeError(f"method must be a dit_accel.SLA config (or SLAParams); got {type(config).__name__} "
                            f"without {missing}. Build one with dit_accel.SLA(topk=...)")
        return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)})


_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(SLAParams))


def sla_block_counts(n_kv: int, method) -> tuple:
    """``(n_blocks, n_critical, n_negligible, n_marginal)`` per query block for ``n_kv`` keys.

    ``n_critical = max(1, ceil(topk * nK))``, or with ``rounding="floor"`` the reference's
    ``max(1, min(nK, int(topk * nK)))`` (the reference itself allows 0 blocks, which gives NaN
    outputs; we keep one). ``n_negligible = floor(negligible * nK)`` (clipped so the classes
    never overlap). The counts are the same for every query block.
    """
    method = SLAParams.of(method)
    if type(n_kv) is int and not tracing():  # (a SymInt under torch.compile: computed)
        key = (n_kv, method)
        hit = _COUNTS.get(key)
        if hit is None:
            if len(_COUNTS) >= 4096:  # bounded
                _COUNTS.clear()
            hit = _COUNTS[key] = _block_counts(n_kv, method)
        return hit
    return _block_counts(n_kv, method)


#: (n_kv, SLAParams) -> sla_block_counts: read several times per call.
_COUNTS: dict = {}


def _block_counts(n_kv: int, method: SLAParams) -> tuple:
    n_k = _cdiv(n_kv, method.block_k)
    if method.rounding == "floor":
        # The reference's float product, unrounded: int(0.29 * 100) is 28 there, so here too.
        n_crit = max(1, min(n_k, int(method.topk * n_k)))
    else:
        # The 1e-9 keeps e.g. 0.1 * 30 = 3.0000000000000004 from rounding up to 4 blocks.
        n_crit = min(n_k, max(1, math.ceil(method.topk * n_k - 1e-9)))
    n_neg = min(n_k - n_crit, math.floor(method.negligible * n_k + 1e-9))
    return n_k, n_crit, n_neg, n_k - n_crit - n_neg


def sla_density(n_tokens: int, method) -> float:
    """Fraction of key blocks the sparse branch visits (critical blocks / all blocks) for a length.

    Example: ``sla_density(32760, SLA(topk=0.05))`` is ``26 / 512``.
    """
    method = SLAParams.of(method)
    if not is_int(n_tokens) or n_tokens < 1:  # (numpy's ints too; not True)
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    n_k, n_crit, _, _ = sla_block_counts(int(n_tokens), method)
    return n_crit / n_k


def sla_visited(q: torch.Tensor, k: torch.Tensor, method) -> dict:
    """What one SLA call's sparse branch visits, from its own classification of ``q`` and ``k``:
    ``{"true_density": visited query-key pairs / (Nq * Nk), "work_vs_dense": the work of its visited blocks, each in
    full (``block_q x block_k``, as the kernel runs a ragged last block), over Nq * Nk}``, both averaged over batch and
    heads. :func:`sla_density` is the share of key blocks, which a ragged last key block makes neither: whether the
    top-k picks it depends on the data.

    Example: at 130 tokens in blocks of 64 (the last one of 2 tokens) with one critical block per query block, the
    true density is 64/130 when the top-k picks a full block and 2/130 when it picks the last one; the work is
    3 x 64 x 64 / 130^2 either way (three query blocks, one 64 x 64 block each)."""
    method = SLAParams.of(method)
    critical = sla_classify(q, k, method).critical  # [B, H, nQ, kc]
    n_q, n_k = q.shape[-2], k.shape[-2]

    def sizes(n: int, block: int) -> torch.Tensor:
        return (n - torch.arange(0, n, block, device=critical.device)).clamp(max=block).to(torch.float64)

    rows, cols = sizes(n_q, method.block_q), sizes(n_k, method.block_k)
    pairs = (rows[:, None] * cols[critical.long()]).sum()
    calls = critical.shape[0] * critical.shape[1]
    work = critical.numel() * method.block_q * method.block_k
    return {"true_density": float(pairs) / (calls * n_q * n_k), "work_vs_dense": work / (calls * n_q * n_k)}


class SLABlocks:
    """Block classification of one SLA call.

    Attributes:
        critical: ``[B, H, nQ, kc]`` critical key-block indices per query block, ascending (int64 from
            :func:`sla_classify`, ready for indexing; int32 from the Triton backend's classification, which its
            fused kernel takes).
        negligible: ``[B, H, nQ, kn]`` negligible key-block indices, ascending (``kn`` may be 0), likewise.
        classes: int8 ``[B, H, nQ, nK]``: ``CRITICAL`` (1), ``MARGINAL`` (0) or ``NEGLIGIBLE`` (2).
        scores: fp32 ``[B, H, nQ, nK]`` pooled block scores the classes were taken from.

    ``classes`` (and an empty ``negligible``) may be left out when ``scores`` is given: they are built
    from the indices on first use (the twin's top-k path never needs the class map).
    """

    def __init__(self, critical: torch.Tensor, negligible: Optional[torch.Tensor] = None,
                 classes: Optional[torch.Tensor] = None, scores: Optional[torch.Tensor] = None):
        if classes is None and scores is None:
            raise ValueError("SLABlocks needs classes or scores (the key-block count comes from their last axis)")
        self.critical, self.scores = critical, scores
        self._negligible, self._classes = negligible, classes

    @property
    def negligible(self) -> torch.Tensor:
        if self._negligible is None:
            self._negligible = self.critical.new_empty(self.critical.shape[:-1] + (0,))
        return self._negligible

    @property
    def classes(self) -> torch.Tensor:
        if self._classes is None:
            classes = torch.full(self.scores.shape, MARGINAL, dtype=torch.int8, device=self.critical.device)
            classes.scatter_(-1, self.critical.long(), CRITICAL)
            if self.negligible.shape[-1]:
                classes.scatter_(-1, self.negligible.long(), NEGLIGIBLE)
            self._classes = classes
        return self._classes

    @property
    def marginal(self) -> torch.Tensor:
        """int64 ``[B, H, nQ, km]`` marginal key-block indices, ascending (``km`` is the same for all)."""
        km = self.classes.shape[-1] - self.critical.shape[-1] - self.negligible.shape[-1]
        return true_columns(self.classes == MARGINAL, km)

    def density(self) -> float:
        """Visited (critical) block fraction."""
        n_k = (self.scores if self._classes is None else self._classes).shape[-1]
        return self.critical.shape[-1] / n_k


def chunk_totals(*partials: torch.Tensor):
    """Per-chunk partial sums ``(B*H, chunks, ...)`` (a launch's, one row per chunk of tokens) -> their totals
    ``(B*H, ...)``, each: the one chunk as a view where there is one (no copy), else the sum over the chunks."""
    return tuple(p[:, 0] if p.shape[1] == 1 else p.sum(1) for p in partials)


def true_columns(mask: torch.Tensor, width: int) -> torch.Tensor:
    """int64 indices of the first ``width`` True columns of each row of ``mask``, ascending.

    A stable sort of ``~mask`` brings the True columns first in column order; ``width`` comes from
    shapes, so there is no host sync. Rows with fewer True columns are padded with False columns.
    """
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]


def _mean_pool(x: torch.Tensor, block: int, sums: bool = False):
    """[B, H, N, D] -> fp32 [B, H, cdiv(N, block), D] mean over the real tokens of each block, accumulated in
    fp32 whatever x's dtype (``dtype=``: no fp32 copy of x, which costs a pass over a video's q or k).

    One pass over x, views only: a ragged last block is summed apart (no padded copy of x). ``sums``: also
    return the fp32 [B, H, 1, D] sum over all tokens, from the block sums (the mean of k needs no second
    pass)."""
    b, h, n, d = x.shape
    nb = _cdiv(n, block)
    whole = n // block
    if whole == nb:  # whole blocks: a view of x (any strides), no padded copy
        means = x.view(b, h, nb, block, d).mean(-2, dtype=torch.float32)
        return (means, means.sum(-2, keepdim=True) * block) if sums else means
    tail = x[:, :, whole * block:].sum(-2, keepdim=True, dtype=torch.float32)
    if whole:
        head = x[:, :, :whole * block].view(b, h, whole, block, d).sum(-2, dtype=torch.float32)
        block_sums = torch.cat([head, tail], -2)
    else:
        block_sums = tail
    counts = torch.full((nb,), float(block), device=x.device, dtype=torch.float32)
    counts[-1] = n - whole * block
    means = block_sums / counts[:, None]
    return (means, block_sums.sum(-2, keepdim=True)) if sums else means


def sla_classify(q: torch.Tensor, k: torch.Tensor, method) -> SLABlocks:
    """Classify key blocks per query block (critical / marginal / negligible), see the module docstring.

    Not differentiable (the top-k choice has no gradient). Ties are broken towards the lower
    key-block index for critical and towards the higher index for negligible blocks, so the
    result is deterministic.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``.
    Returns:
        :class:`SLABlocks`.
    """
    from ..checks import check_qkv

    method = SLAParams.of(method)
    check_qkv(q, k, k)  # (unchecked: torch's unpacking or bmm errors, and a k of one head broadcast silently)
    return classify_checked(q, k, method)


def classify_checked(q: torch.Tensor, k: torch.Tensor, method: SLAParams) -> SLABlocks:
    """:func:`sla_classify` of checked inputs and an :class:`SLAParams` (the attention call's path)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _classify(q, k, method)
    return _classify(q, k, method)


def _classify(q: torch.Tensor, k: torch.Tensor, method: SLAParams) -> SLABlocks:
    return classify_pooled(*_pooled(q, k, method), k.shape[-2], method)


def _pooled(q: torch.Tensor, k: torch.Tensor, method: SLAParams):
    """fp32 ``(qb, kb)``: the query-block means of q and the key-block means of ``k - mean_tokens(k)``
    (the PyTorch twin of :func:`.pool.pool_blocks`)."""
    qb = _mean_pool(q, method.block_q)
    # Pooling is linear, so pooling k - mean(k) equals pooling k minus the mean; with whole blocks that
    # mean is the mean of the block means (a reduction over nK rows, not over every key).
    if k.shape[-2] % method.block_k == 0:
        kb = _mean_pool(k, method.block_k)
        return qb, kb - kb.mean(dim=-2, keepdim=True)
    kb, k_sum = _mean_pool(k, method.block_k, sums=True)
    return qb, kb - k_sum / k.shape[-2]


def classify_pooled(qb: torch.Tensor, kb: torch.Tensor, n_kv: int, method: SLAParams,
                    index_dtype: torch.dtype = torch.int64) -> SLABlocks:
    """:func:`sla_classify` from the pooled ``qb`` ``[B, H, nQ, D]`` and smoothed ``kb`` ``[B, H, nK, D]`` (fp32)
    of ``n_kv`` keys: ``scores = qb @ kb^T``, then per row a stable sort (descending) whose first ``n_crit``
    indices are the critical blocks (ties: the lower index first) and last ``n_neg`` the negligible ones
    (ties: the higher index), each set sorted ascending. One matmul and one sort of the scores, plus one sort
    of each (short) index set, none for a set of one. ``index_dtype``: the sets' dtype (the fused kernels
    take int32: converted before the short sort, which then needs no second copy)."""
    _, n_crit, n_neg, _ = sla_block_counts(n_kv, method)
    n_k = kb.shape[-2]
    scores = torch.matmul(qb, kb.transpose(-1, -2))  # one batched GEMM over (B, H)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    # (stable: the indices are distinct, and ATen's stable sort is the faster one on short rows)
    critical = _ascending(order.narrow(-1, 0, n_crit), index_dtype)
    negligible = _ascending(order.narrow(-1, n_k - n_neg, n_neg), index_dtype) if n_neg else None
    return SLABlocks(critical, negligible, scores=scores)


def _ascending(indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distinct ``indices`` (a slice of a sort's indices) sorted along the last axis, as ``dtype``."""
    if indices.dtype != dtype:
        indices = indices.to(dtype)
    if indices.shape[-1] == 1:  # one per row: already in order
        return indices
    return torch.sort(indices, dim=-1, stable=True).values


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi of the linear branch, applied on the head dimension (fp32 in, fp32 out)."""
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"feature_map must be 'softmax', 'elu' or 'relu', got {kind!r}")


def fp32_features(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``feature_map(x.float(), kind)``; the softmax reads x once (``dtype=`` casts inside the kernel) instead of
    through an fp32 copy."""
    if kind == "softmax":
        return torch.softmax(x, dim=-1, dtype=torch.float32)
    return feature_map(x.float(), kind)


def add_feature_grad(g: torch.Tensor, f32: torch.Tensor, g_phi: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    """``g + phi'(x)^T g_phi`` (phi's backward for the upstream fp32 gradient ``g_phi``, from ``f32 = phi(x)``
    alone), rounded once to ``dtype`` into a new contiguous tensor: all fp32 until the one write.

    softmax: one fused softmax backward, ``f * (g_phi - sum(f * g_phi))`` (four passes as written); elu + 1: 1
    where x > 0 (there f = x + 1 > 1), else exp(x) = f, i.e. min(f, 1); relu: f > 0."""
    if kind == "softmax":
        back = torch._softmax_backward_data(g_phi, f32, -1, torch.float32)
    elif kind == "elu":
        back = g_phi * f32.clamp(max=1.0)
    else:
        back = g_phi * (f32 > 0)
    return torch.add(g, back, out=torch.empty(g.shape, dtype=dtype, device=g.device))


def rounded_features(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi(x) computed in fp32 (:func:`fp32_features`) and rounded to x's dtype: the fused kernel's linear-branch
    operand, and, upcast, the operand of the caller's global sums (both read the same rounded values)."""
    return fp32_features(x, kind).to(x.dtype)
