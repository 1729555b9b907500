"""Calibration and plan files, round 23 of the input audit: each test pins one fault found by driving
``dit-accel calibrate``, ``calibrate()`` and calibrated plan files as a user would. Expectations are written out by
hand."""

import json
import types
import warnings

import pytest

import dit_accel
from dit_accel import SparsePlan
from dit_accel._util import DitAccelWarning
from dit_accel.calibrate import CalibrationSettings, calibrate
from dit_accel.cli.main import main
from dit_accel.models import loading
from dit_accel.plans.plan_json import stamp_quality


def _calibrated(terms="tiles", head_dim=None, default=None):
    """The JSON of a plan as calibrate writes it for tiny-shapes (4 layers x 4 heads, head dim 32, 2 steps): a dense
    step, then Tile on every layer."""
    tile = {"method": "tile", "tile": [4, 4, 4], "window": [1, 1, 1]}
    provenance = {"model_class": "WanTransformer3DModel", "model_id": "tiny-shapes", "grids": [[4, 12, 12]],
                  "steps": 2, "model_config": {"attention_head_dim": 32, "num_layers": 4},
                  "cost_model": {"arch": "h100", "kernel": "current", "terms": terms},
                  "quality": {"plan": "allocation", "search": {"videos": 8, "psnr": 52.9, "psnr_worst": 50.1}}}
    if head_dim is not None:
        provenance["head_dim"] = head_dim
    return {"format": "dit_accel.sparse_plan", "format_version": 1, "num_layers": 4, "num_heads": 4,
            "phases": [{"steps": [0, 1], "default": {"method": "dense"}, "layers": {}},
                       {"steps": [1, None], "default": default or {"method": "dense"},
                        "layers": {} if default else {str(i): tile for i in range(4)}}],
            "provenance": provenance}


# ------------------------------------------------------------------ info --plan / generate's plan summary
def test_a_method_that_does_not_run_at_the_grid_is_not_priced_as_all_the_attention_time(tmp_path):
    """A hand-edited GNA kernel larger than the plan's grid has no modelled time. Before, each of its slots counted
    as one second against the dense slots' microseconds: ``attention time: gna 100%, dense 0%``."""
    plan = SparsePlan.from_json(_calibrated(default={"method": "gna", "kernel_size": [100, 100, 100]}))
    prof = plan.profile()
    assert prof["priced"] is False
    assert prof["share"] == {"dense": 0.5, "gna": 0.5}  # slots: 4 layers x 4 heads on each of the 2 steps
    line = plan.summary_line()
    assert "(step, layer, head) slots: dense 50%, gna 50%" in line and "gna 100%" not in line
    assert "mean density n/a" in line
    basis = next(s for s in plan.table() if s.startswith("shares:"))
    assert "gna(kernel_size=100x100x100) does not run at the plan's grid 4x12x12" in basis


def test_a_plan_that_runs_at_its_grid_is_still_priced():
    prof = SparsePlan.from_json(_calibrated()).profile()
    assert prof["priced"] is True and set(prof["share"]) == {"dense", "tile"}
    assert prof["mean_density"] == pytest.approx((1 + 1 / 9) / 2)


def test_shares_are_priced_at_the_calibrated_models_head_dim():
    """calibrate prices candidates at the model's head dim (tiny-shapes: 32); info --plan priced every plan at 128,
    which under per-CTA terms gave Tile 59% of the attention time where calibrate's own pricing gave 84%."""
    from_config = SparsePlan.from_json(_calibrated(terms="full")).profile()  # model_config.attention_head_dim
    recorded = SparsePlan.from_json(_calibrated(terms="full", head_dim=32)).profile()  # provenance.head_dim
    at_128 = SparsePlan.from_json(_calibrated(terms="full", head_dim=128)).profile()
    assert from_config["share"] == pytest.approx(recorded["share"])
    assert from_config["share"]["tile"] == pytest.approx(0.842, abs=0.01)
    assert at_128["share"]["tile"] == pytest.approx(0.594, abs=0.01)
    assert "head dim 32" in from_config["basis"]


# ------------------------------------------------------------------ provenance.quality of an edited plan
def _write(path, data):
    path.write_text(json.dumps(data, indent=1))
    return path


