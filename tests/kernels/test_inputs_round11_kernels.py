"""Kernel entry points' inputs, round 11: each test pins one fault found by calling ``merge_attention``,
``sla_attention``, ``dense_attention`` and ``dense_attention_reference`` directly with unusual but legal values (a
silent wrong answer or gradient, a raw error from inside torch, a misleading error, before the fix). Numbers are
checked against an fp64 brute force written here or the fp32 SLA reference of the tests, at sizes that are not
whole blocks and head dims that are no power of two."""

import pytest
import torch
from torch import nn

from dit_accel.kernels import SLAParams, merge_attention, sla_attention
from tests.kernels.sla_reference import brute_force_classes, make_proj, make_qkv, reference_sla

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
N, M, D = 40, 56, 20  # ragged last blocks, a head dim that is no power of two


def _qkv(b=1, h=2, n=N, m=M, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) for length in (n, m, m)]


def _brute(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale) v and its log-sum-exp over the token mask in fp64; rows seeing no key give 0, -inf."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -INF)
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return p @ v, lse


# ------------------------------------------------------------ merge_attention: NaN and +inf log-sum-exps
def test_merge_of_a_nan_row_is_nan_like_attention_over_the_union():
    """Before: a NaN in one query (a diverged layer) gave NaN lse on both sides, and ``merge_attention`` returned
    0 for that row (its weights NaN, "not > 0", so both sides were dropped): the sparse model hid what the dense
    one shows. Now the row is NaN, as attention over the union of the keys; the other rows are unchanged."""
    q, k, v = _qkv()
    q[0, 1, 5, 3] = NAN
    split = 23
    o_a, lse_a = _brute(q, k[:, :, :split], v[:, :, :split])
    o_b, lse_b = _brute(q, k[:, :, split:], v[:, :, split:])
    ref, ref_lse = _brute(q, k, v)
    o, lse = merge_attention(o_a.float(), lse_a.float(), o_b.float(), lse_b.float())
    assert torch.isnan(ref[0, 1, 5]).all() and torch.isnan(ref_lse[0, 1, 5])  # (the union's answer)
    assert torch.isnan(o[0, 1, 5]).all() and torch.isnan(lse[0, 1, 5])
    keep = ~torch.isnan(ref_lse)
    torch.testing.assert_close(o[keep], ref[keep].float())
    torch.testing.assert_close(lse[keep], ref_lse[keep].float())


@pytest.mark.parametrize("other", [0.5, -INF], ids=["other-finite", "other-empty"])
def test_merge_with_a_nan_lse_on_one_side_does_not_drop_it(other):
    """Before: a NaN lse on side A with a finite (or empty) side B gave 0, B's output dropped as well."""
    o_a, o_b = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    lse_a = torch.tensor([[[NAN, 0.0, 0.0]]])
    lse_b = torch.tensor([[[other, other, other]]])
    for o, lse in (merge_attention(o_a, lse_a, o_b, lse_b), merge_attention(o_b, lse_b, o_a, lse_a)):
        assert torch.isnan(o[0, 0, 0]).all() and torch.isnan(lse[0, 0, 0])
        assert not torch.isnan(o[0, 0, 1:]).any()  # (no NaN spreads to other rows)
    w = torch.softmax(torch.tensor([0.0, other]), 0)  # the fp32 formula on the finite rows
    torch.testing.assert_close(merge_attention(o_a, lse_a, o_b, lse_b)[0][0, 0, 1:], w[0] * o_a[0, 0, 1:]
                               + (w[1] * o_b[0, 0, 1:] if other != -INF else 0))


def test_merge_with_plus_inf_keeps_that_side_and_both_plus_inf_is_nan():
    """Before: an lse of +inf on one side (an overflowed sum) gave NaN (inf / inf), and +inf against an empty side
    too; now that side alone, the limit of the weights, with lse +inf. +inf on both sides has no limit: NaN.
    Rows with -inf on both sides still give 0 and -inf."""
    o_a, o_b = torch.full((1, 1, 5, 4), 1.0), torch.full((1, 1, 5, 4), 2.0)
    lse_a = torch.tensor([[[INF, INF, -INF, INF, -INF]]])
    lse_b = torch.tensor([[[3.0, -INF, INF, INF, -INF]]])
    o, lse = merge_attention(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o[0, 0, :3, 0], torch.tensor([1.0, 1.0, 2.0]))
    assert torch.equal(lse[0, 0, :3], torch.tensor([INF, INF, INF]))
    assert torch.isnan(o[0, 0, 3]).all() and torch.isnan(lse[0, 0, 3])
    assert (o[0, 0, 4] == 0).all() and torch.isneginf(lse[0, 0, 4])


