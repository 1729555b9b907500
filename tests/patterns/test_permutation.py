"""Tiled orders: the tile a separable pattern is laid out with when none is given."""

import pytest
import torch


@pytest.mark.parametrize("grid, kernel, stride", [((3, 8, 8), (3, 3, 3), 1), ((5, 12, 10), (3, 5, 5), 1),
                                                  ((6, 16, 12), (2, 8, 4), (2, 8, 4)), ((4, 9, 14), (3, 7, 3), 1)])
def test_least_work_tile_is_the_cheapest_built_layout(grid, kernel, stride):
    """The per-dimension product rule of least_work_tile against the layouts themselves: every candidate
    tile is built, its visited and full blocks counted, and the chosen tile costs least."""
    import itertools
    import math

    from dit_accel.patterns.gna import gna_relations
    from dit_accel.patterns.permutation import PARTIAL_BLOCK_COST, TilePermutation, block_box, least_work_tile
    from dit_accel.patterns.separable import separable_layout

    g, rels = gna_relations(grid, kernel, stride, 1, False)
    costs = {}
    for tile in itertools.product(*[[1, 2, 4, 8, 16, 32, 64]] * 3):
        if math.prod(tile) != 64 or block_box(tile, 64) is None:
            continue
        layout = separable_layout(TilePermutation(g, tile), rels, 64, 64)
        visited = int(layout.kv_counts.sum())
        partial = int((layout.kv_mask_ids >= 0).sum())
        costs[tile] = visited + (PARTIAL_BLOCK_COST - 1) * partial
    chosen = least_work_tile(g, rels)
    assert costs[chosen] == pytest.approx(min(costs.values()))


def test_gna_default_tile_visits_less_on_the_wan_preset():
    """The issue's case: GNA(7, 16, 16) on Wan 480p visited 0.120 of the blocks with the least-padding tile."""
    import dit_accel
    from dit_accel.patterns.gna import gna_relations
    from dit_accel.patterns.permutation import TilePermutation, pick_tile
    from dit_accel.patterns.separable import separable_layout

    plan = dit_accel.GNA(kernel_size=(7, 16, 16)).plan((21, 30, 52))
    g, rels = gna_relations((21, 30, 52), (7, 16, 16), 1, 1, False)
    old = separable_layout(TilePermutation(g, pick_tile(g, (64,))), rels, 64, 64)
    assert old.density() == pytest.approx(0.1203, abs=1e-4)
    assert plan.density < 0.8 * old.density()


@pytest.mark.parametrize("grid, tile, identity", [((4, 3, 5), (1, 3, 5), True), ((4, 3, 5), (2, 3, 5), True),
                                                  ((4, 3, 5), (1, 1, 5), True), ((4, 3, 5), (1, 3, 1), False),
                                                  ((4, 3, 5), (3, 3, 5), False), ((4, 3, 6), (1, 3, 3), False),
                                                  ((6, 8), (1, 8), True), ((6, 8), (2, 4), False)])