def test_the_quality_record_of_a_plan_edited_since_calibrate_is_left_out_with_a_warning(tmp_path):
    """generate printed provenance.quality (the calibrated plan's search and validation PSNR) for any plan that
    carried it: after a layer was edited by hand, figures of another plan, without a word."""
    stamped = stamp_quality(SparsePlan.from_json(_calibrated()))
    path = stamped.save(tmp_path / "plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plan as written: its record stands, no warning
        assert SparsePlan.load(path).provenance["quality"]["search"]["psnr"] == 52.9
    edited = json.loads(path.read_text())
    edited["phases"][1]["layers"]["0"] = {"method": "sla", "topk": 0.01}
    _write(path, edited)
    with pytest.warns(DitAccelWarning, match=r"plan\.json: provenance\.quality describes the plan calibrate wrote"):
        plan = SparsePlan.load(path)
    assert "quality" not in plan.provenance
    assert plan.provenance["model_id"] == "tiny-shapes"  # the rest of the provenance stays
    assert plan.source == str(path)


def test_a_quality_record_without_a_content_hash_is_kept():
    """Plans from before the record named its plan (shipped plans among them) cannot be told apart: kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "quality" in SparsePlan.from_json(_calibrated()).provenance


def test_stamp_quality_names_the_plans_content():
    plan = stamp_quality(SparsePlan.from_json(_calibrated()))
    assert plan.provenance["quality"]["plan_sha256"] == plan.content_hash()
    bare = _calibrated()
    del bare["provenance"]["quality"]
    assert "quality" not in stamp_quality(SparsePlan.from_json(bare)).provenance


# ------------------------------------------------------------------ calibrate(): the caller's settings
def _stop_at_the_loader(monkeypatch):
    def stop(model, **kwargs):
        raise loading.ModelLoadError("stopped in the test")

    monkeypatch.setattr(loading, "load_pipeline", stop)


def test_a_failed_calibration_leaves_the_callers_settings_as_they_were(tmp_path, monkeypatch):
    """calibrate() filled the model's default size and steps into the caller's settings (then failed to load):
    the same settings reused with dataclasses.replace(settings, model="tiny-wan") calibrated tiny-wan at
    tiny-shapes' 7 frames of 48x48 and 12 steps, without a word."""
    _stop_at_the_loader(monkeypatch)
    settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25)
    with pytest.raises(loading.ModelLoadError, match="stopped in the test"):
        calibrate(settings, tmp_path / "plan.json", log=None)
    assert (settings.steps, settings.frames, settings.height, settings.width, settings.guidance_scale) == \
        (None, None, None, None, None)
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("progress", ["no", 0, None], ids=["str-no", "int-0", "none"])
def test_progress_must_be_true_or_false(tmp_path, monkeypatch, progress):
    """A string such as "no" is truthy: the progress bar was drawn, without a word."""
    _stop_at_the_loader(monkeypatch)
    settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25, steps=2)
    with pytest.raises(TypeError, match=r"progress=.* is invalid: expected True or False"):
        calibrate(settings, tmp_path / "plan.json", progress=progress, log=None)


def test_the_public_names_stay_importable():
    assert dit_accel.SparsePlan is SparsePlan


# ------------------------------------------------------------------ prompts the text encoder cannot tell apart
class _Tokenizer:
    """Whitespace words as token ids; one special token (T5's end of text)."""

    model_max_length = 512

    def __call__(self, text, add_special_tokens=False):
        return types.SimpleNamespace(input_ids=[hash(w) % 1000 for w in text.split()])

    def num_special_tokens_to_add(self):
        return 1


class _Pipe:
    """A pipeline whose text encoder reads ``max_sequence_length`` tokens (Wan's T5: 15 words and the end token
    at tiny-shapes' 16)."""

    def __init__(self):
        self.tokenizer = _Tokenizer()
        self.transformer = None

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt, generator=None, output_type=None, callback_on_step_end=None, num_inference_steps=2,
                 num_frames=None, height=None, width=None, guidance_scale=None, max_sequence_length=16):
        raise AssertionError("the dense run started: the prompts were not checked")


LONG = "a red circle moving right on a plain black background in a short clip with soft light and"


