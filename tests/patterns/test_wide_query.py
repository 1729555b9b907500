"""128-row query blocks for Tile/GNA (issue 27 item 5): ``wide_query_layout`` against a brute-force check.

The brute force builds the pattern's token mask from the independent STA/GNA definitions of
``test_gna_tile`` (no dit_accel.patterns code), moves it to tiled order by explicit coordinates
(``test_layouts``), and per wide query block compares the key blocks its two halves visit (and
which of them are fully allowed). The wide layout must exist exactly when the wide block is a box
inside one tile and the halves agree, and must then visit the same key tiles per token as the
narrow layout: same token mask, same density, same partial fraction, same modelled tile work.
"""

import pytest
import torch

from dit_accel.kernels import cost
from dit_accel.kernels.layout import BlockLayout
from dit_accel.patterns import gna_layout, tile_layout
from dit_accel.patterns.permutation import block_box
from dit_accel.patterns.separable import wide_query_layout
from tests.patterns.test_gna_tile import _ref_gna, _ref_sta
from tests.patterns.test_layouts import _expected_tiled

pytestmark = pytest.mark.usefixtures("one_thread")


def _halves(expected: torch.Tensor, bq: int, bk: int):
    """Per wide block (2 x bq rows): ``(visits, full)`` of each half, bool ``[nK]`` each, from the token mask."""
    n_q, n_k = expected.shape[0] // bq, expected.shape[1] // bk
    out = []
    for i in range(0, n_q - 1, 2):
        pair = []
        for half in (i, i + 1):
            rows = expected[half * bq:(half + 1) * bq]
            visits = torch.tensor([bool(rows[:, j * bk:(j + 1) * bk].any()) for j in range(n_k)])
            full = torch.tensor([bool(rows[:, j * bk:(j + 1) * bk].all()) for j in range(n_k)])
            pair.append((visits, full))
        out.append(pair)
    return out


def _brute_agree(expected: torch.Tensor, bq: int, bk: int) -> bool:
    return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in _halves(expected, bq, bk))


def _check_wide(narrow: BlockLayout, wide: BlockLayout, expected: torch.Tensor):
    """``wide`` lists per wide block exactly the brute-force key blocks of its halves; same work as ``narrow``."""
    bq, bk = narrow.block_q, narrow.block_k
    assert wide.block_q == 2 * bq and wide.block_k == bk and wide.num_q_blocks * 2 == narrow.num_q_blocks
    visited, ids = wide.block_masks()
    for i, (a, b) in enumerate(_halves(expected, bq, bk)):
        assert torch.equal(visited[0, i], a[0]) and torch.equal(visited[0, i], b[0])
        assert torch.equal(visited[0, i] & (ids[0, i] < 0), a[1])  # full in the wide layout = full in both halves
    assert torch.equal(wide.to_dense_mask(), narrow.to_dense_mask())
    assert torch.equal(wide.to_dense_mask()[0], expected)
    assert wide.density() == narrow.density()
    assert wide.partial_fraction() == narrow.partial_fraction()
    n, w = cost.tile_counts(narrow, heads=1), cost.tile_counts(wide, heads=1)
    assert 2 * w.full_tiles == n.full_tiles and 2 * w.partial_tiles == n.partial_tiles and 2 * w.ctas == n.ctas


# (grid, tile, window, bq): Tile layouts whose STA tile holds 2 x bq boxes: every wide block lies in one tile.
TILE_CASES = [
    ((2, 16, 16), (1, 16, 8), (1, 3, 3), 64),
    ((2, 16, 16), (1, 16, 8), (1, 1, 1), 64),
    ((6, 8, 8), (2, 4, 4), (1, 1, 3), 16),
    ((5, 9, 10), (2, 4, 4), (3, 1, 3), 16),  # padded along every dimension
    ((4, 6, 12), (2, 2, 8), (1, 3, 1), 16),
    ((6, 12), (4, 8), (1, 2), 16),          # image grid, even window
]


