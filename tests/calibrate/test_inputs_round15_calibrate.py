"""dit-accel calibrate, round 15 of the input audit: figures the plan and its report record, and step-count flags.

The end-to-end tests run the real ``calibrate()`` on a stand-in pipeline (a transformer that returns its input,
videos that never change, ``dit_accel.apply`` replaced by a handle that samples one q/k/v call), so a whole
calibration takes a fraction of a second and the figures it writes are known."""

import json
import types

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.calibrate import CalibrationSettings, calibrate, report, run
from dit_accel.calibrate.replay import DenseReplay
from dit_accel.cli.main import main
from dit_accel.models import loading
from dit_accel.plans.sparse_plan import Phase, SparsePlan
from tests.calibrate import StandInHandle

GRID, HEADS, HEAD_DIM = (2, 16, 16), 2, 16


class _Transformer(torch.nn.Module):
    def forward(self, hidden_states, timestep=None, return_dict=False):
        return (hidden_states * 0.5,)


class _Pipe:
    """Two denoising steps; ``cfg``: "separate" (a call per guidance branch), "batched" (both branches in one
    call) or "none" (one call per step, as FLUX's guidance embedding)."""

    def __init__(self, cfg="separate"):
        self.cfg, self.transformer = cfg, _Transformer()
        self.scheduler = types.SimpleNamespace(timesteps=torch.tensor([900.0, 500.0]), order=1)

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt, generator, output_type, callback_on_step_end, num_inference_steps=2, num_frames=None,
                 height=None, width=None, guidance_scale=None, max_sequence_length=None):
        x = torch.zeros(len(prompt), 4)
        for step in range(num_inference_steps):
            if self.cfg == "batched":
                self.transformer(hidden_states=torch.cat([x, x]))
            else:
                for _ in range(2 if self.cfg == "separate" else 1):
                    self.transformer(hidden_states=x)
            callback_on_step_end(self, step, 0, {})
        return types.SimpleNamespace(frames=[np.full((1, 8, 8, 3), 0.5, np.float32) for _ in prompt])


