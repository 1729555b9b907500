"""Tile/GNA plans choose 128-row query blocks on CUDA where the pattern allows (issue 27 item 5).

Which layout a call runs is decided by ``LayoutPlan.kernel_layout(device, backend)`` without a GPU;
the wide layout itself runs through the Triton interpreter against the fp32 masked reference, with
the mask written by brute force (tests/patterns/test_gna_tile.py).
"""

import math

import pytest
import torch

import dit_accel
from dit_accel.kernels import block_sparse_attention
from dit_accel.patterns.permutation import TilePermutation
from dit_accel.plans.per_head import PerHead
from tests.patterns.test_gna_tile import _ref_gna, _ref_sta
from tests.utils import assert_attention_close, interpreter, make_qkv


def test_tile_plan_runs_128_row_blocks_on_cuda_only(monkeypatch):
    plan = dit_accel.Tile(tile=(1, 16, 8), window=(1, 3, 3)).plan((2, 16, 16))
    wide = plan.kernel_layout("cuda")
    assert plan.layout.block_q == 64 and wide.block_q == 128 and wide.block_k == 64
    assert wide is plan.wide_layout() and wide is plan.kernel_layout("cuda:0", "triton")
    # A call that records a backward keeps 64-row blocks (the 128-row backward ran slower per tile).
    assert plan.kernel_layout("cuda", grad=True) is plan.layout
    # The CPU paths, the PyTorch twin and forced FlexAttention keep the plan's 64-row layout.
    assert plan.kernel_layout("cpu") is plan.layout and plan.kernel_layout("cpu", "triton") is plan.layout
    assert plan.kernel_layout("cuda", "torch") is plan.layout and plan.kernel_layout("cuda", "flex") is plan.layout
    assert plan.layout_on("cpu").block_q == 64
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
    assert plan.kernel_layout("cuda") is plan.layout
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "triton")
    assert plan.kernel_layout("cuda") is wide
    # Same key tiles per token: the visited density that stats report holds for both.
    assert plan.density == wide.density() == plan.layout.density()
    assert plan.describe()["density"] == plan.layout.density()
    assert torch.equal(wide.to_dense_mask(), plan.layout.to_dense_mask())


def test_published_hunyuan_tile_setting_is_wide():
    # FastVideo's STA for HunyuanVideo: tile (6, 8, 8) = 384 tokens, window (3, 3, 3); a (2, 8, 8) box per 128 rows.
    plan = dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3)).plan((18, 32, 32))
    wide = plan.kernel_layout("cuda")
    assert wide.block_q == 128 and wide.density() == plan.density
    assert torch.equal(wide.to_dense_mask(), plan.layout.to_dense_mask())


def test_plans_keep_64_where_halves_differ():
    # Tile at a target density picks a 64-token tile: a 128-row block would span two tiles.
    tile = dit_accel.Tile().at_density((4, 16, 24), 0.2)
    plan = tile.plan((4, 16, 24))
    assert plan.perm.tile_volume == 64 and plan.wide_layout() is None
    assert plan.kernel_layout("cuda") is plan.layout
    # GNA with stride 1: neighbouring queries see different windows.
    gna = dit_accel.GNA(kernel_size=(3, 5, 5)).plan((6, 8, 8))
    assert gna.kernel_layout("cuda") is gna.layout and gna.layout.block_q == 64


def test_gna_with_tile_strides_is_wide():
    plan = dit_accel.GNA(kernel_size=(2, 32, 16), stride=(1, 16, 8), tile=(1, 16, 8)).plan((4, 32, 32))
    wide = plan.kernel_layout("cuda")
    assert wide.block_q == 128 and wide.density() == plan.density


def test_per_head_plan_is_wide_when_every_head_agrees():
    heads = [dit_accel.Tile(tile=(1, 16, 8), window=w) for w in ((1, 3, 3), (1, 1, 1))]
    plan = PerHead(methods=tuple(heads)).plan((2, 16, 16))
    group = plan._groups[0].plan
    wide = group.kernel_layout("cuda")
    assert wide.block_q == 128 and wide.num_heads == 2 and wide.density() == group.density
    assert torch.equal(wide.to_dense_mask(), group.layout.to_dense_mask())


