"""The calibrated plan shipped for tiny-shapes: calibrate's own output for the documented command, validated on
prompts its search never saw, better there than uniform SLA at no less modelled cost, and generate's default."""
import json
import shlex
from pathlib import Path

import pytest

import dit_accel
from dit_accel.cli.main import main
from dit_accel.models.tiny_shapes import (TINY_SHAPES_DEFAULTS, TINY_SHAPES_GRID, TINY_SHAPES_PLAN,
                                          TINY_SHAPES_PLAN_COMMAND, TINY_SHAPES_PLAN_PROMPTS, TINY_SHAPES_PROMPT)
from dit_accel.sparse_plan import prompts_hash

REPO = Path(__file__).resolve().parents[2]


def _command_args() -> dict:
    words = shlex.split(TINY_SHAPES_PLAN_COMMAND)
    assert words[:2] == ["dit-accel", "calibrate"]
    return {words[i]: words[i + 1] for i in range(2, len(words), 2)}


def test_the_shipped_plan_is_what_the_documented_command_writes():
    plan = dit_accel.SparsePlan.load(TINY_SHAPES_PLAN)
    args = _command_args()
    assert Path(args["--out"]) == TINY_SHAPES_PLAN.relative_to(REPO)
    assert Path(args["--prompts"]) == TINY_SHAPES_PLAN_PROMPTS.relative_to(REPO)
    prov = plan.provenance
    lines = TINY_SHAPES_PLAN_PROMPTS.read_text().splitlines()
    prompts = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    assert prov["prompts_sha256"] == prompts_hash(prompts) and prov["model_id"] == "tiny-shapes"
    assert prov["budget"]["min_psnr"] == float(args["--min-psnr"])
    assert prov["model_class"] == "WanTransformer3DModel" and prov["grids"] == [list(TINY_SHAPES_GRID)]
    assert prov["steps"] == TINY_SHAPES_DEFAULTS["num_inference_steps"]
    assert TINY_SHAPES_PLAN_COMMAND in (REPO / "README.md").read_text().replace("\\\n    ", "")
    # the report folder the command names holds this plan's report
    report = json.loads((REPO / args["--report-dir"] / "calibration.json").read_text())
    assert report["plan_sha256"] == plan.content_hash()


def test_the_shipped_plan_beat_uniform_sla_at_no_less_cost_on_prompts_the_search_never_saw():
    quality = dit_accel.SparsePlan.load(TINY_SHAPES_PLAN).provenance["quality"]
    val, base = quality["validation"], quality["baseline"]
    min_psnr = float(_command_args()["--min-psnr"])
    assert val["psnr_worst"] >= min_psnr and val["videos"] >= 4
    assert TINY_SHAPES_PROMPT in quality["validation_prompts"]  # the README prompt was held out of the search
    assert base["label"].startswith("uniform sla") and base["modelled_ms"] <= quality["dense_modelled_ms"]
    assert quality["modelled_ms"] <= base["modelled_ms"] * (1 + 1e-9)  # the plan at equal or lower modelled cost
    assert val["psnr"] > base["psnr"] and val["psnr_worst"] > base["psnr_worst"]
    assert quality["modelled_ms"] < quality["dense_modelled_ms"]


def test_generate_runs_the_shipped_plan_by_default_and_passes_the_readme_prompt(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "outputs" / "tiny-shapes-plan.mp4.json").read_text())
    plan = dit_accel.SparsePlan.load(TINY_SHAPES_PLAN)
    assert meta["method"]["method"] == "plan" and meta["method"]["plan"] == plan.to_json()
    assert meta["method_choice"] == "tiny-shapes' default: the calibrated plan shipped with dit_accel"
    assert meta["plan_quality"] == plan.provenance["quality"]
    quality = meta["quality"]
    assert quality["prompt"] == TINY_SHAPES_PROMPT
    assert all(quality["method"][k] for k in ("colour_ok", "shape_ok", "motion_ok", "consistent")), out  # 4/4
    for needle in ("tiny-shapes' default: the calibrated plan shipped with dit_accel:", "calibrated: ",
                   "modelled GPU attention", "validation videos (prompts the search never saw)",
                   "uniform SLA at no less cost", "[4/4; dense 4/4]"):
        assert needle in out, out


@pytest.mark.parametrize("argv", [["--method", "sla"], ["--dense-steps", "1"], ["--no-model-defaults"],
                                  ["--height", "64"]])
def test_anything_that_picks_a_method_or_another_call_leaves_the_shipped_plan(argv):
    import argparse

    from dit_accel.cli.generate import _default_plan

    args = argparse.Namespace(model="tiny-shapes", no_model_defaults=False, method=None, plan=None, weights=None,
                              steps=None, frames=None, height=None, width=None)
    from dit_accel.cli.options import _SCHEDULE_FLAGS, _dest, method_flags

    for flag in list(method_flags()) + list(_SCHEDULE_FLAGS):
        setattr(args, _dest(flag), None)
    _default_plan(args)
    assert args.plan == str(TINY_SHAPES_PLAN)
    parsed = {"--method": ("method", "sla"), "--dense-steps": ("dense_steps", 1),
              "--no-model-defaults": ("no_model_defaults", True), "--height": ("height", 64)}
    name, value = parsed[argv[0]]
    setattr(args, name, value)
    args.plan = None
    _default_plan(args)
    assert args.plan is None and (args._default_note is not None) == (argv[0] == "--height")