def test_prompts_the_text_encoder_reads_as_one_are_refused_before_the_dense_run(tmp_path, monkeypatch):
    """Two prompts that differ only past the tokens the pipeline encodes are one video: before, one sat in the
    search set and the other in the "held-out" validation set, which then validated the plan on a search video."""
    monkeypatch.setattr(loading, "load_pipeline", lambda model, **kw: _Pipe())
    prompts = [LONG + " a tree", LONG + " a house", "a blue square moving left"]
    settings = CalibrationSettings(model="tiny-shapes", prompts=prompts, min_psnr=25, steps=2, validate=1)
    with pytest.raises(ValueError) as err:
        calibrate(settings, tmp_path / "plan.json", log=None)
    message = str(err.value)
    assert f"prompts {prompts[0]!r} and {prompts[1]!r} are the same in their first 15 tokens" in message
    assert "max_sequence_length 16" in message and "raise --max-sequence-length" in message
    assert not (tmp_path / "plan.json").exists()


def test_prompts_that_differ_within_the_encoded_tokens_pass():
    from dit_accel.calibrate.generation import encoded_repeat

    prompts = [LONG, "a blue square moving left", "a red circle moving left"]
    assert encoded_repeat(_Pipe(), prompts, {"max_sequence_length": 16}) is None
    # a longer text length reads the words where the two differ
    assert encoded_repeat(_Pipe(), [LONG + " a tree", LONG + " a house"], {"max_sequence_length": 64}) is None
    assert encoded_repeat(_Pipe(), [LONG + " a tree", LONG + " a house"], {"max_sequence_length": 16}) is not None


# ------------------------------------------------------------------ ~ in the output paths
class _Stop(Exception):
    pass


def _stop_at_the_outputs(monkeypatch):
    """Records where calibrate() would write the plan and the report, then stops (nothing loads)."""
    from dit_accel.calibrate import run

    seen = {}

    def recover(out, report_dir):
        seen.update(out=out, report_dir=report_dir)
        raise _Stop

    monkeypatch.setattr(run, "recover_outputs", recover)
    return seen


def test_a_plan_path_under_home_is_written_under_home_by_calibrate(tmp_path, monkeypatch):
    """``--out=~/plans/plan.json`` (no shell to expand it, or the Python API) wrote the plan and its report into a
    folder named ``~`` in the working folder, where ``--plan ~/plans/plan.json`` did not look."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    seen = _stop_at_the_outputs(monkeypatch)
    settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25, steps=2)
    with pytest.raises(_Stop):
        calibrate(settings, "~/plans/plan.json", report_dir="~/reports", log=None)
    assert seen == {"out": home / "plans" / "plan.json", "report_dir": home / "reports"}
    with pytest.raises(_Stop):
        calibrate(settings, "~/plans/plan.json", log=None)
    assert seen["report_dir"] == home / "plans" / "plan_report"
    assert not (work / "~").exists()


def test_the_cli_reads_home_in_out_prompts_and_report_dir(tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / "prompts.txt").write_text("a red circle moving right\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    seen = _stop_at_the_outputs(monkeypatch)
    with pytest.raises(_Stop):
        main(["calibrate", "--model", "tiny-shapes", "--prompts=~/prompts.txt", "--out=~/plan.json",
              "--report-dir=~/report", "--min-psnr", "25", "--steps", "2", "--no-progress"])
    assert seen == {"out": home / "plan.json", "report_dir": home / "report"}
    assert not (work / "~").exists()


# ------------------------------------------------------------------ a hand-edited plan's trailing comma
@pytest.mark.parametrize("edit, hint", [
    (('"window": [1, 1, 1]', '"window": [1, 1, 1,]'), "a comma after the last entry at line 1, column "),
    (('"num_heads": 4,', '"num_heads": 4,,'), None),  # a doubled comma: the parser's words stand
], ids=["in-a-list", "doubled"])
def test_a_comma_after_the_last_entry_is_named(tmp_path, edit, hint):
    path = tmp_path / "plan.json"
    text = json.dumps(_calibrated())  # one line
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ValueError) as err:
        SparsePlan.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: is not valid JSON")
    if hint:
        assert hint in message and "before ']' (JSON allows none there): remove it" in message
    else:
        assert "a comma after the last entry" not in message and "Expecting property name" in message


def test_a_trailing_comma_before_the_closing_brace_names_its_line(tmp_path):
    path = SparsePlan.from_json(_calibrated()).save(tmp_path / "plan.json")
    lines = path.read_text().rstrip().splitlines()
    lines[-2] += ","  # the last entry of the plan object, then "}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"a comma after the last entry at line {len(lines) - 1}, column "
                                         rf"{len(lines[-2])}, before '}}' \(JSON allows none there\): remove it"):
        SparsePlan.load(path)