def test_permutation_of_whole_rows_is_the_identity(grid, tile, identity):
    """Tiles of whole rows (frames) list tokens in raster order: permute and unpermute hand back their input
    (no copy); every other tile still permutes. Checked against the raster index of each tiled position,
    computed here from the definition (tiles in raster order, raster order inside a tile)."""
    import itertools
    import math

    import torch

    from dit_accel.patterns.permutation import TilePermutation

    padded = [-(-g // t) * t for g, t in zip(grid, tile)]
    n_tiles = [p // t for p, t in zip(padded, tile)]
    order = []
    for tc in itertools.product(*[range(n) for n in n_tiles]):
        for inner in itertools.product(*[range(t) for t in tile]):
            c = [a * t + b for a, t, b in zip(tc, tile, inner)]
            order.append(-1 if any(x >= g for x, g in zip(c, grid)) else
                         sum(x * math.prod(grid[d + 1:]) for d, x in enumerate(c)))
    perm = TilePermutation(grid, tile)
    assert perm.order.tolist() == order
    assert perm.identity is identity
    assert identity is (order == list(range(math.prod(grid))))
    x = torch.randn(2, math.prod(grid), 3)
    tiled = perm.permute(x, dim=1)
    assert (tiled is x) is identity
    expect = torch.stack([x[:, i] if i >= 0 else torch.zeros_like(x[:, 0]) for i in order], 1)
    assert torch.equal(tiled, expect)
    assert torch.equal(perm.unpermute(tiled, dim=1), x)


@pytest.mark.parametrize("cls", ["padded", "packed"])
def test_permute_and_unpermute_against_their_definition(cls):
    """Tiled position p holds raster token order[p] (zero where order[p] = -1); raster token i comes back from tiled
    position inverse[i]; gradients flow to every real token once. The attention output comes back laid out as
    (B, N, H, D) in memory, so a pipeline's transpose(1, 2).flatten(2) is a view."""
    from dit_accel.patterns.permutation import PackedTilePermutation, TilePermutation

    grid, tile = (3, 5, 7), (2, 2, 4)
    perm = TilePermutation(grid, tile) if cls == "padded" else PackedTilePermutation(grid, tile, block=16)
    assert perm.num_padded > perm.num_tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, perm.num_tokens, 8, generator=g).requires_grad_()
    tiled = perm.permute(x, dim=-2)
    for p, token in enumerate(perm.order.tolist()):
        want = x[:, :, token] if token >= 0 else torch.zeros(2, 3, 8)
        assert torch.equal(tiled[:, :, p], want), p
    back = perm.unpermute(tiled, dim=-2)
    assert torch.equal(back, x) and back.transpose(1, 2).is_contiguous()
    weight = torch.randn(tiled.shape, generator=g)
    (tiled * weight).sum().backward()
    assert torch.equal(x.grad, weight[:, :, perm.inverse])
    lse = torch.randn(2, 3, perm.num_padded, generator=g)
    assert torch.equal(perm.unpermute(lse, dim=-1), lse[:, :, perm.inverse])


@pytest.mark.parametrize("cls", ["padded", "packed"])
def test_permutation_gradients_are_the_inverse_gather(cls):
    """Both directions' gradients are the other direction's gather (a padded position's gradient is zero), with no
    scatter-add and no zero fill of a gradient: the op list of each backward names neither. Twice differentiable
    (float64 gradcheck and gradgradcheck)."""
    from tests.utils import dispatched

    from dit_accel.patterns.permutation import PackedTilePermutation, TilePermutation

    grid, tile = (3, 5, 7), (2, 2, 4)
    perm = TilePermutation(grid, tile) if cls == "padded" else PackedTilePermutation(grid, tile, block=16)
    g = torch.Generator().manual_seed(1)
    ops = []

    def record(func, args, kwargs, out):
        ops.append(func._schema.name)

    t = torch.randn(2, 3, perm.num_padded, 8, generator=g).requires_grad_()
    raster = perm.unpermute(t, dim=-2)
    weight = torch.randn(raster.shape, generator=g)
    with dispatched(record):
        (raster * weight).sum().backward()
    real = perm.order >= 0
    want = torch.zeros_like(t)
    want[:, :, real] = weight[:, :, perm.order[real]]
    assert torch.equal(t.grad, want)
    for layout in ("BHND", "BNHD"):  # x's gradient comes laid out as x: no copy into the leaf's layout either
        x = torch.randn(2, 3, perm.num_tokens, 8, generator=g)
        x = (x if layout == "BHND" else x.transpose(1, 2).contiguous().transpose(1, 2)).requires_grad_()
        tiled = perm.permute(x, dim=-2)
        ops.clear()
        with dispatched(record):
            tiled.backward(torch.randn(tiled.shape, generator=g))
        assert not {"aten::index_add", "aten::index_add_", "aten::zeros", "aten::new_zeros", "aten::copy_"} & set(ops)
        assert x.grad.stride() == x.stride(), layout
    x64 = torch.randn(1, 2, perm.num_tokens, 3, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: perm.unpermute(perm.permute(x, dim=-2) ** 2, dim=-2), (x64,))
    assert torch.autograd.gradgradcheck(lambda x: perm.permute(x, dim=-2) ** 2, (x64,))
