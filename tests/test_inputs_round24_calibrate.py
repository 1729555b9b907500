"""Calibration and eval output files and plan objects, round 24 of the input audit ("trust"): each test pins one
fault found by driving ``dit-accel calibrate``, ``dit-accel eval`` and ``SparsePlan`` as a user would. Expectations
are written out by hand."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dit_accel import Dense, SparsePlan, Tile
from dit_accel.calibrate import CalibrationSettings, calibrate
from dit_accel.calibrate.generation import call_as_run
from dit_accel.calibrate.report import check_outputs
from dit_accel.cli.main import main
from dit_accel.models import loading
from dit_accel.plans.sparse_plan import Phase


def _plan(**provenance) -> SparsePlan:
    return SparsePlan([Phase(0, 1), Phase(1, None, {1: Tile(tile=(4, 4, 4), window=(1, 1, 3))})], num_layers=4,
                      num_heads=2, provenance=provenance)


def _report(folder: Path, plan_path=None, eval_run: bool = False) -> None:
    """A report folder as calibrate (or, ``eval_run``, eval) left it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text("# an earlier run's report\n")
    if eval_run:
        (folder / "results.json").write_text("{}\n")
    else:
        (folder / "calibration.json").write_text(json.dumps({"plan_path": str(plan_path), "plan_sha256": "0" * 64}))


# ------------------------------------------------------------------ 1. a report folder of another run
def test_a_report_dir_holding_another_plans_report_is_refused(tmp_path):
    """``calibrate --out b.json --report-dir reports`` after ``--out a.json --report-dir reports`` replaced a.json's
    report.md, heatmap.png and calibration.json with b.json's, without a word: a.json was left with no report."""
    _report(tmp_path / "reports", tmp_path / "a.json")
    with pytest.raises(ValueError) as err:
        check_outputs(tmp_path / "b.json", tmp_path / "reports")
    message = str(err.value)
    assert "--report-dir" in message and "reports" in message and "another plan" in message
    assert "a.json" in message and "Pass another --report-dir" in message and "b_report" in message


def test_a_report_dir_holding_an_eval_report_is_refused(tmp_path):
    _report(tmp_path / "eval_out", eval_run=True)
    with pytest.raises(ValueError, match=r"already holds report.md, results.json of another run .*another "
                                         r"--report-dir"):
        check_outputs(tmp_path / "plan.json", tmp_path / "eval_out")


def test_a_rerun_with_the_same_out_replaces_its_own_report(tmp_path):
    """As --out replaces the plan, a rerun replaces that plan's report (its own folder, or a moved one of the same
    plan): not refused."""
    _report(tmp_path / "reports", tmp_path / "plan.json")
    check_outputs(tmp_path / "plan.json", tmp_path / "reports")
    check_outputs(tmp_path / "plan.json")  # an empty default folder
    plan = _plan()
    plan.save(tmp_path / "moved.json")
    (tmp_path / "reports" / "calibration.json").write_text(json.dumps({"plan_path": "elsewhere/plan.json",
                                                                       "plan_sha256": plan.content_hash()}))
    check_outputs(tmp_path / "moved.json", tmp_path / "reports")


def test_calibrate_refuses_another_plans_report_dir_before_the_model_loads(tmp_path, monkeypatch):
    def stop(model, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loading, "load_pipeline", stop)
    _report(tmp_path / "reports", tmp_path / "a.json")
    settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25)
    with pytest.raises(ValueError, match="another plan"):
        calibrate(settings, tmp_path / "b.json", report_dir=tmp_path / "reports", log=None)
    assert (tmp_path / "reports" / "report.md").read_text() == "# an earlier run's report\n"
    assert not (tmp_path / "b.json").exists()


