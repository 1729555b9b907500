"""``dit-accel calibrate --search warmup``: a dense warm-up, then one candidate everywhere, bisected per candidate on
verified runs; checked against every (candidate, warm-up) pair, and end to end."""

import json
import math
import random

import pytest

import dit_accel
from dit_accel.calibrate.budget import COST_TIE, bridges, warmup_search
from dit_accel.calibrate.candidates import candidate_grid
from dit_accel.calibrate.costs import CostModel
from dit_accel.calibrate.search import BridgedAssignment, SearchSpace, UniformAssignment
from dit_accel.cli.main import main

GRID = (4, 12, 12)
STEPS = 12
BUCKETS = [(0, 1), (1, 2), (2, 11), (11, 12)]


def _space():
    """Tile and SLA candidates on GRID, tiles-priced, with no scored errors (the warm-up search reads none)."""
    cands = candidate_grid(GRID, size="small", methods=("tile", "sla"))
    costs = CostModel(GRID, 32, terms="tiles")
    block = [c for c in cands if c.kind == "block_sparse"]
    return SearchSpace(cands, {}, costs, 2, BUCKETS, 4, costs.full_head(block[0].method.plan(GRID)))


def _verify_by_threshold(least, runs, bridges_pass=()):
    """A stand-in for the end-to-end run: a uniform plan passes (30 dB on both videos) when its warm-up is at least
    ``least[candidate]``, else fails (20 dB); a bridged one when its bridge is in ``bridges_pass`` and the plan without
    the bridge passes; the dense plan is exact. Every run is appended to ``runs``."""
    def verify(assignment, lam):
        runs.append(assignment)
        if isinstance(assignment, BridgedAssignment):
            ok = assignment.bridge in bridges_pass and assignment.warmup + 1 >= least[assignment.candidate]
            psnr = 30.0 if ok else 20.0
        elif isinstance(assignment, UniformAssignment):
            psnr = 30.0 if assignment.warmup >= least[assignment.candidate] else 20.0
        else:
            assert all(c.dense for c in assignment.choices.values())
            psnr = 100.0
        return {"psnr_videos": [psnr, psnr + 1.0], "modelled_ms": assignment.cost_per_sample(2) * 1e3,
                "assignment": assignment}

    return verify


def _cheapest_passing(space, least):
    """Brute force: the least cost of a passing plan over every sparse candidate and warm-up, and the dense plan."""
    dense = space.assign(math.inf).cost_per_sample(2)
    costs = [UniformAssignment(space, c, w).cost_per_sample(2) for c in space.block + space.sla
             for w in range(STEPS) if w >= least[c]]
    return min(costs + [dense]) * 1e3


@pytest.mark.parametrize("seed", range(12))
def test_the_warmup_search_finds_the_cheapest_passing_plan_of_every_pair(seed):
    space = _space()
    assert not space.errors and space.sparse_pays()
    rng = random.Random(seed)
    least = {c: rng.randint(0, STEPS + 1) for c in space.block + space.sla}  # STEPS + 1: passes at no warm-up
    runs = []
    best, trace = warmup_search(space, _verify_by_threshold(least, runs), min_psnr=25.0, calls_per_step=2)
    cheapest = _cheapest_passing(space, least)
    assert best["passes"] and cheapest <= best["modelled_ms"] <= cheapest * (1 + COST_TIE) + 1e-9
    assert len(trace) == len(runs) and len({a.key() for a in runs}) == len(runs)  # each plan verified once
    # bisection: at most one probe at a candidate's longest affordable warm-up, then log2 of the range
    sparse = [c for c in space.block + space.sla if space.layer_cost(c) < space.dense_layer_cost]
    assert len(runs) <= len(sparse) * (2 + math.ceil(math.log2(STEPS + 1))) + 1 + 1  # + 1: a bridge that fails
    # candidates costlier per call than dense are never run; every plan run after the first passing one is cheaper
    assert all(space.layer_cost(a.candidate) < space.dense_layer_cost for a in runs if isinstance(a, UniformAssignment))
    first = next((i for i, r in enumerate(trace) if r["passes"]), len(trace))
    for i in range(first + 1, len(trace)):
        passed = min(r["modelled_ms"] for r in trace[:i] if r["passes"])
        assert trace[i]["modelled_ms"] < passed / (1 + COST_TIE) + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_a_later_candidate_that_fails_one_step_below_its_longest_affordable_warm_up_costs_two_runs(seed):
    """After the first passing plan, a candidate runs at its longest affordable warm-up, then one step shorter,
    and only then bisects: where the shorter one fails, it stops at two runs."""
    space = _space()
    rng = random.Random(seed)
    least = {c: rng.randint(0, STEPS + 1) for c in space.block + space.sla}
    runs = []
    warmup_search(space, _verify_by_threshold(least, runs), min_psnr=25.0, calls_per_step=2)
    uniform = [a for a in runs if isinstance(a, UniformAssignment) and not isinstance(a, BridgedAssignment)]
    first_pass = next((i for i, a in enumerate(uniform) if a.warmup >= least[a.candidate]), None)
    if first_pass is None:
        return
    later = {}
    for a in uniform[first_pass + 1:]:
        if a.candidate != uniform[first_pass].candidate:
            later.setdefault(a.candidate, []).append(a.warmup)
    for candidate, warmups in later.items():
        if len(warmups) > 1:  # passed at its longest affordable warm-up: the next probe is one step shorter
            assert warmups[1] == warmups[0] - 1
            if warmups[0] - 1 < least[candidate]:  # ... which fails: nothing more is run for it
                assert len(warmups) == 2, (candidate, warmups, least[candidate])
        else:  # one run: it failed there, or passed at warm-up 0
            assert warmups[0] < least[candidate] or warmups[0] == 0


