"""Fine-tuning: what a failed run leaves of a pipeline passed in (its dtype, its dit_accel handle), and more (round 11
of the input audit)."""

import warnings

import pytest
import torch

import dit_accel
from dit_accel._util import DitAccelWarning
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training import loop
from tests.training import probe

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)  # token grid (3, 4, 8)


def _config(output, prompts, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output), prompts=str(prompts),
                steps=1, lr=1e-3, rank=2, seed=0, progress=False, eval_batches=1, gradient_accumulation_steps=1,
                **SHAPE)
    return FinetuneConfig(**{**base, **kw})


def _tensors(pipe):
    """Every parameter and buffer of every module of the pipeline, by name: (dtype, a copy)."""
    out = {}
    for key, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for name, t in [*component.named_parameters(), *component.named_buffers()]:
                out[f"{key}.{name}"] = (t.dtype, t.detach().clone())
    return out


def _assert_bit_identical(pipe, before):
    after = _tensors(pipe)
    assert sorted(after) == sorted(before)
    changed = [k for k, (dtype, t) in before.items() if after[k][0] != dtype or not torch.equal(after[k][1], t)]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"


def _fail_in_training(monkeypatch):
    def failing(self, i, first):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loop._Trainer, "step", failing)


def _failing(when: str, monkeypatch, **kw):
    """``(finetune keywords, the error they raise)``: a run refused by its checks, or one that fails in training."""
    if when == "refused":
        return {**kw, "target_modules": ("nothing_here",)}, ValueError
    _fail_in_training(monkeypatch)
    return kw, RuntimeError


@pytest.mark.parametrize("when", ["refused", "in-training"])
def test_a_failed_run_leaves_the_pipeline_it_cast_bit_identical(when, prompts_file, tmp_path, monkeypatch):
    """Before: finetune(model=pipe, mixed_precision="bf16") cast the caller's pipeline to bf16 before its checks, and a
    run that failed (a --target-modules typo, an error in training) left it in bf16: its fp32 weights were lost (a cast
    back gives other values)."""
    pipe = build_tiny_pipeline("tiny-wan")
    before = _tensors(pipe)
    assert {dtype for dtype, _ in before.values() if dtype.is_floating_point} == {torch.float32}
    kw, error = _failing(when, monkeypatch, model=pipe, mixed_precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (Diffusers: modules that should be kept in float32)
        with pytest.raises(error):
            finetune(_config(tmp_path / "out", prompts_file, **kw))
    _assert_bit_identical(pipe, before)
    assert not (tmp_path / "out").exists()


def test_a_run_that_succeeds_keeps_the_cast(prompts_file, tmp_path):
    """The other side: a run that succeeds leaves the trained student in the run's dtype (as documented)."""
    pipe = build_tiny_pipeline("tiny-wan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = finetune(_config(tmp_path / "out", prompts_file, model=pipe, mixed_precision="bf16", eval_batches=0))
    assert pipe.transformer.patch_embedding.weight.dtype == torch.bfloat16
    assert result["handle"].removed is False


def _state(transformer):
    return {k: type(v).__name__ for k, v in transformer.attn_processors.items()}


@pytest.mark.parametrize("when", ["refused", "in-training"])
def test_a_failed_run_gives_back_the_handle_the_pipeline_held(when, prompts_file, tmp_path, monkeypatch):
    """Before: finetune on a pipeline with a live dit_accel.apply handle replaced that handle (with a warning); a run
    that failed then removed its own, so the pipeline ran dense and the user's handle was removed for good
    (handle.removed True, its summary() refused)."""
    pipe = build_tiny_pipeline("tiny-wan")
    dense = probe(pipe.transformer)
    handle = dit_accel.apply(pipe, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), backend="torch")
    sparse, processors = probe(pipe.transformer), _state(pipe.transformer)
    assert not torch.allclose(sparse, dense)
    kw, error = _failing(when, monkeypatch, model=pipe)
    with pytest.raises(error):
        finetune(_config(tmp_path / "out", prompts_file, **kw))
    assert handle.removed is False and _state(pipe.transformer) == processors
    handle.reset_stats()
    assert torch.equal(probe(pipe.transformer), sparse)
    assert handle.summary()["sparse_calls"] == 2  # both layers of the call ran under it
    handle.remove()
    assert torch.equal(probe(pipe.transformer), dense)


def test_a_run_that_succeeds_replaces_the_handle_the_pipeline_held(prompts_file, tmp_path):
    """The other side: the trained student replaces the pipeline's handle, which is removed, with a warning."""
    pipe = build_tiny_pipeline("tiny-wan")
    dense = probe(pipe.transformer)
    old = dit_accel.apply(pipe, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), backend="torch")
    with pytest.warns(DitAccelWarning, match=r"finetune\(\) on a model that AccelHandle\(Tile.*active\) was applied "
                                             r"to: that handle was removed .* the trained student AccelHandle\(SLA"):
        result = finetune(_config(tmp_path / "out", prompts_file, model=pipe, eval_batches=0))
    assert old.removed is True and result["handle"].removed is False
    assert not any(hook.attached for hook in old._hooks) and len(pipe.transformer._forward_pre_hooks) == 1
    result["handle"].remove()  # (the trained LoRA stays on the model: the run's result)
    with loop._adapters_disabled(pipe.transformer):
        assert torch.equal(probe(pipe.transformer), dense)


