"""The fused SLA backward's launcher: the dQ, dK/dV and linear-branch dK/dV kernels of :mod:`.triton`, and the work
between them (the gradients' scale, the transposed block lists, phi's backward)."""

from __future__ import annotations

import torch

from ..._util import cdiv as _cdiv
from .. import occupancy, selfcheck
from ..dense.triton import bwd_preprocess
from .common import FEATURE_IDS, add_feature_grad, chunk_totals, fp32_features, true_columns
from . import glue
from .configs import BLOCK_K, BLOCK_M, select_sla_config
from .triton import (_LOG2E, _arch, _global_partials, _last_dim_contiguous, _launch, _live, _pad_d,
                     _strides)

__all__ = ["sla_backward", "transposed_lists", "row_scale", "SCORE_BOUND"]

_FEATURE_NAMES = {i: name for name, i in FEATURE_IDS.items()}
#: Linear scores are divided by a per-row scale so that they stay below this (fp16 max is 65504).
SCORE_BOUND = 2.0 ** 15


def _unit_rows(qf: torch.Tensor, feature: int) -> bool:
    """Whether :func:`row_scale` is 1 on every row without reading anything (softmax features, ``D < 2^15``)."""
    return _FEATURE_NAMES[feature] == "softmax" and qf.shape[-1] < SCORE_BOUND


def row_scale(qf: torch.Tensor, kf: torch.Tensor, feature: int) -> torch.Tensor:
    """Per-row divisor ``s_i >= 1`` of the linear scores, fp32 ``(B, H, Nq)`` (the kernels take ``1 / s``).

    ``|phi(q_i) . phi(k_j)| <= sum|phi(q_i)| * max|phi(k)|``, so the scores divided by ``s_i`` stay
    below :data:`SCORE_BOUND` and fit fp16 (unnormalised relu / elu features overflow it otherwise).
    Numerator and denominator scale alike, so ``s`` cancels. Softmax features need no reading: each is
    at most 1, so that bound is at most ``D``, and ``s`` is 1 for every ``D < 2^15``.
    """
    if _unit_rows(qf, feature):
        return torch.ones(qf.shape[:-1], dtype=torch.float32, device=qf.device)
    kmax = kf.float().abs().amax(dim=(-1, -2))[..., None]
    return (qf.float().abs().sum(-1) * kmax / SCORE_BOUND).clamp_min(1.0).contiguous()


def transposed_lists(index: torch.Tensor, n_kb: int):
    """[B, H, nQ, L] key-block lists -> per key block its query blocks ``[B, H, nK, nQ]`` + counts ``[B, H, nK]``.

    No host sync: the width is nQ (the worst case), so shapes are static. Query blocks ascend.
    """
    b, h, n_qb, width = index.shape
    visited = torch.zeros(b, h, n_qb, n_kb, dtype=torch.bool, device=index.device)
    if width:
        visited.scatter_(-1, index.long(), True)
    visited = visited.transpose(-1, -2)
    counts = visited.sum(-1, dtype=torch.int32)
    order = true_columns(visited, n_qb).to(torch.int32)
    return order.contiguous(), counts.contiguous()


