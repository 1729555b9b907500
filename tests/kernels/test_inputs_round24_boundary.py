"""The public attention functions on valid but unusual inputs, round 24: each test pins one fault found by driving
``block_sparse_attention``, ``sla_attention`` and their helpers as a user would (under ``torch.vmap`` after an eager
call, with a projection module of another width, a hooked or weight-normed projection, a bad layout or device):
a silent wrong answer or a raw error from inside torch before the fix. Numbers are checked against an fp32 brute
force written here, at lengths that are not whole blocks."""

import pytest
import torch
from torch import nn

from dit_accel.kernels import BlockLayout, SLAParams, block_sparse_attention, sla_attention
from dit_accel.kernels.backends import BackendUnavailable
from dit_accel.kernels.block_sparse.api import dense_reason, prepare_layout

D = 16


def _qkv(*lead, n=40, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, 1, 2, n, d, generator=g) for _ in range(3)]


def _layout(n=40, block=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, n, n, generator=g) < 0.4
    mask[..., 0] = True
    return BlockLayout.from_dense_mask(mask, block_q=block, block_k=block)


def _brute(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v over the token mask ``[H, N, M]`` in fp32."""
    scores = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v.float()


# ------------------------------------------------------------------ 1. vmap after an eager call (block-sparse)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_vmap_after_an_eager_call_is_checked_again():
    """Before: the first eager call's decision was kept per (layout, shapes) and a ``torch.vmap`` call of the same
    per-sample shapes took it unchecked: a forced ``flex`` (which vmap cannot run) failed deep in torch's
    FlexAttention trace with a Dynamo ``TorchRuntimeError`` instead of the BackendUnavailable it gets when vmap
    comes first. Now calls under torch.func transforms take the checked path; the twin still maps exactly."""
    layout = _layout()
    q, k, v = _qkv(3)
    block_sparse_attention(q[0], k[0], v[0], layout, backend="flex")  # (the eager call whose answer was kept)
    with pytest.raises(BackendUnavailable, match="FlexAttention cannot run under torch.vmap; use backend='torch'"):
        torch.vmap(lambda a, b, c: block_sparse_attention(a, b, c, layout, backend="flex"))(q, k, v)
    block_sparse_attention(q[0], k[0], v[0], layout, backend="torch")
    mapped = torch.vmap(lambda a, b, c: block_sparse_attention(a, b, c, layout, backend="torch"))(q, k, v)
    want = torch.stack([_brute(q[i], k[i], v[i], layout.to_dense_mask()) for i in range(3)])
    torch.testing.assert_close(mapped, want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------ 2. SLA under vmap
@pytest.mark.parametrize("n,live_proj", [(40, False), (32, True)], ids=["ragged-keys", "projected-marginal"])
@pytest.mark.parametrize("eager_first", [False, True], ids=["vmap-first", "after-eager"])
def test_sla_under_vmap_refuses_what_it_cannot_map_with_what_to_do(n, live_proj, eager_first):
    """Before: ``torch.vmap`` over ``sla_attention`` on the twin failed from inside with torch's "vmap: inplace
    arithmetic(self, *extra_args) is not possible" (a ragged last key block, masked in place) or "aten::scatter_ ...
    is not possible" (a live projection over the marginal blocks, listed in place), naming neither the function nor
    a way out. Now it is refused at the call, also after an eager call of the same shapes, saying to fold the mapped
    dim into the batch; whole blocks without a projection still map exactly, and torch.func.grad still runs."""
    method = SLAParams(topk=0.5, block_q=16, block_k=16)
    q, k, v = _qkv(3, n=n)
    proj = nn.Linear(D, D) if live_proj else None
    if eager_first:
        sla_attention(q[0], k[0], v[0], method, proj, backend="torch")
    with pytest.raises(BackendUnavailable, match=r"sla_attention cannot run these inputs under torch.vmap on backend "
                                                 r"'torch'.*Fold the mapped dim into q, k and v's batch dim"):
        torch.vmap(lambda a, b, c: sla_attention(a, b, c, method, proj, backend="torch"))(q, k, v)
    grad = torch.func.grad(lambda a: sla_attention(a, k[0], v[0], method, proj, backend="torch").sum())(q[0])
    leaf = q[0].clone().requires_grad_()
    sla_attention(leaf, k[0], v[0], method, proj, backend="torch").sum().backward()
    torch.testing.assert_close(grad, leaf.grad)
    q, k, v = _qkv(3, n=32)  # (whole blocks, no projection: maps, as before)
    mapped = torch.vmap(lambda a, b, c: sla_attention(a, b, c, method, None, backend="torch"))(q, k, v)
    torch.testing.assert_close(mapped, torch.stack([sla_attention(q[i], k[i], v[i], method, None, backend="torch")
                                                    for i in range(3)]))


# ------------------------------------------------------------------ 3. a projection module of another width
def test_sla_projection_module_of_another_width_is_named():
    """Before: an ``nn.Sequential(nn.Linear(8, 8))`` projection on a head dim of 16 failed inside torch with "mat1
    and mat2 shapes cannot be multiplied (80x16 and 8x8)", naming neither ``proj`` nor the head dim it must take
    (a bare ``nn.Linear`` of the wrong width is named at the boundary). Now the same ValueError as a module that
    returns the wrong shape: what proj must map, the head dim, and what to use."""
    q, k, v = _qkv()
    method = SLAParams(topk=0.5, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"proj must map the linear branch \(\.\.\., D\) to \(\.\.\., D\).*"
                                         r"cannot be multiplied.*Use a Linear\(D, D\) per layer \(D = 16"):
        sla_attention(q, k, v, method, nn.Sequential(nn.Linear(8, 8)), backend="torch")


# ------------------------------------------------------------------ 4. a zero projection with a forward hook
def test_sla_zero_projection_with_a_forward_hook_keeps_the_hook():
    """Before: a zero-initialised ``nn.Linear`` projection was taken as inert (its output exactly zero) and the
    linear branch skipped, also where a forward hook adds to the projection's output: the hook's term was lost
    without a word (1.0 off here). Now a hooked projection (or one whose forward was replaced) is run."""
    q, k, v = _qkv()
    method = SLAParams(topk=0.5, block_q=16, block_k=16)
    proj = nn.Linear(D, D)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    proj.register_forward_hook(lambda module, args, out: out + 1.0)
    with torch.no_grad():
        got = sla_attention(q, k, v, method, proj, backend="torch")
        want = sla_attention(q, k, v, method, None, backend="torch") + 1.0
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ 5. weight_norm / spectral_norm projections
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_sla_normed_projection_runs_as_its_weight(norm):
    """Before: a projection wrapped by ``torch.nn.utils.weight_norm`` or ``spectral_norm`` (its weight rebuilt by a
    pre-hook from ``weight_g``/``weight_v`` or ``weight_orig``) failed with a raw ``KeyError: 'weight'`` from the
    inert-projection check. Now it runs, equal to a plain Linear holding the weight it computes."""
    q, k, v = _qkv()
    method = SLAParams(topk=0.5, block_q=16, block_k=16)
    torch.manual_seed(0)
    proj = getattr(nn.utils, norm)(nn.Linear(D, D)).eval()  # (eval: spectral_norm's weight stays put)
    with torch.no_grad():
        got = sla_attention(q, k, v, method, proj, backend="torch")
        plain = nn.Linear(D, D)
        plain.weight.copy_(proj.weight)
        plain.bias.copy_(proj.bias)
        want = sla_attention(q, k, v, method, plain, backend="torch")
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ 6. helpers given a non-layout or a bad device
def test_prepare_layout_and_dense_reason_name_a_bad_argument():
    """Before: ``prepare_layout("x", "cpu")`` and ``dense_reason("x", ...)`` failed with AttributeErrors ("'str'
    object has no attribute 'device'"), and ``prepare_layout(layout, "cpux")`` with torch's list of device types.
    Now each names the argument and what it takes."""
    layout = _layout()
    with pytest.raises(TypeError, match="layout must be a dit_accel.kernels.BlockLayout; got str"):
        prepare_layout("x", "cpu")
    with pytest.raises(ValueError, match=r"device='cpux' is invalid: a torch device such as 'cpu', 'cuda'"):
        prepare_layout(layout, "cpux")
    with pytest.raises(ValueError, match=r"device=None is invalid"):
        prepare_layout(layout, None)
    with pytest.raises(TypeError, match="layout must be a dit_accel.kernels.BlockLayout; got str"):
        dense_reason("x", batch=1, heads=2, head_dim=D, dtype=torch.float16, return_lse=False, needs_grad=False)
    assert prepare_layout(layout, "cpu", "torch") is layout  # (a right call is unchanged)


# ------------------------------------------------------------------ 7. unusual but valid inputs stay exact
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,d", [(63, 40), (65, 72), (33, 112)], ids=["N63-D40", "N65-D72", "N33-D112"])
def test_strided_views_and_partial_gradients_match_the_reference(backend, n, d):
    """Diffusers' (B, N, H, D) tensors transposed, a per-head layout at lengths that are not whole blocks, a given
    scale and a gradient on k alone: the output and k's gradient equal the fp32 brute force (a guard for the
    paths the fixes above touch)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, d, generator=g).transpose(1, 2) for _ in range(3))
    layout = _layout(n, 16, seed=2)
    kk = k.detach().clone().requires_grad_()
    out = block_sparse_attention(q, kk, v, layout, scale=0.2, backend=backend)
    ref_k = k.detach().clone().requires_grad_()
    scores = (q @ ref_k.transpose(-1, -2) * 0.2).masked_fill(~layout.to_dense_mask(), float("-inf"))
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    w = torch.randn(want.shape, generator=g)
    (got_k,) = torch.autograd.grad((out * w).sum(), kk)
    (want_k,) = torch.autograd.grad((want * w).sum(), ref_k)
    torch.testing.assert_close(got_k, want_k, atol=2e-5, rtol=2e-5)
