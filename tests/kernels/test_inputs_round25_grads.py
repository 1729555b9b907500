"""Gradients of the public attention functions at valid but unusual inputs, round 25: the Triton kernels (under the
interpreter) and their PyTorch twins against autograd through an fp32 masked-dense reference written here from the
definition. Batch 3, one head, head dims that are not 64, lengths that are not whole blocks, fully masked query rows,
(B, N, H, D) views, upstream gradients with stride 0 (``.expand``), only some inputs requiring grad, a second
backward, accumulation into ``.grad``; and a ``create_graph=True`` gradient, which the kernels' custom-op paths
let torch refuse with "no autograd formula was registered" (naming neither the function nor a way out) before."""

import copy

import pytest
import torch

import dit_accel
from dit_accel.kernels import BlockLayout, SLAParams, block_sparse_attention, sla_attention
from tests.kernels.sla_reference import brute_force_classes, make_proj, reference_sla
from tests.kernels.vsa_reference import reference as vsa_reference
from tests.utils import dispatched, interpreter


@pytest.fixture(autouse=True)
def _no_selfcheck(monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")  # (the first-use self-checks are proved apart)


def _brute(q, k, v, mask, scale=None):
    """``(o, lse)`` of softmax(q k^T * scale) v over the token mask ``[H, N, M]`` in fp32; a row without keys gives
    o = 0 (the package's convention) and lse = -inf."""
    scores = (q.float() @ k.float().transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)).masked_fill(~mask, -torch.inf)
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v.float(), torch.logsumexp(scores, -1)


def _close(got, want, what, tol=2e-5):
    assert got is not None and torch.isfinite(got).all(), f"{what}: missing or not finite"
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _mask(n=40, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, n, m, generator=g) < 0.4
    mask[..., :3] = True
    mask[:, 7] = False  # a query row without keys inside a visited block row
    mask[:, 16:32] = False  # a whole query block without keys (no visited block at all)
    return mask


# ------------------------------------------------------------------ 1. block-sparse: the Triton kernel's gradients
@interpreter
def test_block_sparse_triton_gradients_at_odd_shapes_views_and_expanded_upstream_gradients():
    """Verified exact (no fault): B=3, one head, D=24, N=40 and M=37 (ragged last blocks of 16), q, k, v as the
    (B, N, H, D) views Diffusers passes, an upstream gradient of stride 0 in its last dim, an lse gradient, fully
    masked rows (zero output and zero gradients, not NaN); then a second backward (retain_graph) accumulates."""
    mask = _mask(40, 37)
    layout = BlockLayout.from_dense_mask(mask, block_q=16, block_k=16)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, 1, 24, generator=g).transpose(1, 2).requires_grad_() for n in (40, 37, 37))
    o, lse = block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    do = torch.randn(3, 1, 40, 1, generator=g).expand(3, 1, 40, 24)
    dlse = torch.randn(3, 1, 40, generator=g)
    loss = (o * do).sum() + (lse.nan_to_num(0.0, 0.0, 0.0) * dlse).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (q, k, v)]
    loss.backward()
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    o_r, lse_r = _brute(qr, kr, vr, mask)
    ((o_r * do).sum() + (torch.where(lse_r.isfinite(), lse_r, 0.0) * dlse).sum()).backward()
    _close(o, o_r, "o")
    assert (o[:, :, 16:32] == 0).all() and (o[:, :, 7] == 0).all()
    for name, got, x, want in zip(("dq", "dk", "dv"), first, (q, k, v), (qr.grad, kr.grad, vr.grad)):
        _close(got, want, name)
        _close(x.grad, 2 * want, f"{name} accumulated")
    assert (first[0][:, :, 16:32] == 0).all() and (first[0][:, :, 7] == 0).all()


@interpreter
def test_block_sparse_triton_gradient_of_v_alone_and_of_batch_expanded_keys():
    """Only v requires grad (k expanded over the batch, stride 0): dv right, nothing else asked of the kernel."""
    mask = _mask()
    layout = BlockLayout.from_dense_mask(mask, block_q=16, block_k=16)
    g = torch.Generator().manual_seed(2)
    q, k1 = torch.randn(3, 1, 40, 16, generator=g), torch.randn(1, 1, 40, 16, generator=g)
    v = torch.randn(3, 1, 40, 16, generator=g).requires_grad_()
    k = k1.expand(3, 1, 40, 16)
    do = torch.randn(3, 1, 16, 40, generator=g).transpose(-1, -2)  # a transposed upstream gradient
    dv, = torch.autograd.grad(block_sparse_attention(q, k, v, layout, backend="triton"), v, do)
    vr = v.detach().requires_grad_()
    want, = torch.autograd.grad(_brute(q, k, vr, mask)[0], vr, do)
    _close(dv, want, "dv")


# ------------------------------------------------------------------ 2. create_graph=True through the custom ops
def _second_derivative_refused(fn, inputs, what):
    out = fn(*inputs)
    grad, = torch.autograd.grad(out.pow(2).sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match=f"{what} has no second derivative.*Take that gradient without create_graph"):
        torch.autograd.grad(grad.sum(), inputs)


