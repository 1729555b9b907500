"""SLA: sparse-linear attention (block classification, PyTorch twin, public API).

Semantics follow ``METHODS.md`` (section SLA). Per ``(batch, head)``:

1. Classify block pairs from pooled scores: ``k_s = k - mean_tokens(k)``,
   ``score = mean_pool(q, Bq) @ mean_pool(k_s, Bk)^T``; per query block the top
   ``ceil(topk * nK)`` key blocks (at least 1) are *critical*, the bottom
   ``floor(negligible * nK)`` are *negligible*, the rest *marginal*.
2. Sparse branch: exact softmax attention over the critical blocks only.
3. Linear branch: ``O_l = phi(q) H / (phi(q) . z + eps)`` with
   ``H = sum phi(K_j)^T V_j`` and ``z = sum colsum(phi(K_j))`` over the marginal
   blocks (``linear_tokens="marginal"``) or over all tokens (``"all"``).
4. ``O = O_s + proj(O_l)``.

Two implementations share this module's classification: the PyTorch twin
(``backend="torch"``, CPU fallback and test oracle, gathers only critical key
blocks so memory is ``O(N * kc * Bk)``, never ``N x N``) and the fused Triton
kernel (``backend="triton"``, see ``sla_triton.py`` / ``sla_ops.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import SLA
from .checks import check_qkv

__all__ = [
    "sla_attention",
    "sla_density",
    "sla_classify",
    "sla_block_counts",
    "SLABlocks",
    "MARGINAL",
    "CRITICAL",
    "NEGLIGIBLE",
    "bench_sla",
]

# Values of the int8 class map.
MARGINAL, CRITICAL, NEGLIGIBLE = 0, 1, 2

# Guards the linear branch's division when phi(q) . z is (close to) zero.
LINEAR_EPS = 1e-6

_BACKENDS = ("auto", "triton", "torch", "flex")
_TRITON_MAX_HEAD_DIM = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- classification
def sla_block_counts(n_kv: int, method: SLA) -> tuple:
    """``(n_blocks, n_critical, n_negligible, n_marginal)`` per query block for ``n_kv`` keys.

    ``n_critical = max(1, ceil(topk * nK))`` and ``n_negligible = floor(negligible * nK)``
    (clipped so the classes never overlap). The counts are the same for every query block.
    """
    n_k = _cdiv(n_kv, method.block_k)
    # The 1e-9 keeps e.g. 0.1 * 30 = 3.0000000000000004 from rounding up to 4 blocks.
    n_crit = min(n_k, max(1, math.ceil(method.topk * n_k - 1e-9)))
    n_neg = min(n_k - n_crit, math.floor(method.negligible * n_k + 1e-9))
    return n_k, n_crit, n_neg, n_k - n_crit - n_neg


def sla_density(n_tokens: int, method: SLA) -> float:
    """Fraction of key blocks the sparse branch visits (critical blocks / all blocks) for a length.

    Example: ``sla_density(32760, SLA(topk=0.05))`` is ``26 / 512``.
    """
    if not isinstance(method, SLA):
        raise TypeError(f"method must be a dit_accel.SLA config, got {type(method).__name__}")
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    n_k, n_crit, _, _ = sla_block_counts(n_tokens, method)
    return n_crit / n_k


@dataclass(frozen=True, eq=False)
class SLABlocks:
    """Block classification of one SLA call.

    Attributes:
        critical: int32 ``[B, H, nQ, kc]`` critical key-block indices per query block, ascending.
        negligible: int32 ``[B, H, nQ, kn]`` negligible key-block indices, ascending (``kn`` may be 0).
        classes: int8 ``[B, H, nQ, nK]``: ``CRITICAL`` (1), ``MARGINAL`` (0) or ``NEGLIGIBLE`` (2).
        scores: fp32 ``[B, H, nQ, nK]`` pooled block scores the classes were taken from.
    """

    critical: torch.Tensor
    negligible: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor

    @property
    def marginal(self) -> torch.Tensor:
        """int64 ``[B, H, nQ, km]`` marginal key-block indices, ascending (``km`` is the same for all)."""
        km = self.classes.shape[-1] - self.critical.shape[-1] - self.negligible.shape[-1]
        return true_columns(self.classes == MARGINAL, km)

    def density(self) -> float:
        """Visited (critical) block fraction."""
        return self.critical.shape[-1] / self.classes.shape[-1]


def true_columns(mask: torch.Tensor, width: int) -> torch.Tensor:
    """int64 indices of the first ``width`` True columns of each row of ``mask``, ascending.

    A stable sort of ``~mask`` brings the True columns first in column order; ``width`` comes from
    shapes, so there is no host sync. Rows with fewer True columns are padded with False columns.
    """
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, cdiv(N, block), D] mean over the real tokens of each block."""
    b, h, n, d = x.shape
    nb = _cdiv(n, block)
    pad = nb * block - n
    sums = F.pad(x, (0, 0, 0, pad)).view(b, h, nb, block, d).sum(-2)
    counts = torch.full((nb,), float(block), device=x.device, dtype=x.dtype)
    counts[-1] = block - pad
    return sums / counts[:, None]


