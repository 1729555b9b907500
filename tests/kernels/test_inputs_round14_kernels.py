"""Round 14, the kernels' boundary: torch.func transforms a backend cannot take."""
import pytest
import torch

from dit_accel.kernels import BackendUnavailable, block_sparse_attention
from dit_accel.kernels.layout import BlockLayout


def _layout():
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[0, 1] = False
    return BlockLayout.from_dense_mask(mask.repeat_interleave(64, 0).repeat_interleave(64, 1))


def test_flex_under_vmap_is_refused_and_the_twin_maps_exactly():
    """Before: ``torch.vmap`` over a forced ``backend="flex"`` failed deep in torch's FlexAttention trace
    ("RuntimeError when making fake tensor call ... BatchedTensor"). Now it is refused, naming what works; the
    PyTorch twin under vmap matches its call per batch entry."""
    layout = _layout()
    q, k, v = (torch.randn(3, 1, 2, 128, 32) for _ in range(3))
    with pytest.raises(BackendUnavailable, match="FlexAttention cannot run under torch.vmap; use backend='torch'"):
        torch.vmap(lambda a, b, c: block_sparse_attention(a, b, c, layout, backend="flex"))(q, k, v)
    mapped = torch.vmap(lambda a, b, c: block_sparse_attention(a, b, c, layout, backend="torch"))(q, k, v)
    looped = torch.stack([block_sparse_attention(q[i], k[i], v[i], layout, backend="torch") for i in range(3)])
    torch.testing.assert_close(mapped, looped, rtol=0, atol=0)