class _Handle(StandInHandle):
    grid, heads, head_dim = GRID, HEADS, HEAD_DIM


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-ins in place; returns ``[cfg]``, the guidance structure of the pipelines loaded next."""
    cfg = ["separate"]
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: _Pipe(cfg[0]))
    monkeypatch.setattr(dit_accel, "apply", _Handle)
    # (matplotlib and torchmetrics take seconds to import, and the videos never change: PSNR is the cap)
    monkeypatch.setattr(report, "heatmap_png", lambda *a, **k: b"png")
    monkeypatch.setattr(run, "_psnr", lambda video, ref: 100.0)
    monkeypatch.setattr(run, "_psnr_ssim", lambda videos, refs, per_video=False:
                        (100.0, 1.0) + (([100.0] * len(videos),) if per_video else ()))
    return cfg


def _calibrate(tmp_path, name="plan", **kw):
    base = dict(model="tiny-wan", prompts=["a red circle", "a blue square"], min_psnr=25, steps=2,
                methods=("tile",), candidates="small", cost_terms="tiles")
    settings = CalibrationSettings(**{**base, **kw})
    result = calibrate(settings, tmp_path / f"{name}.json", progress=False, log=lambda m: None)
    return result, SparsePlan.load(tmp_path / f"{name}.json")


def test_the_plan_names_the_seeds_its_search_ran_on(tmp_path, stand_in):
    """Before: 2 prompts and no --seeds search on seeds 0-3 (seeds are added below 8 videos), and the plan's
    provenance said seeds [0] (the shipped tiny-shapes plan too: [0], for 10 search videos of 5 prompts)."""
    result, plan = _calibrate(tmp_path, search="warmup", validate=0)
    assert result["search_videos"] == 2  # --validate 0: no seeds added
    assert plan.provenance["seeds"] == [0]
    result, plan = _calibrate(tmp_path, search="warmup")  # the validation set: the prompts on a new seed
    assert result["search_videos"] == 8 and result["validation"]["seeds"] == [4]
    assert plan.provenance["seeds"] == result["search_seeds"] == [0, 1, 2, 3]


@pytest.mark.parametrize("cfg, passes", [("separate", 2), ("batched", 2), ("none", 1)])
def test_modelled_attention_per_sample_counts_the_transformer_passes_of_each_step(tmp_path, stand_in, cfg, passes):
    """Before: calibrate guessed 2 passes per step from guidance_scale > 1, and 1 when the scale was left to the
    pipeline (tiny-wan's and Wan's default 5.0 runs both branches): the modelled attention per sample, dense's
    and the plan's, in the CLI line, report.md and the plan's provenance, was half the pipeline's. With FLUX's
    guidance embedding (one pass) at --guidance-scale 3.5 it was twice."""
    stand_in[0] = cfg
    result, plan = _calibrate(tmp_path, search="warmup", validate=0, guidance_scale=3.5 if cfg == "none" else None)
    stand_in[0] = "none"
    one, _ = _calibrate(tmp_path, name="one", search="warmup", validate=0)
    assert result["dense"]["modelled_ms"] == pytest.approx(passes * one["dense"]["modelled_ms"])
    assert plan.provenance["quality"]["dense_modelled_ms"] == pytest.approx(result["dense"]["modelled_ms"])
    assert result["settings"]["passes_per_step"] == passes  # (the evidence script prices its rows with it)


def test_a_warmup_search_reports_no_layer_error_it_did_not_score(tmp_path, stand_in):
    """Before: --search warmup scores no attention error, and report.md said "max layer error 0.0000" for its
    sparse plan (the shipped tiny-shapes-63 report too), as if it were exact."""
    result, plan = _calibrate(tmp_path, search="warmup", validate=0)
    assert plan.phases  # a sparse plan
    assert result["final"]["max_layer_error"] is None
    row = next(line for line in (tmp_path / "plan_report" / "report.md").read_text().splitlines()
               if line.startswith("| calibrated plan"))
    assert row.rstrip(" |").endswith("| -") and "0.0000 |" not in row
    saved = json.loads((tmp_path / "plan_report" / "calibration.json").read_text())
    assert saved["final"]["max_layer_error"] is None


def test_replayed_steps_are_the_ones_kept_for_every_video():
    """Before: under a --replay-mb too small for a video's dense steps, a plan's whole dense prefix counted as read
    from the dense run: calibration.json said replayed_steps 2 for steps computed again, and their dense-run time
    was added to the measured attention that had timed them already (tiny-shapes, 3 steps: 378 ms against
    291 ms computed)."""
    from dit_accel.calibrate.run import _replayed
    from dit_accel.methods import Tile

    pipe = _Pipe("none")
    plan = SparsePlan([Phase(2, None, default=Tile(tile=(1, 16, 16), window=(1, 1, 1)))])  # 2 dense steps of 3
    per_call = 4 * 4  # one video's output of one call: 4 float32
    for budget, read in ((10**6, 2), (2 * per_call, 1), (per_call // 2, 0)):  # per video: all, 1 call, none
        replay = DenseReplay(budget)
        with replay.recording(pipe.transformer, videos=2):
            replay.begin([("a", 0), ("b", 0)])
            for _ in range(3):
                pipe.transformer(hidden_states=torch.ones(2, 4))
        context, steps = _replayed(pipe, replay, plan, layers=1, steps=3)
        assert steps == read, budget
        with context:
            replay.begin([("a", 0), ("b", 0)])
            for _ in range(3):
                pipe.transformer(hidden_states=torch.ones(2, 4))
        assert replay.replayed_calls == read  # every step it says it read, read


def test_warmup_and_cooldown_candidates_past_the_steps_are_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                          capsys):
    """Before: a warm-up or last-steps candidate at or past the step count was dropped without a word."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    for change, says in (({"warmup": (1, 4)}, "--warmup-candidates 1,4: a dense warm-up must be shorter than the 4"),
                         ({"cooldown": (5,)}, "--cooldown-candidates 5: a last-steps phase must be shorter")):
        settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25,
                                       steps=4, **change)
        with pytest.raises(ValueError, match=says):
            calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    # tiny-shapes' default: 12 steps, known only once the defaults fill in (still before the model loads)
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out", str(tmp_path / "p.json"),
                 "--min-psnr", "25", "--warmup-candidates", "15", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--warmup-candidates 15" in err[0] and "12 steps" in err[0], err
    assert list(tmp_path.iterdir()) == [prompts]
    # the defaults (1,2 and 1) are no error at any step count
    CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25, steps=2).check()


def test_a_sample_budget_too_small_for_one_row_is_refused_at_the_first_call(tmp_path, stand_in):
    """Before: --max-sample-mb below one batch row per (layer, bucket) kept no sample (samples.rows 0), scored
    nothing, and the allocation search went on to an all-dense allocation without a word (tiny-shapes at
    --max-sample-mb 1: "allocation, lambda 0" dense, then uniform plans ranked on no error). On a large model
    the default 512 MiB is such a budget (Wan 14B: 4.6 GB a row)."""
    with pytest.raises(ValueError, match=r"--max-sample-mb 0\.1 holds no q/k/v sample: one batch row per \(layer, "
                                         r"step bucket\) takes 0\.375 MiB here .*give --max-sample-mb 1 or more"):
        _calibrate(tmp_path, max_sample_mb=0.1)
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "plan_report").exists()
    result, _ = _calibrate(tmp_path, max_sample_mb=0.5)  # one row fits: scored, as before
    assert result["samples"]["rows"] == 1


