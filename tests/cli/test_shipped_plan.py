"""The calibrated plans shipped for the shapes models: calibrate's own output for the documented command, validated
on prompts its search never saw, better there than uniform SLA at no less modelled cost, and generate's default
(test_main_job.py runs it)."""
import json
import shlex
from pathlib import Path

import pytest

import dit_accel
from dit_accel.models.tiny_shapes import SHAPES_MODELS, TINY_SHAPES_PLAN
from dit_accel.plans.sparse_plan import prompts_hash

REPO = Path(__file__).resolve().parents[2]
WITH_PLANS = [name for name, m in SHAPES_MODELS.items() if m.plan is not None]


def _command_args(name) -> dict:
    words = shlex.split(SHAPES_MODELS[name].plan_command)
    assert words[:2] == ["dit-accel", "calibrate"]
    return {words[i]: words[i + 1] for i in range(2, len(words), 2)}  # flags with one value each


def _documented(command: str) -> bool:
    """The command appears verbatim in README.md or docs/models.md (lines continued with a backslash joined)."""
    return any(command in (REPO / f).read_text().replace("\\\n    ", "") for f in ("README.md", "docs/models.md"))


@pytest.mark.parametrize("name", WITH_PLANS)
def test_the_shipped_plan_is_what_the_documented_command_writes(name):
    entry = SHAPES_MODELS[name]
    plan = dit_accel.SparsePlan.load(entry.plan)
    args = _command_args(name)
    assert args["--model"] == name and Path(args["--out"]) == entry.plan.relative_to(REPO)
    prov = plan.provenance
    lines = (REPO / args["--prompts"]).read_text().splitlines()
    prompts = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    assert prov["prompts_sha256"] == prompts_hash(prompts) and prov["model_id"] == name
    assert prov["budget"]["min_psnr"] == float(args["--min-psnr"])
    assert prov["model_class"] == "WanTransformer3DModel" and prov["grids"] == [list(entry.grid)]
    assert prov["steps"] == entry.defaults["num_inference_steps"]
    assert _documented(entry.plan_command), entry.plan_command
    # the report folder the command names holds this plan's report
    report = json.loads((REPO / args["--report-dir"] / "calibration.json").read_text())
    assert report["plan_sha256"] == plan.content_hash()


@pytest.mark.parametrize("name", WITH_PLANS)
def test_the_shipped_plan_beat_uniform_sla_at_no_less_cost_on_prompts_the_search_never_saw(name):
    entry = SHAPES_MODELS[name]
    quality = dit_accel.SparsePlan.load(entry.plan).provenance["quality"]
    val, base = quality["validation"], quality["baseline"]
    args = _command_args(name)
    min_psnr, rule = float(args["--min-psnr"]), args.get("--budget-on", "worst")
    budget = dit_accel.SparsePlan.load(entry.plan).provenance["budget"]
    assert budget["min_psnr_on"] == ("the mean" if rule == "mean" else "every calibration video")
    assert val["psnr" if rule == "mean" else "psnr_worst"] >= min_psnr and val["videos"] >= 4
    assert entry.prompt in quality["validation_prompts"]  # the README prompt was held out of the search
    assert base["label"].startswith("uniform sla") and base["modelled_ms"] <= quality["dense_modelled_ms"]
    assert quality["modelled_ms"] <= base["modelled_ms"] * (1 + 1e-9)  # the plan at equal or lower modelled cost
    assert val["psnr"] > base["psnr"] and val["psnr_worst"] > base["psnr_worst"]
    assert quality["modelled_ms"] < quality["dense_modelled_ms"]


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


@pytest.mark.parametrize("name", [name for name, m in SHAPES_MODELS.items() if m.plan_weights is not None])
def test_the_shipped_lora_was_trained_under_the_shipped_plan(name):
    """A model's LoRA folder (generate loads it with the plan) is a `finetune --plan` folder for this model, its
    grid and call, trained under the shipped plan's content (the hash apply(..., weights=) checks)."""
    from dit_accel.checkpoints.finetuned import load_method, read_weights_info

    entry = SHAPES_MODELS[name]
    plan = dit_accel.SparsePlan.load(entry.plan)
    assert load_method(entry.plan_weights).content_hash() == plan.content_hash()
    info = read_weights_info(entry.plan_weights)
    assert info["model"] == name and info["token_grid"] == list(entry.grid)
    assert (info["frames"], info["height"], info["width"]) == tuple(entry.defaults[k] for k in ("num_frames", "height",
                                                                                                 "width"))
    run = json.loads((entry.plan_weights / "finetune_run.json").read_text())
    assert (run["model"], run["mode"], run["plan"]) == (name, "distill", plan.content_hash())
