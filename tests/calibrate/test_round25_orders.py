"""Round 25: calibration prices a block-sparse launch whose heads all run in one token order, as they run.

A launch lays every head out in one order (PerHead takes the order most heads use), and a head of another order
then visits what its pattern covers in that order, not its own layout's density, which the search prices."""

import torch

from dit_accel import PerHead
from dit_accel.calibrate.candidates import candidate_grid
from dit_accel.calibrate.costs import CostModel
from dit_accel.calibrate.search import SearchSpace

GRID = (32, 8, 8)


def _head_densities(method):
    layout = method.plan(GRID)._groups[0].plan.layout
    return (layout.kv_counts.float().sum(1) / (layout.num_q_blocks * layout.num_kv_blocks)).tolist()


def test_a_launch_mixes_no_heads_of_two_token_orders_and_runs_at_the_priced_densities():
    """Before: head 0 best as Tile, head 1 best as Radial (raster order) were put in one launch priced at their own
    densities (0.031 and 0.309); that launch ran them at 0.031 and 0.719 (Radial laid out in Tile's order)."""
    cands = candidate_grid(GRID, methods=("tile", "radial"))
    tile = next(i for i, c in enumerate(cands) if type(c.method).__name__ == "Tile")
    radial = next(i for i, c in enumerate(cands) if type(c.method).__name__ == "Radial")
    errors = torch.full((len(cands), 2), 1.0, dtype=torch.float64)
    errors[0] = 0.0  # dense
    errors[tile, 0] = errors[radial, 1] = 0.0  # each head exact under one method only
    costs = CostModel(GRID, 64, terms="tiles")
    space = SearchSpace(cands, {(0, 0): errors}, costs, 1, [(0, 1)], 2, costs.dense_head())
    choice = space.choose(0, 0, 1e3)  # error priced high: each head exact
    picked = [cands[i].method for i in choice.heads if i >= 0]
    assert len(picked) == 1, choice  # one head sparse, the other dense inside the launch (no Tile + Radial mix)
    both = PerHead(methods=(cands[tile].method, cands[radial].method))
    assert max(_head_densities(both)) > 2 * cands[radial].density  # what the mix would have run


def test_a_hand_made_per_head_config_whose_head_runs_in_another_order_at_a_cost_is_said():
    """Before: PerHead(Tile (4, 4, 4), GNA (3, 5, 5)) on (8, 8, 8) ran the GNA head over every key block in the
    Tile heads' order, against 0.38 in its own, without a word."""
    import pytest

    from dit_accel import GNA, Tile
    from dit_accel._util import DitAccelWarning

    tiles = (Tile(tile=(4, 4, 4), window=(1, 1, 1)), Tile(tile=(4, 4, 4), window=(1, 3, 3)))
    with pytest.warns(DitAccelWarning, match=r"GNA\(kernel_size=\(3, 5, 5\).* visits 1\.00 of the key blocks against "
                                             r"0\.38 in its own: give the heads one token order"):
        PerHead(methods=(tiles[0], GNA(kernel_size=(3, 5, 5)), tiles[1])).plan((8, 8, 8))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DitAccelWarning)  # one order, or a conversion that costs nothing: not said
        PerHead(methods=(tiles[0], GNA(kernel_size=(3, 5, 5), tile=(4, 4, 4)), tiles[1])).plan((8, 8, 8))
