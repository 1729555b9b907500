"""``GNA.at_density`` on a causal grid: a target at or above the densest window's visited density gets that window
(before: the first round's window stayed, 0.183 of (8, 32, 32) fully causal for a target of 0.3, where the whole
window visits 0.220)."""
import math
import warnings

import pytest

import dit_accel
from dit_accel.patterns.gna import kernels_at_density

GRID = (8, 32, 32)


def _densest(causal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dit_accel.GNA(kernel_size=GRID, is_causal=causal).plan(GRID).density


@pytest.mark.parametrize("causal, density", [(True, 0.3), (True, 0.5), ((True, True, False), 0.7)], ids=str)
def test_a_target_past_the_densest_causal_window_gets_that_window(causal, density):
    densest = _densest(causal)
    assert densest < density  # (the case: the target cannot be reached)
    method = dit_accel.GNA(kernel_size=(3, 7, 7), is_causal=causal).at_density(GRID, density)
    assert method.kernel_size == GRID
    assert method.plan(GRID).density == pytest.approx(densest)


def test_a_reachable_causal_target_is_still_found_near_it():
    method = dit_accel.GNA(kernel_size=(3, 7, 7), is_causal=True).at_density(GRID, 0.1)
    assert abs(method.plan(GRID).density / 0.1 - 1) < 0.1


def test_the_search_returns_the_whole_window_when_nothing_else_can_reach():
    """A stand-in price: half the token density, so the most any window visits is 0.5."""
    grid = (4, 6, 6)

    def visited(ks):
        return 0.5 * math.prod(min(k, g) / g for k, g in zip(ks, grid))

    assert kernels_at_density(grid, 0.6, visited) == grid
    assert kernels_at_density(grid, 0.5, visited) == grid
    found = kernels_at_density(grid, 0.2, visited)
    assert abs(visited(found) / 0.2 - 1) < 0.1
