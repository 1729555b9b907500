"""VSA as a calibration candidate (asked for with methods=(..., "vsa")): candidates, cost, search, end to end."""

import json

import math

import pytest
import torch

import dit_accel
from dit_accel.calibrate.candidates import METHODS, candidate_grid
from dit_accel.calibrate.costs import CostModel
from dit_accel.calibrate.search import SearchSpace
from dit_accel.cli.main import main

GRID = (4, 12, 12)  # tiny-shapes: 9 cubes of (4, 4, 4)


def test_vsa_candidates_are_opt_in_and_priced_by_their_cubes():
    assert "vsa" not in METHODS  # not a default candidate of other models
    assert all(c.kind != "vsa" for c in candidate_grid(GRID, size="default"))
    cands = candidate_grid(GRID, size="default", methods=("tile", "vsa"))
    vsa = [c for c in cands if c.kind == "vsa"]
    assert [c.label for c in vsa] == ["vsa s0.5", "vsa s0.7", "vsa s0.85"]
    assert [c.density for c in vsa] == pytest.approx([5 / 9, 3 / 9, 2 / 9])  # ceil((1 - s) * 9) of 9 cubes
    costs = CostModel(GRID, 32, terms="tiles")
    heads = [costs.head(c) for c in vsa]
    assert heads[0] > heads[1] > heads[2] > 0 and costs.launch("vsa") == costs.launch("block_sparse")
    assert heads[0] < costs.dense_head() * 1.5


def test_the_search_mixes_block_sparse_and_vsa_heads_into_a_plan_that_runs():
    cands = candidate_grid(GRID, size="small", methods=("tile", "vsa"))
    kinds = [c.kind for c in cands]
    v, t = kinds.index("vsa"), kinds.index("block_sparse")
    errors = torch.full((len(cands), 2), 1.0, dtype=torch.float64)
    errors[v, 0] = 1e-6  # head 0: VSA nearly exact, head 1: a tile window nearly exact
    errors[t, 1] = 1e-6
    costs = CostModel(GRID, 32, terms="tiles")
    block = [c for c in cands if c.kind == "block_sparse"]
    space = SearchSpace(cands, {(0, 0): errors}, costs, 1, [(0, 2)], 2, costs.full_head(block[0].method.plan(GRID)))
    choice = space.choose(0, 0, 1e-3)  # error priced well above the time saved by a wrong head
    assert choice.heads == (v, t) and choice.launches == ("block_sparse", "vsa")
    method = dit_accel.PerHead((cands[v].method, cands[t].method))
    plan = method.plan(GRID)
    assert [g[2] for g in plan.groups] == ["block_sparse", "vsa"]
    q, k, v_ = (torch.randn(1, 2, 576, 16) for _ in range(3))
    out, _ = plan.run(q, k, v_, backend="torch")
    from tests.kernels.vsa_reference import count_for, reference

    want = reference(q[:, :1], k[:, :1], v_[:, :1], GRID, count_for(GRID, (4, 4, 4), sparsity=0.7), (4, 4, 4))[0]
    torch.testing.assert_close(out[:, :1].double(), want, atol=1e-5, rtol=1e-5)


def test_calibrate_end_to_end_writes_a_vsa_plan_that_apply_runs(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "plan.json"
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "25", "--out",
                 str(out), "--phases", "1", "--warmup-candidates", "1", "--candidates", "small", "--methods", "vsa",
                 "--search-iters", "1", "--cost-terms", "tiles", "--no-progress", "--quiet", "--seeds", "0",
                 "--validate", "1", "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    plan = dit_accel.SparsePlan.load(out)
    assert "vsa s0.7" in plan.provenance["candidates"]
    assert any(m.get("method") == "vsa" for phase in json.loads(out.read_text())["phases"]
               for m in phase["layers"].values())
    result = json.loads((tmp_path / "plan_report" / "calibration.json").read_text())
    assert result["final"]["psnr"] >= 25.0
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    with dit_accel.apply(pipe, plan) as handle:
        pipe("a red circle moving right", num_inference_steps=2, output_type="np", num_frames=7, height=48, width=48)
        rows = handle.stats()
    assert all(r["sparse_calls"] > 0 and r["density"] == pytest.approx(3 / 9) for r in rows)  # vsa s0.7: 3 of 9


def test_full_terms_price_the_coarse_branch_of_vsa():
    """Under the full terms a VSA head pays its C x C coarse branch on top of its fine tiles, and a VSA launch two
    dense launches more than a block-sparse one; the tiles-only terms leave the coarse branch out."""
    from dit_accel.kernels import cost as kernel_cost

    vsa = next(c for c in candidate_grid(GRID, size="default", methods=("vsa",)) if c.kind == "vsa")
    full, tiles = CostModel(GRID, 32, terms="full"), CostModel(GRID, 32, terms="tiles")
    c = kernel_cost.constants("h100")
    assert full.launch("vsa") - full.launch("block_sparse") == pytest.approx(2 * c.dense_per_call_s)
    cubes, tokens = vsa.method.plan(GRID).cubes.count, math.prod(GRID)
    # the coarse branch by hand: SLA's glue constants per token and per cube pair, dense tiles for C x C at d=32
    coarse = (tokens * c.sla_per_token_s * 32 / 128 + cubes ** 2 * c.sla_per_block_pair_s
              + (cubes / 64) ** 2 * (32 / 128) * c.dense_per_tile_s / c.slots)
    fine = CostModel(GRID, 32, terms="no-launch")
    fine._heads.clear()
    assert full.head(vsa) - coarse == pytest.approx(fine._block(_fine_counts(vsa.method.plan(GRID))), rel=1e-9)
    assert tiles.head(vsa) < full.head(vsa) - coarse * 0.99


def _fine_counts(plan):
    from dit_accel.kernels import cost as kernel_cost

    vol, c = plan.cubes.volume, plan.cubes.count
    partial = float((~plan.cubes.real.all(-1)).float().mean())
    visited = float(c * plan.count)
    return kernel_cost.TileCounts(ctas=c, full_tiles=visited * (1 - partial), partial_tiles=visited * partial,
                                  block_q=vol, block_k=vol, q_len=plan.cubes.perm.num_padded,
                                  kv_len=plan.cubes.perm.num_padded, heads=1)