def _image_folder(root):
    import json

    from PIL import Image

    root.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 32), (40 * i, 90, 200)).save(root / f"img{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": f"picture {i}"}) + "\n"
                                                 for i in range(2)))
    return root


@pytest.mark.parametrize("case", ["tile-window-covers-the-grid", "radial-frames-smaller-than-a-block"])
def test_a_method_that_runs_dense_on_the_training_grid_is_refused(case, prompts_file, tmp_path):
    """Before: the run trained without one sparse step (apply() only warned at the first call, "runs dense
    attention (no speedup)"), and the weights folder said it was trained for the method."""
    if case.startswith("tile"):
        method, says = dit_accel.Tile(tile=(1, 2, 2), window=(3, 4, 8)), r"the window covers the whole grid \(3, 4, 8\)"
    else:
        method, says = dit_accel.Radial(block_size=64), r"radial attention keeps every block on grid \(3, 4, 8\)"
    assert method.plan((3, 4, 8)).is_dense  # (the reference: the method's own plan of the grid)
    pipe = build_tiny_pipeline("tiny-wan")
    before = _tensors(pipe)
    with pytest.raises(ValueError, match=rf"^--method {method.name} runs dense attention on this model at 9x64x128 "
                                         rf"\(token grid \(3, 4, 8\)\): {says}.*Fine-tuning would train the dense "
                                         r"model, not the method: change the method's settings or the sample size"):
        finetune(_config(tmp_path / "out", prompts_file, model=pipe, method=method))
    _assert_bit_identical(pipe, before)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, says", [
    (dit_accel.Radial(block_size=64), r"runs dense attention on the images of --data '.*pics' \(one frame each, "
                                      r"whatever --frames says: token grid \(1, 4, 16\)\): radial attention keeps "
                                      r"every block .*train on videos only, or a method that is sparse on one frame"),
    (dit_accel.GNA(kernel_size=(3, 3, 3)), r"does not fit the images of --data '.*pics' \(one frame each, whatever "
                                           r"--frames says: token grid \(1, 4, 16\)\): kernel_size\*dilation = "
                                           r"3\*1 = 3 exceeds the grid extent 1"),
], ids=["radial", "gna"])
def test_images_in_data_mode_are_checked_at_their_one_frame(method, says, tmp_path):
    """An image is one latent frame whatever --frames says. Before: the method was checked at --frames 33 (token grid
    (9, 4, 16), where both are sparse) and the images trained at (1, 4, 16): Radial dense throughout, GNA failed at
    the first forward with an error that named the grid of --frames."""
    assert not method.plan((9, 4, 16)).is_dense
    data = _image_folder(tmp_path / "pics")
    with pytest.raises(ValueError, match=rf"^--method {method.name} {says}"):
        finetune(FinetuneConfig(model="tiny-wan", method=method, mode="data", data=str(data),
                                output=str(tmp_path / "out"), steps=1, rank=2, frames=33, height=64, width=256,
                                max_sequence_length=8, progress=False, eval_batches=0))
    assert not (tmp_path / "out").exists()


