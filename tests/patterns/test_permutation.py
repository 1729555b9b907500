"""Tiled orders: the tile a separable pattern is laid out with when none is given."""

import pytest


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
