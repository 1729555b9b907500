"""``finetune --plan``: LoRA (+ SLA projections) under a calibrated SparsePlan, on tiny-wan (CPU, a few steps)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dit_accel
from dit_accel import SparsePlan
from dit_accel.plans.per_head import PerHead
from dit_accel.plans.sparse_plan import Phase
from dit_accel.training import FinetuneConfig, finetune, load_method
from dit_accel.training.finetune import _accelerator, _Trainer
from dit_accel.checkpoints.finetuned import METHOD_FILE, SLA_FILE
from tests.training import PROMPTS

# Token grid (3, 4, 8) = 96 tokens (two 64-key blocks), as in test_finetune.py.
SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)
GRID = [3, 4, 8]
# tiny-wan's FlowMatchEulerDiscreteScheduler at 6 steps (what calibrate records as the plan's timesteps)
TIMESTEPS = [1000.0, 923.3425, 818.9233, 668.3267, 432.2251, 8.9286]


def _plan(**provenance) -> SparsePlan:
    """Steps 0-1 dense; from step 2, layer 0 runs SLA on head 0 and dense on head 1, layer 1 GNA on both."""
    sparse = {0: PerHead((dit_accel.SLA(topk=0.5), dit_accel.Dense())), 1: dit_accel.GNA(kernel_size=(3, 3, 3))}
    prov = dict(model_class="WanTransformer3DModel", model_id="tiny-wan", grids=[GRID], steps=6,
                timesteps=TIMESTEPS, call={"num_frames": 9, "height": 64, "width": 128})
    prov.update(provenance)
    return SparsePlan((Phase(0, 2), Phase(2, None, sparse)), num_layers=2, num_heads=2, provenance=prov)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _plan().save(root / "plan.json")
    return root


def _config(out, files, **kw):
    base = dict(model="tiny-wan", plan=str(files / "plan.json"), output=str(out), prompts=str(files / "prompts.txt"),
                steps=2, lr=2e-3, rank=2, seed=0, progress=False, eval_batches=0, gradient_accumulation_steps=1,
                **SHAPE)
    base.update(kw)
    return FinetuneConfig(**base)


def _inputs(transformer, timesteps, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(timesteps), 4, 3, 8, 16, generator=g)
    emb = torch.randn(len(timesteps), 16, transformer.config.text_dim, generator=g)
    return x, torch.tensor(timesteps), {"encoder_hidden_states": emb}


def _call(transformer, x, t, text):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, return_dict=False, **text)[0]


def test_the_student_runs_the_plan_at_the_step_of_its_noise_level(files, tmp_path):
    """The trainer's student forward (before any step: LoRA and SLA projections are zero) equals
    apply(plan) outside training at the plan's step nearest the sample's timestep; a batch whose
    samples fall on different steps equals each sample alone."""
    config = _config(tmp_path / "out", files)
    trainer = _Trainer(config, _accelerator(config), PROMPTS, None)
    transformer = trainer.transformer
    # 990 -> step 0 (dense phase), 700 -> step 3, 450 -> step 4, 20 -> step 5 (sparse phase)
    timesteps = [990.0, 700.0, 450.0, 20.0]
    assert trainer.plan_steps(torch.tensor(timesteps)) == [0, 3, 4, 5]
    x, t, text = _inputs(transformer, timesteps)
    with torch.no_grad():
        student = trainer.student(x, t, text)
    # the layers that run SLA get a projection, the GNA-only layer none; LoRA on both layers
    assert list(trainer.projections) == [trainer.handle.layers[0]]
    lora_layers = {k.split(".lora_")[0] for k in trainer.params if "lora_" in k}
    assert any("blocks.0." in k for k in lora_layers) and any("blocks.1." in k for k in lora_layers)
    trainer.handle.remove()
    with dit_accel.apply(transformer, _plan()) as handle:
        for i, step in enumerate([0, 3, 4, 5]):
            handle.set_step(step, 6)
            one = _call(transformer, x[i:i + 1], t[i:i + 1], {"encoder_hidden_states": text["encoder_hidden_states"][i:i + 1]})
            torch.testing.assert_close(student[i:i + 1], one, rtol=1e-4, atol=1e-5)
    dense = _call(transformer, x, t, text)
    torch.testing.assert_close(student[:1], dense[:1], rtol=1e-4, atol=1e-5)  # step 0 is dense in the plan
    assert (student[1:] - dense[1:]).abs().max() > 1e-3  # the sparse steps are not dense


def test_finetune_under_a_plan_writes_a_folder_that_gives_the_plan_back(files, tmp_path):
    out = tmp_path / "ft"
    result = finetune(_config(out, files))
    info = json.loads((out / METHOD_FILE).read_text())
    plan = _plan()
    assert info["method"]["method"] == "plan" and info["plan_sha256"] == plan.content_hash()
    saved = load_method(out)
    assert isinstance(saved, SparsePlan) and saved.content_hash() == plan.content_hash()
    # SLA projections only for layer 0 (the one with an SLA head), and they trained
    sla = load_file(str(out / SLA_FILE))
    assert sorted({k.rsplit(".", 1)[0] for k in sla}) == [result["handle"].layers[0]]
    assert any(v.abs().max() > 0 for v in sla.values())
    # the trained student == a fresh pipeline with apply(pipe, load_method(DIR), weights=DIR), at a sparse step
    trained = result["pipe"].transformer
    x, t, text = _inputs(trained, [450.0])
    result["handle"].set_step(4, 6)
    before = _call(trained, x, t, text)
    result["handle"].remove()
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-wan", device="cpu", dtype=torch.float32, seed=0)
    with dit_accel.apply(pipe.transformer, saved, weights=str(out)) as handle:
        handle.set_step(4, 6)
        torch.testing.assert_close(_call(pipe.transformer, x, t, text), before, rtol=1e-4, atol=1e-5)
    # the same plan with other provenance loads too (the content hash decides); another plan or a method does not
    with dit_accel.apply(pipe.transformer, _plan(model_id="elsewhere", date="x"), weights=str(out)):
        pass
    other = SparsePlan((Phase(0, None, {1: dit_accel.GNA(kernel_size=(3, 3, 3))}),), 2, 2)
    for wrong, expect in ((other, "trained under the calibrated plan .* runs another plan"),
                          (dit_accel.SLA(topk=0.5), "trained under the calibrated plan")):
        with pytest.raises(ValueError, match=expect):
            dit_accel.apply(pipe.transformer, wrong, weights=str(out))
    # --resume refuses a different plan (content hash), accepts the same one
    (files / "other.json").write_text(json.dumps(other.to_json()))
    with pytest.raises(ValueError, match="--resume: .*different run.*plan's content changed"):
        finetune(_config(out, files, plan=str(files / "other.json"), resume=True, steps=3))
    assert finetune(_config(out, files, resume=True, steps=3))["resumed_from"] == 2


@pytest.mark.parametrize("case", ["model-class", "grid", "with-method", "dense-layers", "changes-per-step-without-steps"])
def test_a_plan_that_does_not_fit_is_refused_before_training(case, files, tmp_path):
    kw, expect = {}, None
    if case == "model-class":
        _plan(model_class="FluxTransformer2DModel", model_id="tiny-flux").save(files / "flux.json")
        kw, expect = dict(plan=str(files / "flux.json")), "calibrated for a FluxTransformer2DModel.*WanTransformer3DModel"
    elif case == "grid":
        kw, expect = dict(frames=5), r"calibrated on token grid \(3, 4, 8\) \(--frames 9 --height 64 --width 128\)"
    elif case == "with-method":
        kw, expect = dict(method=dit_accel.SLA(topk=0.5)), "--plan and --method exclude each other"
    elif case == "dense-layers":
        kw, expect = dict(dense_layers=[0]), "--dense-layers does not combine with --plan"
    elif case == "changes-per-step-without-steps":  # no way to map a noise level to one of its steps
        _plan(steps=None, timesteps=None).save(files / "nosteps.json")
        kw, expect = dict(plan=str(files / "nosteps.json")), "changes per denoising step but does not say"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=expect):
        finetune(_config(out, files, **kw))
    assert not out.exists()  # a rejected run writes nothing


def test_cli_plan_excludes_method_and_takes_the_plans_size(files, tmp_path, capsys):
    from dit_accel.cli.finetune import main

    base = ["--model", "tiny-wan", "--plan", str(files / "plan.json"), "--prompts", str(files / "prompts.txt"),
            "--output", str(tmp_path / "out"), "--steps", "1"]
    assert main(base + ["--method", "sla"]) == 2
    assert "--plan and --method exclude each other" in capsys.readouterr().err
    assert main(base + ["--topk", "0.5"]) == 2
    assert "--plan and --topk exclude each other" in capsys.readouterr().err
    import argparse

    from dit_accel.cli.finetune import _add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    config = config_from_args(parser.parse_args(base))
    assert (config.frames, config.height, config.width) == (9, 64, 128) and config.method is None


def test_generate_runs_the_plan_of_a_weights_folder(files, tmp_path, capsys):
    from dit_accel.cli.main import main

    out = tmp_path / "ft"
    assert main(["finetune", "--model", "tiny-wan", "--plan", str(files / "plan.json"), "--prompts",
                 str(files / "prompts.txt"), "--output", str(out), "--steps", "1", "--rank", "2",
                 "--max-sequence-length", "8", "--eval-batches", "0", "--no-progress"]) == 0
    common = ["generate", "--model", "tiny-wan", "--weights", str(out), "--frames", "9", "--height", "64", "--width",
              "128", "--steps", "6", "--quiet"]
    video = tmp_path / "v.gif"
    assert main(common + ["--out", str(video)]) == 0, capsys.readouterr().err
    meta = json.loads(Path(str(video) + ".json").read_text())
    assert meta["method"]["method"] == "plan"
    assert SparsePlan.from_json(meta["method"]["plan"]).content_hash() == _plan().content_hash()
    assert meta["density"]["mean"] < 1.0  # the plan's sparse steps ran
    assert main(common + ["--method", "sla", "--out", str(tmp_path / "x.gif")]) == 2
    assert "trained under a calibrated plan" in capsys.readouterr().err