@interpreter
@pytest.mark.parametrize("grid", [(2, 16, 16), (2, 14, 16)], ids=["full-blocks", "padded-partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_tile_layout_through_the_triton_kernel(grid, dtype):
    tile, window = (1, 16, 8), (1, 3, 3)
    plan = dit_accel.Tile(tile=tile, window=window).plan(grid)
    wide = plan.kernel_layout("cuda")
    assert wide.block_q == 128 and wide.q_len <= 512
    if grid == (2, 14, 16):
        assert wide.partial_fraction() > 0  # padded keys: partial 128-row tiles with stacked masks
    n = grid[0] * grid[1] * grid[2]
    q, k, v = make_qkv(1, 2, n, n, 64, dtype, device="cpu")
    perm = TilePermutation(grid, tile)
    qt, kt, vt = (perm.permute(x, dim=-2) for x in (q, k, v))
    o, lse = block_sparse_attention(qt, kt, vt, wide, return_lse=True, backend="triton")
    o, lse = perm.unpermute(o, dim=-2), perm.unpermute(lse, dim=-1)
    assert_attention_close(o, lse, q, k, v, _ref_sta(grid, tile, window))


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_gna_layout_with_different_half_masks_through_the_triton_kernel(dtype):
    # Both 64-row halves of each 128-row block visit both key blocks of their frame partially, with other masks.
    grid, kernel, tile = (2, 16, 8), (2, 9, 2), (1, 16, 8)
    plan = dit_accel.GNA(kernel_size=kernel, tile=tile).plan(grid)
    wide = plan.kernel_layout("cuda")
    assert wide.block_q == 128 and wide.partial_fraction() > 0
    n = 2 * 16 * 8
    q, k, v = make_qkv(1, 2, n, n, 64, dtype, device="cpu")
    qt, kt, vt = (plan.perm.permute(x, dim=-2) for x in (q, k, v))
    o, lse = block_sparse_attention(qt, kt, vt, wide, return_lse=True, backend="triton")
    o, lse = plan.perm.unpermute(o, dim=-2), plan.perm.unpermute(lse, dim=-1)
    assert_attention_close(o, lse, q, k, v, _ref_gna(grid, kernel, 1, 1, False))


# Fitted Tile plans: packed tiles (real tokens first, a padding tail) whose slot holds whole 128-row blocks. The
# fitted tiles at Wan 2.1's grids divide them (BENCHMARKS 2.1); the small grids here run through the interpreter.
FITTED = [((4, 9, 14), (1, 8, 16), (3, 1, 1)),   # tile (1, 9, 14): 126 tokens in a 128-position slot
          ((4, 7, 18), (1, 9, 14), (3, 1, 1))]   # tile (2, 7, 18): 252 in 256, two 128-row blocks per slot


@pytest.mark.parametrize("grid,tile,window", [*FITTED, ((21, 30, 52), (6, 8, 8), (3, 3, 3)),
                                              ((21, 45, 80), (6, 8, 8), (3, 3, 3))],
                         ids=["126-in-128", "252-in-256", "wan-480p-recommended", "wan-720p-recommended"])
def test_fitted_tile_plans_run_128_row_blocks_on_cuda(grid, tile, window):
    """A fitted (packed) Tile plan's kernels run 128-row query blocks on CUDA: a wide block lies in one tile's slot,
    so its halves share the tile's window; same key blocks per token as the 64-row layout (the twin's)."""
    from dit_accel.patterns.permutation import PackedTilePermutation

    plan = dit_accel.Tile(tile=tile, window=window, fit=True).plan(grid)
    assert isinstance(plan.perm, PackedTilePermutation) and plan.perm.slot % 128 == 0
    wide = plan.kernel_layout("cuda")
    assert plan.layout.block_q == 64 and wide.block_q == 128 and wide.block_k == 64
    assert plan.kernel_layout("cpu") is plan.layout and plan.kernel_layout("cuda", "torch") is plan.layout
    assert plan.kernel_layout("cuda", grad=True) is plan.layout  # training calls: 64-row blocks
    assert wide.density() == plan.layout.density() and wide.partial_fraction() == plan.layout.partial_fraction()
    narrow_lists = plan.layout.kv_indices.masked_fill(
        torch.arange(plan.layout.kv_indices.shape[-1]) >= plan.layout.kv_counts[..., None], -1)
    wide_lists = wide.kv_indices.masked_fill(torch.arange(wide.kv_indices.shape[-1]) >= wide.kv_counts[..., None], -1)
    width = min(narrow_lists.shape[-1], wide_lists.shape[-1])
    for half in (0, 1):  # each 64-row half of a wide block lists the wide block's key blocks
        assert torch.equal(narrow_lists[:, half::2, :width], wide_lists[..., :width])
    if math.prod(grid) <= 512:
        assert torch.equal(wide.to_dense_mask(), plan.layout.to_dense_mask())


def test_a_packed_slot_that_cuts_128_row_blocks_stays_64():
    """Tile (1, 12, 12): 144 tokens in a 192-position slot; a 128-row block would straddle two tiles."""
    plan = dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=144).plan((8, 12, 12))
    packed = plan.call_plan("cuda")
    assert packed.perm.slot == 192 and packed.kernel_layout("cuda").block_q == 64


@interpreter
@pytest.mark.parametrize("grid,tile,window", FITTED, ids=["126-in-128", "252-in-256"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fitted_tile_128_row_blocks_through_the_triton_kernel(grid, tile, window, dtype):
    from dit_accel.patterns.tile import fit_tile

    plan = dit_accel.Tile(tile=tile, window=window, fit=True).plan(grid)
    wide = plan.kernel_layout("cuda")
    assert wide.block_q == 128 and wide.q_len <= 512 and wide.partial_fraction() > 0  # ragged key tails
    n = math.prod(grid)
    q, k, v = make_qkv(1, 2, n, n, 64, dtype, device="cpu")
    qt, kt, vt = (plan.perm.permute(x, dim=-2) for x in (q, k, v))
    o, lse = block_sparse_attention(qt, kt, vt, wide, return_lse=True, backend="triton")
    o, lse = plan.perm.unpermute(o, dim=-2), plan.perm.unpermute(lse, dim=-1)
    assert_attention_close(o, lse, q, k, v, _ref_sta(grid, *fit_tile(grid, tile, window)))


def test_tile_at_density_with_a_given_tile():
    grid = (4, 32, 32)
    tile = dit_accel.Tile().at_density(grid, 0.2, tile=(1, 16, 8))
    assert tile.tile == (1, 16, 8)
    plan = tile.plan(grid)
    assert plan.kernel_layout("cuda").block_q == 128 and abs(plan.density - 0.2) < 0.1
    assert dit_accel.Tile().at_density(grid, 0.2).tile == dit_accel.patterns.default_tile(grid, 64)
    with pytest.raises(ValueError, match="tile"):
        dit_accel.Tile().at_density(grid, 0.2, tile=(1, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tile_plan_on_cuda_runs_128_row_blocks(dtype):
    grid, tile, window = (4, 32, 32), (1, 16, 8), (1, 3, 3)
    plan = dit_accel.Tile(tile=tile, window=window).plan(grid)
    q, k, v = make_qkv(1, 2, 4096, 4096, 128, dtype, device="cuda")
    # backend="triton": ``auto`` may run dense attention here instead, where it measures dense faster (the
    # "never slower than dense" rule), which is not the tile pattern (its first GPU run did exactly that).
    o, density = plan.run(q, k, v, backend="triton")
    assert plan.layout_on(q.device, backend="triton").block_q == 128 and density == plan.layout.density()
    assert_attention_close(o, None, q, k, v, dit_accel.patterns.tile_mask(grid, tile, window))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fitted_tile_plan_on_cuda_runs_128_row_blocks(dtype):
    from dit_accel.patterns.tile import fit_tile

    grid, tile, window = (6, 9, 14), (1, 8, 16), (3, 1, 1)  # fitted: (1, 9, 14), 126 tokens in a 128-token slot
    plan = dit_accel.Tile(tile=tile, window=window, fit=True).plan(grid)
    n = math.prod(grid)
    q, k, v = make_qkv(1, 2, n, n, 128, dtype, device="cuda")
    o, density = plan.run(q, k, v, backend="triton")
    assert plan.layout_on(q.device, backend="triton").block_q == 128 and density == plan.layout.density()
    assert_attention_close(o, None, q, k, v, _ref_sta(grid, *fit_tile(grid, tile, window)))