@pytest.mark.parametrize("grid,tile,window,bq", TILE_CASES)
def test_tile_wide_blocks_inside_one_tile_have_equal_halves(grid, tile, window, bq):
    perm, narrow = tile_layout(grid, tile, window, block_q=bq, block_k=bq)
    assert perm.tile == tile and block_box(perm.tile, 2 * bq) is not None
    expected = _expected_tiled(_ref_sta(grid, tile, window), grid, tile)
    assert _brute_agree(expected, bq, bq)  # the claim, checked by brute force
    wide = wide_query_layout(perm, narrow, 2 * bq)
    assert wide is not None
    _check_wide(narrow, wide, expected)
    # Built directly at the wide block size over the same tiled order: the same layout.
    _, direct = tile_layout(grid, tile, window, block_q=2 * bq, block_k=bq)
    assert torch.equal(direct.block_masks()[0], wide.block_masks()[0])
    assert torch.equal(direct.block_masks()[1] >= 0, wide.block_masks()[1] >= 0)


def test_tile_per_head_windows():
    grid, tile, windows, bq = (4, 8, 8), (2, 4, 4), ((1, 1, 1), (1, 3, 1), (3, 1, 3)), 16
    perm, narrow = tile_layout(grid, tile, windows, block_q=bq, block_k=bq)
    wide = wide_query_layout(perm, narrow, 2 * bq)
    assert wide is not None and wide.num_heads == 3
    for h, window in enumerate(windows):
        expected = _expected_tiled(_ref_sta(grid, tile, window), grid, tile)
        assert _brute_agree(expected, bq, bq)
        assert torch.equal(wide.to_dense_mask()[h], expected)
    assert wide.density() == narrow.density()


@pytest.mark.parametrize("grid,tile,window,bq", [
    ((2, 16, 16), (1, 8, 8), (1, 1, 1), 64),   # 64-token tiles: a 128-row block spans two tiles
    ((1, 16, 24), (1, 16, 4), (1, 1, 3), 64),  # halves in W tiles 2 and 3 see tiles 1..3 and 2..4
])
def test_tile_wide_blocks_across_tiles_are_refused(grid, tile, window, bq):
    perm, narrow = tile_layout(grid, tile, window, block_q=bq, block_k=bq)
    assert block_box(perm.tile, 2 * bq) is None
    expected = _expected_tiled(_ref_sta(grid, tile, window), grid, tile)
    assert not _brute_agree(expected, bq, bq)  # merging would visit the union of two different lists
    assert wide_query_layout(perm, narrow, 2 * bq) is None


@pytest.mark.parametrize("grid,k,s,tile,bq,agree", [
    ((6, 8, 8), 3, 1, (2, 4, 4), 16, False),          # stride 1: frames 2 and 3 see frames 1..3 and 2..4
    ((4, 8, 8), (2, 4, 4), (2, 4, 4), (2, 4, 4), 16, True),  # stride = tile: a tile shares one window
    ((6, 8, 8), (4, 8, 4), (2, 8, 4), (2, 4, 4), 16, True),
    ((8, 4), (5, 2), 1, (8, 4), 16, True),  # both halves partial in both key blocks, with different masks
])
def test_gna_wide_blocks_only_where_the_halves_agree(grid, k, s, tile, bq, agree):
    perm, narrow = gna_layout(grid, k, s, 1, False, tile=tile, block_q=bq, block_k=bq)
    assert block_box(perm.tile, 2 * bq) is not None  # a box inside one tile in every case
    expected = _expected_tiled(_ref_gna(grid, k, s, 1, False), grid, tile)
    assert _brute_agree(expected, bq, bq) == agree
    wide = wide_query_layout(perm, narrow, 2 * bq)
    assert (wide is not None) == agree
    if agree:
        _check_wide(narrow, wide, expected)


def test_wide_query_layout_refuses_other_shapes():
    perm, narrow = tile_layout((2, 16, 16), (1, 16, 8), (1, 3, 3), block_q=64, block_k=64)
    assert wide_query_layout(None, narrow) is None
    assert wide_query_layout(perm, narrow, 256) is None  # only twice the block
    _, wide = tile_layout((2, 16, 16), (1, 16, 8), (1, 3, 3), block_q=128, block_k=64)
    assert wide_query_layout(perm, wide, 256) is None  # 256 is no box in a 128-token tile
