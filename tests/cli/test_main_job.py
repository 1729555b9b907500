"""README's main job (`dit-accel generate` with no arguments): the default shapes model with its shipped plan beside
a dense run of the same call. Every shipped plan runs on its model's own token layout, what the job prints is what
it measured (the sidecar), and a plan's quality line says how its cost was priced."""
import contextlib
import io
import json
import math
import os
import re

import pytest

import dit_accel
from dit_accel._util import format_time
from dit_accel.cli.generate_args import DEFAULT_MODEL
from dit_accel.cli.generate_report import _plan_quality_lines, _summary_lines
from dit_accel.cli.main import main
from dit_accel.models.tiny_shapes import SHAPES_MODELS, shapes_model

MODEL = shapes_model(DEFAULT_MODEL)
WITH_PLANS = [name for name, m in SHAPES_MODELS.items() if m.plan is not None]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    folder, out, cwd = tmp_path_factory.mktemp("main_job"), io.StringIO(), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out):
            code = main(["generate"])
    finally:
        os.chdir(cwd)
    assert code == 0, out.getvalue()
    sidecar = json.loads((folder / "outputs" / f"{DEFAULT_MODEL}-plan.mp4.json").read_text())
    return out.getvalue(), sidecar


@pytest.mark.parametrize("name", WITH_PLANS)
def test_the_shipped_plan_fits_the_shipped_model(name):
    """Calibrated for this model's class, layers, heads, token grid and call; it runs on the model's own layout
    at the last step (where a plan's sparse phases are)."""
    import torch
    from diffusers import WanTransformer3DModel

    from dit_accel.models.tiny import tiny_transformer_inputs

    entry = SHAPES_MODELS[name]
    plan = dit_accel.SparsePlan.load(entry.plan)
    prov = plan.provenance
    config = json.loads((entry.folder / "transformer" / "config.json").read_text())
    assert prov["model_id"] == name and prov["model_class"] == config["_class_name"]
    assert (plan.num_layers, plan.num_heads) == (config["num_layers"], config["num_attention_heads"])
    assert prov["grids"] == [list(entry.grid)] and prov["steps"] == entry.defaults["num_inference_steps"]
    model = WanTransformer3DModel.from_pretrained(entry.folder / "transformer").eval()
    inputs = tiny_transformer_inputs("wan", model, grid=entry.grid)
    steps = entry.defaults["num_inference_steps"]
    with dit_accel.apply(model, plan) as handle, torch.no_grad():
        handle.set_step(steps - 1, steps)
        model(**inputs)
        assert [tuple(g) for _, g in handle.plans] == [entry.grid]


def test_the_printed_lines_are_the_measured_stats(main_job):
    out, meta = main_job
    t, cmp = meta["timing"], meta["compare_dense"]
    assert f"token grid {MODEL.grid} = {math.prod(MODEL.grid):,} video tokens" in out
    assert (f"self-attention {format_time(t['attention_s'])} vs dense {format_time(cmp['dense_attention_s'])} "
            f"({cmp['attention_speedup']:.2f}x)") in out, out
    assert (f"transformer {format_time(t['transformer_s'])} vs dense {format_time(cmp['dense_transformer_s'])} "
            f"({cmp['transformer_speedup']:.2f}x); PSNR vs dense {cmp['psnr_db']:.1f} dB") in out, out
    # times to 3 significant figures: no time printed with more digits than it has
    assert not re.search(r"\d\.\d{4,} m?s", out), out
    assert cmp["attention_speedup"] == pytest.approx(cmp["dense_attention_s"] / t["attention_s"])
    assert cmp["transformer_speedup"] == pytest.approx(cmp["dense_transformer_s"] / t["transformer_s"])
    assert meta["settings"]["frames"] == MODEL.defaults["num_frames"]
    plan = dit_accel.SparsePlan.load(MODEL.plan)
    assert meta["method"]["method"] == "plan" and meta["method"]["plan"] == plan.to_json()
    density = re.search(r"its sparse calls visit ([0-9.]+) of the video attention blocks", out)
    assert density and abs(float(density.group(1)) - meta["density"]["mean"]) <= 5e-4 + 1e-12  # printed to 3 places
    # the two mean densities say what each is: over the sparse calls, and over every call with dense ones as 1
    assert f"mean density of the sparse attention calls {meta['density']['mean']:.3f}" in out
    s = meta["summary"]
    with_dense = (s["sparse_calls"] * meta["density"]["mean"] + s["dense_calls"]) / (s["sparse_calls"] + s["dense_calls"])
    assert f"; {with_dense:.3f} with its {s['dense_calls']} dense calls counted as 1" in out
    assert f"mean density {plan.profile()['mean_density']:.3f} over every step, layer and head (dense ones as 1)" in out