def test_target_modules_given_as_one_string_are_read_as_the_cli_reads_them(prompts_file, tmp_path):
    """Before: target_modules="to_q, to_k" was refused as "to_q, to_k:  to_k matched no layer ...; did you mean to_k
    ...?" (the name kept its space), and a run recorded with target_modules="to_q,to_k" could not be resumed with the
    tuple the CLI passes: "--resume: ... holds a different run (target_modules: 'to_q,to_k' -> ['to_q', 'to_k'])"."""
    import json

    from dit_accel.training.checkpoints import RUN_FILE
    from dit_accel.checkpoints.finetuned import read_weights_info

    out = tmp_path / "out"
    kw = dict(eval_batches=0, checkpoint_every=1)
    finetune(_config(out, prompts_file, target_modules="to_q, to_k", **kw))
    assert read_weights_info(out)["lora"]["target_modules"] == ["to_k", "to_q"]
    assert finetune(_config(out, prompts_file, target_modules=("to_q", "to_k"), steps=2, resume=True,
                            **kw))["resumed_from"] == 1
    record = json.loads((out / RUN_FILE).read_text())  # a run file of before: the string as given
    (out / RUN_FILE).write_text(json.dumps({**record, "target_modules": "to_q,to_k"}))
    assert finetune(_config(out, prompts_file, target_modules=("to_q", "to_k"), steps=3, resume=True,
                            **kw))["resumed_from"] == 2


def test_a_seed_past_64_bits_is_refused_naming_the_flag_before_the_model_loads(prompts_file, tmp_path, capsys,
                                                                               monkeypatch):
    """Before: "dit-accel finetune: error: Overflow when unpacking long long" (torch.manual_seed, after the model
    had loaded), naming no option."""
    from dit_accel.cli.finetune import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(loop, "_load_pipe", no_load)
    out = tmp_path / "out"
    rc = main(["--model", "tiny-wan", "--method", "sla", "--prompts", str(prompts_file), "--steps", "1", "--output",
               str(out), "--seed", str(2 ** 64)])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("dit-accel finetune: error: --seed 18446744073709551616 is invalid: must be an integer "
                               "from 0 to 2**64 - 1 (18446744073709551615), the seeds torch's generators take.\n")
    assert not out.exists()
    torch.Generator().manual_seed(2 ** 64 - 1)  # (the largest seed allowed is one torch takes)


def test_a_pipeline_with_two_experts_is_refused_before_training(prompts_file, tmp_path):
    """Wan 2.2 A14B runs transformer above its boundary_ratio and transformer_2 below it. Before: finetune trained
    transformer alone at every noise level, and apply(pipe, load_method(DIR), weights=DIR) then refused the folder:
    "sla_projections.safetensors does not match the model's SLA layers: missing ['transformer_2.blocks.0.attn1.bias',
    ...]; was it trained on a different model?"."""
    import copy

    pipe = build_tiny_pipeline("tiny-wan")
    pipe.register_modules(transformer_2=copy.deepcopy(pipe.transformer))
    pipe.register_to_config(boundary_ratio=0.875)
    before = _tensors(pipe)
    with pytest.raises(ValueError, match=r"^fine-tuning supports pipelines with one transformer; this WanPipeline has "
                                         r"two experts \(transformer, and transformer_2 below its boundary_ratio"):
        finetune(_config(tmp_path / "out", prompts_file, model=pipe))
    _assert_bit_identical(pipe, before)
    processors = set(_state(pipe.transformer).values()) | set(_state(pipe.transformer_2).values())
    assert "SparseAttnProcessor" not in processors
    assert not (tmp_path / "out").exists()


