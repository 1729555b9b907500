"""A plan or a weights folder made for one model, used on another: tiny-shapes-63's plan on tiny-shapes-long runs
with a warning and no borrowed quality in the sidecar; its LoRA is refused in one line."""

import json
import types

from dit_accel.cli.generate import _plan_model_note
from dit_accel.cli.main import main
from dit_accel.models.tiny_shapes import shapes_model
from dit_accel.plans.sparse_plan import SparsePlan

PLAN_63 = shapes_model("tiny-shapes-63").plan
LORA_63 = shapes_model("tiny-shapes-63").plan_weights


def test_a_lora_trained_on_another_model_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "tiny-shapes-long", "--weights", str(LORA_63), "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on tiny-shapes-63" in err and "--model tiny-shapes-long" in err
    assert not out.exists()


def test_another_models_plan_warns_and_its_quality_is_not_reported_as_this_runs(tmp_path, capsys):
    """As tiny-shapes-63's plan on tiny-shapes-long at 63 frames, at the cheapest call of a shipped plan:
    tiny-shapes' (7 frames) on tiny-shapes-long, whose token grid at 7 frames is the plan's."""
    out = tmp_path / "v.mp4"
    plan = shapes_model("tiny-shapes").plan
    assert SparsePlan.load(plan).provenance.get("quality")  # the quality the sidecar must not borrow
    assert main(["generate", "--model", "tiny-shapes-long", "--plan", str(plan), "--frames", "7", "--out",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: --plan" in err and "calibrated on tiny-shapes, not on tiny-shapes-long" in err
    record = json.loads((tmp_path / "v.mp4.json").read_text())
    assert record["plan_quality"] is None and "calibrated on tiny-shapes," in record["plan_model_note"]
    assert any("calibrated on tiny-shapes," in w for w in record["warnings"])


def test_a_plan_of_the_same_model_has_no_note():
    plan = SparsePlan.load(PLAN_63)
    for model in ("tiny-shapes-63", str(shapes_model("tiny-shapes-63").folder)):
        args = types.SimpleNamespace(model=model, plan=str(PLAN_63), quiet=True)
        assert _plan_model_note(args, plan) is None, model
    args = types.SimpleNamespace(model="tiny-shapes", plan=str(PLAN_63), quiet=True)
    assert "calibrated on tiny-shapes-63" in _plan_model_note(args, plan)