def test_generate_runs_the_shipped_plan_by_default_and_passes_the_readme_prompt(main_job):
    out, meta = main_job
    plan = dit_accel.SparsePlan.load(MODEL.plan)
    assert meta["method"]["method"] == "plan" and meta["method"]["plan"] == plan.to_json()
    lora = " and its sparse-aware LoRA (finetune --plan)" if MODEL.plan_weights is not None else ""
    assert meta["method_choice"] == f"{MODEL.owner()} default: the calibrated plan shipped with dit_accel{lora}"
    assert meta["schedule"].get("weights") == (str(MODEL.plan_weights) if MODEL.plan_weights else None)
    assert meta["plan_quality"] == plan.provenance["quality"]
    quality = meta["quality"]
    assert quality["prompt"] == MODEL.prompt
    assert all(quality["method"][k] for k in ("colour_ok", "shape_ok", "motion_ok", "consistent")), out  # 4/4
    for needle in (f"{MODEL.owner()} default: the calibrated plan shipped with dit_accel{lora}:", "calibrated: ",
                   "validation videos (prompts the search never saw)", "uniform SLA at no less cost",
                   "[4/4; dense 4/4]"):
        assert needle in out, out


@pytest.mark.parametrize("priced, words", [("modelled", "modelled GPU attention 2.00 ms/sample"),
                                           ("timed on cpu", "attention timed on cpu 2.00 ms/sample")])
def test_the_plan_quality_line_says_how_the_cost_was_priced(priced, words):
    """calibrate --costs measured prices candidates by timing them on the calibration device; the plan's line must
    not call that a modelled GPU time. Plans written before the field existed read as modelled."""
    quality = {"plan": "tile w1x3x3", "modelled_ms": 2.0, "dense_modelled_ms": 5.0, "priced": priced}
    assert _plan_quality_lines(quality)[0] == f"calibrated: tile w1x3x3; {words} vs dense 5.00 ms (2.50x)"
    if priced == "modelled":
        del quality["priced"]
        assert _plan_quality_lines(quality)[0] == f"calibrated: tile w1x3x3; {words} vs dense 5.00 ms (2.50x)"


@pytest.mark.parametrize("ran, said", [(["dense (sparse modelled slower)"], "its"),
                                       (["dense (sparse modelled slower)", "triton"], "some of its"),
                                       (["torch"], None)])
def test_calls_auto_ran_dense_are_said(main_job, ran, said):
    """The H200 ran the main job in bf16 with every sparse call dense (the cost model has the kernel slower at
    2,304 tokens and 4 heads) and printed "PSNR vs dense 100.0 dB" with no word why."""
    lines = [line for line in _summary_lines({**main_job[1], "backends_used": ran}) if "as dense attention" in line]
    if said is None:
        assert lines == []
    else:
        assert lines == [f"note: backend auto ran {said} sparse calls as dense attention: dense measured faster at "
                         "this size on this GPU (the cost model says so where the autotuner is off; --backend triton "
                         "runs the kernels)"]


@pytest.mark.parametrize("device, ran, said", [("cuda", ["torch"], "its"), ("cuda:0", ["torch", "triton"], "some of its"),
                                               ("cuda", ["triton"], None), ("cpu", ["torch"], None)])
def test_calls_auto_ran_on_the_twin_on_a_gpu_are_said(main_job, device, ran, said):
    """The H200 ran the main job's plan (Tile on 144-token frames, a block size the Triton kernels do not take) with
    the PyTorch twin, and printed 1.01x with no word why."""
    record = {**main_job[1], "backends_used": ran, "settings": {**main_job[1]["settings"], "device": device}}
    lines = [line for line in _summary_lines(record) if "PyTorch twin" in line]
    if said is None:
        assert lines == []
    else:
        assert lines == [f"note: backend auto ran {said} sparse calls on the GPU with the PyTorch twin, not the "
                         "Triton kernels: their layout is not one the kernels take (--backend triton says why)"]