def test_bridges_are_wider_candidates_of_the_same_method_closest_to_dense_first():
    space = _space()
    for c in space.cheaper_than_dense():
        found = bridges(space, c)
        method, cost = space.candidates[c].method, space.layer_cost(c)
        expected = {i for i in space.block + space.sla if type(space.candidates[i].method) is type(method)
                    and space.candidates[i].kind == space.candidates[c].kind
                    and cost < space.layer_cost(i) < space.dense_layer_cost}
        assert set(found) == expected
        assert [space.layer_cost(i) for i in found] == sorted((space.layer_cost(i) for i in found), reverse=True)


def test_a_bridged_plan_prices_and_writes_its_bridge_step():
    space = _space()
    tile = space.block[0]
    bridge = bridges(space, tile)[0]
    option = BridgedAssignment(space, tile, 3, bridge)
    plan = option.to_plan({})
    assert [(p.start, p.stop) for p in plan.phases] == [(3, 4), (4, None)]
    assert all(plan.phases[0].method(l) == space.candidates[bridge].method for l in range(2))
    assert all(plan.phases[1].method(l) == space.candidates[tile].method for l in range(2))
    per_layer = 3 * space.dense_layer_cost + space.layer_cost(bridge) + (STEPS - 4) * space.layer_cost(tile)
    assert option.cost_per_sample(2) == pytest.approx(per_layer * 2 * 2)
    assert option.warmup_steps() == 3 and option.key() != UniformAssignment(space, tile, 4).key()
    assert [t["steps"] for t in option.phase_tables()] == [[0, 3], [3, 4], [4, STEPS]]
    # the same plan without its bridge costs one dense step more per layer and call
    unbridged = UniformAssignment(space, tile, 4).cost_per_sample(2)
    assert unbridged - option.cost_per_sample(2) == pytest.approx(
        (space.dense_layer_cost - space.layer_cost(bridge)) * 2 * 2)


@pytest.mark.parametrize("passing", [0, 1, 2])
def test_the_last_dense_step_is_bridged_by_the_narrowest_bridge_that_passes_in_a_row(passing):
    """The chosen uniform plan (Tile after 4 dense steps) keeps its dense step 3 unless a bridge passes; bridges run
    widest first and stop at the first that fails; the last that passed is kept."""
    space = _space()
    tile = space.block[0]
    order = bridges(space, tile)
    assert len(order) == 2
    least = {c: STEPS + 1 for c in space.block + space.sla}
    least[tile] = 4
    runs = []
    best, trace = warmup_search(space, _verify_by_threshold(least, runs, bridges_pass=order[:passing]),
                                min_psnr=25.0, calls_per_step=2)
    bridged = [a for a in runs if isinstance(a, BridgedAssignment)]
    assert [a.bridge for a in bridged] == order[:min(passing + 1, 2)]  # the widest first, up to the first failure
    assert all(a.candidate == tile and a.warmup == 3 for a in bridged)
    if passing == 0:
        assert type(best["assignment"]) is UniformAssignment and best["assignment"].warmup == 4
    else:
        assert isinstance(best["assignment"], BridgedAssignment) and best["assignment"].bridge == order[passing - 1]
        assert best["passes"] and best["modelled_ms"] < UniformAssignment(space, tile, 4).cost_per_sample(2) * 1e3


def test_a_bridge_whose_own_plan_failed_after_the_same_dense_steps_is_not_run():
    """Tile after 11 dense steps is chosen; the search ran a wider Tile after 10 dense steps on the way, which failed:
    the plan bridged by it at step 10 (narrower at every later step) is not run."""
    from dit_accel.calibrate.budget import _nests

    space = _space()
    tile = space.block[0]
    least = {c: STEPS + 1 for c in space.block + space.sla}
    least[tile] = 11
    runs = []
    best, _ = warmup_search(space, _verify_by_threshold(least, runs, bridges_pass=bridges(space, tile)),
                            min_psnr=25.0, calls_per_step=2)
    assert type(best["assignment"]) is UniformAssignment and best["assignment"].warmup == 11
    failed = {a.candidate for a in runs if type(a) is UniformAssignment and a.warmup == 10 and a.candidate != tile}
    assert failed and all(_nests(space, b, tile) for b in failed)
    assert bridges(space, tile)[0] in failed
    assert not [a for a in runs if isinstance(a, BridgedAssignment)]