@interpreter
def test_sla_triton_gradient_with_create_graph_is_refused_naming_the_kernel():
    """Before: differentiating a create_graph=True gradient of the fused SLA kernel failed inside torch with "Trying to
    backward through dit_accel.sla_bwd.default but no autograd formula was registered". Now it says which kernel has
    no second derivative and what to do (the twin, backend='torch', has one: checked below)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 80, 16, generator=g).requires_grad_() for _ in range(3))
    method = SLAParams(topk=0.5, block_q=64, block_k=64)
    _second_derivative_refused(lambda a, b, c: sla_attention(a, b, c, method, make_proj(16), backend="triton"),
                               (q, k, v), "SLA's fused Triton kernel")


@interpreter
def test_block_sparse_op_path_gradient_with_create_graph_is_refused_naming_the_kernel():
    """The custom-op path (under a dispatch mode, or traced) refused as the eager path does; before, torch's "no
    autograd formula was registered" for dit_accel::block_sparse_bwd."""
    mask = _mask()
    layout = BlockLayout.from_dense_mask(mask, block_q=16, block_k=16)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g).requires_grad_() for _ in range(3))

    def call(a, b, c):
        with dispatched(lambda *_: None):  # (a dispatch mode: the call goes through dit_accel::block_sparse_fwd)
            return block_sparse_attention(a, b, c, layout, backend="triton")

    _second_derivative_refused(call, (q, k, v), "block-sparse attention's Triton kernel")


def test_sla_twin_second_derivative_is_right():
    """The twin's create_graph=True gradient is differentiable and equals the reference's second derivative."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 40, 8, generator=g).requires_grad_() for _ in range(3))
    method, proj = SLAParams(topk=0.5, negligible=0.25, block_q=16, block_k=16), make_proj(8)
    gq, = torch.autograd.grad(sla_attention(q, k, v, method, proj, backend="torch").pow(2).sum(), q, create_graph=True)
    got = torch.autograd.grad(gq.pow(2).sum(), (q, k, v))
    classes = brute_force_classes(q.detach(), k.detach(), method)
    o_r = reference_sla(q, k, v, classes, method, copy.deepcopy(proj))[0]
    gr, = torch.autograd.grad(o_r.pow(2).sum(), q, create_graph=True)
    want = torch.autograd.grad(gr.pow(2).sum(), (q, k, v))
    for name, a, b in zip(("d2q", "d2k", "d2v"), got, want):
        _close(a, b, name, tol=1e-4)


# ------------------------------------------------------------------ 3. SLA and VSA: the Triton kernels' gradients
@interpreter
def test_sla_triton_gradients_with_projection_views_and_parts():
    """Verified exact (no fault): B=3, one head, D=32, N=100 (a ragged last block of 64), a projection, (B, N, H, D)
    views, the parts' gradients (o_sparse, its lse, the projected linear branch) against the reference given the
    same block classes, for q, k, v and the projection's weight and bias."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, 100, 1, 32, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    method, proj = SLAParams(topk=0.5, block_q=64, block_k=64), make_proj(32)
    o_s, lse, o_lp, _ = sla_attention(q, k, v, method, proj, backend="triton", return_parts=True)
    do, dlse = torch.randn(3, 1, 100, 1, generator=g).expand(o_s.shape), torch.randn(lse.shape, generator=g)
    dp = torch.randn(o_lp.shape, generator=g)
    got = torch.autograd.grad((o_s * do).sum() + (lse * dlse).sum() + (o_lp * dp).sum(), (q, k, v, *proj.parameters()))
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    pr = copy.deepcopy(proj)
    _, o_sr, lse_r, o_lpr = reference_sla(qr, kr, vr, brute_force_classes(q.detach(), k.detach(), method), method, pr)
    want = torch.autograd.grad((o_sr * do).sum() + (lse_r * dlse).sum() + (o_lpr * dp).sum(),
                               (qr, kr, vr, *pr.parameters()))
    for name, a, b in zip(("dq", "dk", "dv", "d weight", "d bias"), got, want):
        _close(a, b, name, tol=5e-5)


@interpreter
def test_vsa_triton_gated_gradients_with_partial_cubes_and_expanded_gate():
    """Verified exact (no fault): VSA with a gate on a grid of partial cubes (2, 4, 6) / (2, 2, 4), B=2, one head,
    D=16, the gate expanded from one row (stride 0), only q and the gate requiring grad."""
    grid, tile = (2, 4, 6), (2, 2, 4)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 1, 48, 16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 1, 48, 16, generator=g) for _ in range(2))
    gate1 = torch.randn(1, 1, 1, 16, generator=g).requires_grad_()
    gate = gate1.expand(2, 1, 48, 16)
    out = dit_accel.vsa_attention(q, k, v, grid, topk=3, tile=tile, gate=gate, backend="triton")
    do = torch.randn(2, 1, 16, 48, generator=g).transpose(-1, -2)
    got = torch.autograd.grad(out, (q, gate1), do)
    qr, gr = q.detach().double().requires_grad_(), gate1.detach().double().requires_grad_()
    want = torch.autograd.grad(vsa_reference(qr, k, v, grid, 3, tile, gr.expand(2, 1, 48, 16))[0], (qr, gr),
                               do.double())
    for name, a, b in zip(("dq", "dgate"), got, want):
        _close(a, b, name, tol=5e-5)
