"""Kernel entry points, round 17: each test pins one fault found by comparing a kernel path with an fp32 reference
written here, at ragged lengths and with the outputs a caller merges or trains on."""

import os

import pytest
import torch

from dit_accel.kernels import SLAParams, sla_attention, sla_classify
from dit_accel.kernels.dense import fastest_attention
from dit_accel.kernels.sla.ops import sla_triton_attention

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels through the interpreter on CPU")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sla_linear_reference(q, k, v, classes, method):
    """The linear branch before proj, fp32: relu features over each query block's marginal key blocks."""
    nq, nk = q.shape[2], k.shape[2]
    marginal = classes.long().eq(0).repeat_interleave(method.block_q, -2)[..., :nq, :]
    marginal = marginal.repeat_interleave(method.block_k, -1)[..., :nk]
    a = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * marginal
    return (a @ v) / (a.sum(-1, keepdim=True) + method.linear_eps)


@interpreter
def test_sla_triton_linear_branch_over_a_ragged_marginal_block_matches_the_reference():
    # 65 keys in blocks of 64: one critical block and, where the ragged one-token block is marginal, a marginal
    # set of one token. The "subtract" plan (all 65 keys less the critical 64) left it within the rounding of the
    # global sums: o_linear was 3.8 off the reference with relu features (the twin: 5e-7).
    method = SLAParams(topk=0.4, negligible=0.2, feature_map="relu")
    q, k, v = _randn(1, 2, 64, 16, seed=0), _randn(1, 2, 65, 16, seed=1), _randn(1, 2, 65, 16, seed=2)
    blocks = sla_classify(q, k, method)
    assert (blocks.classes[..., 1] == 0).any()  # the ragged block is marginal somewhere: the case under test
    want = _sla_linear_reference(q, k, v, blocks.classes, method)
    # (the fused kernel on the twin's classes: the pooling and selection kernels are not under test)
    got = sla_triton_attention(q, k, v, blocks, method, 16 ** -0.5, True)[2]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    twin = sla_attention(q, k, v, method, torch.nn.Identity(), backend="torch", return_parts=True)[2]
    torch.testing.assert_close(twin, want, atol=1e-4, rtol=1e-4)


def test_fastest_attention_lse_carries_its_gradient_into_a_merge():
    # The example of fastest_attention: its lse merged with another part's. aten's attention ops give the lse no
    # gradient, so dq and dk lacked its terms, silently (0.99 off here on the CPU's flash op).
    q = _randn(1, 2, 65, 16, seed=0).requires_grad_()
    k, v = (_randn(1, 2, 3, 16, seed=s).requires_grad_() for s in (1, 2))
    weights = _randn(1, 2, 65, seed=3)
    o, lse = fastest_attention(q, k, v, return_lse=True)
    got = torch.autograd.grad((o * 0.5).sum() + (lse * weights).sum(), (q, k, v))
    s = (q @ k.transpose(-1, -2)) * 16 ** -0.5
    ref_o, ref_lse = torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
    want = torch.autograd.grad((ref_o * 0.5).sum() + (ref_lse * weights).sum(), (q, k, v))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_fastest_attention_lse_gradient_under_torch_func_grad():
    q, k, v = (_randn(1, 2, 17, 16, seed=s) for s in range(3))
    weights = _randn(1, 2, 17, seed=3)

    def ours(q, k):
        o, lse = fastest_attention(q, k, v, return_lse=True)
        return o.sum() * 0.5 + (lse * weights).sum()

    def ref(q, k):
        s = (q @ k.transpose(-1, -2)) * 0.25
        return (torch.softmax(s, -1) @ v).sum() * 0.5 + (torch.logsumexp(s, -1) * weights).sum()

    for g, w in zip(torch.func.grad(ours, argnums=(0, 1))(q, k), torch.func.grad(ref, argnums=(0, 1))(q, k)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_fastest_attention_lse_gradient_in_half_precision():
    q, k, v = (_randn(1, 1, 33, 16, seed=s).half().requires_grad_() for s in range(3))
    o, lse = fastest_attention(q, k, v, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k))
    qf, kf = (t.detach().float().requires_grad_() for t in (q, k))
    want = torch.autograd.grad(torch.logsumexp((qf @ kf.transpose(-1, -2)) * 0.25, -1).sum(), (qf, kf))
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), w, atol=5e-3, rtol=5e-3)


def test_an_additive_float_mask_table_is_refused_not_inverted():
    # SDPA's float attn_mask form (0 allowed, -inf masked) as the element-mask table: read as "nonzero", every
    # allowed pair was masked and every masked one allowed, silently.
    from dit_accel.kernels import BlockLayout, block_sparse_attention

    allowed = torch.ones(1, 16, 16, dtype=torch.bool).tril()
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    visited, ids = torch.ones(2, 2, dtype=torch.bool), torch.tensor([[0, -1], [-1, 0]])
    with pytest.raises(TypeError, match="mask_table must be a bool tensor.*mask_table == 0"):
        BlockLayout.from_block_masks(visited, q_len=32, kv_len=32, block_q=16, block_k=16, mask_ids=ids,
                                     mask_table=additive)
    layout = BlockLayout.from_block_masks(visited, q_len=32, kv_len=32, block_q=16, block_k=16, mask_ids=ids,
                                          mask_table=additive == 0)
    q, k, v = (_randn(1, 1, 32, 16, seed=s) for s in range(3))
    dense = torch.ones(32, 32, dtype=torch.bool)
    dense[:16, :16], dense[16:, 16:] = allowed[0], allowed[0]
    s = ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="torch"), torch.softmax(s, -1) @ v,
                               atol=1e-5, rtol=1e-5)