def test_only_wider_windows_of_one_tile_nest():
    from dit_accel.calibrate.budget import _nests

    space = _space()
    labels = {space.candidates[i].label: i for i in range(len(space.candidates))}
    w1, rows, cols = labels["tile w1x1x1"], labels["tile w1x1x3"], labels["tile w1x3x1"]
    assert _nests(space, rows, w1) and _nests(space, cols, w1) and _nests(space, w1, w1)
    assert not _nests(space, rows, cols) and not _nests(space, w1, rows)
    assert not _nests(space, labels["sla k0.3"], w1) and not _nests(space, w1, labels["sla k0.3"])


def test_the_warmup_search_ends_at_the_dense_plan_when_no_warm_up_passes():
    space = _space()
    runs = []
    least = {c: STEPS for c in space.block + space.sla}  # every sparse step breaks the budget
    best, trace = warmup_search(space, _verify_by_threshold(least, runs), min_psnr=25.0, calls_per_step=2)
    assert all(c.dense for c in best["assignment"].choices.values()) and best["passes"]
    assert sum(not isinstance(a, UniformAssignment) for a in runs) == 1  # the dense plan, run once, at the end
    assert not any(r["passes"] for r in trace[:-1])


def test_warmup_search_needs_a_psnr_budget_and_no_layer_error(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving right\n")
    base = ["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out", str(tmp_path / "p.json"),
            "--no-progress", "--search", "warmup"]
    assert main(base + ["--max-layer-error", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--search warmup" in err and "--max-layer-error" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_calibrate_with_the_warmup_search_end_to_end(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\na blue square moving left\n")
    out = tmp_path / "plan.json"
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "25", "--out",
                 str(out), "--search", "warmup", "--candidates", "small", "--methods", "tile,sla", "--steps", "3",
                 "--cost-terms", "tiles", "--no-progress", "--quiet", "--seeds", "0", "--validate", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    plan = dit_accel.SparsePlan.load(out)
    result = json.loads((tmp_path / "plan_report" / "calibration.json").read_text())
    assert result["settings"]["search"] == "warmup" and "warm-up bisected" in plan.provenance["objective"]
    assert "scoring" not in result["seconds"] and "sensitivity probes" not in result["seconds"]
    assert result["step_weights"] is None
    # every verified plan is a warm-up then one candidate (or, when none passes, the dense plan)
    labels = [t["plan"] for t in result["trace"]]
    assert all(label.startswith("uniform ") or label == "dense (exact)" for label in labels)
    assert result["chosen"] in labels and f"chosen: {result['chosen']}" in printed
    warm = result["final"]["warmup_steps"]
    phases = [] if warm == 3 else [(warm, warm + 1), (warm + 1, None)] if "bridge step" in result["chosen"] \
        else [(warm, None)]
    assert [(p.start, p.stop) for p in plan.phases] == phases
    report = (tmp_path / "plan_report" / "report.md").read_text()
    assert "--search warmup" in report and "## Search and validation" in report
    assert result["final"]["psnr_worst"] >= 25.0 and result["validation"]["videos"] == 1


def test_a_plan_that_fails_validation_falls_back_one_dense_step_at_a_time():
    """The bisection verified warm-ups 6 and 8; when 6 fails on the validation videos, 7 is verified on the search
    videos (only when reached) and offered before 8; a longer warm-up that fails the search videos is skipped."""
    from dit_accel.calibrate.run import CalibrationSettings, _longer_warmups

    space = _space()
    tile = space.block[0]
    runs = []
    verify = _verify_by_threshold({tile: 6}, runs)
    trace = [dict(verify(UniformAssignment(space, tile, w), math.nan), passes=True) for w in (8, 6)]
    runs.clear()
    settings = CalibrationSettings("tiny-shapes-long", ["p"], min_psnr=25.0, search="warmup")
    fallback = _longer_warmups(trace[1], settings, verify, trace)
    assert runs == []  # nothing verified before a fallback is asked for
    seventh = next(fallback)
    assert seventh["assignment"].warmup == 7 and seventh["passes"] and trace[-1] is seventh and len(runs) == 1
    assert next(fallback) is trace[0] and len(runs) == 1  # 8: verified already
    assert [r["assignment"].warmup for r in fallback] == list(range(9, STEPS)) and len(runs) == STEPS - 8
    failing = _longer_warmups(trace[1], settings, _verify_by_threshold({tile: STEPS}, []), [trace[1]])
    assert list(failing) == []  # longer warm-ups that fail the search videos are not offered
