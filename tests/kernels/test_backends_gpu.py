"""The vendor launches (FA4, cuDNN, NATTEN) against the fp32 twin at production sizes: Wan 2.1 480p
(grid 21 x 30 x 52 = 32,760 tokens), 40 heads x batch 2, head dim 128, bf16. ``pytest -m gpu``; skipped
without CUDA and without the vendor package.

The fp32 oracle cannot hold 80 full 32k x 32k score matrices, so the forward is compared on sampled query rows
(the first and last blocks, the ragged tail, random rows) of the first and last heads of both batch elements;
the backward runs the same layouts on a shorter clip (5 frames) where the oracle's gradients fit.
"""

from __future__ import annotations

import pytest
import torch

from dit_accel.kernels import block_sparse_attention, dense_attention_reference
from dit_accel.kernels.backends import Request
from dit_accel.kernels.block_sparse import backends as vendor
from dit_accel.patterns.gna import gna_layout
from dit_accel.patterns.radial import radial_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WAN480 = (21, 30, 52)
SHORT = (5, 30, 52)
HEADS, BATCH, D = 40, 2, 128
TOL = {"fwd": 2e-2, "bwd": 4e-2}  # relative Frobenius error vs fp32, bf16 inputs


def _skip_unless(name: str, grad: bool = False):
    why = vendor.module(name).reason(Request(torch.device("cuda"), torch.bfloat16, D, needs_grad=grad))
    if why is not None:
        pytest.skip(why)


def _qkv(n, heads=HEADS, batch=BATCH, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _sampled_forward_error(o, q, k, v, mask, scale, rows):
    """Largest relative error of ``o`` against the fp32 oracle on ``rows`` of heads 0 and H-1, both batches."""
    errs = []
    for h in (0, q.shape[1] - 1):
        m = mask[0 if mask.shape[0] == 1 else h][rows]
        ref, _ = dense_attention_reference(q[:, h:h + 1, rows].float(), k[:, h:h + 1].float(), v[:, h:h + 1].float(),
                                           m, scale)
        errs.append(_rel(o[:, h:h + 1, rows], ref))
    return max(errs)


def _rows(n, block, real=None):
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.arange(block), torch.arange(n - block - 37, n), torch.randint(0, n, (1024,), generator=g)])
    idx = idx.unique()
    if real is not None:
        idx = idx[real[idx]]
    return idx.cuda()


def _gna(grid):
    perm, layout = gna_layout(grid, (3, 9, 13), stride=(1, 3, 1), block_q=64, block_k=64)
    return perm, layout


@pytest.mark.parametrize("name", ["fa4", "natten"])
def test_wan480p_gna_forward(name):
    _skip_unless(name)
    perm, layout = _gna(WAN480)
    if name == "natten":
        w = vendor.module("natten").attach_gna(layout, perm, (3, 9, 13), (1, 3, 1))
        assert not isinstance(w, str), w
    q, k, v = _qkv(layout.q_len)
    scale = D ** -0.5
    o = block_sparse_attention(q, k, v, layout, backend=name)
    mask = layout.to(torch.device("cuda")).to_dense_mask()
    real = (perm.order >= 0) if name == "natten" else None
    err = _sampled_forward_error(o, q, k, v, mask, scale, _rows(layout.q_len, 64, real))
    assert err < TOL["fwd"], f"{name}: relative error {err:.3g} on Wan 480p GNA"


def test_wan480p_radial_forward_on_cudnn_and_fa4():
    layout = radial_layout(WAN480, 128, decay=0.2)  # block-level: every visited block whole
    mask = layout.to(torch.device("cuda")).to_dense_mask()
    q, k, v = _qkv(layout.q_len, seed=2)
    ran = 0
    for name in ("cudnn", "fa4"):
        why = vendor.module(name).reason(Request(torch.device("cuda"), torch.bfloat16, D))
        if why is not None:
            continue
        o = block_sparse_attention(q, k, v, layout, backend=name)
        err = _sampled_forward_error(o, q, k, v, mask, D ** -0.5, _rows(layout.q_len, 128))
        assert err < TOL["fwd"], f"{name}: relative error {err:.3g} on Wan 480p radial"
        ran += 1
    if not ran:
        pytest.skip("neither cudnn nor fa4 can run here")


@pytest.mark.parametrize("name", ["fa4", "cudnn", "natten"])
def test_backward_against_the_oracle(name):
    _skip_unless(name, grad=True)
    if name == "cudnn":
        perm, layout = None, radial_layout(SHORT, 128, decay=0.5)
    else:
        perm, layout = _gna(SHORT)
        if name == "natten":
            vendor.module("natten").attach_gna(layout, perm, (3, 9, 13), (1, 3, 1))
    q, k, v = _qkv(layout.q_len, heads=8, seed=3)
    mask = layout.to(torch.device("cuda")).to_dense_mask()
    do = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    if perm is not None and name == "natten":
        do[:, :, ~(perm.order >= 0).cuda()] = 0  # padded query rows are dropped by the caller

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        torch.autograd.backward(fn(*leaves).float(), do.float())
        return [t.grad for t in leaves]

    got = grads(lambda a, b, c: block_sparse_attention(a, b, c, layout, backend=name), torch.bfloat16)
    want = grads(lambda a, b, c: dense_attention_reference(a, b, c, mask, D ** -0.5)[0], torch.float32)
    for g, w, what in zip(got, want, ("dq", "dk", "dv")):
        assert _rel(g, w) < TOL["bwd"], f"{name} {what}: relative error {_rel(g, w):.3g}"


def test_vendor_contenders_time_side_by_side():
    perm, layout = _gna(SHORT)
    q, k, v = _qkv(layout.q_len, heads=8)
    fns = vendor.vendor_contenders(layout, q, k, v)
    if not fns:
        pytest.skip(f"no vendor backend here: {vendor.vendor_reasons(layout, q, k, v)}")
    ref = block_sparse_attention(q, k, v, layout, backend="triton")
    for name, fn in fns.items():
        assert _rel(fn(), ref) < TOL["fwd"], name
