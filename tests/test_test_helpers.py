"""The suite's own recording helpers see what they claim to (a recorder that saw nothing would let a bound pass)."""

import torch

from tests.utils import dispatched, largest_output


def test_dispatched_hands_over_each_operator_with_its_output():
    seen = []
    x = torch.ones(3, 4)
    with dispatched(lambda func, args, kwargs, out: seen.append((func.__name__, tuple(out.shape)))):
        (x * 2).sum(dim=0)
    assert seen == [("mul.Tensor", (3, 4)), ("sum.dim_IntList", (4,))]


def test_largest_output_counts_the_biggest_tensor_made_forward_and_backward():
    x = torch.ones(6, requires_grad=True)
    assert largest_output(lambda: x.outer(x).sum()) == 36
    assert largest_output(lambda: x.outer(torch.ones(2)).sum().backward()) == 12
