"""VSA's coarse branch in two Triton launches: cube pooling of q, k, v, then coarse attention with its scores.

:func:`coarse_triton` returns what :func:`~.naive.coarse_attention` (the PyTorch twin, the CPU path and the
oracle) returns: the coarse output per cube, the fp32 scores ``mean(q) . mean(k) * scale`` of every cube pair,
and the selection, ``torch.topk`` over those scores (so ties are broken exactly as torch.topk breaks them).

- ``_vsa_pool_kernel``: one program per (batch x head, cube) reads the cube's tokens of q, k and v once in
  tiled order (the permutation's padding holds zeros) and writes the three fp32 means over its real tokens.
- ``_vsa_coarse_kernel``: one program per (batch x head, block of query cubes) walks the key cubes, writes
  the scores and keeps an online softmax of them against the value means (fp32, IEEE dots: no TF32).

Forward only: a call that needs gradients through the coarse branch runs the twin (:mod:`.api` decides).
Registered with the first-use self-check as ``vsa.triton.coarse``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import Cubes

__all__ = ["coarse_triton", "BLOCK_CUBES", "ROWS", "VARIANT"]

VARIANT = "vsa.triton.coarse"

#: Query cubes per program, and key cubes per step (tl.dot needs at least 16).
BLOCK_CUBES = 16
#: Token rows of a cube read per step.
ROWS = 64


@triton.jit
def _cube_mean(base, start, stride_n, stride_d, rows, cols, col_ok, inv, VOL: tl.constexpr, ROWS: tl.constexpr):
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for r in tl.static_range(0, VOL, ROWS):
        tok = start + r + rows
        ptrs = base + tok.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
        x = tl.load(ptrs, mask=((r + rows) < VOL)[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    return acc * inv


@triton.jit
def _vsa_pool_kernel(Q, K, V, QC, KC, VC, INV,
                     sq_b, sq_n, sq_d, sk_b, sk_n, sk_d, sv_b, sv_n, sv_d, so_b, so_c,
                     D, VOL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    inv = tl.load(INV + c)  # 1 / real tokens of the cube
    start = c * VOL
    out = bh * so_b + c.to(tl.int64) * so_c + cols
    tl.store(QC + out, _cube_mean(Q + bh * sq_b, start, sq_n, sq_d, rows, cols, col_ok, inv, VOL, ROWS), mask=col_ok)
    tl.store(KC + out, _cube_mean(K + bh * sk_b, start, sk_n, sk_d, rows, cols, col_ok, inv, VOL, ROWS), mask=col_ok)
    tl.store(VC + out, _cube_mean(V + bh * sv_b, start, sv_n, sv_d, rows, cols, col_ok, inv, VOL, ROWS), mask=col_ok)


@triton.jit
def _vsa_coarse_kernel(QC, KC, VC, S, O, C, D, scale, so_b, so_c, ss_b, ss_m,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WITH_OUT: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < C
    d_ok = offs_d < D
    qc = tl.load(QC + bh * so_b + offs_m[:, None] * so_c + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                 other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < C
        kv_ptr = bh * so_b + offs_n[:, None] * so_c + offs_d[None, :]
        kc = tl.load(KC + kv_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qc, tl.trans(kc), input_precision="ieee") * scale
        tl.store(S + bh * ss_b + offs_m[:, None].to(tl.int64) * ss_m + offs_n[None, :], s,
                 mask=m_ok[:, None] & n_ok[None, :])
        if WITH_OUT:
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            vc = tl.load(VC + kv_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, vc, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
    if WITH_OUT:
        tl.store(O + bh * so_b + offs_m[:, None] * so_c + offs_d[None, :], acc / l_i[:, None],
                 mask=m_ok[:, None] & d_ok[None, :])


def coarse_triton(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cubes: Cubes, count: int, scale: float,
                  with_output: bool = True):
    """:func:`~.naive.coarse_attention` (fp32) in two launches, forward only: ``(coarse or None, scores,
    selection)``. ``q_t, k_t, v_t``: ``(B, H, Np, D)`` in tiled order (padding zero)."""
    b, h, n_pad, d = q_t.shape
    c, vol = cubes.count, cubes.volume
    device = q_t.device
    q3, k3, v3 = (x.reshape(b * h, n_pad, d) for x in (q_t, k_t, v_t))
    qc, kc, vc = (torch.empty(b * h, c, d, dtype=torch.float32, device=device) for _ in range(3))
    inv = (1.0 / cubes.sizes.to(torch.float32)).to(device)
    block_d = max(16, triton.next_power_of_2(d))
    rows = min(ROWS, triton.next_power_of_2(vol))
    _vsa_pool_kernel[(b * h, c)](q3, k3, v3, qc, kc, vc, inv, *q3.stride(), *k3.stride(), *v3.stride(),
                                 qc.stride(0), qc.stride(1), d, VOL=vol, ROWS=rows, BLOCK_D=block_d)
    scores = torch.empty(b * h, c, c, dtype=torch.float32, device=device)
    out = torch.empty(b * h, c, d, dtype=torch.float32, device=device) if with_output else scores
    grid = (b * h, triton.cdiv(c, BLOCK_CUBES))
    _vsa_coarse_kernel[grid](qc, kc, vc, scores, out, c, d, float(scale), qc.stride(0), qc.stride(1),
                             scores.stride(0), scores.stride(1), BLOCK_M=BLOCK_CUBES, BLOCK_N=BLOCK_CUBES,
                             BLOCK_D=block_d, WITH_OUT=with_output)
    from ..selfcheck import corrupt

    scores = corrupt(VARIANT, scores.view(b, h, c, c))  # ($DIT_ACCEL_FAULT proves the self-check catches it)
    if with_output:
        corrupt(VARIANT, out)
    selection = torch.topk(scores, count, dim=-1).indices
    return (out.view(b, h, c, d) if with_output else None), scores, selection
