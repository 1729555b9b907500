"""dit-accel calibrate: the search on synthetic errors, and the command end to end on tiny models (small grid, 2 steps)."""

import json

import pytest
import torch

import dit_accel
from dit_accel.calibrate.candidates import candidate_grid
from dit_accel.calibrate.costs import CostModel
from dit_accel.calibrate.sampling import QKVSampler, step_buckets
from dit_accel.calibrate.search import SearchSpace
from dit_accel.cli.main import main

GRID = (4, 12, 12)


def test_step_buckets_split_at_the_phases_and_the_warmup_candidates():
    assert step_buckets(12, 3, (1, 2)) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 12)]
    assert step_buckets(2, 1) == [(0, 2)]
    assert step_buckets(3, 5) == [(0, 1), (1, 2), (2, 3)]
    assert step_buckets(12, 3, (1, 2), (1,)) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 11), (11, 12)]
    assert step_buckets(4, 1, (), (1, 2, 9)) == [(0, 2), (2, 3), (3, 4)]


def test_sampler_keeps_the_chosen_steps_within_its_memory():
    sampler = QKVSampler([(0, 1), (1, 4)], per_bucket=2, max_bytes=10**9)
    assert sorted(sampler.steps) == [0, 1, 3]
    q = torch.randn(4, 2, 576, 8)
    sampler.set_layers(1)
    for step in range(4):
        if sampler.wants(0, step):
            sampler.save(0, "l0", GRID, step, q, q, q)
    assert sampler.bucket_samples(0, 1)[0].shape == (8, 2, 576, 8)
    small = QKVSampler([(0, 2)], per_bucket=2, max_bytes=3 * 4 * 2 * 576 * 8 * 2)  # two rows of one step
    small.set_layers(1)
    small.save(0, "l0", GRID, 1, q, q, q)
    assert small.per_bucket == 1 and small.rows == 2 and small.bytes <= small.max_bytes


def _space(errors, terms="tiles"):
    cands = candidate_grid(GRID, size="small", methods=("tile", "sla"))
    costs = CostModel(GRID, 32, terms=terms)
    block = [c for c in cands if c.kind == "block_sparse"]
    return cands, SearchSpace(cands, errors, costs, 1, [(0, 4)], 2, costs.full_head(block[0].method.plan(GRID)))


def test_the_search_trades_cost_for_error_per_head():
    cands = candidate_grid(GRID, size="small", methods=("tile", "sla"))
    errors = torch.zeros(len(cands), 2, dtype=torch.float64)
    errors[1:, 0] = 1e-4  # head 0: every sparse candidate nearly exact
    errors[1:, 1] = 0.5  # head 1: every sparse candidate far off
    _, space = _space({(0, 0): errors})
    cheapest = space.choose(0, 0, 0.0)
    assert all(i > 0 for i in cheapest.heads)  # no price on error: the cheapest candidate on both heads
    mid = space.choose(0, 0, 1e-6)  # seconds per unit of squared error: ~6e-8 s saved per head
    assert mid.heads[0] > 0 and mid.heads[1] == -1  # head 1 dense inside the launch
    assert space.choose(0, 0, 1e9).dense  # error priced out: the dense layer
    bounded = space.choose(0, 0, 0.0, max_error=0.1)
    assert bounded.error <= 0.1 ** 2
    # With the per-call terms at 576 tokens nothing sparse is cheaper than dense, error or not.
    _, full = _space({(0, 0): torch.zeros(len(cands), 2, dtype=torch.float64)}, terms="full")
    assert full.choose(0, 0, 0.0).dense


