"""Joint (video + text) attention merge (Plan.run) vs the dense masked fp32 oracle, odd sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.patterns import gna_mask
from tests.utils import reference


def _reference(q, k, v, allowed):
    """The dense oracle per sample (``allowed`` is ``[B, 1, S, S]``: per-sample text padding)."""
    return torch.cat([reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], allowed[b])[0] for b in range(q.shape[0])])


CASES = [
    pytest.param((3, 3, 7), (2, 3, 3), 5, "first", [5, 2], id="grid3x3x7-text5-first-padded"),
    pytest.param((2, 5, 13), (2, 3, 5), 9, "last", [9, 0], id="grid2x5x13-text9-last-one-without-text"),
    pytest.param((63,), 7, 4, "last", None, id="grid63-text4-last-nomask"),
]


@pytest.mark.parametrize("grid,kernel,num_text,position,valid", CASES)
def test_joint_merge_equals_masked_reference(grid, kernel, num_text, position, valid):
    method = dit_accel.GNA(kernel_size=kernel)
    plan = method.plan(grid)
    nv = math.prod(grid)
    b, h, d = 2, 3, 16
    s = nv + num_text
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    key_mask = None
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool)
    video = slice(num_text, s) if position == "first" else slice(0, nv)
    text = slice(0, num_text) if position == "first" else slice(nv, s)
    allowed[:, :, video, video] = gna_mask(grid, method.kernel_size)
    if valid is not None:
        key_mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
        for i, n in enumerate(valid):
            key_mask[i, ..., text.start + n:text.stop] = False
        allowed &= key_mask
    out, density = plan.run(q, k, v, num_text=num_text, text_first=position == "first", key_mask=key_mask,
                            backend="torch")
    torch.testing.assert_close(out, _reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    assert density == pytest.approx(plan.layout.density())


def test_joint_sla_with_all_blocks_critical_is_dense():
    torch.manual_seed(0)
    nv, nt = 130, 7
    q, k, v = (torch.randn(1, 2, nv + nt, 16) for _ in range(3))
    proj = torch.nn.Linear(16, 16)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    plan = dit_accel.SLA(topk=1.0).plan((nv,))
    out, density = plan.run(q, k, v, num_text=nt, text_first=True, backend="torch", proj=proj)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert float(density) == pytest.approx(1.0)
