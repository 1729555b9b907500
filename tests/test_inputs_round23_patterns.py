"""Round 23 (trust), patterns and method configs: bad inputs get a clear error naming the argument, and long 1-D
token grids get their block layout without an ``L x L`` relation.

Faults fixed: ``GNA().for_shares("816", 2)`` failed with "not all arguments converted during string formatting"
(``grid[0] % shares`` on a str) and took shares of ``0``/``True``; ``relation_1d`` built its relation through
``L x L`` int64 index temporaries (20000 tokens: 4 s) and every block layout went through it (a 100k-token 1-D grid:
tens of GB), took ``kernel=0`` (an all-False relation) and divided by zero at ``stride=0``; ``Radial``/``SLA``/``VSA``
``.plan(5)`` or ``.plan(None)`` failed in ``tuple(grid)`` with "'int' object is not iterable".
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.patterns import checks, gna_layout
from dit_accel.patterns import gna as gna_module
from dit_accel.patterns.permutation import TilePermutation
from dit_accel.patterns.separable import Band, covers_grid, relation_1d, relation_density, separable_blocks, \
    window_1d


# ------------------------------------------------------------------ for_shares
@pytest.mark.parametrize("method", [dit_accel.GNA(), dit_accel.Dense(), dit_accel.Tile()], ids=lambda m: m.name)
@pytest.mark.parametrize("grid", ["816", None, (), (16, 0, 8), (16.0, 8, 8)], ids=repr)
def test_for_shares_names_a_bad_grid(method, grid):
    with pytest.raises(ValueError, match=rf"{type(method).__name__}\.for_shares\(grid, shares\): grid=.* is invalid: "
                                         r"expected 1 to 3 positive ints.*pass the token grid"):
        method.for_shares(grid, 2)


@pytest.mark.parametrize("shares, exc", [("2", TypeError), (True, TypeError), (2.0, TypeError), (0, ValueError),
                                         (-2, ValueError)], ids=repr)
def test_for_shares_names_bad_shares(shares, exc):
    with pytest.raises(exc, match=r"GNA\.for_shares\(shares=.*\) is invalid: an int >= 1, the number of ring ranks"):
        dit_accel.GNA().for_shares((16, 8, 8), shares)


def test_for_shares_still_picks_one_ranks_tile():
    assert dit_accel.GNA().for_shares([16, 8, 8], 2).tile is not None  # (a list grid: taken as a tuple)
    assert dit_accel.GNA().for_shares((16, 8, 8), 1) == dit_accel.GNA()
    assert dit_accel.GNA().for_shares((15, 8, 8), 2) == dit_accel.GNA()  # (frames not split evenly: as it is)
    assert dit_accel.Tile().for_shares((16, 8, 8), 4) == dit_accel.Tile()


# ------------------------------------------------------------------ plan(grid) of a non-sequence
@pytest.mark.parametrize("method", [dit_accel.Radial(), dit_accel.SLA(), dit_accel.VSA()], ids=lambda m: m.name)
@pytest.mark.parametrize("grid", [None, "x", 2.5], ids=repr)
def test_plan_of_a_grid_that_is_no_sequence_names_it(method, grid):
    with pytest.raises(ValueError, match=rf"{type(method).__name__}\.plan\(grid\): grid=.* is invalid.*pass the "
                                         "token grid"):
        method.plan(grid)


@pytest.mark.parametrize("method", [dit_accel.Radial(), dit_accel.VSA()], ids=lambda m: m.name)
def test_plan_of_an_int_grid_says_video_grids_only(method):
    with pytest.raises(ValueError, match=r"\(T, H, W\).*\(5,\).*Tile"):
        method.plan(5)


# ------------------------------------------------------------------ relation_1d and Band
def _reference_relation(extent, kernel, stride=1, dilation=1, causal=False):
    """The relation as relation_1d built it before round 23 (index-put of the per-group windows)."""
    x = torch.arange(extent)
    g, inner = x % dilation, x // dilation
    allowed = torch.zeros(extent, extent, dtype=torch.bool)
    for r in range(dilation):
        members = x[g == r]
        start, end = window_1d(members.numel(), kernel, stride, causal)
        keys = inner[members]
        allowed[members[:, None], members[None, :]] = (start[:, None] <= keys[None, :]) & (keys[None, :] < end[:, None])
    return allowed


RULES = [(63, 7, 1, 1, False), (63, 2, 2, 3, True), (130, 9, 3, 2, False), (130, 64, 8, 2, True),
         (257, 5, 1, 1, True), (257, 20, 20, 1, False), (257, 40, 7, 6, False), (5, 5, 1, 1, False), (1, 1, 1, 2, False)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "L{}-k{}-s{}-d{}-{}".format(*r[:4], "causal" if r[4] else "nc"))
def test_relation_and_band_equal_the_reference(rule):
    reference = _reference_relation(*rule)
    assert torch.equal(relation_1d(*rule), reference)
    band = Band(*rule)
    assert torch.equal(band.dense(), reference)
    assert band.covers() == bool(reference.all()) == covers_grid([reference])
    assert relation_density(band) == pytest.approx(float(reference.float().mean()), abs=1e-6)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "L{}-k{}-s{}-d{}-{}".format(*r[:4], "causal" if r[4] else "nc"))
@pytest.mark.parametrize("tile, block_q, block_k", [(64, 64, 64), (128, 64, 32), (128, 32, 128)], ids=str)
def test_band_blocks_equal_the_relations(rule, tile, block_q, block_k):
    """The block view from the band's index math is the relation's, field for field (padding, dedupe order)."""
    perm = TilePermutation((rule[0],), (tile,))
    want = separable_blocks(perm, [_reference_relation(*rule)], block_q, block_k)
    got = separable_blocks(perm, [Band(*rule)], block_q, block_k)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grid, tile", [((63, 130), (8, 8)), ((9, 257), (1, 64)), ((5, 7, 130), (1, 2, 32))], ids=str)
def test_band_blocks_equal_the_relations_on_grids(grid, tile):
    for k, s, d, c in [(3, 1, 1, False), (3, 2, 2, True), (5, 5, 1, False)]:
        perm = TilePermutation(grid, tile)
        want = separable_blocks(perm, [_reference_relation(g, k, s, d, c) for g in grid], 64, 64)
        got = separable_blocks(perm, [Band(g, k, s, d, c) for g in grid], 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_a_long_1d_gna_layout_builds_no_relation(monkeypatch):
    """gna_layout builds its layout from the band: a 1-D grid of 100k tokens has a 10 GB relation."""
    grid = (2048 + 130,)
    expected = {}
    for k, s, d, c in [(65, 1, 1, False), (33, 4, 3, True)]:
        rels = [_reference_relation(grid[0], k, s, d, c)]
        perm = TilePermutation(grid, (64,))
        expected[k] = separable_blocks(perm, rels, 64, 64)

    def refuse(*args, **kwargs):
        raise AssertionError("relation_1d was built")

    monkeypatch.setattr(gna_module, "relation_1d", refuse)
    for k, s, d, c in [(65, 1, 1, False), (33, 4, 3, True)]:
        perm, layout = gna_layout(grid, k, s, d, c)
        assert perm.tile == (64,) and layout.q_len == perm.num_padded
        visited, _, table = expected[k]
        assert layout.density() == pytest.approx(float(visited.float().mean()))
        assert layout.mask_table.shape[0] == table.shape[0]


def test_a_relation_the_machine_cannot_hold_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setattr(checks, "available_memory", lambda: 2**20)
    with pytest.raises(MemoryError, match=r"relation_1d\(extent=10000\) materialises 10000 x 10000 bools .* GiB "
                                          r"available: build block layouts from the rule \(gna_layout, Band\)"):
        relation_1d(10000, 7)  # (0.3 GB while built: a size worth the check)
    assert relation_1d(100, 7).shape == (100, 100)  # (30 KB: built)
    perm, layout = gna_layout((4000,), 7)  # (the layout needs no relation)
    assert layout.q_len == 4032


@pytest.mark.parametrize("name, args, exc", [
    ("extent", ("8", 3), TypeError), ("extent", (0, 3), ValueError), ("kernel", (8, 0), ValueError),
    ("kernel", (8, 2.5), TypeError), ("stride", (8, 3, 0), ValueError), ("dilation", (8, 3, 1, 0), ValueError),
    ("dilation", (8, 3, 1, True), TypeError),
], ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__)
def test_relation_and_band_name_a_bad_argument(name, args, exc):
    for build in (relation_1d, Band):
        with pytest.raises(exc, match=rf"relation_1d: {name}=.* is invalid: an int >= 1"):
            build(*args)


def test_a_long_1d_gna_plan_builds_no_relation_and_a_relation_tensor_too_big_is_refused(monkeypatch):
    """GNA.plan lays out Bands (no L x L relation) on a 1-D grid of any length; the paths that still build relation
    tensors (fit=True clamps a kernel through them) refuse one this machine cannot hold, naming what to do."""
    monkeypatch.setattr(checks, "available_memory", lambda: 3 * 10**6)
    plan = dit_accel.GNA(kernel_size=7).plan((10000,))
    # (NATTEN's window shifts inward at the borders: every query sees 7 keys)
    assert plan.layout.q_len == 10048 and plan.token_density == 7 * 10000 / 10000**2
    with pytest.raises(MemoryError, match=r"10000 x 10000 bools .* available: build block layouts from the rule"):
        dit_accel.GNA(kernel_size=20000, fit=True).plan((10000,))
