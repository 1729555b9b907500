"""Calibration, round 21 of the input audit: each test pins one fault found by running ``dit-accel calibrate`` and
``calibrate()`` as a user would. Expectations are written out by hand."""

import types

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.calibrate import CalibrationSettings, calibrate, report, run
from dit_accel.models import loading
from tests.calibrate import StandInHandle


# ------------------------------------------------------------------ Wan 2.2: two experts, replayed steps
class _Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.computed = 0  # calls that ran (a replayed call does not reach forward)

    def forward(self, hidden_states, timestep=None, return_dict=False):
        self.computed += 1
        return (hidden_states * 0.5,)


class _TwoExperts:
    """Wan 2.2 A14B's schedule: ``transformer`` (the high-noise expert) runs the first half of the steps,
    ``transformer_2`` the rest; classifier-free guidance as one call per branch (2 calls per step)."""

    def __init__(self):
        self.transformer, self.transformer_2 = _Expert(), _Expert()
        self.scheduler = types.SimpleNamespace(timesteps=torch.tensor([]), order=1)

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt, generator, output_type, callback_on_step_end, num_inference_steps=2, num_frames=None,
                 height=None, width=None, guidance_scale=None, max_sequence_length=None):
        self.scheduler.timesteps = torch.linspace(1000, 0, num_inference_steps + 1)[:-1]
        for step in range(num_inference_steps):
            expert = self.transformer if step < num_inference_steps // 2 else self.transformer_2
            for _branch in range(2):
                expert(hidden_states=torch.zeros(len(prompt), 4))
            callback_on_step_end(self, step, 0, {})
        return types.SimpleNamespace(frames=[np.full((1, 8, 8, 3), 0.5, np.float32) for _ in prompt])


class _Handle(StandInHandle):
    """On both experts: one layer each."""

    layers, both_experts = ("blocks.0.attn1", "transformer_2.blocks.0.attn1"), True


def test_a_plans_replayed_steps_on_two_experts_are_the_steps_it_did_not_compute(tmp_path, monkeypatch):
    """Before: the dense run's replay recorded ``pipe.transformer`` only. On Wan 2.2 (the first expert runs 2 of 4
    steps, 2 calls each) it counted 4 calls per video over 4 steps, "1 call per step", and a plan of 2 dense steps
    was reported as 2 replayed steps (and its measured time given 2 steps of the dense run's) while only 2 calls,
    one step, were read back and the rest computed again."""
    pipe = _TwoExperts()
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: pipe)
    monkeypatch.setattr(dit_accel, "apply", _Handle)
    monkeypatch.setattr(report, "heatmap_png", lambda *a, **k: b"png")
    monkeypatch.setattr(run, "_psnr", lambda video, ref: 100.0)
    monkeypatch.setattr(run, "_psnr_ssim", lambda videos, refs, per_video=False:
                        (100.0, 1.0) + (([100.0] * len(videos),) if per_video else ()))
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square"], min_psnr=25, steps=4,
                                   methods=("tile",), candidates="small", cost_terms="tiles", validate=0,
                                   search="warmup", extend_seeds=False, batch_size=1)
    result = calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert result["settings"]["passes_per_step"] == 2
    runs = [r for r in result["trace"] if r["repeat_of"] is None]
    assert any(r["replayed_steps"] for r in runs)
    videos, calls = 2, 2 * 4  # calls per video: 2 per step
    skipped = sum(videos * 2 * r["replayed_steps"] for r in runs)  # each replayed step: its 2 calls, per video
    computed = pipe.transformer.computed + pipe.transformer_2.computed
    assert computed == videos * calls * (1 + len(runs)) - skipped


# ------------------------------------------------------------------ --costs measured where dense is fastest
def test_measured_costs_under_which_no_sparse_candidate_pays_are_said(monkeypatch):
    """Before: --costs measured on a device where no sparse candidate times faster than dense attention (a CPU,
    a small grid: every per-head time 0.00 ms after the one-head call is taken off) gave a dense plan whatever
    the budget, said only as "chosen: dense (exact)", as if the budget had allowed no sparsity; --costs model
    says the same situation in a note."""
    from dit_accel.calibrate import costs
    from dit_accel.calibrate.candidates import sparse_candidates

    monkeypatch.setattr(costs, "_wall_ms", lambda fn, device, repeats=5: 1.0)  # every call as fast as dense
    grid = (2, 8, 8)
    candidates = sparse_candidates(grid, size="small", methods=("tile",), log=lambda m: None)
    settings = CalibrationSettings("tiny-wan", ["a red circle"], min_psnr=25, steps=2, costs="measured")
    space, note = run.search_space(candidates, {}, grid, 16, 1, [(0, 2)], 2, settings)
    assert not space.sparse_pays()
    assert note is not None and "--costs measured: on cpu" in note and "dense whatever the budget" in note
    assert "--costs model" in note


