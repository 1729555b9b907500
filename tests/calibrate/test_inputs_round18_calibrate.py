"""Calibration and plans, round 18 of the input audit: each test pins one fault found by handing ``dit-accel
calibrate``, ``calibrate()`` and SparsePlan odd paths, plans and grids. Expectations are written out by hand."""

import json
import types

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel import Phase, SparsePlan, Tile
from dit_accel.calibrate import CalibrationSettings, calibrate, report, run
from dit_accel.calibrate.candidates import sparse_candidates
from dit_accel.cli.main import main
from dit_accel.models import loading
from tests.calibrate import StandInHandle


@pytest.fixture
def no_load(monkeypatch):
    def load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", load)


# ------------------------------------------------------------------ --capture where the outputs go
@pytest.mark.parametrize("capture", ["plan.json", "plan.json/qkv", "plan_report/report.md"])
def test_a_capture_folder_at_the_plan_or_a_report_file_is_refused_before_the_model_loads(capture, tmp_path, no_load):
    """Before: the dense run made the capture folder at the plan's path, and the calibration ran to its end and then
    failed to write the plan there (IsADirectoryError), the whole run lost."""
    settings = CalibrationSettings("tiny-shapes", ["a red circle moving right"], min_psnr=30, steps=2,
                                   capture_dir=str(tmp_path / capture))
    with pytest.raises(ValueError, match="--capture .* the captures would make a folder where that file is"):
        calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_cli_refuses_a_capture_folder_at_the_plan(tmp_path, no_load, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    code = main(["calibrate", "--no-progress", "--model", "tiny-shapes", "--steps", "2", "--prompts", str(prompts),
                 "--out", str(tmp_path / "plan.json"), "--min-psnr", "30", "--capture", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--capture" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plan.json").exists()


# ------------------------------------------------------------------ a strategy for another step count
TILE = Tile(tile=(4, 4, 4), window=(1, 1, 3))


def test_a_strategy_is_written_for_the_steps_the_plan_was_calibrated_for():
    """Before: ``to_tile_strategy(num_steps=50)`` of a plan calibrated for 4 steps wrote its last phase for steps
    1..49 (a schedule never scored), and left out, refused the open phase although the plan records its steps."""
    plan = SparsePlan((Phase(0, 1), Phase(1, None, {0: TILE})), num_layers=1, num_heads=1, provenance={"steps": 4})
    assert plan.to_tile_strategy() == {"1_0_0": [1, 1, 3], "2_0_0": [1, 1, 3], "3_0_0": [1, 1, 3]}
    assert plan.to_tile_strategy(num_steps=4) == plan.to_tile_strategy()
    with pytest.raises(ValueError, match="num_steps=50: the plan was calibrated for 4 denoising steps"):
        plan.to_tile_strategy(num_steps=50)


def test_a_strategy_for_fewer_steps_than_a_phase_names_is_refused():
    """Before: ``num_steps=2`` of a plan whose phase runs steps 1..3 wrote steps 1..3, past the run's last."""
    plan = SparsePlan((Phase(1, 4, {0: TILE}),), num_layers=1, num_heads=1)
    with pytest.raises(ValueError, match=r"num_steps=2: the plan has a phase for steps 1..3, past the run's last step"):
        plan.to_tile_strategy(num_steps=2)
    assert len(plan.to_tile_strategy(num_steps=4)) == 3


# ------------------------------------------------------------------ Radial on a large grid
def test_radial_left_out_on_a_large_grid_is_said_with_the_reason():
    """Before: on Wan 480p's grid (21, 30, 52), 32,760 tokens, Radial was dropped without a word (the default
    --methods include it), and --methods radial alone was told "each candidate runs dense there or visits more
    than 90% of the key blocks ... pass a larger size", where a smaller one is what gives Radial candidates."""
    said = []
    out = sparse_candidates((21, 30, 52), size="small", methods=("sla", "radial"), log=said.append)
    assert {c.label.split()[0] for c in out} == {"dense", "sla"}
    assert len(said) == 1 and "no Radial candidate on token grid (21, 30, 52) (32760 tokens)" in said[0]
    assert "up to 8192 tokens" in said[0]
    said.clear()
    assert [c.label for c in sparse_candidates((21, 30, 52), methods=("radial",), log=said.append)] == ["dense"]
    assert len(said) == 1 and "up to 8192 tokens" in said[0] and "a smaller size" in said[0]
    assert "larger size" not in said[0]
    said.clear()
    sparse_candidates((4, 12, 12), size="small", methods=("sla", "radial"), log=said.append)
    assert said == []  # a small grid has Radial candidates: nothing to say


# ------------------------------------------------------------------ pipelines that take one prompt per call
class _OnePrompt:
    """tiny-minimax-h3's call: one ``str`` prompt, one generator, no step callback."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt: str = "", generator=None, output_type: str = "np", num_inference_steps: int = 2):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: takes one prompt (a str)")
        self.calls.append((prompt, float(torch.rand(1, generator=generator))))
        return types.SimpleNamespace(frames=[np.zeros((1, 4, 4, 3), np.float32)])


class WanVACEPipeline:
    """Diffusers' WanVACEPipeline refuses a list of prompts in check_inputs, whatever its annotation says."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt=None, generator=None, output_type="np", callback_on_step_end=None,
                 num_inference_steps=2):
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("Passing a list of prompts is not yet supported. This may be supported in the future.")
        self.calls.append((prompt, float(torch.rand(1, generator=generator))))
        for step in range(num_inference_steps):
            callback_on_step_end(self, step, 0, {})
        return types.SimpleNamespace(frames=[np.zeros((1, 4, 4, 3), np.float32)])


@pytest.mark.parametrize("make", [_OnePrompt, WanVACEPipeline], ids=["str-prompt-no-callback", "WanVACEPipeline"])
def test_a_pipeline_of_one_prompt_per_call_generates_every_video(make):
    """Before: calibrating tiny-minimax-h3 failed at the dense run's first call with a raw ``TypeError: ...
    unexpected keyword argument 'callback_on_step_end'``, and tiny-wan-vace with "Passing a list of prompts is not
    yet supported", both after the model had loaded; now each video is one call of one prompt and its seed."""
    pipe, steps = make(), []
    jobs = [("a fox", 0), ("a cat", 0), ("a fox", 1)]
    videos = run.generate_videos(pipe, jobs, {"num_inference_steps": 2}, 8, on_step=lambda: steps.append(1))
    assert len(videos) == 3 and videos[0].shape == (1, 4, 4, 3) and videos[0].dtype == np.uint8
    noise = {seed: float(torch.rand(1, generator=torch.Generator().manual_seed(seed))) for seed in (0, 1)}
    assert pipe.calls == [("a fox", noise[0]), ("a cat", noise[0]), ("a fox", noise[1])]
    assert len(steps) == 6  # the progress bar's steps: 2 per video
    assert run.takes_one_prompt(pipe)


# ------------------------------------------------------------------ the default report folder in the way
def test_a_file_at_the_default_report_folder_is_named_as_the_default(tmp_path, no_load, capsys):
    """Before: ``--out results`` beside a file ``results_report`` said "report_dir='.../results_report' is a file;
    pass a folder": a setting the user never gave, and no word of --report-dir."""
    (tmp_path / "results_report").write_text("my notes\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    code = main(["calibrate", "--no-progress", "--model", "tiny-shapes", "--steps", "2", "--prompts", str(prompts),
                 "--out", str(tmp_path / "results"), "--min-psnr", "30"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the report folder" in err and "(the default beside the plan, results_report) is a file" in err
    assert "--report-dir" in err
    assert (tmp_path / "results_report").read_text() == "my notes\n"


# ------------------------------------------------------------------ the report's calibration.json passed as the plan
def test_loading_a_calibration_record_as_a_plan_names_the_plan_it_wrote(tmp_path):
    """Before: ``SparsePlan.load("plan_report/calibration.json")`` (the JSON beside report.md) said only "format:
    must be "dit_accel.sparse_plan"; got nothing", not which file the plan is."""
    record = tmp_path / "calibration.json"
    record.write_text(json.dumps({"settings": {"model": "tiny-shapes"}, "plan_path": "runs/plan.json",
                                  "budget": {"min_psnr": 30}}))
    with pytest.raises(ValueError, match=r"calibration.json: format: this is the record of a calibration .*the plan "
                                         r"it wrote is runs/plan.json: pass that file"):
        SparsePlan.load(record)


# ------------------------------------------------------------------ a pipeline that runs another number of steps
class _Transformer(torch.nn.Module):
    def forward(self, hidden_states, timestep=None, return_dict=False):
        return (hidden_states * 0.5,)


class _FewerSteps:
    """tiny-minimax-h3's schedule: N sigmas, the last 0, give N - 1 transformer calls (and N - 1 timesteps)."""

    def __init__(self):
        self.transformer = _Transformer()
        self.scheduler = types.SimpleNamespace(timesteps=torch.tensor([]), order=1)

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt, generator, output_type, callback_on_step_end, num_inference_steps=2, num_frames=None,
                 height=None, width=None, guidance_scale=None, max_sequence_length=None):
        self.scheduler.timesteps = torch.linspace(1000, 0, num_inference_steps)[:-1]
        for step in range(num_inference_steps - 1):
            self.transformer(hidden_states=torch.zeros(len(prompt), 4))
            callback_on_step_end(self, step, 0, {})
        return types.SimpleNamespace(frames=[np.full((1, 8, 8, 3), 0.5, np.float32) for _ in prompt])


_Handle = StandInHandle  # one layer, one sampled q/k/v call of a (2, 16, 16) grid


def test_a_pipeline_that_runs_fewer_steps_than_asked_is_refused_after_the_dense_run(tmp_path, monkeypatch):
    """Before: calibrating tiny-minimax-h3 (--steps 3: 2 transformer steps) scored every candidate, then failed at
    the first verified plan with "the plan has a phase for steps 1..end; this run has 2 denoising steps", naming
    no --steps; a search that reached the end failed making the plan ("provenance.timesteps has 2 entries")."""
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: _FewerSteps())
    monkeypatch.setattr(dit_accel, "apply", _Handle)
    monkeypatch.setattr(run, "score_candidates", lambda *a, **k: pytest.fail("scored after a dense run of 2 steps"))
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square"], min_psnr=25, steps=3,
                                   methods=("tile",), candidates="small", cost_terms="tiles", validate=0)
    with pytest.raises(ValueError, match=r"--steps 3: _FewerSteps ran 2 denoising step\(s\) per video"):
        calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert not (tmp_path / "plan.json").exists()


