"""OnePass (one gathered flash call for short layouts) against the dense oracle, and where ``auto`` takes it."""

import pytest
import torch

import dit_accel
from dit_accel.kernels import BlockLayout
from dit_accel.kernels.block_sparse.one_pass import OnePass, one_pass_fits
from dit_accel.patterns import TilePermutation
from dit_accel.plans.plan import DENSE_MASKED, ONE_PASS
from tests.utils import assert_attention_close


pytestmark = pytest.mark.usefixtures("one_thread")


def _bnhd(b, h, n, d, seed):
    """SDPA-shaped (B, H, N, D) views of (B, N, H, D) memory, as the attention processors make them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(3)]


def _token_major(o):
    """Whether (B, H, N, D) ``o`` lies in (B, N, H, D) memory order, SDPA's own: the processor's transpose
    back to tokens is then a view."""
    return o.stride(3) == 1 and o.stride(1) == o.shape[3] and o.stride(2) == o.shape[1] * o.shape[3]


def _layout(heads, n, block, seed, *, ragged_keys=False):
    """At most two key blocks per query block (the diagonal one and one other), some partial: per-head
    when ``heads > 1``. Every query keeps its own key, so every row sees something."""
    g = torch.Generator().manual_seed(seed)
    n_b = -(-n // block)
    visited = torch.eye(n_b, dtype=torch.bool).repeat(heads, 1, 1)
    other = torch.randint(0, n_b, (heads, n_b), generator=g)
    visited[torch.arange(heads)[:, None], torch.arange(n_b)[None], other] = True
    tokens = visited.repeat_interleave(block, -2).repeat_interleave(block, -1)[:, :n, :n]
    partial = torch.rand(heads, n, n, generator=g) < 0.6
    mask = tokens & (partial | torch.eye(n, dtype=torch.bool))
    if ragged_keys:
        mask[:, :, -3:] = False
    return BlockLayout.from_dense_mask(mask, block_q=block, block_k=block), mask


@pytest.mark.parametrize("b, h, n, d, heads", [(1, 2, 256, 16, 1), (2, 3, 130, 8, 3), (1, 4, 96, 32, 1)],
                         ids=["whole-blocks", "ragged-per-head-batch2", "heads4"])
def test_equals_the_dense_oracle_on_raster_layouts(b, h, n, d, heads):
    layout, mask = _layout(heads, n, 32, seed=n)
    q, k, v = _bnhd(b, h, n, d, seed=1)
    o, lse = OnePass(layout, n)(q, k, v)
    assert_attention_close(o, lse, q, k, v, mask if heads > 1 else mask[0])
    assert _token_major(o)


def test_equals_the_dense_oracle_in_tiled_order_with_padding():
    """A (3, 10, 10) grid in 4x4x4 tiles: 300 tokens, 576 tiled positions of which 276 are padding. The layout
    (each tile attends to itself and to the next tile) is over tiled positions; q, k, v and the result are raster."""
    perm = TilePermutation((3, 10, 10), (4, 4, 4))
    n_t = perm.num_padded // 64
    visited = (torch.eye(n_t, dtype=torch.bool) | torch.eye(n_t, dtype=torch.bool).roll(1, 1))[None]
    real = perm.order >= 0
    tiled = visited.repeat_interleave(64, -2).repeat_interleave(64, -1) & real[None, None, :] & real[None, :, None]
    layout = BlockLayout.from_dense_mask(tiled, block_q=64, block_k=64)
    raster = tiled[0][perm.inverse][:, perm.inverse]  # the same mask, written over raster tokens
    q, k, v = _bnhd(1, 2, 300, 16, seed=2)
    o, lse = OnePass(layout, 300, perm.order)(q, k, v, scale=0.2)
    assert_attention_close(o, lse, q, k, v, raster, scale=0.2)
    assert _token_major(o)


def test_half_precision_runs_in_fp32_and_returns_the_input_dtype():
    layout, mask = _layout(1, 128, 32, seed=3)
    q, k, v = (x.half() for x in _bnhd(1, 2, 128, 16, seed=3))
    o, lse = OnePass(layout, 128)(q, k, v)
    assert o.dtype == torch.float16
    assert_attention_close(o, lse, q, k, v, mask[0])


def test_refuses_a_layout_that_leaves_a_query_without_keys():
    mask = torch.eye(128, dtype=torch.bool)
    mask[5, 5] = False
    with pytest.raises(ValueError, match="without a key"):
        OnePass(BlockLayout.from_dense_mask(mask, block_q=32, block_k=32), 128)


def test_fits_only_narrow_short_layouts():
    narrow, _ = _layout(1, 256, 32, seed=4)  # at most 2 of 8 key blocks
    assert one_pass_fits(narrow, batch=1, heads=2, head_dim=16)
    assert not one_pass_fits(narrow, batch=1, heads=2, head_dim=1 << 14)  # past the byte budget
    wide = BlockLayout.from_dense_mask(torch.ones(256, 256, dtype=torch.bool), block_q=32, block_k=32)
    assert not one_pass_fits(wide, batch=1, heads=2, head_dim=16)  # every block: masked dense's work


@pytest.mark.parametrize("method, grid, expected", [
    (dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)), (5, 8, 8), ONE_PASS),  # 1 of 5 key blocks
    (dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), (8, 8, 8), ONE_PASS),  # 3 of 8
    (dit_accel.GNA(kernel_size=(3, 6, 6)), (5, 8, 8), DENSE_MASKED),  # 3 of 5: wider than half
], ids=["tile-1-of-5", "tile-3-of-8", "gna-3-of-5"])
def test_auto_takes_one_pass_for_short_narrow_layouts_with_the_twins_result(method, grid, expected):
    plan = method.plan(grid)
    q, k, v = _bnhd(1, 2, plan.num_tokens, 12, seed=5)
    with torch.no_grad():
        assert plan.backend_for(q, k, v, "auto") == expected
        auto, lse_auto, _, _ = plan.attend(q, k, v, scale=None, backend="auto")
        twin, lse_twin, _, _ = plan.attend(q, k, v, scale=None, backend="torch")
    torch.testing.assert_close(auto, twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_auto, lse_twin, rtol=1e-5, atol=1e-5)
    q.requires_grad_(True)  # autograd: the twin (one pass is forward-only)
    assert plan.backend_for(q, k, v, "auto") == "torch"


def test_a_backend_forced_by_the_environment_runs_as_forced(monkeypatch):
    plan = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)).plan((5, 8, 8))
    q, k, v = _bnhd(1, 2, plan.num_tokens, 12, seed=6)
    with torch.no_grad():
        assert plan.backend_for(q, k, v, "auto") == ONE_PASS
        monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
        assert plan.backend_for(q, k, v, "auto") == "torch"
