"""The dense oracle itself, checked against an independent per-row definition written here.

Every other test compares against :func:`dit_accel.kernels.dense_attention_reference`
(re-exported as ``tests.utils.reference``); this file is why that is sound.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import dense_attention_reference
from tests.utils import assert_lse_close

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_attention(q, k, v, mask, scale):
    """Independent oracle: one query row at a time, explicit softmax over the allowed keys."""
    b, h, n, d = q.shape
    o = torch.zeros(b, h, n, d, dtype=torch.float64)
    lse = torch.full((b, h, n), -math.inf, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for head in range(h):
        m = mask[head % mask.shape[0]] if mask.dim() == 3 else mask
        for i in range(n):
            keys = m[i].nonzero().flatten()
            if keys.numel() == 0:
                continue
            s = torch.einsum("bd,bkd->bk", q[:, head, i], k[:, head, keys]) * scale
            top = s.max(-1, keepdim=True).values
            w = torch.exp(s - top)
            o[:, head, i] = torch.einsum("bk,bkd->bd", w, v[:, head, keys]) / w.sum(-1, keepdim=True)
            lse[:, head, i] = (top + torch.log(w.sum(-1, keepdim=True))).squeeze(-1)
    return o, lse


def test_reference_matches_naive_and_sdpa():
    q, k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 2, 41, 16), torch.randn(1, 2, 41, 16)
    mask = torch.rand(2, 37, 41) < 0.3
    mask[:, 5] = False
    o, lse = dense_attention_reference(q, k, v, mask, scale=0.2)
    no, nlse = naive_attention(q, k, v, mask, 0.2)
    torch.testing.assert_close(o.double(), no, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse, nlse, atol=1e-5, rtol=1e-5)
    assert (o[:, :, 5] == 0).all() and torch.isinf(lse[:, :, 5]).all()
    torch.testing.assert_close(dense_attention_reference(q, k, v)[0], F.scaled_dot_product_attention(q, k, v))