# ------------------------------------------------------------------ calibrate()'s own arguments
def test_calibrate_with_log_none_writes_its_plan_quietly(tmp_path, monkeypatch, capsys):
    """Before: ``calibrate(settings, out, log=None)`` ran the model's loading, then raised ``TypeError: 'NoneType'
    object is not callable`` at its first note."""
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: _FewerSteps())
    monkeypatch.setattr(dit_accel, "apply", _Handle)
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square"], min_psnr=25, steps=3,
                                   methods=("tile",), candidates="small", cost_terms="tiles", validate=0)
    with pytest.raises(ValueError, match="--steps 3"):  # (the stand-in's steps: refused past the notes)
        calibrate(settings, tmp_path / "plan.json", progress=False, log=None)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("settings, log, match", [
    ({"model": "tiny-shapes"}, print, "settings must be a CalibrationSettings; got dict"),
    (None, "quiet", "log='quiet' is invalid"),
])
def test_calibrate_refuses_settings_of_another_type_and_a_log_that_is_no_function(settings, log, match, tmp_path,
                                                                                   no_load):
    """Before: a dict of settings was ``AttributeError: 'dict' object has no attribute 'check'``; a log that is no
    function a TypeError after the model had loaded."""
    if settings is None:
        settings = CalibrationSettings("tiny-shapes", ["a red circle moving right"], min_psnr=30, steps=2)
    with pytest.raises(TypeError, match=match):
        calibrate(settings, tmp_path / "plan.json", progress=False, log=log)