def test_merge_stays_differentiable_next_to_a_nan_row():
    """A NaN row does not reach the gradient of the other rows (the weights are chosen by where(), not exp of
    NaN), and those gradients equal attention over the union's."""
    q, k, v = _qkv(n=6)
    q[0, 0, 2] = NAN
    q.requires_grad_(True)
    o_a, lse_a = _brute(q, k[:, :, :30], v[:, :, :30])
    o_b, lse_b = _brute(q, k[:, :, 30:], v[:, :, 30:])
    o, _ = merge_attention(o_a, lse_a, o_b, lse_b)
    rows = torch.ones(6, dtype=torch.bool)
    rows[2] = False
    (grad,) = torch.autograd.grad(o[:, :, rows].sum(), q)
    ref, _ = _brute(q, k, v)
    (ref_grad,) = torch.autograd.grad(ref[:, :, rows].sum(), q)
    assert not torch.isnan(grad[:, :, rows]).any()
    torch.testing.assert_close(grad[:, :, rows], ref_grad[:, :, rows])


# ------------------------------------------------------------ sla_attention with a projection that is no Linear
SLA = SLAParams(topk=0.5, negligible=0.25, block_q=16, block_k=16)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(D, D)).to("meta"),
    lambda: nn.Sequential(nn.Linear(D, D, device="meta"), nn.GELU(), nn.Linear(D, D, device="meta")),
], ids=["sequential-to-meta", "sequential-built-on-meta"])
@pytest.mark.parametrize("parts", [False, True], ids=["output", "parts"])
def test_sla_with_a_projection_on_the_meta_device_says_so(make, parts):
    """Before: a not yet materialised ``nn.Sequential`` projection (``init_empty_weights``, weights not loaded)
    raised torch's "Tensor on device meta is not on the expected device cpu!" after the attention had run; an
    ``nn.Linear`` was already told to move. Now one line naming proj's parameter, both devices and the fix."""
    q, k, v = _qkv(n=64, m=64)
    with pytest.raises(ValueError, match=r"proj's 0\.weight is on meta but q on cpu: move proj to q's device"):
        sla_attention(q, k, v, SLA, make(), backend="torch", return_parts=parts)


def test_sla_on_meta_tensors_takes_a_meta_sequential_and_refuses_a_cpu_one():
    q, k, v = (t.to("meta") for t in _qkv(n=64, m=64))
    o = sla_attention(q, k, v, SLA, nn.Sequential(nn.Linear(D, D, device="meta")), backend="torch")
    assert o.shape == q.shape and o.device.type == "meta"
    with pytest.raises(ValueError, match="proj's 0.weight is on cpu but q on meta"):
        sla_attention(q, k, v, SLA, nn.Sequential(nn.Linear(D, D)), backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sla_runs_a_half_precision_sequential_projection_in_its_dtype(dtype):
    """Before: a model in fp16/bf16 with an ``nn.Sequential`` projection of its dtype raised "mat1 and mat2 must
    have the same dtype, but got Float and Half" on the PyTorch twin (whose linear branch is fp32): only a bare
    ``nn.Linear`` had its input cast. Checked against the fp32 reference with the same modules in fp32."""
    q, k, v = make_qkv(2, 2, 72, 24, nk=88)
    lin1, lin2 = make_proj(24, seed=1), make_proj(24, seed=2)
    proj = nn.Sequential(lin1, nn.GELU(), lin2)
    want, _, _, _ = reference_sla(q, k, v, brute_force_classes(q, k, SLA), SLA, proj)
    half = [t.to(dtype) for t in (q, k, v)]
    o = sla_attention(*half, SLA, nn.Sequential(lin1, nn.GELU(), lin2).to(dtype), backend="torch")
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), want, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------ dense_attention's lse carries its gradient
def test_dense_attention_merged_over_two_key_sets_trains_like_attention_over_the_union():
    """Before: ``dense_attention(..., return_lse=True)`` returned an lse that required grad, but its backward
    dropped that gradient: two halves merged with ``merge_attention`` (text keys and video keys) gave dq and dk
    off by about 10% of their size, without a word. Checked against the fp64 brute force over all keys."""
    from dit_accel.kernels.dense import dense_attention

    q, k, v = (t.requires_grad_(True) for t in _qkv())
    split = 23
    o_a, lse_a = dense_attention(q, k[:, :, :split], v[:, :, :split], return_lse=True)
    o_b, lse_b = dense_attention(q, k[:, :, split:], v[:, :, split:], return_lse=True)
    o, _ = merge_attention(o_a, lse_a, o_b, lse_b)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref, _ = _brute(q, k, v)
    want = torch.autograd.grad((ref * do.double()).sum(), (q, k, v))
    torch.testing.assert_close(o, ref.float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_o", [True, False], ids=["o-and-lse", "lse-alone"])
def test_dense_attention_lse_gradient_matches_the_brute_force(use_o):
    """The lse's own gradient (``d lse / d s = P``), with and without the output's."""
    from dit_accel.kernels.dense import dense_attention

    q, k, v = (t.requires_grad_(True) for t in _qkv(b=2, n=33, m=47, d=12))
    w = torch.randn(2, 2, 33, generator=torch.Generator().manual_seed(4))
    o, lse = dense_attention(q, k, v, return_lse=True)
    ref, ref_lse = _brute(q, k, v)
    loss = (lse * w).sum() + (o.sum() if use_o else 0)
    ref_loss = (ref_lse * w.double()).sum() + (ref.sum() if use_o else 0)
    inputs = (q, k) if not use_o else (q, k, v)  # (v gets no gradient from the lse)
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref_loss, inputs)
    for g, want_g in zip(got, want):
        torch.testing.assert_close(g, want_g.float(), atol=1e-4, rtol=1e-4)