def test_one_sla_config_per_layer():
    cands = candidate_grid(GRID, size="default", methods=("sla",))
    errors = torch.rand(len(cands), 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    costs = CostModel(GRID, 32, terms="tiles")
    space = SearchSpace(cands, {(0, 0): errors}, costs, 1, [(0, 2)], 4, costs.dense_head())
    for lam in (0.0, 1e-9, 1e-8, 1e-7):
        heads = space.choose(0, 0, lam).heads
        assert len({i for i in heads if i >= 0 and cands[i].kind == "sla"}) <= 1


@pytest.mark.parametrize("model, extra", [
    ("tiny-shapes", ["--steps", "2"]),
    ("tiny-wan", ["--steps", "2", "--frames", "9", "--height", "64", "--width", "64"]),
])
def test_calibrate_end_to_end_writes_a_plan_that_apply_runs(tmp_path, capsys, model, extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "plan.json"
    code = main(["calibrate", "--model", model, "--prompts", str(prompts), "--min-psnr", "25", "--out", str(out),
                 "--phases", "1", "--warmup-candidates", "1", "--candidates", "small", "--methods", "tile,sla",
                 "--search-iters", "1", "--cost-terms", "tiles", "--no-progress", "--quiet", "--seeds", "0",
                 "--validate", "1", *extra])
    assert code == 0
    printed = capsys.readouterr().out
    assert "note: 1 calibration video(s)" in printed  # too few to trust: said
    plan = dit_accel.SparsePlan.load(out)
    prov = plan.provenance
    assert prov["model_id"] == model and len(prov["prompts_sha256"]) == 64
    budget = {"min_psnr": 25.0, "min_psnr_on": "every calibration video"}
    assert prov["budget"] == budget
    assert {"versions", "date", "grids", "objective", "model_class"} <= set(prov)
    # the calibrated transformer's config: apply() warns when the plan runs on another config of this class
    assert prov["model_config"]["num_layers"] == plan.num_layers and "in_channels" in prov["model_config"]
    # the timestep of each step: finetune --plan maps a training noise level to the plan's step through them
    assert len(prov["timesteps"]) == prov["steps"] == 2 and prov["timesteps"][0] > prov["timesteps"][1]
    report = tmp_path / "plan_report"
    assert {p.name for p in report.iterdir()} == {"report.md", "heatmap.png", "calibration.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    result = json.loads((report / "calibration.json").read_text())
    assert result["final"]["psnr"] >= 25.0 and result["trace"]
    assert "PSNR" in (report / "report.md").read_text()
    # validated on a video the search never saw (1 prompt: the same prompt on a new seed), side by side in the report
    val = result["validation"]
    assert val["videos"] == 1 and val["seeds"] == [1] and val["tried"]
    assert val["tried"][0]["search"]["psnr_worst"] in [t["psnr_worst"] for t in result["trace"] if t["passes"]]
    chosen = val["final"]
    assert chosen is None or (chosen["passes"] and chosen["psnr_worst"] >= 25.0)
    assert "## Search and validation" in (report / "report.md").read_text()
    # uniform SLA given at least the plan's modelled cost, on the same validation videos, in the plan's provenance
    base = val["baseline"]  # (tiny-wan at this size has no sparse candidate: nothing to compare)
    assert (base is None) == (model == "tiny-wan")
    if base is not None:
        assert base["label"].startswith("uniform sla")
        assert base["modelled_ms"] >= result["final"]["modelled_ms"] - 1e-12
        assert plan.provenance["quality"]["baseline"]["psnr"] == base["psnr"]
    assert result["plan_sha256"] == plan.content_hash() and result["cost_vs_dense"]["ratio"] > 1
    cost = result["cost_vs_dense"]  # the same time against one dense video: the ratio times the videos
    assert cost["per_video_ratio"] == pytest.approx(cost["ratio"] * cost["videos"])
    assert f"{cost['per_video_ratio']:.2f}x one dense video" in printed  # ratios to 2 decimals
    if model == "tiny-shapes":
        gt = result["groundtruth"]
        assert set(gt) == {"dense", "plan", "required"} and not gt["required"]  # reported by default
        assert all(t["groundtruth"] is not None for t in result["trace"])
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    with dit_accel.apply(pipe, plan) as handle:
        pipe("a red circle moving right", num_inference_steps=2, output_type="np",
             **({"num_frames": 9, "height": 64, "width": 64} if model == "tiny-wan" else
                {"num_frames": 7, "height": 48, "width": 48}))
        assert handle.stats()


def test_split_holds_out_prompts_spread_over_the_list_and_adds_seeds_when_few():
    from dit_accel.calibrate.run import split_jobs

    prompts = [f"p{i}" for i in range(6)]
    search, val, notes = split_jobs(prompts, [0])
    assert sorted({p for p, _ in val}) == ["p1", "p4"]  # a third, spread over the list
    assert not {p for p, _ in val} & {p for p, _ in search}  # no prompt in both
    assert len(search) == 4 * 2 and {s for _, s in search} == {0, 1}  # 4 prompts x 2 seeds: 8 search videos
    assert {s for _, s in val} == {0, 1}
    search, val, _ = split_jobs(prompts, [0], extend_seeds=False)
    assert len(search) == 4 and len(val) == 2
    search, val, _ = split_jobs(prompts[:4], [7], validate=2)  # the 4-prompt case: 2 held out, 4 seeds
    assert len({p for p, _ in val}) == 2 and len(search) == 8 and {s for _, s in search} == {7, 8, 9, 10}
    search, val, notes = split_jobs(prompts[:2], [0, 1], extend_seeds=False)  # too few prompts: new seeds
    assert {p for p, _ in val} == {"p0", "p1"} and {s for _, s in val} == {2} and len(search) == 4
    search, val, notes = split_jobs(prompts, [0], validate=0)
    assert val == [] and len(search) == 6 and "no validation" in notes[0]


def test_calibrate_needs_a_budget(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving right\n")
    assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out",
                 str(tmp_path / "p.json"), "--no-progress"]) == 2
    assert "budget" in capsys.readouterr().err


def _random_space(layers, buckets, seed):
    """Tile and SLA candidates on GRID with random errors per (layer, bucket) and 4 heads, tiles-priced."""
    cands = candidate_grid(GRID, size="small", methods=("tile", "sla"))
    g = torch.Generator().manual_seed(seed)
    errors = {(layer, b): torch.rand(len(cands), 4, generator=g, dtype=torch.float64) * 0.05
              for layer in range(layers) for b in range(len(buckets))}
    costs = CostModel(GRID, 32, terms="tiles")
    block = [c for c in cands if c.kind == "block_sparse"]
    return SearchSpace(cands, errors, costs, layers, buckets, 4, costs.full_head(block[0].method.plan(GRID)))


def _verify_by_error(offsets):
    """A stand-in for the end-to-end run: video i's PSNR falls with the plan's summed squared attention error,
    shifted by ``offsets[i]`` (some videos suffer more from the same plan than others)."""
    import math

    def verify(assignment, lam):
        error = sum(c.error for c in assignment.choices.values())
        base = 100.0 if error == 0 else -10.0 * math.log10(error) + 20.0
        return {"psnr_videos": [min(100.0, base + o) for o in offsets],
                "modelled_ms": assignment.cost_per_sample(1) * 1e3, "assignment": assignment}

    return verify


def test_the_psnr_budget_holds_on_every_calibration_video_by_default():
    from dit_accel.calibrate.run import passes_budget, search_budget

    assert passes_budget([30.0, 30.0, 20.0], 25.0) is False  # the mean (26.7) would pass
    assert passes_budget([30.0, 30.0, 20.0], 25.0, "mean") is True
    assert passes_budget([1.0], None) is True
    space = _random_space(2, [(0, 4)], 3)
    verify = _verify_by_error([4.0, 4.0, 4.0, -8.0])  # three videos the plan barely changes, one it breaks
    mean, _ = search_budget(space, verify, min_psnr=25.0, rule="mean", iters=12)
    worst, trace = search_budget(space, verify, min_psnr=25.0, rule="worst", iters=12)
    assert float(torch.tensor(mean["psnr_videos"]).mean()) >= 25.0 and min(mean["psnr_videos"]) < 25.0
    assert min(worst["psnr_videos"]) >= 25.0 and worst["modelled_ms"] > mean["modelled_ms"]
    assert not all(c.dense for c in worst["assignment"].choices.values())  # still sparse somewhere
    assert all(r["passes"] == (min(r["psnr_videos"]) >= 25.0) for r in trace)
    # nothing sparse passes: the dense plan, exactly
    dense, _ = search_budget(space, _verify_by_error([-200.0]), min_psnr=25.0, iters=3)
    assert all(c.dense for c in dense["assignment"].choices.values())


def test_a_plan_that_loses_a_groundtruth_check_fails_whatever_its_psnr():
    from dit_accel.calibrate.run import CalibrationSettings, groundtruth_kept, search_budget

    dense = {"colour": 1.0, "shape": 0.75, "motion": 0.5, "consistency": 1.0, "all": 0.5}
    assert groundtruth_kept(dict(dense), dense)
    assert groundtruth_kept(dict(dense, motion=0.75), dense)  # better is fine
    assert not groundtruth_kept(dict(dense, shape=0.5), dense)
    space = _random_space(2, [(0, 4)], 3)
    by_psnr = _verify_by_error([0.0])
    plain, _ = search_budget(space, by_psnr, min_psnr=20.0, iters=12)

    def with_groundtruth(assignment, lam):  # the checks break above half the plain plan's error
        record = by_psnr(assignment, lam)
        error = sum(c.error for c in assignment.choices.values())
        record["groundtruth_ok"] = error <= 0.5 * sum(c.error for c in plain["assignment"].choices.values())
        return record

    kept, trace = search_budget(space, with_groundtruth, min_psnr=20.0, iters=12)
    assert kept["groundtruth_ok"] and kept["modelled_ms"] > plain["modelled_ms"]
    assert all(r["passes"] == (r["groundtruth_ok"] and min(r["psnr_videos"]) >= 20.0) for r in trace)
    assert any(not r["passes"] and min(r["psnr_videos"]) >= 20.0 for r in trace)  # PSNR alone would have passed
    assert not CalibrationSettings("tiny-shapes", ["p"], min_psnr=1.0).gates_groundtruth()
    assert CalibrationSettings("tiny-shapes", ["p"], min_psnr=1.0, groundtruth="require").gates_groundtruth()
    with pytest.raises(ValueError, match="no ground-truth checker"):
        CalibrationSettings("tiny-wan", ["p"], min_psnr=1.0, groundtruth="require").check()


def _linear_generation(space, sensitivity, factor, seen):
    """A stand-in for a probe's generation: the output error is linear in each sparse (layer, step)'s attention
    error, times the step's sensitivity and the layer's factor; records which (layer, step)s were sparse."""
    def run(plan):
        total, sparse = 0.0, []
        for phase in plan.phases:
            assert phase.stop == phase.start + 1  # one step at a time
            (b,) = [i for i, (start, stop) in enumerate(space.buckets) if start <= phase.start < stop]
            assert phase.start == (space.buckets[b][0] + space.buckets[b][1]) // 2  # the bucket's middle step
            for layer, method in phase.layers.items():
                choice = space.choose(layer, b, 0.0)
                assert method == space.method_of(choice)
                sparse.append((layer, phase.start))
                total += sensitivity[b] * factor[layer] * choice.error
        seen.append(sparse)
        return total

    return run


def test_step_weights_are_measured_one_step_per_bucket_and_move_the_sparsity_to_the_steps_that_matter_least():
    from dit_accel.calibrate.run import probe_step_weights

    buckets = [(0, 1), (1, 2), (2, 4), (4, 8)]
    space = _random_space(2, buckets, 5)
    sensitivity = [50.0, 10.0, 2.0, 0.01]  # output error per unit of attention error at one step
    seen = []
    weights = probe_step_weights(space, _linear_generation(space, sensitivity, [1.0, 1.0], seen))
    assert seen == [[(0, 0), (1, 0)], [(0, 1), (1, 1)], [(0, 3), (1, 3)], [(0, 6), (1, 6)]]
    expected = [max(w, 1e-3 * 50.0) for w in sensitivity]
    assert weights == pytest.approx([w / (sum(expected) / 4) for w in expected])
    # weighted, the same lam keeps the sensitive first bucket denser and the last one sparser than unweighted
    lam = space.scale()
    plain = space.assign(lam)
    space.bucket_weights = weights
    weighted = space.assign(lam)

    def bucket_error(assignment, b):
        return sum(c.error for (_, bb), c in assignment.choices.items() if bb == b)

    assert bucket_error(weighted, 0) <= bucket_error(plain, 0)
    assert bucket_error(weighted, 3) >= bucket_error(plain, 3)
    assert bucket_error(weighted, 0) < bucket_error(weighted, 3)


def test_layer_weights_are_measured_per_layer_group_over_what_the_step_weights_predict():
    from dit_accel.calibrate.run import probe_layer_weights

    buckets = [(0, 1), (1, 4)]
    space = _random_space(4, buckets, 6)
    space.bucket_weights = [3.0, 0.5]
    factor = [8.0, 8.0, 0.5, 0.5]  # the first two layers move the output 16 times more than the last two
    seen = []
    run = _linear_generation(space, space.bucket_weights, factor, seen)
    assert probe_layer_weights(space, run, 2) == pytest.approx([16 / 8.5, 16 / 8.5, 1 / 8.5, 1 / 8.5])
    assert seen == [[(0, 0), (1, 0), (0, 2), (1, 2)], [(2, 0), (3, 0), (2, 2), (3, 2)]]
    assert probe_layer_weights(space, run, 0) == [1.0] * 4
    assert probe_layer_weights(space, run, 9) == pytest.approx([w / 4.25 for w in factor])  # one group per layer


@pytest.mark.parametrize("grid, head_dim, heads, terms", [(GRID, 32, 2, "tiles"), ((8, 32, 32), 128, 12, "full")])
def test_auto_cost_terms_keep_the_full_model_unless_it_makes_every_candidate_lose(grid, head_dim, heads, terms):
    from dit_accel.calibrate.run import CalibrationSettings, search_space

    cands = candidate_grid(grid, size="small", methods=("tile", "sla"))
    errors = {(0, 0): torch.zeros(len(cands), heads, dtype=torch.float64)}
    settings = CalibrationSettings("m", ["p"], min_psnr=25.0)
    assert settings.cost_terms == "auto"
    space, note = search_space(cands, errors, grid, head_dim, 1, [(0, 4)], heads, settings)
    assert space.costs.terms == terms and (note is not None) == (terms == "tiles")
    # the full model at this grid: dense wins with error free exactly where auto fell back to tiles
    settings.cost_terms = "full"
    full, none = search_space(cands, errors, grid, head_dim, 1, [(0, 4)], heads, settings)
    assert none is None and full.assign(0.0).choices[(0, 0)].dense == (terms == "tiles")
    assert not space.assign(0.0).choices[(0, 0)].dense  # what auto searches can go sparse


def test_the_bisection_spends_no_run_on_an_exact_plan_or_the_cheapest_one():
    from dit_accel.calibrate.run import search_budget

    space = _random_space(2, [(0, 4)], 3)
    _, trace = search_budget(space, _verify_by_error([4.0, 4.0, 4.0, -8.0]), min_psnr=25.0, iters=6)
    keys = [r["assignment"].key() for r in trace]
    cheapest = space.assign(0.0).key()
    assert keys[0] == cheapest and cheapest not in keys[1:]
    assert not any(all(c.error == 0 for c in r["assignment"].choices.values()) for r in trace)  # none exact


def test_measured_costs_split_each_timing_into_a_per_call_and_a_per_head_term():
    import statistics

    from dit_accel.calibrate.costs import MeasuredCostModel

    cands = candidate_grid(GRID, size="small", methods=("tile", "sla"))
    sparse = [c for c in cands if c.kind != "dense"]
    # the timer's answers in call order: dense (4 heads, then 1), then each sparse candidate (4 heads, then 1)
    answers = [10.0, 4.0]
    for i, c in enumerate(sparse):
        answers += [6.0 + i, 3.0] if c.kind == "block_sparse" else [5.5, 2.5]
    calls = []

    def timer(fn):
        calls.append(fn)
        return answers[len(calls) - 1]

    costs = MeasuredCostModel(GRID, 32, cands, 4, timer=timer)
    assert len(calls) == len(answers)
    assert costs.dense_head() == pytest.approx(2e-3) and costs.launch("dense") == pytest.approx(2e-3)
    for i, c in enumerate(sparse):
        if c.kind == "block_sparse":  # (6 + i - 3) / 3 per head, the rest of the one-head call per launch
            assert costs.head(c) == pytest.approx((3.0 + i) / 3 * 1e-3)
        else:
            assert costs.head(c) == pytest.approx(1e-3)
    assert costs.launch("sla") == pytest.approx(1.5e-3)
    block_launches = sorted(3.0 - (3.0 + i) / 3 for i, c in enumerate(sparse) if c.kind == "block_sparse")
    assert costs.launch("block_sparse") == pytest.approx(statistics.median(block_launches) * 1e-3)
    assert costs.describe()["terms"] == "measured"


def test_calibrate_with_costs_measured_on_this_device(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20", "--out",
                 str(out), "--phases", "1", "--warmup-candidates", "1", "--candidates", "small", "--methods", "tile",
                 "--search-iters", "1", "--costs", "measured", "--sensitivity", "uniform", "--steps", "2",
                 "--no-progress", "--quiet"]) == 0
    plan = dit_accel.SparsePlan.load(out)
    assert "measured attention time (on cpu)" in plan.provenance["objective"]
    assert plan.provenance["quality"]["priced"] == "timed on cpu"  # generate's line says so, not "modelled GPU"
    assert plan.provenance["cost_model"]["terms"] == "measured"
    result = json.loads((tmp_path / "plan_report" / "calibration.json").read_text())
    assert all(c["head_cost_us"] >= 0 for c in result["candidates"])
    report = (tmp_path / "plan_report" / "report.md").read_text()
    assert "timed on cpu" in report
    # the times it prints and reports were measured here: none of them is called modelled
    assert "modelled ms/sample" not in report and "ms/sample modelled" not in report
    plan_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: "))
    assert "attention timed on cpu" in plan_line and "modelled" not in plan_line


def _stub_validation(monkeypatch, offsets: dict):
    """Stand-ins for apply and generate_videos: each plan's videos are dense's plus a constant (``offsets[plan]``,
    or ``offsets[plan][prompt]`` per video), so the PSNR of every video is set. Returns ``rec(name, lam, ms)``,
    a search record that passed."""
    import numpy as np

    from dit_accel.calibrate import run

    current = []

    class Assignment:
        def __init__(self, name):
            self.name = name

        def key(self):
            return self.name

        def to_plan(self, provenance):
            return self

        def content_hash(self):
            return self.name

    class Applied:
        def __init__(self, pipe, plan, **kwargs):
            current.append("dense" if isinstance(plan, dit_accel.Dense) else plan.name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def offset(prompt):
        o = offsets[current[-1]]
        return o[prompt] if isinstance(o, dict) else o

    def videos(pipe, jobs, call_kwargs, batch_size, on_step=None, replay=None):
        return [np.full((2, 8, 8, 3), 100 + offset(p), np.uint8) for p, _ in jobs]

    monkeypatch.setattr(dit_accel, "apply", Applied)
    monkeypatch.setattr(run, "generate_videos", videos)

    def rec(name, lam, ms):
        return {"lam": lam, "modelled_ms": ms, "psnr": 40.0, "psnr_worst": 39.0, "passes": True,
                "assignment": Assignment(name)}
    return rec, Assignment


def test_validation_falls_back_to_the_next_denser_plan_that_holds_on_unseen_videos(monkeypatch):
    """The cheapest plan passing the search fails the validation videos: the next denser one passing both is
    written, and said; when none holds, the dense plan. (Videos offset by a constant: PSNR set per plan.)"""
    import math

    from dit_accel.calibrate import run

    offsets = {"dense": 0, "cheap": 26, "mid": 3, "dear": 2}  # 19.8 dB, 38.6 dB, 42.1 dB against dense
    rec, Assignment = _stub_validation(monkeypatch, offsets)

    trace = [rec("cheap", 0.0, 1.0), rec("dear", 2.0, 3.0), rec("mid", 1.0, 2.0)]
    settings = run.CalibrationSettings(model="tiny-wan", prompts=["a"], min_psnr=30.0, steps=2, baseline=False)
    log = []
    chosen, val = run._validate(None, settings, None, None, trace[0], trace, [("a", 5), ("b", 5)], {},
                                run._Progress(False), log.append)
    assert chosen["assignment"].name == "mid" and val["fell_back"]
    assert [t["passes"] for t in val["tried"]] == [False, True] and val["final"]["psnr_worst"] > 38
    assert "falling back" in log[0]
    # a plan that holds is kept, and validated once
    chosen, val = run._validate(None, settings, None, None, trace[2], trace, [("a", 5)], {}, run._Progress(False),
                                log.append)
    assert chosen is trace[2] and not val["fell_back"] and len(val["tried"]) == 1
    # none holds: the dense plan, exact
    offsets.update(mid=26, dear=26)

    class Space:
        def assign(self, lam):
            return Assignment("dense")

    def verify(assignment, lam):
        return {"lam": lam, "modelled_ms": 9.0, "psnr": 100.0, "psnr_worst": 100.0, "assignment": assignment}

    chosen, val = run._validate(None, settings, Space(), verify, trace[0], trace, [("a", 5)], {},
                                run._Progress(False), log.append)
    assert math.isinf(chosen["lam"]) and val["final"] is None and len(val["tried"]) == 3


def test_validation_holds_the_budget_under_the_search_rule(monkeypatch):
    """--budget-on mean: the validation videos meet min_psnr on their mean, as the search's did; one video under it
    fails the plan only under the default rule (every video)."""
    from dit_accel.calibrate import run

    # "cheap": 48.1 dB on prompt a, 19.8 dB on prompt b (mean 34.0); "mid": 38.6 dB on both
    rec, _ = _stub_validation(monkeypatch, {"dense": 0, "cheap": {"a": 1, "b": 26}, "mid": 3})
    trace = [rec("cheap", 0.0, 1.0), rec("mid", 1.0, 2.0)]
    jobs = [("a", 5), ("b", 5)]
    for rule, kept in (("mean", "cheap"), ("worst", "mid")):
        settings = run.CalibrationSettings(model="tiny-wan", prompts=["a"], min_psnr=30.0, steps=2, baseline=False,
                                           budget_on=rule)
        log = []
        chosen, val = run._validate(None, settings, None, None, trace[0], trace, jobs, {}, run._Progress(False),
                                    log.append)
        assert chosen["assignment"].name == kept, rule
        assert val["tried"][0]["psnr"] > 30 > val["tried"][0]["psnr_worst"]
        assert ("falling back" in " ".join(log)) is (rule == "worst")


def test_a_uniform_plan_is_priced_step_by_step_and_runs_one_method_after_its_warmup():
    from dit_accel.calibrate.search import UniformAssignment, uniform_options

    buckets = [(0, 1), (1, 2), (2, 4), (4, 8)]
    space = _random_space(2, buckets, 7)
    tile = next(i for i in space.block)
    option = UniformAssignment(space, tile, 3)  # the warm-up ends inside the bucket (2, 4)
    cand = space.candidates[tile]
    sparse_layer = space.costs.launch(cand.kind) + 4 * space.costs.head(cand)
    assert option.cost_per_sample(2) == pytest.approx(2 * 2 * (3 * space.dense_layer_cost + 5 * sparse_layer))
    plan = option.to_plan({})
    assert [(p.start, p.stop) for p in plan.phases] == [(3, None)]
    assert all(plan.phases[0].layers[l] == cand.method for l in range(2))
    # the additive model's error, step by step: steps 3 (bucket 2) and 4..7 (bucket 3), each layer's heads summed
    space.bucket_weights = [1.0, 1.0, 2.0, 0.5]
    expected = sum(w * float(space.errors[(l, b)][tile].sum())
                   for l in range(2) for b, w in ((2, 2.0), (3, 0.5), (3, 0.5), (3, 0.5), (3, 0.5)))
    assert option.predicted_error() == pytest.approx(expected)
    assert [t["steps"] for t in option.phase_tables()] == [[0, 3], [3, 8]]
    # options: the longest warm-up each candidate affords within the ceiling, least predicted error first
    ceiling = option.cost_per_sample(1) * 1e3
    options = uniform_options(space, ceiling, 1, 10)
    assert options and all(o.cost_per_sample(1) * 1e3 <= ceiling * (1 + 1e-9) for o in options)
    for o in options:
        longer = UniformAssignment(space, o.candidate, o.warmup + 1)
        assert o.warmup == 7 or longer.cost_per_sample(1) * 1e3 > ceiling * (1 + 1e-9)
    assert [o.predicted_error() for o in options] == sorted(o.predicted_error() for o in options)
    assert all(space.candidates[o.candidate].kind == "sla" for o in uniform_options(space, ceiling, 1, 10,
                                                                                    kinds=("sla",)))
    # a baseline given at least the plan's cost: each candidate's cheapest warm-up at or above the ceiling
    above = uniform_options(space, ceiling, 1, 10, side="above")
    assert above
    for o in above:
        costs = [UniformAssignment(space, o.candidate, w).cost_per_sample(1) * 1e3 for w in range(8)]
        assert o.cost_per_sample(1) * 1e3 == min(c for c in costs if c >= ceiling * (1 - 1e-9))


def test_the_search_verifies_uniform_plans_and_keeps_the_cheapest_passing_with_the_widest_margin(monkeypatch):
    """Step-structured plans the additive model misjudges join the verified plans at no more cost than the
    allocation's; the cheapest passing plan is kept, and within COST_TIE of it the widest worst-video margin."""
    from dit_accel.calibrate import budget, run
    from dit_accel.calibrate.search import UniformAssignment

    space = _random_space(2, [(0, 2), (2, 4)], 3)
    by_error = _verify_by_error([4.0, 0.0, -2.0])
    uniform_videos = {}

    def verify(assignment, lam):
        if isinstance(assignment, UniformAssignment):
            return {"psnr_videos": uniform_videos.get(assignment.key(), [20.0, 20.0, 20.0]),
                    "modelled_ms": assignment.cost_per_sample(1) * 1e3, "assignment": assignment}
        return by_error(assignment, lam)

    alone, _ = run.search_budget(space, verify, min_psnr=25.0, iters=8, uniform=0)
    assert not isinstance(alone["assignment"], UniformAssignment)
    failing, trace = run.search_budget(space, verify, min_psnr=25.0, iters=8, uniform=3)  # they fail: the allocation
    assert failing["assignment"].key() == alone["assignment"].key()
    options = [r["assignment"] for r in trace if isinstance(r["assignment"], UniformAssignment)]
    assert 0 < len(options) <= 3 and all(o.cost_per_sample(1) * 1e3 <= alone["modelled_ms"] * (1 + 1e-9)
                                        for o in options)
    cheaper = min(options, key=lambda o: o.cost_per_sample(1))
    uniform_videos[cheaper.key()] = [26.0, 25.5, 25.1]  # passes, barely: the cheapest passing plan wins anyway
    kept, _ = run.search_budget(space, verify, min_psnr=25.0, iters=8, uniform=3)
    if cheaper.cost_per_sample(1) * 1e3 < alone["modelled_ms"] / (1 + budget.COST_TIE):
        assert kept["assignment"].key() == cheaper.key()
    # within COST_TIE of the cheapest passing plan the wider worst-video margin wins, not the lower cost
    tie = UniformAssignment(space, cheaper.candidate, cheaper.warmup)
    tie.cost_per_sample = lambda calls: alone["modelled_ms"] * (1 - budget.COST_TIE / 2) / 1e3 * calls
    monkeypatch.setattr(budget, "uniform_options", lambda *a, **k: [tie])
    worst = min(alone["psnr_videos"])
    assert worst > 25.1
    uniform_videos[tie.key()] = [worst - 0.1] * 3  # cheaper by 1%, narrower margin: the allocation's plan
    kept, _ = run.search_budget(space, verify, min_psnr=25.0, iters=8, uniform=1)
    assert kept["assignment"].key() == alone["assignment"].key()
    uniform_videos[tie.key()] = [worst + 3.0] * 3  # and with the wider margin: the uniform plan
    kept, _ = run.search_budget(space, verify, min_psnr=25.0, iters=8, uniform=1)
    assert kept["assignment"] is tie


def test_a_verified_run_stops_at_the_first_video_under_the_budget(monkeypatch):
    """The hardest quarter of the videos goes first; one under the budget ends the run (the plan has failed)."""
    import numpy as np

    from dit_accel.calibrate import run

    calls = []

    def videos(pipe, jobs, call_kwargs, batch_size, on_step=None, replay=None):
        calls.append([s for _, s in jobs])
        return [np.full((2, 8, 8, 3), 100 + (30 if s == 3 else 1), np.uint8) for _, s in jobs]  # seed 3: 18.6 dB

    monkeypatch.setattr(run, "generate_videos", videos)
    jobs = [("p", s) for s in range(8)]
    dense = [np.full((2, 8, 8, 3), 100, np.uint8) for _ in jobs]
    settings = run.CalibrationSettings(model="m", prompts=["p"], min_psnr=25.0, steps=2)
    bar = run._Progress(False)
    made, stopped = run._hardest_first(None, jobs, dense, [3, 0, 1, 2, 4, 5, 6, 7], {}, settings, bar, 25.0)
    assert stopped and calls == [[3, 0]] and [i for i, v in enumerate(made) if v is not None] == [0, 3]
    calls.clear()
    made, stopped = run._hardest_first(None, jobs, dense, [0, 1, 2, 4, 5, 6, 7, 3], {}, settings, bar, 25.0)
    assert not stopped and calls == [[0, 1], [2, 4, 5, 6, 7, 3]] and all(v is not None for v in made)
    calls.clear()
    run._hardest_first(None, jobs, dense, list(range(8)), {}, settings, bar, None)  # no budget: one pass
    assert calls == [list(range(8))]
    assert run.passes_budget([30.0, None], 25.0) and not run.passes_budget([30.0, None], 25.0, "mean")


def test_validation_ground_truth_fails_a_check_only_when_the_plan_is_worse_beyond_chance():
    from dit_accel.calibrate.run import groundtruth_close

    def scores(fails, n=8):
        return {"per_video": [{"colour": True, "shape": i not in fails, "motion": True, "consistency": True}
                              for i in range(n)]}

    dense = scores(set())
    assert groundtruth_close(scores({0}), dense)  # one video: noise
    assert groundtruth_close(scores({0, 1, 2, 3}), dense)  # 4 of 8 lost, none gained: p = 1/16, not below 5%
    assert not groundtruth_close(scores({0, 1, 2, 3, 4}), dense)  # 5 of 8: p = 1/32
    assert groundtruth_close(scores({0, 1, 2, 3, 4}), scores({5, 6, 7}))  # 5 lost, 3 gained: p = 0.36
    assert not groundtruth_close(scores(set(range(6)), n=20), dense.__class__(per_video=scores(set(), 20)["per_video"]))
    assert groundtruth_close(scores({2}), scores({2}))  # the same failures: nothing lost


def test_candidate_tile_counts_windows_in_frames():
    """--tile 1,12,12 on a grid of 12x12-token frames: Tile windows of whole frames, run as blocks of one frame
    (no element masks); no GNA candidates (another token order); narrow windows first on a long axis."""
    from dit_accel.calibrate.candidates import check_candidate_tile

    cands = candidate_grid((32, 12, 12), size="default", methods=("tile", "gna"), tile=(1, 12, 12))
    tiles = [c for c in cands if c.kind == "block_sparse"]
    assert [c.method.window for c in tiles] == [(1, 1, 1), (3, 1, 1), (5, 1, 1), (17, 1, 1)]
    assert all(c.method.block_size == 144 and c.method.tile == (1, 12, 12) for c in tiles)
    assert [round(c.density * 32) for c in tiles] == [1, 3, 5, 17]
    # A 64-token tile keeps 64-token blocks and its GNA candidates.
    framed = candidate_grid((16, 8, 8), size="default", methods=("tile", "gna"), tile=(1, 8, 8))
    assert any(c.label.startswith("gna") for c in framed)
    assert all(c.method.block_size is None for c in framed if c.label.startswith("tile"))
    with pytest.raises(ValueError, match="3 dimensions"):
        candidate_grid((32, 12, 12), tile=(12, 12))
    with pytest.raises(ValueError, match=">= 1"):
        check_candidate_tile((0, 8, 8))