# ------------------------------------------------------------------ a pipeline of two transformers
class _TwoTransformers(_FewerSteps):
    """Wan 2.2's experts: ``transformer`` and ``transformer_2``, each with its own attention layers; 2 steps."""

    def __call__(self, prompt, generator, output_type, callback_on_step_end, num_inference_steps=2, num_frames=None,
                 height=None, width=None, guidance_scale=None, max_sequence_length=None):
        self.scheduler.timesteps = torch.linspace(1000, 0, num_inference_steps + 1)[:-1]
        for step in range(num_inference_steps):
            self.transformer(hidden_states=torch.zeros(len(prompt), 4))
            callback_on_step_end(self, step, 0, {})
        return types.SimpleNamespace(frames=[np.full((1, 8, 8, 3), 0.5, np.float32) for _ in prompt])


def _two_handles(second_layers):
    class _Two(_Handle):
        def __init__(self, pipe, method, capture=None, timing=False, backend="auto"):
            self.transformers, self.transformer = [pipe.transformer, torch.nn.Linear(1, 1)], pipe.transformer
            self.layers = ["blocks.0.attn1", "blocks.1.attn1"] + [f"transformer_2.blocks.{i}.attn1"
                                                                  for i in range(second_layers)]
            if capture is not None:  # each transformer's layer indices start at 0
                q = torch.randn(1, 2, 512, 16, generator=torch.Generator().manual_seed(0))
                for layer in range(max(2, second_layers)):
                    capture.save(layer, self.layers[layer], (2, 16, 16), next(iter(capture.steps)), q, q, q)
    return _Two