def test_a_tile_that_leaves_no_tile_or_gna_candidate_is_said():
    """Before: --tile 4,12,12 on tiny-shapes' token grid (4, 12, 12) dropped every Tile and GNA candidate (one
    tile covers the grid) without a word, and --methods tile,gna,sla searched SLA alone."""
    from dit_accel.calibrate.candidates import sparse_candidates

    notes = []
    out = sparse_candidates((4, 12, 12), size="small", methods=("tile", "gna", "sla"), tile=(4, 12, 12),
                            log=notes.append)
    assert [c.kind for c in out] == ["dense", "sla"]
    assert len(notes) == 1 and notes[0].startswith("note: --tile 4,12,12: no Tile or GNA candidate is sparse on "
                                                   "token grid (4, 12, 12)") and "the search has sla only" in notes[0]
    notes.clear()  # a tile that leaves them, or no tile given: no note
    sparse_candidates((4, 12, 12), size="small", methods=("tile", "sla"), tile=(1, 12, 12), log=notes.append)
    sparse_candidates((4, 12, 12), size="small", methods=("tile", "sla"), log=notes.append)
    assert notes == []
    sparse_candidates((4, 12, 12), size="small", methods=("tile",), tile=(4, 12, 12), log=notes.append)
    assert len(notes) == 1 and "pass a smaller --tile, a larger size" in notes[0]  # the plan is dense: said, with why


@pytest.mark.parametrize("argv, named", [
    (["--phases", "1"], "--phases 1"),
    (["--warmup-candidates", "3,6"], "--warmup-candidates 3,6"),
    (["--cooldown-candidates", "2", "--samples-per-bucket", "1"], "--cooldown-candidates 2, --samples-per-bucket 1"),
    (["--max-sample-mb", "64"], "--max-sample-mb 64"),
], ids=["phases", "warmup-candidates", "two", "max-sample-mb"])
def test_the_warmup_search_names_the_sample_options_it_does_not_read(argv, named, tmp_path, monkeypatch, capsys):
    """Before: --search warmup tries every warm-up length and keeps no q/k/v sample, and --phases,
    --warmup-candidates, --cooldown-candidates, --samples-per-bucket and --max-sample-mb changed nothing without a
    word (the allocation-only options were refused already). With --capture they set what is captured."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    base = ["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20", "--search",
            "warmup", "--out", str(tmp_path / "plan.json"), "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "not apply to --search warmup" in err and len(err.splitlines()) == 1, err
    api = {"--phases": ("phases", 1), "--warmup-candidates": ("warmup", (3, 6)),
           "--max-sample-mb": ("max_sample_mb", 64.0)}.get(argv[0])
    if api is not None:  # the Python API refuses the same
        settings = CalibrationSettings(model="tiny-shapes", prompts=["a red square moving left"], min_psnr=20,
                                       search="warmup", **{api[0]: api[1]})
        with pytest.raises(ValueError, match="not apply to --search warmup"):
            calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
        settings.capture_dir = str(tmp_path / "qkv")  # with --capture they size the sample it writes
        settings.check()

    def stop(*a, **k):
        raise loading.ModelLoadError("stopped in the test")

    monkeypatch.setattr(loading, "load_pipeline", stop)  # with --capture: the loader is reached
    assert main(base + argv + ["--capture", str(tmp_path / "qkv")]) == 2
    assert "stopped in the test" in capsys.readouterr().err


def test_an_exact_layer_is_priced_as_the_dense_call_it_runs():
    """Before: with --costs measured, a block-sparse launch timed cheaper than SDPA's priced a layer of dense heads
    inside a block-sparse launch below the dense layer; its plan runs Dense (one SDPA call), so the search's exact
    plans (the bisection's upper end) cost 0.005 s against dense's 0.006 s: a dense plan with a 1.2x priced
    speed-up and no dense warm-up."""
    import math

    from dit_accel.calibrate.candidates import candidate_grid
    from dit_accel.calibrate.costs import MeasuredCostModel
    from dit_accel.calibrate.search import SearchSpace

    grid = (4, 12, 12)
    cands = candidate_grid(grid, size="small", methods=("tile",))
    # dense: 3 ms with both heads, 2 ms with one (1 ms a head, 1 ms a call); block-sparse: 1 ms a head, 0.5 ms a call
    times = iter([3.0, 2.0] + [2.5, 1.5] * len(cands))
    costs = MeasuredCostModel(grid, 32, cands, heads=2, timer=lambda fn: next(times))
    errors = {(0, 0): torch.full((len(cands), 2), 0.01, dtype=torch.float64)}
    space = SearchSpace(cands, errors, costs, 1, [(0, 2)], 2, costs.dense_head())
    for lam in (1e9, math.inf):
        exact = space.assign(lam)
        assert exact.to_plan({}).phases[0].default == dit_accel.Dense() and not exact.to_plan({}).phases[0].layers
        assert exact.cost_per_sample(1) == pytest.approx(exact.dense_cost_per_sample(1)), lam
        assert exact.warmup_steps() == 2
    cheap = space.assign(0.0)  # the sparse candidates are still chosen where error is free
    assert not cheap.choices[(0, 0)].dense and cheap.cost_per_sample(1) < cheap.dense_cost_per_sample(1)