def test_sla_fused_kernel_runs_an_fp32_sequential_projection_on_half_inputs():
    """Before: fp16 q, k, v on the fused kernel (its linear branch in q's dtype) with an fp32 ``nn.Sequential``
    projection (fp32 trained weights, half activations) raised "mat1 and mat2 must have the same dtype"; a bare
    ``nn.Linear`` ran. Checked against the fp32 reference."""
    method = SLAParams(topk=0.5, negligible=0.25, block_q=64, block_k=64)
    q, k, v = make_qkv(1, 2, 130, 24)
    proj = nn.Sequential(make_proj(24, seed=1), nn.Tanh(), make_proj(24, seed=2))
    want, _, _, _ = reference_sla(q, k, v, brute_force_classes(q, k, method), method, proj)
    o = sla_attention(q.half(), k.half(), v.half(), method, proj, backend="triton")
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.float(), want, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------ the dense oracle's scale
@pytest.mark.parametrize("scale", [True, "0.5", 0, -0.2, NAN, INF], ids=["bool", "str", "zero", "negative", "nan", "inf"])
def test_dense_reference_checks_the_scale_like_the_kernels(scale):
    """Before: ``dense_attention_reference`` ran any scale ``float()`` could read: ``True`` as 1, ``"0.5"`` as 0.5,
    a negative or zero scale, and NaN into NaN outputs, where every kernel it is the oracle of refuses them."""
    from dit_accel.kernels import dense_attention_reference

    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        dense_attention_reference(q, k, v, scale=scale)


def test_dense_reference_still_takes_a_numpy_scale():
    import numpy as np

    from dit_accel.kernels import dense_attention_reference

    q, k, v = _qkv()
    o, lse = dense_attention_reference(q, k, v, scale=np.float32(0.3))
    ref, ref_lse = _brute(q, k, v, scale=float(np.float32(0.3)))
    torch.testing.assert_close(o, ref.float())
    torch.testing.assert_close(lse, ref_lse.float())


def test_sla_takes_a_lazy_linear_projection_of_the_head_dim():
    """Before: ``nn.LazyLinear(D)`` (in_features set by its first call) was refused with "proj must be Linear(20,
    20) acting on the head dim, got Linear(0, 20)", though it is one; an ``nn.Sequential`` holding it ran. Now it
    runs (and becomes that Linear), checked against the fp32 reference with the weights it took; one of another
    width is refused before anything runs, its parameters still unset."""
    from torch.nn.parameter import is_lazy

    q, k, v = make_qkv(1, 2, 64, D, nk=72)
    proj = nn.LazyLinear(D)
    o = sla_attention(q, k, v, SLA, proj, backend="torch")
    assert type(proj) is nn.Linear and proj.in_features == D
    want, _, _, _ = reference_sla(q, k, v, brute_force_classes(q, k, SLA), SLA, proj)
    torch.testing.assert_close(o, want, atol=1e-4, rtol=1e-4)
    wrong = nn.LazyLinear(8)
    with pytest.raises(ValueError, match=r"proj must be Linear\(20, 20\) acting on the head dim, got LazyLinear\(8\)"):
        sla_attention(q, k, v, SLA, wrong, backend="torch")
    assert is_lazy(wrong.weight)