@torch.no_grad()
def sla_classify(q: torch.Tensor, k: torch.Tensor, method: SLA) -> SLABlocks:
    """Classify key blocks per query block (critical / marginal / negligible), see the module docstring.

    Not differentiable (the top-k choice has no gradient). Ties are broken towards the lower
    key-block index for critical and towards the higher index for negligible blocks, so the
    result is deterministic.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``.
    Returns:
        :class:`SLABlocks`.
    """
    qf, kf = q.detach().float(), k.detach().float()
    n_k, n_crit, n_neg, _ = sla_block_counts(kf.shape[-2], method)
    qb = _mean_pool(qf, method.block_q)
    # Pooling is linear, so pooling k - mean(k) equals pooling k minus the mean.
    kb = _mean_pool(kf, method.block_k) - kf.mean(dim=-2, keepdim=True)
    scores = qb @ kb.transpose(-1, -2)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    critical = torch.sort(order[..., :n_crit], dim=-1).values
    negligible = torch.sort(order[..., n_k - n_neg:], dim=-1).values
    classes = torch.full(scores.shape, MARGINAL, dtype=torch.int8, device=q.device)
    classes.scatter_(-1, critical, CRITICAL)
    classes.scatter_(-1, negligible, NEGLIGIBLE)
    return SLABlocks(critical.to(torch.int32).contiguous(), negligible.to(torch.int32).contiguous(),
                     classes, scores)