def test_a_pipeline_of_two_transformers_gets_a_plan_of_each_ones_layers(tmp_path, monkeypatch):
    """Before: Wan 2.2's two experts of 40 layers each were counted as one model of 80 layers: the plan said
    num_layers 80, and apply() refused it at the first verified plan ("the plan is for 80 attention layers;
    this model has 40: calibrate a plan for it"), after the whole dense run and scoring."""
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: _TwoTransformers())
    monkeypatch.setattr(dit_accel, "apply", _two_handles(2))
    monkeypatch.setattr(report, "heatmap_png", lambda *a, **k: b"png")  # (matplotlib, torchmetrics: seconds)
    monkeypatch.setattr(run, "_psnr", lambda video, ref: 100.0)
    monkeypatch.setattr(run, "_psnr_ssim", lambda videos, refs, per_video=False:
                        (100.0, 1.0) + (([100.0] * len(videos),) if per_video else ()))
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square"], min_psnr=25, steps=2,
                                   methods=("tile",), candidates="small", cost_terms="tiles", validate=0,
                                   search="warmup")
    result = calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert result["settings"]["layers"] == 2
    assert SparsePlan.load(tmp_path / "plan.json").num_layers == 2


def test_two_transformers_of_different_layer_counts_are_refused_after_the_dense_run(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: _TwoTransformers())
    monkeypatch.setattr(dit_accel, "apply", _two_handles(3))
    settings = CalibrationSettings("tiny-wan", ["a red circle", "a blue square"], min_psnr=25, steps=2,
                                   methods=("tile",), candidates="small", cost_terms="tiles", validate=0)
    with pytest.raises(ValueError, match="its 2 transformers have different numbers of attention layers"):
        calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