def test_eval_refuses_an_out_folder_holding_a_calibration_report(tmp_path, capsys):
    """``dit-accel eval --out plan_report`` replaced the calibration's report.md with the eval's."""
    _report(tmp_path / "plan_report", tmp_path / "plan.json")
    assert main(["eval", "--model", "tiny-shapes", "--out", str(tmp_path / "plan_report")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "calibration.json" in err and "pass another --out folder" in err
    assert (tmp_path / "plan_report" / "report.md").read_text() == "# an earlier run's report\n"


# ------------------------------------------------------------------ 2. the frames that ran
def test_the_plan_records_the_frame_count_the_pipeline_ran():
    """Diffusers' WanPipeline rounds num_frames (tiny-shapes: 2 -> 3 frames, Wan: 4k+1): the plan's provenance.call
    said 2, a size that never ran."""
    notes = []
    call = {"num_frames": 2, "height": 48, "width": 48, "num_inference_steps": 2}
    videos = [np.zeros((3, 48, 48, 3), np.uint8)]
    assert call_as_run(call, videos, notes.append) == {**call, "num_frames": 3}
    assert call["num_frames"] == 2  # (the caller's dict stays)
    assert "--frames 2" in notes[0] and "made 3 frames" in notes[0] and "--frames 3" in notes[0]
    assert call_as_run({**call, "num_frames": 3}, videos, notes.append) == {**call, "num_frames": 3}
    image_call = {"height": 48, "width": 48}
    assert call_as_run(image_call, [np.zeros((48, 48, 3), np.uint8)]) is image_call
    assert len(notes) == 1


# ------------------------------------------------------------------ 3. a layer past the plan's
@pytest.mark.parametrize("layer", [4, 100], ids=["num_layers", "far-past"])
def test_for_layer_step_refuses_a_layer_past_the_plans_layers(layer):
    """Before: layer 4 of a 4-layer plan ran the phase's default (None: dense), unsaid."""
    with pytest.raises(ValueError, match=rf"for_layer_step\(layer={layer}\) is invalid: the plan is for 4 "
                                         r"attention layers \(num_layers\), so layer is 0..3"):
        _plan().for_layer_step(layer, 1)
    with pytest.raises(ValueError, match=r"runs_sla\(layer=.*0..3"):
        _plan().runs_sla(layer)


def test_runs_sla_names_a_layer_that_is_no_int():
    with pytest.raises(TypeError, match=r"runs_sla\(layer='1'\) is invalid: an int >= 0"):
        _plan().runs_sla("1")


def test_a_plan_without_num_layers_answers_any_layer():
    plan = SparsePlan([Phase(0, None, {1: Tile(tile=(4, 4, 4), window=(1, 1, 3))})])
    assert plan.for_layer_step(100, 0) is None and plan.for_layer_step(1, 0) is not None


# ------------------------------------------------------------------ 4. the OS refuses the write
def test_a_refused_save_names_the_path_and_what_to_do_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    _plan().save(path)
    before = path.read_text()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError) as err:
        SparsePlan([Phase(0, 2)], num_layers=4).save(path)
    message = str(err.value)
    assert str(path) in message and "nothing written (the file already there is unchanged)" in message
    assert f"make {tmp_path} writable, or write the file to another folder" in message
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_folder_that_cannot_be_made_names_the_plan_path(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match=r"make .* writable, or write the file to another folder.*plan.json"):
        _plan().save(tmp_path / "new" / "plan.json")


# ------------------------------------------------------------------ audit: plan == other
def test_a_plan_equals_its_saved_and_loaded_copy(tmp_path):
    """SparsePlan compared by identity: ``plan == SparsePlan.load(path)`` was False for the plan just saved."""
    plan = _plan(steps=4)
    plan.save(tmp_path / "plan.json")
    loaded = SparsePlan.load(tmp_path / "plan.json")
    assert loaded == plan and hash(loaded) == hash(plan) and len({plan, loaded}) == 1
    assert _plan(steps=4) != _plan(steps=5)  # another provenance
    assert SparsePlan([Phase(0, None, default=Dense())]) != SparsePlan([])
    assert plan != "plan.json" and plan.as_method().sparse_plan == loaded


# ------------------------------------------------------------------ audit: head_methods' head count
@pytest.mark.parametrize("heads, error", [(0, ValueError), (2.0, TypeError), (True, TypeError)],
                         ids=["zero", "float", "bool"])
def test_head_methods_names_a_head_count_that_is_no_count(heads, error):
    """Before: heads=0 returned () and heads=2.0 raised "can't multiply sequence by non-int of type 'float'"."""
    with pytest.raises(error, match=r"head_methods\(heads=.*\) is invalid: the layer's number of attention heads, "
                                    r"an int >= 1"):
        _plan().head_methods(0, 0, heads)
    assert _plan().head_methods(0, 0, 2) == (Dense(), Dense())