# --------------------------------------------------------------------------- feature maps
def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi of the linear branch, applied on the head dimension (fp32 in, fp32 out)."""
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"feature_map must be 'softmax', 'elu' or 'relu', got {kind!r}")


# --------------------------------------------------------------------------- PyTorch twin
def _sparse_branch_torch(q, k, v, critical, block_q, block_k, scale):
    """Softmax attention of each query block over its critical key blocks (fp32, differentiable)."""
    b, h, nq_tok, d = q.shape
    nk_tok = k.shape[-2]
    n_q, n_k, kc = critical.shape[2], _cdiv(nk_tok, block_k), critical.shape[-1]
    pad_q, pad_k = n_q * block_q - nq_tok, n_k * block_k - nk_tok
    qb = F.pad(q, (0, 0, 0, pad_q)).view(b, h, n_q, block_q, d)
    kb = F.pad(k, (0, 0, 0, pad_k)).view(b, h, n_k, block_k, d)
    vb = F.pad(v, (0, 0, 0, pad_k)).view(b, h, n_k, block_k, d)
    # Gather only the critical blocks: [B, H, nQ, kc * Bk, D]. Gathering from the un-expanded
    # [B, H, nK, Bk, D] keeps the backward's scatter at the size of K, not nQ times it.
    idx = critical.long().reshape(b, h, n_q * kc, 1, 1).expand(b, h, n_q * kc, block_k, d)
    kg = torch.gather(kb, 2, idx).view(b, h, n_q, kc * block_k, d)
    vg = torch.gather(vb, 2, idx).view(b, h, n_q, kc * block_k, d)
    tok = critical.long()[..., None] * block_k + torch.arange(block_k, device=q.device)
    valid = (tok < nk_tok).flatten(3, 4)[..., None, :]  # [B, H, nQ, 1, kc * Bk]
    s = (qb @ kg.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ vg
    return o.reshape(b, h, n_q * block_q, d)[:, :, :nq_tok], lse.reshape(b, h, -1)[:, :, :nq_tok]


def _linear_branch_torch(q, k, v, blocks: SLABlocks, method: SLA):
    """Linear attention over the marginal blocks (or all tokens), fp32, differentiable."""
    b, h, nq_tok, d = q.shape
    nk_tok = k.shape[-2]
    qf = feature_map(q, method.feature_map)
    kf = feature_map(k, method.feature_map)
    if method.linear_tokens == "all":
        hs = kf.transpose(-1, -2) @ v  # [B, H, D, D]
        zs = kf.sum(-2)  # [B, H, D]
        num = qf @ hs
        den = (qf * zs[:, :, None]).sum(-1)
        return num / (den + LINEAR_EPS)[..., None]
    bq, bk = method.block_q, method.block_k
    n_q, n_k = blocks.classes.shape[-2:]
    pad_k = n_k * bk - nk_tok
    kfb = F.pad(kf, (0, 0, 0, pad_k)).view(b, h, n_k, bk, d)  # padded keys: phi rows are 0
    vb = F.pad(v, (0, 0, 0, pad_k)).view(b, h, n_k, bk, d)
    h_blk = kfb.transpose(-1, -2) @ vb  # [B, H, nK, D, D] = phi(K_j)^T V_j
    z_blk = kfb.sum(-2)  # [B, H, nK, D]
    marg = (blocks.classes == MARGINAL).float()  # [B, H, nQ, nK]
    h_q = torch.einsum("bhqk,bhkde->bhqde", marg, h_blk)  # per query block
    z_q = torch.einsum("bhqk,bhkd->bhqd", marg, z_blk)
    qfb = F.pad(qf, (0, 0, 0, n_q * bq - nq_tok)).view(b, h, n_q, bq, d)
    num = qfb @ h_q
    den = (qfb * z_q[:, :, :, None]).sum(-1)
    o = num / (den + LINEAR_EPS)[..., None]
    return o.reshape(b, h, n_q * bq, d)[:, :, :nq_tok]


def _sla_torch(q, k, v, blocks, method, scale, with_linear):
    qf, kf, vf = q.float(), k.float(), v.float()
    o_s, lse = _sparse_branch_torch(qf, kf, vf, blocks.critical, method.block_q, method.block_k, scale)
    o_l = _linear_branch_torch(qf, kf, vf, blocks, method) if with_linear else None
    return o_s.to(q.dtype), lse, o_l


# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, method, proj, scale, backend):
    if not isinstance(method, SLA):
        raise TypeError(f"method must be a dit_accel.SLA config, got {type(method).__name__}; "
                        "build one with dit_accel.SLA(topk=...)")
    check_qkv(q, k, v)
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError("q and k need at least one token")
    if proj is not None and not callable(proj):
        raise TypeError(f"proj must be an nn.Module mapping (..., D) -> (..., D) or None, got {type(proj).__name__}")
    if isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) != (q.shape[-1], q.shape[-1]):
        raise ValueError(f"proj must be Linear({q.shape[-1]}, {q.shape[-1]}) acting on the head dim, "
                         f"got Linear({proj.in_features}, {proj.out_features})")
    if scale is not None and (not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None (1/sqrt(D)), got {scale!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")


def triton_unavailable_reason(device: torch.device, head_dim: int) -> Optional[str]:
    """None when the fused Triton SLA kernel can run on ``device`` with ``head_dim``, else why not."""
    if head_dim > _TRITON_MAX_HEAD_DIM:
        return f"head dim {head_dim} > {_TRITON_MAX_HEAD_DIM} is not supported by the Triton SLA kernel"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton SLA kernel needs a CUDA device (got {device.type}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'")


def _resolve_backend(backend: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    if backend == "auto":
        env = os.environ.get("DIT_ACCEL_BACKEND", "").strip().lower()
        if env in ("triton", "torch"):
            backend = env
        else:  # unknown names (e.g. "flex", meant for other kernels) fall back to auto
            # fp32 tiles need more shared memory than sm_89 offers, so GPUs run fp32 through the twin.
            fused = device.type == "cuda" and dtype != torch.float32
            backend = "triton" if fused and triton_unavailable_reason(device, head_dim) is None else "torch"
    if backend == "triton":
        why = triton_unavailable_reason(device, head_dim)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run: {why}")
    return backend


# --------------------------------------------------------------------------- public API
def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: SLA,
                  proj: Optional[nn.Module] = None, *, scale: Optional[float] = None,
                  backend: str = "auto", return_parts: bool = False):
    """Sparse-linear attention: ``O = O_sparse + proj(O_linear)`` (METHODS.md, section SLA).

    Per ``(batch, head)`` key blocks are classified per query block from pooled scores
    (:func:`sla_classify`): *critical* blocks get exact softmax attention, *marginal* blocks
    go through linear attention (``phi`` = ``method.feature_map``), *negligible* blocks are
    skipped. With ``proj`` still zero (its initialisation), **SLA is training-free top-k
    block-sparse attention**; fine-tuning ``proj`` (and LoRA) recovers the marginal mass.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, H, Nk, D)`` (like SDPA), float16 / bfloat16 / float32.
            Any lengths (ragged last blocks are masked); the Triton kernel needs ``D <= 128``.
        method: :class:`dit_accel.SLA` config (topk, negligible, block sizes, feature map,
            linear token set).
        proj: module applied to the linear branch on the head dim, normally a zero-initialised
            ``nn.Linear(D, D)`` per layer. ``None`` drops the linear branch (not computed).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, else the PyTorch twin; env
            ``DIT_ACCEL_BACKEND`` overrides), ``"triton"`` (on CPU only under
            ``TRITON_INTERPRET=1``) or ``"torch"``; ``"flex"`` (accepted for pipeline-wide
            settings) runs the PyTorch twin.
        return_parts: also return the parts, for log-sum-exp merging with other keys.

    Returns:
        ``o`` ``(B, H, Nq, D)`` in q's dtype; with ``return_parts=True`` the tuple
        ``(o_sparse, lse_sparse, o_linear_projected, info)``: ``o_sparse`` in q's dtype,
        ``lse_sparse`` fp32 ``(B, H, Nq)`` (natural log), ``o_linear_projected`` in q's dtype
        (zeros when ``proj`` is None) and ``info`` a dict with ``density`` (visited critical
        block fraction), ``blocks`` (:class:`SLABlocks`) and ``backend``.
        All outputs are differentiable w.r.t. q, k, v and proj's parameters.

    Example::

        proj = torch.nn.Linear(64, 64); torch.nn.init.zeros_(proj.weight); torch.nn.init.zeros_(proj.bias)
        o = sla_attention(q, k, v, dit_accel.SLA(topk=0.05), proj)
    """
    _check_inputs(q, k, v, method, proj, scale, backend)
    d = q.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    # SLA has no FlexAttention variant; a pipeline-wide backend="flex" runs the PyTorch twin.
    backend = _resolve_backend("torch" if backend == "flex" else backend, q.device, d, q.dtype)
    blocks = sla_classify(q, k, method)
    _, _, _, n_marg = sla_block_counts(k.shape[-2], method)
    with_linear = proj is not None and (method.linear_tokens == "all" or n_marg > 0)

    if backend == "torch":
        o_s, lse, o_l = _sla_torch(q, k, v, blocks, method, scale, with_linear)
    else:
        from .sla_ops import sla_triton_attention

        o_s, lse, o_l = sla_triton_attention(q, k, v, blocks, method, scale, with_linear)

    o_lp = None
    if proj is not None:
        if o_l is None:  # no marginal blocks: O_l is exactly zero, proj(0) is still its bias
            o_l = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        weight = getattr(proj, "weight", None)
        o_lp = proj(o_l.to(weight.dtype) if isinstance(weight, torch.Tensor) else o_l).to(q.dtype)
    o = o_s if o_lp is None else o_s + o_lp
    if not return_parts:
        return o
    info = {"density": blocks.density(), "blocks": blocks, "backend": backend}
    return o_s, lse, (o_lp if o_lp is not None else torch.zeros_like(o_s)), info


# --------------------------------------------------------------------------- benchmark
def bench_sla(n_tokens: int = 32760, heads: int = 12, head_dim: int = 128, *, topk: float = 0.05,
              dtype: torch.dtype = torch.bfloat16, backward: bool = True, batch: int = 1,
              warmup: int = 3, iters: int = 10, device: str = "cuda") -> dict:
    """Time the fused SLA kernel against SDPA (dense) at one shape; CUDA only.

    Returns a dict with ``sla_fwd_ms``, ``sdpa_fwd_ms`` (and ``*_bwd_ms`` when ``backward``:
    forward+backward time), ``speedup_fwd``, ``density`` and ``ideal_speedup`` (1 / density).
    Default shape: Wan2.1-1.3B at 480p (N = 32,760, 12 heads, D = 128, bf16), 95% sparsity.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_sla needs a CUDA device")
    method = SLA(topk=topk)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, n_tokens, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g, requires_grad=backward)
               for _ in range(3))
    proj = nn.Linear(head_dim, head_dim, device=device, dtype=dtype)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)

    def timed(fn):
        for _ in range(warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    def sla_fwd():
        with torch.no_grad():
            sla_attention(q, k, v, method, proj, backend="triton")

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    out = {"n_tokens": n_tokens, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
           "density": sla_density(n_tokens, method)}
    out["ideal_speedup"] = 1.0 / out["density"]
    out["sla_fwd_ms"], out["sdpa_fwd_ms"] = timed(sla_fwd), timed(sdpa_fwd)
    out["speedup_fwd"] = out["sdpa_fwd_ms"] / out["sla_fwd_ms"]
    if backward:
        do = torch.randn(shape, device=device, dtype=dtype, generator=g)
        out["sla_fwd_bwd_ms"] = timed(lambda: sla_attention(q, k, v, method, proj, backend="triton").backward(do))
        out["sdpa_fwd_bwd_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v).backward(do))
        out["speedup_fwd_bwd"] = out["sdpa_fwd_bwd_ms"] / out["sla_fwd_bwd_ms"]
    return out
