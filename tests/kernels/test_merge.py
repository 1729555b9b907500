"""merge_attention: exact log-sum-exp merge of attention over disjoint key sets."""

import pytest
import torch

from dit_accel.kernels import dense_attention_reference, merge_attention


pytestmark = pytest.mark.usefixtures("one_thread")


def _split_case(n=37, m=53, split=20, d=16):
    q, k, v = torch.randn(2, 3, n, d), torch.randn(2, 3, m, d), torch.randn(2, 3, m, d)
    mask = torch.rand(3, n, m) < 0.4
    mask[:, 0, :split] = False   # row 0: nothing on side A
    mask[:, 1, split:] = False   # row 1: nothing on side B
    mask[:, 2] = False           # row 2: nothing at all
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_merge_equals_attention_over_concatenated_keys(dtype):
    q, k, v, mask = _split_case()
    split = 20
    o_a, lse_a = dense_attention_reference(q, k[:, :, :split], v[:, :, :split], mask[..., :split])
    o_b, lse_b = dense_attention_reference(q, k[:, :, split:], v[:, :, split:], mask[..., split:])
    o, lse = merge_attention(o_a.to(dtype), lse_a, o_b.to(dtype), lse_b)
    ref, ref_lse = dense_attention_reference(q, k, v, mask)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(o.float(), ref, **tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    assert (o[:, :, 2] == 0).all() and torch.isinf(lse[:, :, 2]).all()


def test_merge_is_differentiable_without_nan():
    q, k, v, mask = _split_case()
    q.requires_grad_(True)
    o_a, lse_a = dense_attention_reference(q, k[:, :, :20], v[:, :, :20], mask[..., :20])
    o_b, lse_b = dense_attention_reference(q, k[:, :, 20:], v[:, :, 20:], mask[..., 20:])
    o, _ = merge_attention(o_a, lse_a, o_b, lse_b)
    (grad,) = torch.autograd.grad(o.sum(), q)
    ref, _ = dense_attention_reference(q, k, v, mask)
    (ref_grad,) = torch.autograd.grad(ref.sum(), q)
    assert not torch.isnan(grad).any()
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_merge_large_lse_is_stable():
    o_a, o_b = torch.ones(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    lse_a = torch.tensor([[[1000.0, -1000.0]]])
    lse_b = torch.tensor([[[1000.0, float("-inf")]]])
    o, lse = merge_attention(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o[0, 0, :, 0], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(lse[0, 0], torch.tensor([1000.0 + 0.6931472, -1000.0]))


def test_merge_shape_errors():
    with pytest.raises(ValueError, match="o_a and o_b"):
        merge_attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2), torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="lse_a and lse_b"):
        merge_attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 2), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2))