def test_a_plan_is_checked_at_the_one_frame_of_the_images_in_data_mode(tmp_path):
    """Before: the plan was checked at --frames 9 (token grid (3, 4, 8), the plan's) and the first forward on an image
    failed with "--plan P on token grid (3, 4, 8): plan P was calibrated for token grid 3x4x8 ...; this call's token
    grid is 1x4x8 ... or pass allow_other_grid=True (CLI: --plan-any-grid)", an option finetune does not have."""
    from tests.training.test_finetune_plan import _plan

    _plan().save(tmp_path / "plan.json")
    data = _image_folder(tmp_path / "pics")
    with pytest.raises(ValueError, match=r"^--plan \S+plan\.json was calibrated on token grid \(3, 4, 8\); the images "
                                         r"of --data '\S+pics' are one frame each, whatever --frames says \(token grid "
                                         r"\(1, 4, 8\)\)\. Train the plan on videos only"):
        finetune(FinetuneConfig(model="tiny-wan", plan=str(tmp_path / "plan.json"), mode="data", data=str(data),
                                output=str(tmp_path / "out"), steps=1, rank=2, frames=9, height=64, width=128,
                                max_sequence_length=8, progress=False, eval_batches=1))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, says", [
    (None, r"model= is None: pass a pipeline that holds the transformer"),
    (7, r"model= is 7: pass a pipeline"),
    ("transformer", r"model= is a WanTransformer3DModel, a transformer without its pipeline \(the run needs the "
                    r"pipeline's text encoder, VAE and scheduler too\): pass a pipeline that holds the transformer"),
    ("unet-pipeline", r"model= is a UNetPipeline without a transformer \(fine-tuning adapts a DiT pipeline's "
                      r"transformer\): pass a pipeline"),
], ids=["none", "number", "bare-transformer", "pipeline-without-transformer"])
def test_a_model_that_is_no_pipeline_or_name_is_refused_before_anything_loads(model, says, prompts_file, tmp_path,
                                                                            monkeypatch):
    """Before: None and 7 failed after the accelerator was set up with AttributeError "'NoneType' object has no
    attribute 'to'"; a bare transformer was refused as "this model has NoneType"."""
    if model == "transformer":
        model = build_tiny_pipeline("tiny-wan").transformer
    elif model == "unet-pipeline":  # (a pipeline whose denoiser is a U-Net: no .transformer)
        model = type("UNetPipeline", (), {"components": {}, "unet": object()})()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before it was checked")

    monkeypatch.setattr(loop, "_load_pipe", no_load)
    with pytest.raises(ValueError, match=rf"^{says}.*an embedded model name \(e\.g\. \"tiny-wan\"\), a local Diffusers "
                                         r"folder or a hub id\.$"):
        finetune(_config(tmp_path / "out", prompts_file, model=model))
    assert not (tmp_path / "out").exists()


def test_a_model_folder_given_as_a_path_object_loads(prompts_file, tmp_path):
    """Before: model=pathlib.Path(folder) failed with AttributeError "'PosixPath' object has no attribute 'to'"
    (output= and data= took a Path)."""
    from pathlib import Path

    build_tiny_pipeline("tiny-wan").save_pretrained(tmp_path / "wan")
    result = finetune(_config(tmp_path / "out", prompts_file, model=Path(tmp_path / "wan"), eval_batches=0))
    assert result["steps"] == 1 and type(result["pipe"]).__name__ == "WanPipeline"


@pytest.mark.parametrize("mode", ["distill", "data"])
def test_prompts_and_data_together_are_refused_before_the_model_loads(mode, prompts_file, tmp_path, capsys,
                                                                      monkeypatch):
    """With --data the prompts are the folder's captions. Before: --prompts given beside it was ignored without a
    word (the run trained on the captions; its record hashed the folder only)."""
    from dit_accel.cli.finetune import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(loop, "_load_pipe", no_load)
    data = _image_folder(tmp_path / "pics")
    out = tmp_path / "out"
    rc = main(["--model", "tiny-wan", "--method", "sla", "--mode", mode, "--data", str(data), "--prompts",
               str(prompts_file), "--steps", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("dit-accel finetune: error: --prompts and --data exclude each other: with --data the "
                               "prompts are its captions (metadata.jsonl), so --prompts would be ignored. Drop "
                               "--prompts, or drop --data to distill on --prompts with random latents.\n")
    assert not out.exists()


@pytest.mark.parametrize("dense_layers", [2, [1, 0]], ids=["count", "list"])
def test_dense_layers_that_name_every_layer_are_refused(dense_layers, prompts_file, tmp_path):
    """Before: --dense-layers 2 on tiny-wan's 2 layers trained the dense model under the method's name (held-out loss
    0.0, handle.summary()["sparse_layers"] 0) and wrote a weights folder for --method tile."""
    pipe = build_tiny_pipeline("tiny-wan")
    before, processors = _tensors(pipe), _state(pipe.transformer)
    with pytest.raises(ValueError, match=r"^--dense-layers \[0, 1\] names every attention layer of this model \(2\): "
                                         r"the run would train the dense model, not --method tile\. Leave at least "
                                         r"one layer sparse\.$"):
        finetune(_config(tmp_path / "out", prompts_file, model=pipe, dense_layers=dense_layers,
                         method=dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))))
    _assert_bit_identical(pipe, before)
    assert _state(pipe.transformer) == processors and not getattr(pipe.transformer, "peft_config", None)
    assert not (tmp_path / "out").exists()
