"""Round 16, the patterns and method settings against METHODS.md on unusual but valid inputs.

The references here are written from METHODS.md alone (token loops, no dit_accel code): GNA's 1-D rule with
stride, dilation and causality; STA's clamped tile centre on grids the tile does not divide, windows larger than
the grid included; radial attention's frame-pair rule and 60% / 1/3 block reduction at short sequences and odd
frame counts. Then the faults found this round: a per-head GNA that ignored ``fit=True``, a per-head layer mixing
Tile and GNA heads of other tiles that was refused at video sizes, and ``SLA(topk=0.9, negligible=0.1)``
refused by float rounding.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import dit_accel
from dit_accel.patterns import gna_layout, gna_mask, radial_layout, tile_layout, tile_mask
from dit_accel.plans import per_head as per_head_module
from dit_accel.plans.per_head import PerHead


# ------------------------------------------------------------------ references from METHODS.md
def _gna_window(extent, k, s, causal):
    """Per query, the half-open key window of one undilated dimension (METHODS.md, GNA 1-D rule)."""
    left, right = k // 2, k // 2 + k % 2 - 1
    out = []
    for i in range(extent):
        group = i // s
        if causal:
            leader = min(group * s + s - 1, extent - 1)
            out.append((max(leader - (k - 1), 0), i + 1))
        else:
            centre = min(max(min(group * s + s // 2, extent - 1), left), extent - 1 - right)
            out.append((centre - left, centre + right + 1))
    return out


def _gna_rel(extent, k, s=1, d=1, causal=False):
    rel = torch.zeros(extent, extent, dtype=torch.bool)
    for g in range(d):  # dilation: interleaved groups, the rule on coordinates inside a group
        members = list(range(g, extent, d))
        for a, (start, end) in enumerate(_gna_window(len(members), k, s, causal)):
            for b in range(start, end):
                rel[members[a], members[b]] = True
    return rel


def _sta_rel(extent, t, w):
    """STA along one dimension: key tiles within w // 2 of the query tile's centre clamped inward."""
    n, h = -(-extent // t), w // 2
    rel = torch.zeros(extent, extent, dtype=torch.bool)
    for i, j in itertools.product(range(extent), repeat=2):
        rel[i, j] = 2 * h + 1 >= n or abs(j // t - min(max(i // t, h), n - 1 - h)) <= h
    return rel


def _kron(rels):
    coords = list(itertools.product(*[range(r.shape[0]) for r in rels]))
    mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for dim, rel in enumerate(rels):
        c = torch.tensor([x[dim] for x in coords])
        mask &= rel[c][:, c]
    return mask


def _radial_blocks(grid, block, decay, sinks):
    """Radial attention's kept blocks: the placed bands, then the 60% / 1/3 column rule per block."""
    frames, s = grid[0], grid[1] * grid[2]
    n, ref, pos = frames * s, 2 ** s.bit_length(), torch.arange(s)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qf, kf in itertools.product(range(frames), repeat=2):
        dist = abs(qf - kf)
        if kf in sinks or dist <= 1:
            band = torch.ones(s, s, dtype=torch.bool)
        else:
            width = ref / 2 ** dist.bit_length()
            if width < block and dist % int(block / width) != 0:
                continue
            band = (pos[:, None] - pos[None, :]).abs() <= max(decay * width, block)
        mask[qf * s:(qf + 1) * s, kf * s:(kf + 1) * s] = band
    nb = -(-n // block)
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    for a, b in itertools.product(range(nb), repeat=2):
        sub = mask[a * block:(a + 1) * block, b * block:(b + 1) * block]
        count = sub.sum(0)
        keep[a, b] = int((count > sub.shape[0] / 3).sum()) > 0.6 * int((count > 0).sum())
    return keep


def _raster(perm, layout, head=0):
    mask = layout.to_dense_mask()[head]
    return mask if perm is None else mask[perm.inverse][:, perm.inverse]


# ------------------------------------------------------------------ the patterns agree with METHODS.md
def test_gna_1d_matches_the_rule_for_every_kernel_stride_dilation_and_causality():
    for extent in range(2, 10):
        for k in range(2, extent + 1):
            for s, d, causal in itertools.product(range(1, k + 1), range(1, extent // k + 1), (False, True)):
                assert torch.equal(gna_mask((extent,), k, s, d, causal), _gna_rel(extent, k, s, d, causal)), \
                    (extent, k, s, d, causal)


@pytest.mark.parametrize("grid, kernel, stride, dilation, causal", [
    ((5, 7), (3, 4), (2, 3), (1, 1), (False, True)),        # odd extents, even kernel, strides not dividing them
    ((2, 9, 6), (2, 3, 3), (1, 3, 2), (1, 3, 2), (True, False, False)),   # a dilation that fills the extent
    ((3, 5, 7), (3, 5, 7), 1, 1, (True, False, True)),      # kernels as large as the grid, causal: not dense
    ((4, 6, 5), (4, 5, 2), (4, 5, 1), 1, False),            # stride = kernel: blocked windows, last one shifted
], ids=["2d-odd", "3d-dilated", "whole-causal", "blocked"])
def test_gna_mask_and_layout_match_the_rule(grid, kernel, stride, dilation, causal):
    nd = len(grid)
    per = [v if isinstance(v, tuple) else (v,) * nd for v in (kernel, stride, dilation, causal)]
    ref = _kron([_gna_rel(grid[i], *(p[i] for p in per)) for i in range(nd)])
    assert torch.equal(gna_mask(grid, kernel, stride, dilation, causal), ref)
    perm, layout = gna_layout(grid, kernel, stride, dilation, causal, block_q=16, block_k=16)
    assert torch.equal(_raster(perm, layout), ref)


@pytest.mark.parametrize("grid, tile, window", [
    ((7,), 3, 1), ((7,), 3, 2), ((5,), 8, 1),               # a tile longer than the extent
    ((1, 9, 11), (1, 4, 4), (1, 3, 2)),                     # one frame, extents the tile does not divide
    ((9, 10), (4, 3), (5, 9)),                              # windows larger than the tile count: dense there
    ((5, 6, 7), (2, 4, 3), (2, 1, 4)),                      # even windows cover w + 1 tiles
], ids=str)
def test_tile_mask_and_layout_match_the_clamped_centre_rule(grid, tile, window):
    nd = len(grid)
    tile_t, win_t = ((v,) * nd if isinstance(v, int) else v for v in (tile, window))
    ref = _kron([_sta_rel(g, t, w) for g, t, w in zip(grid, tile_t, win_t)])
    assert torch.equal(tile_mask(grid, tile, window), ref)
    perm, layout = tile_layout(grid, tile, window, block_q=16, block_k=16)
    assert torch.equal(_raster(perm, layout), ref)
    plan = dit_accel.Tile(tile=tile, window=window).plan(grid)
    assert plan.is_dense == bool(ref.all())
    if not plan.is_dense:
        assert torch.equal(_raster(plan.perm, plan.layout), ref)
        assert plan.token_density == pytest.approx(float(ref.float().mean()))


@pytest.mark.parametrize("grid, block, decay, sinks", [
    ((3, 2, 3), 4, 1.0, ()), ((7, 3, 3), 8, 0.5, (0,)), ((9, 2, 5), 8, 0.2, (0,)), ((12, 1, 3), 4, 0.01, (11,)),
    ((5, 5, 5), 16, 1.0, (0,)),
], ids=str)
def test_radial_blocks_match_the_rule_at_short_lengths_and_odd_frame_counts(grid, block, decay, sinks):
    layout = radial_layout(grid, block, decay, sinks)
    got = layout.block_masks()[0][0]
    assert torch.equal(got, _radial_blocks(grid, block, decay, sinks))


# ------------------------------------------------------------------ the faults of this round
def _gna_fitted_ref(grid, kernel):
    """A fit=True GNA head: a kernel longer than its extent is the whole extent (stride 1, non-causal here)."""
    return _kron([_gna_rel(g, min(k, g)) if g >= 2 else torch.ones(g, g, dtype=torch.bool)
                  for g, k in zip(grid, kernel)])


@pytest.mark.parametrize("grid, kernels", [
    ((1, 8, 8), ((2, 3, 3), (2, 20, 20))),                  # a single latent frame: every head's kernel clamped
    ((3, 9, 10), ((2, 3, 3), (5, 2, 30), (2, 3, 3))),       # one head's kernel too long, the others fit
], ids=["one-frame", "one-head-long"])
def test_gna_per_head_kernels_take_fit_true_like_one_kernel(grid, kernels):
    """Before: ``GNA(kernel_size=<one per head>, fit=True)`` ignored ``fit`` and raised "kernel_size*dilation ...
    exceeds the grid extent" on the grid fit=True is there to run (a single frame: an image through Wan)."""
    method = dit_accel.GNA(kernel_size=kernels, fit=True)
    with pytest.warns(dit_accel.DitAccelWarning, match="a head's kernel_size .* exceeds the grid extent.*clamped"):
        plan = method.plan(grid)
    assert plan.layout.num_heads == len(kernels) and not plan.is_dense
    for h, kernel in enumerate(kernels):
        assert torch.equal(_raster(plan.perm, plan.layout, h), _gna_fitted_ref(grid, kernel)), h
    assert plan.token_density == pytest.approx(
        sum(float(_gna_fitted_ref(grid, k).float().mean()) for k in kernels) / len(kernels))


def test_gna_grid_error_names_fit_true():
    with pytest.raises(ValueError, match=r"exceeds the grid extent 1 .*GNA\(\.\.\., fit=True\)"):
        dit_accel.GNA(kernel_size=3).plan((1, 8, 8))
    with pytest.raises(ValueError, match=r"smaller kernel_size or dilation, or GNA\(\.\.\., fit=True\)"):
        dit_accel.GNA(kernel_size=((3, 3), (9, 3))).plan((8, 8))


def test_a_per_head_layer_mixing_tile_and_gna_of_other_tiles_runs_without_a_token_mask(monkeypatch):
    """Before: a Tile head beside GNA heads of another tile was moved into their token order through its
    ``N x N`` mask, refused above 8,192 tokens ("give the heads of a layer methods of one token order"): a
    hand-written PerHead of Tile(6, 8, 8) and GNA heads failed at Wan 480p. Windows are separable, so a head's
    layout is built from its relations in any tiled order."""
    grid = (5, 10, 12)
    heads = (dit_accel.Tile(tile=(2, 4, 4), window=(1, 3, 1)),
             dit_accel.GNA(kernel_size=(3, 5, 5), tile=(1, 8, 8)),
             dit_accel.GNA(kernel_size=(3, 5, 5), tile=(1, 8, 8)),
             dit_accel.Dense(),
             dit_accel.GNA(kernel_size=(2, 9, 2), stride=(1, 3, 2), is_causal=(True, False, False), tile=(1, 8, 8)))
    window = _kron([_gna_rel(g, k) for g, k in zip(grid, (3, 5, 5))])
    refs = [_kron([_sta_rel(g, t, w) for g, t, w in zip(grid, (2, 4, 4), (1, 3, 1))]), window, window,
            torch.ones(600, 600, dtype=torch.bool),
            _kron([_gna_rel(g, k, s, 1, c) for g, k, s, c in zip(grid, (2, 9, 2), (1, 3, 2), (True, False, False))])]
    monkeypatch.setattr(per_head_module, "MAX_CONVERTED_TOKENS", 64)  # as at a video's size: no N x N allowed

    def no_token_mask(plan):
        raise AssertionError("a window head went through its N x N token mask")

    monkeypatch.setattr(per_head_module, "_raster_mask", no_token_mask)
    plan = PerHead(heads).plan(grid)
    (head_ids, group, kind), = plan.groups
    assert kind == "block_sparse" and head_ids == tuple(range(5)) and group.perm.tile == (1, 8, 8)
    for h, ref in enumerate(refs):
        assert torch.equal(_raster(group.perm, group.layout, h), ref), h


def test_a_per_head_radial_band_beside_tiled_heads_is_still_refused_at_video_sizes(monkeypatch):
    monkeypatch.setattr(per_head_module, "MAX_CONVERTED_TOKENS", 64)
    heads = (dit_accel.GNA(kernel_size=(3, 5, 5), tile=(1, 8, 8)),) * 2 + (dit_accel.Radial(block_size=64),)
    with pytest.raises(ValueError, match="another token order.*Radial\\(spatial='window'\\)"):
        PerHead(heads).plan((8, 8, 16))


@pytest.mark.parametrize("topk", [0.9, 0.07, 0.33, 0.67, 0.55])
def test_sla_topk_and_negligible_summing_to_one_are_accepted(topk):
    """Before: ``SLA(topk=0.9, negligible=0.1)`` was refused, "negligible=0.1 is invalid: must be a number in
    [0, 0.1]" (1.0 - 0.9 is 0.09999999999999998): 20 of the 99 two-decimal settings without marginal blocks."""
    negligible = round(1.0 - topk, 2)
    sla = dit_accel.SLA(topk=topk, negligible=negligible)
    assert sla.topk + sla.negligible <= 1.0 and sla.negligible == pytest.approx(negligible)
    sla.plan((2, 8, 8))  # its kernel parameters take it too
    with pytest.raises(ValueError, match="SLA.negligible=.* is invalid"):
        dit_accel.SLA(topk=topk, negligible=negligible + 0.01)


def test_schedule_dense_steps_cover_their_boundaries():
    """Dense on steps 0 .. dense_steps - 1 and total - dense_last_steps .. total - 1, sparse in between; the per-
    step strategy resolves only there; a total unknown keeps the last steps sparse (nothing to count back from)."""
    from dit_accel.pipelines.schedule import Schedule

    tile = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    sched = Schedule(tile, dense_layers=frozenset({2}), dense_steps=2, dense_last_steps=3)
    runs = [sched.method_for(0, step, 10) is not None for step in range(10)]
    assert runs == [False, False, True, True, True, True, True, False, False, False]
    assert sched.method_for(2, 5, 10) is None and sched.method_for(0, 9, None) is tile
    assert math.isclose(sum(runs) / 10, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Schedule(tile, dense_steps=0, dense_last_steps=10).method_for(0, 0, 10) is None


def test_a_per_head_layer_of_fitted_tiles_takes_a_dense_head():
    """Before: ``PerHead((Tile(..., fit=True),) * 2 + (Dense(),))`` (the recommended Tile beside a dense head) on
    a grid the fitted tile packs raised "block_q=64 does not cut tile=(2, 7, 9) ... Pass such a tile", a tile
    the user never gave: the dense head's layout was built as boxes in the packed tile order."""
    grid = (4, 7, 9)  # fit_tile packs tiles of (2, 7, 9): 126 tokens in slots of 128
    fitted = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 3), fit=True)
    plan = PerHead((fitted, dit_accel.Dense(), fitted)).plan(grid)
    (_, group, kind), = plan.groups
    assert kind == "block_sparse" and type(group.perm).__name__ == "PackedTilePermutation"
    window = tile_mask(grid, (2, 7, 9), 1)
    for h, ref in enumerate([window, torch.ones(252, 252, dtype=torch.bool), window]):
        assert torch.equal(_raster(group.perm, group.layout, h), ref), h
    padding = group.perm.order < 0
    assert not group.layout.to_dense_mask()[1][:, padding].any()  # the dense head never reads a padded key
    assert plan.density == pytest.approx((2 * 0.5 + 1.0) / 3)


@pytest.mark.parametrize("grid", [(11, 13), (7, 7)], ids=str)
def test_a_fitted_tile_given_as_one_int_plans_as_the_same_tile_spelt_per_dimension(grid):
    """Before: ``Tile(tile=5, window=1, fit=True)`` (``--tile 5 --fit-grid``) compared fit_tile's ``(5, 5)`` with
    ``5``, took it for another tile and ran the packed order: 576 positions for 143 tokens on (11, 13) (192 as
    ``tile=(5, 5)``), its plan's method ``Tile(tile=(5, 5), window=(1, 1))`` recorded as a tile fitted there."""
    one = dit_accel.Tile(tile=5, window=1, fit=True)
    plan, same = one.plan(grid), dit_accel.Tile(tile=(5, 5), window=1, fit=True).plan(grid)
    assert plan.method is one and type(plan.perm) is type(same.perm)
    assert plan.perm.num_padded == same.perm.num_padded and plan.density == same.density
    assert torch.equal(_raster(plan.perm, plan.layout), tile_mask(grid, 5, 1))


def test_tile_fit_with_per_head_windows_is_refused_when_built():
    """Before: ``Tile(window=<one per head>, fit=True)`` (say ``recommended``'s Tile given per-head windows) was
    accepted and planned the windows on their own tile: fit was ignored, unsaid."""
    with pytest.raises(ValueError, match=r"Tile.fit=True is invalid with per-head windows .*pass fit=False"):
        dit_accel.Tile(tile=(1, 4, 4), window=((1, 1, 3), (1, 3, 1)), fit=True)
    fitted = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3), fit=True)
    with pytest.raises(ValueError, match="per-head windows"):
        fitted.replace(window=((1, 1, 3), (1, 3, 1)))
    assert fitted.replace(window=((1, 1, 3), (1, 3, 1)), fit=False).heads == 2


def test_the_record_of_per_head_gna_kernels_with_fit_says_each_heads_kernel_as_it_ran():
    """Before: ``summary()["ran_on_grid"]`` (and the generate/eval records built on it) wrote per-head kernel sizes
    as given with ``fit=True``, so a head whose (3, 9, 9) ran clamped to (3, 8, 8) on a (3, 8, 8) grid was recorded at
    a size it never ran. Now each head is written as it ran; a head that fits stays as given."""
    from dit_accel.models import tiny as T

    model = T.build_tiny_transformer("wan")  # 2 heads
    inputs = T.tiny_transformer_inputs("wan", model, grid=(3, 8, 8))
    method = dit_accel.GNA(kernel_size=((2, 5, 5), (3, 9, 9)), fit=True)
    with pytest.warns(dit_accel.DitAccelWarning, match="clamped"), dit_accel.apply(model, method) as handle:
        with torch.no_grad():
            model(**inputs)
        ran = handle.summary()["ran_on_grid"]["3x8x8"]
    # by hand: 9 > 8 on the two spatial dimensions of the second head, so its window is the whole 8 there
    assert [tuple(k) for k in ran["kernel_size"]] == [(2, 5, 5), (3, 8, 8)]
    assert ran["stride"] == 1 and ran["dilation"] == 1


def test_tile_fit_with_an_explicit_block_size_is_refused_and_the_cli_drops_a_presets_fit_for_it():
    """Before: ``Tile(fit=True, block_size=144)`` ran the tile given, fit ignored without a word. Now it is refused
    when built; ``--block-size`` beside a preset's fit=True keeps the preset's tile with that block (as it ran)."""
    import argparse

    from dit_accel.cli.options import add_method_options, method_from_args

    with pytest.raises(ValueError, match=r"Tile\.fit=True is invalid with block_size=144: .*pass one of them"):
        dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=144, fit=True)
    parser = argparse.ArgumentParser(prog="t")
    add_method_options(parser)
    args = parser.parse_args(["--method", "tile", "--block-size", "144"])
    preset = {"tile": (1, 12, 12), "window": (3, 1, 1), "fit": True}
    assert method_from_args(args, defaults=preset) == dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1),
                                                                     block_size=144)


def test_sla_params_take_topk_and_negligible_summing_to_one():
    """``SLAParams`` (the kernels' settings) refused topk=0.9, negligible=0.1 as ``SLA`` did: 1 - 0.9 in floats."""
    from dit_accel.kernels.sla.common import SLAParams

    params = SLAParams(topk=0.9, negligible=0.1)
    assert params.topk + params.negligible <= 1.0 and params.negligible == pytest.approx(0.1)
    with pytest.raises(ValueError, match="negligible"):
        SLAParams(topk=0.9, negligible=0.11)
