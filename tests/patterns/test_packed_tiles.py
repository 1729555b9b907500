"""Packed tile order and tiles that fit the grid (issue 72 item 2): blocks whose validity is a length.

The STA mask here is written from METHODS.md (the key tiles within w//2 of the clamped query tile), in raster
order; the attention oracle is the package's fp32 dense reference under that mask.
"""

import itertools
import math

import pytest
import torch

import dit_accel
from dit_accel.eval.bench_layouts import figures_row
from dit_accel.patterns.permutation import PackedTilePermutation
from dit_accel.patterns.tile import FIT_PADDED_WORK, fit_tile, packed_tile_layout
from tests.utils import reference


def _sta_mask(grid, tile, window):
    """Per dimension, key x of query y is allowed iff x's tile is within w//2 of y's clamped tile; a pair is
    allowed iff it is along every dimension (raster order)."""
    rels = []
    for g, t, w in zip(grid, tile, window):
        tiles, half = -(-g // t), (w | 1) // 2
        rel = torch.ones(g, g, dtype=torch.bool)
        if 2 * half + 1 < tiles:
            for x in range(g):
                centre = min(max(x // t, half), tiles - 1 - half)
                for y in range(g):
                    rel[x, y] = abs(y // t - centre) <= half
        rels.append(rel)
    coords = torch.tensor(list(itertools.product(*[range(g) for g in grid])))
    mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for d, rel in enumerate(rels):
        mask &= rel[coords[:, d][:, None], coords[:, d][None, :]]
    return mask


@pytest.mark.parametrize("grid, tile", [((3, 5, 7), (2, 2, 4)), ((2, 6, 13), (1, 6, 13)), ((4, 4, 4), (4, 4, 4))],
                         ids=["ragged-edges", "78-token-tile", "one-cube"])
def test_packed_order_puts_each_tiles_real_tokens_first(grid, tile):
    perm = PackedTilePermutation(grid, tile, 64)
    vol = math.prod(tile)
    assert perm.slot == -(-vol // 64) * 64 and perm.num_padded % 64 == 0
    x = torch.randn(1, 2, math.prod(grid), 3)
    assert torch.equal(perm.unpermute(perm.permute(x)), x)
    for t, start in enumerate(range(0, perm.num_padded, perm.slot)):
        seg = perm.order[start:start + perm.slot]
        real = seg >= 0
        count = int(real.sum())
        assert bool(real[:count].all()) and not bool(real[count:].any())  # a prefix, then padding
        coords = [torch.tensor(divmod_all(int(i), grid)) // torch.tensor(tile) for i in seg[:count]]
        assert len({tuple(c.tolist()) for c in coords}) == 1  # one tile's tokens
        assert seg[:count].tolist() == sorted(seg[:count].tolist())  # raster order inside the tile
    assert perm.block_lengths().tolist() == [max(0, min(64, int((perm.order[i:i + 64] >= 0).sum())))
                                             for i in range(0, perm.num_padded, 64)]


def divmod_all(i, grid):
    out = []
    for g in reversed(grid):
        i, r = divmod(i, g)
        out.append(r)
    return out[::-1]


@pytest.mark.parametrize("grid, tile, window", [((3, 6, 13), (1, 6, 13), (3, 1, 1)), ((4, 6, 10), (2, 3, 5), (1, 3, 1)),
                                                ((5, 6, 10), (2, 4, 8), (1, 3, 1))],
                         ids=["78-token-tiles", "30-token-tiles", "padded-grid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_layout_is_exact_against_the_dense_reference(grid, tile, window, dtype):
    perm, layout = packed_tile_layout(grid, tile, window)
    mask = _sta_mask(grid, tile, window)
    real = perm.order >= 0
    # The layout's tokens, back in raster order, are exactly the STA mask; padding is never attended.
    kernel_mask = layout.to_dense_mask()[0][real][:, real]
    inv = torch.argsort(perm.order[real])
    assert torch.equal(kernel_mask[inv][:, inv], mask)
    from dit_accel.kernels.geometry import block_figures

    f = block_figures(layout, real, real)
    assert f.masked_tiles == 0.0 and f.density == pytest.approx(float(mask.float().mean()))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, math.prod(grid), 16, generator=gen).to(dtype) for _ in range(3))
    out = perm.unpermute(dit_accel.kernels.block_sparse_attention(
        perm.permute(q), perm.permute(k), perm.permute(v), layout, backend="torch"))
    ref = reference(q.float(), k.float(), v.float(), mask)
    ref = ref[0] if isinstance(ref, tuple) else ref
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("grid", [(21, 30, 52), (21, 45, 80), (30, 48, 80), (16, 28, 52)],
                         ids=["wan480p", "wan720p", "hunyuan720p", "fastwan"])
def test_fit_tile_divides_the_grid_with_little_padding(grid):
    tile, window = fit_tile(grid, (6, 8, 8), (3, 3, 3))
    assert all(g % t == 0 for g, t in zip(grid, tile))
    vol = math.prod(tile)
    assert (-(-vol // 64) * 64 / vol) ** 2 <= FIT_PADDED_WORK
    assert all(w % 2 == 1 for w in window)


@pytest.mark.parametrize("cls", ["WanTransformer3DModel", "HunyuanVideoTransformer3DModel"])
@pytest.mark.parametrize("grid", [(21, 30, 52), (21, 45, 80), (30, 48, 80)], ids=["wan480p", "wan720p", "hy720p"])
def test_recommended_tile_wastes_nothing_at_the_issue_grids(cls, grid):
    config, _ = dit_accel.recommended(cls, "tile")
    row = figures_row("g", grid, "tile", "recommended", config)
    assert row["padded_work"] <= 1.08 and row["masked_tiles"] == 0.0, row
    ran = eval(row["ran"], {"Tile": dit_accel.Tile})  # the plan's own config: the tile it runs
    assert all(g % t == 0 for g, t in zip(grid, ran.tile)), row


def test_the_triton_kernel_runs_a_packed_layout_exactly():
    """Ragged key tiles as column counts (carried as column-prefix masks) through the Triton forward (the
    interpreter on the CPU), fp32, 30-token tiles packed into 64-token blocks: 512 positions."""
    grid, tile, window = (4, 6, 10), (2, 3, 5), (1, 3, 1)
    perm, layout = packed_tile_layout(grid, tile, window)
    assert perm.num_padded == 512
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, math.prod(grid), 16, generator=gen) for _ in range(3))
    out = perm.unpermute(dit_accel.kernels.block_sparse_attention(
        perm.permute(q), perm.permute(k), perm.permute(v), layout, backend="triton"))
    ref = reference(q, k, v, _sta_mask(grid, tile, window))
    torch.testing.assert_close(out, ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)


def test_fitted_plan_runs_exactly_and_keeps_the_published_tile_by_name():
    grid = (3, 12, 26)  # whole 312-token frames divide it (packed in 320); (2, 4, 4) does not
    fitted = dit_accel.Tile(tile=(2, 4, 4), window=(1, 3, 3), fit=True)
    plan = fitted.plan(grid)
    assert isinstance(plan.perm, PackedTilePermutation) and all(g % t == 0 for g, t in zip(grid, plan.method.tile))
    assert plan.perm.num_padded == 3 * 320
    mask = _sta_mask(grid, plan.method.tile, plan.method.window)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, math.prod(grid), 16, generator=gen) for _ in range(3))
    o, lse, _, _ = plan.attend(q, k, v, scale=None, backend="torch")
    ref = reference(q, k, v, mask)
    torch.testing.assert_close(o, ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)
    plain = dit_accel.Tile(tile=(2, 4, 4), window=(1, 3, 3)).plan(grid)
    assert plain.method.tile == (2, 4, 4) and not isinstance(plain.perm, PackedTilePermutation)
    assert "fit" not in plain.method.to_dict() and fitted.to_dict()["fit"] is True
    with pytest.raises(ValueError, match="Tile.fit"):
        dit_accel.Tile(fit="yes")