@occupancy.on_inputs_device
def sla_backward(do, dlse, dnum, dden, q, k, v, qf, kf, o, lse, critical, lin_blocks, scale, feature, has_lin,
                 lin_sign, block_q, dqf_g=None, dkf_g=None, dv_g=None, with_global=False, dol=None, o_l=None,
                 inv=None):
    """Launch the dQ and dK/dV kernels. ``dlse`` (may be zeros) is folded into delta. With the linear branch,
    either the caller gives the rounded features ``qf``, ``kf`` and, for the global sums, their fp32 gradients
    ``dqf_g``, ``dkf_g``, ``dv_g`` for phi(q), phi(K) and V (added to the kernels' before phi's backward, which runs
    here in PyTorch operators), or ``qf`` is None and the glue kernels (:mod:`.glue`) make the features and, with
    ``with_global``, the global sums' gradients, and take phi's backward. ``dnum`` and ``dden``: the gradients of
    the linear branch's numerator and denominator; or, given the linear output's gradient ``dol``, that output
    ``o_l`` and ``inv = 1 / (den + eps)`` (softmax features, with the glue kernels), the kernels form them and
    ``dden`` is the incoming gradient of ``den`` (empty: none)."""
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    arch = _arch(q.device)
    cfg_dq = select_sla_config("bwd_dq", q.dtype, d, has_lin, arch)
    cfg_dkdv = select_sla_config("bwd_dkdv", q.dtype, d, has_lin, arch)
    n_kb, dp = _cdiv(nk, BLOCK_K), cfg_dq.block_d
    glued, sums = has_lin and qf is None, None
    do = do.to(q.dtype).contiguous()
    # d lse / d s = p, so an lse gradient shifts delta: ds = p * (dp - (rowsum(do*o) - dlse)); delta and the
    # base-2 lse (+inf on rows without keys) in one launch, as contiguous (B*H, Nq) fp32.
    delta, lse2 = bwd_preprocess(_last_dim_contiguous(o.to(q.dtype)), do, lse, dlse)
    if has_lin and not glued:
        qf, kf = _pad_d(dp, qf.contiguous(), kf.contiguous())
        phi_q, phi_k = (fp32_features(t, _FEATURE_NAMES[feature]) for t in (q, k))  # for the phi backward
    q, k, v, do = _pad_d(dp, *(_last_dim_contiguous(t) for t in (q, k, v)), do)
    # With the linear branch, dq / dk leave the kernels in fp32 and get the phi backward added after them.
    # dK / dV leave the kernels in fp32 (the linear kernel adds to dV), and so does dQ with the linear branch.
    dq = torch.empty(q.shape, dtype=torch.float32 if has_lin else q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    if has_lin and dol is not None:  # (the glue kernels form d num, d den and their scale from do_l)
        dol, o_l = (t.contiguous() for t in _pad_d(dp, dol, o_l))
        dden, dscale = glue.linear_grads(dol, o_l, inv, dden if dden.numel() else None)
        qf, kf, sums, dnum_s = _glue_features(q, k, v, dol, dden, feature, d, with_global, inv, dscale)
        dden = dden_s = (dden / dscale[..., None]).contiguous()
        dnum, inv_s = dnum_s, row_scale(qf, kf, feature).reciprocal_()
    elif has_lin:
        dnum, dden = _pad_d(dp, dnum.float())[0], dden.float()
        if glued:
            qf, kf, sums, _ = _glue_features(q, k, v, dnum, dden, feature, d, with_global)
        dnum, dden, dscale, inv_s, dnum_s, dden_s = _scaled_linear_grads(dnum, dden, qf, kf, feature, q.dtype)
    else:  # unused by the kernels; any live allocation will do
        dnum = dden = dscale = inv_s = dnum_s = dden_s = delta
        qf, kf = q, k
    # (the gradients for phi(q) and phi(K), fp32; without the linear branch unused, any live allocation)
    dqf, dkf = (torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (q, k)) if has_lin else (dq, dk)
    crit_ptr, lin_ptr = _live(critical), _live(lin_blocks)
    crit_t, crit_cnt = transposed_lists(critical, n_kb)
    lin_t, lin_cnt = transposed_lists(lin_blocks, n_kb) if has_lin else (None, None)
    n_sub, sign = block_q // BLOCK_M, float(lin_sign)
    strides = (*_strides(q), *_strides(k), *_strides(v))
    _launch(cfg_dq, (_cdiv(nq, BLOCK_M), b * h),
            q, k, v, kf, do, lse2, delta, dnum, dden, dscale, crit_ptr, lin_ptr, dq, dqf, *strides,
            h, nq, nk, dp, critical.shape[-1], lin_blocks.shape[-1], n_sub, scale, scale * _LOG2E, sign)
    _launch(cfg_dkdv, (n_kb, b * h), q, k, v, do, lse2, delta, crit_t, crit_cnt, dk, dv, *strides,
            h, nq, nk, dp, n_sub, scale, scale * _LOG2E)
    if has_lin:
        cfg_lin = select_sla_config("bwd_dkdv_lin", q.dtype, d, True, arch)
        _launch(cfg_lin, (n_kb, b * h), v, qf, kf, dnum_s, dden_s, dscale, inv_s, lin_t, lin_cnt, dv, dkf,
                *_strides(v), h, nq, nk, dp, n_sub, sign)
    if glued:  # phi's backward and the global terms, each gradient written once in the input dtype
        dnum32, dden32, kv, ksum, dkv, dksum = sums or (None,) * 6
        dq = glue.grad_q(q, dq, dqf, d, feature, dnum32, dden32, kv, ksum, inv)
        dk, dv = glue.grad_k(k, v, dk, dkf, dv, d, feature, dkv, dksum)
        return selfcheck.corrupt(glue.VARIANT, dq), dk, dv
    dq, dk, dv, dqf, dkf = (g[..., :d] for g in (dq, dk, dv, dqf, dkf))  # drop padded columns
    name = _FEATURE_NAMES[feature]
    if has_lin:  # (each written once in v's dtype: the fp32 sum is rounded in the add)
        dq = add_feature_grad(dq, phi_q, dqf if dqf_g is None else dqf.add_(dqf_g), name, v.dtype)
        dk = add_feature_grad(dk, phi_k, dkf if dkf_g is None else dkf.add_(dkf_g), name, v.dtype)
    else:
        dq, dk = (g.to(v.dtype).contiguous() for g in (dq, dk))
    if dv_g is not None:  # (the same fp32 sum, rounded as it is written)
        dv = torch.add(dv, dv_g, out=torch.empty(dv.shape, dtype=v.dtype, device=dv.device))
    dv = dv.to(v.dtype).contiguous()
    return selfcheck.corrupt("sla.triton.bwd", dq), dk, dv


def _scaled_linear_grads(dnum, dden, qf, kf, feature, dtype):
    """``(dnum, dden, dscale, 1 / s, dnum_s, dden_s)``: the linear branch's fp32 gradients as the kernels take them.
    ``dnum ~ do / (phi(q) . z)`` is tiny; the kernels see it rescaled to O(1) per (batch, head) (every
    linear-branch gradient is linear in (dnum, dden)) and multiply the scale back. dK/dV also takes it times the
    rows' score divisor s (see the kernel). ``dnum`` comes contiguous in ``dtype`` whatever its layout."""
    # (max |x| as an inf-norm: no |dnum| tensor)
    dscale = torch.maximum(torch.linalg.vector_norm(dnum, float("inf"), dim=(-1, -2)),
                           torch.linalg.vector_norm(dden, float("inf"), dim=-1)).clamp_min(1e-30)
    dden = dden / dscale[..., None]
    s = row_scale(qf, kf, feature)
    if _unit_rows(qf, feature):  # s is 1: dnum * s is dnum (each divided and rounded in one write)
        dnum = dnum_s = torch.div(dnum, dscale[..., None, None],
                                  out=torch.empty(dnum.shape, dtype=dtype, device=dnum.device))
        dden_s = dden = dden.contiguous()
    else:
        dnum = dnum / dscale[..., None, None]
        dnum_s = (dnum * s[..., None]).to(dtype).contiguous()
        dden_s = (dden * s).contiguous()
        dnum, dden = dnum.to(dtype).contiguous(), dden.contiguous()
    return dnum, dden, dscale.contiguous(), s.reciprocal_(), dnum_s, dden_s


def _glue_features(q, k, v, dnum, dden, feature: int, head_dim: int, with_global: bool, inv=None, dscale=None):
    """``(qf, kf, sums, dnum_s)`` from the glue kernels on the padded ``q``, ``k``, ``v``: the rounded features; with
    the global sums, ``(dnum, dden, kv, ksum, dkv, dksum)`` for phi's backward (``dnum`` fp32, or the linear output's
    gradient with ``inv``; ``dden`` fp32; phi(K), ``kv`` and ``ksum`` from the forward's global-sums kernel); with
    ``dscale``, ``d num / dscale`` in q's dtype (else None)."""
    if not with_global:
        qf, _, _, dnum_s = glue.features(q, head_dim, feature, dnum if dscale is not None else None, None, inv,
                                         dscale, sums=False)
        return qf, glue.features(k, head_dim, feature)[0], None, dnum_s
    dnum, dden = dnum.contiguous(), dden.contiguous()
    kv, ksum, _, kf = _global_partials(k, v, feature, head_dim)
    kv, ksum = chunk_totals(kv, ksum)
    qf, dkv, dksum, dnum_s = glue.features(q, head_dim, feature, dnum, dden, inv, dscale)
    return qf, kf.view(k.shape), (dnum, dden, kv, ksum, dkv, dksum), dnum_s