# ------------------------------------------------------------------ --prompts where the report is written
@pytest.mark.parametrize("report_dir", [".", None], ids=["report-dir", "default-report-dir"])
def test_a_prompts_file_the_report_would_overwrite_is_refused_before_the_model_loads(report_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """Before: ``--report-dir . --prompts report.md`` (or prompts kept at plan_report/report.md) ran the whole
    calibration and then replaced the prompts file with the report (--out at the prompts was refused already)."""
    from dit_accel.cli.main import main

    folder = tmp_path if report_dir else tmp_path / "plan_report"
    folder.mkdir(exist_ok=True)
    prompts = folder / "report.md"
    prompts.write_text("a red circle moving right\n")
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    argv = ["calibrate", "--no-progress", "--model", "tiny-shapes", "--prompts", str(prompts), "--out",
            str(tmp_path / "plan.json"), "--min-psnr", "30", "--steps", "2"]
    code = main(argv + (["--report-dir", str(tmp_path)] if report_dir else []))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"dit-accel calibrate: --prompts {prompts} is the report.md that ") and "overwrite" in err
    assert prompts.read_text() == "a red circle moving right\n"


# ------------------------------------------------------------------ a pipeline that runs N - 1 steps
class _OnePromptFewerSteps:
    """tiny-minimax-h3: one ``str`` prompt per call, and N - 1 transformer steps (and timesteps) for N."""

    def __init__(self):
        self.transformer = _Expert()
        self.scheduler = types.SimpleNamespace(timesteps=torch.tensor([]), order=1)
        self.calls = 0

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt: str, generator, output_type, num_inference_steps=2, num_frames=None, height=None,
                 width=None, guidance_scale=None, max_sequence_length=None):
        self.calls += 1
        self.scheduler.timesteps = torch.linspace(1000, 0, num_inference_steps)[:-1]
        for _step in range(num_inference_steps - 1):
            self.transformer(hidden_states=torch.zeros(1, 4))
        return types.SimpleNamespace(frames=[np.full((1, 8, 8, 3), 0.5, np.float32)])


def test_a_pipeline_that_runs_fewer_steps_is_refused_after_its_first_video(tmp_path, monkeypatch):
    """Before: tiny-minimax-h3 (one video per call) generated every video of the dense run (4 here; 8 or more on a
    real calibration, minutes each) before its 2 transformer steps for --steps 3 were found and refused."""
    pipe = _OnePromptFewerSteps()
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: pipe)
    monkeypatch.setattr(dit_accel, "apply", _Handle)
    pipe.transformer_2 = pipe.transformer  # (the stand-in handle names two; one module under both names)
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square"], min_psnr=25, steps=3, seeds=[0, 1],
                                   methods=("tile",), candidates="small", cost_terms="tiles", validate=0)
    with pytest.raises(ValueError, match=r"--steps 3: _OnePromptFewerSteps ran 2 denoising step\(s\) per video"):
        calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert pipe.calls == 1
    assert not (tmp_path / "plan.json").exists()


# ------------------------------------------------------------------ prompts repeated up to their spaces
def test_prompts_that_differ_in_their_spaces_only_are_refused_as_repeats(tmp_path, monkeypatch):
    """Before: ``["a red circle", "a blue square", "a red  circle "]`` passed the check of repeated prompts (the
    texts differ), and the two spellings of one prompt, one video to the text encoder, could land one in the search
    set and one in the validation set, which then held a video the search had been chosen on."""
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square", "a red  circle "], min_psnr=25,
                                   steps=2)
    with pytest.raises(ValueError, match="prompts 'a red circle' and 'a red  circle ' differ in their spaces only"):
        calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
