"""Round 19 of the input audit: fine-tuning (caption folders, schedules, LoRA targets, what a run is told)."""

import json

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.models import loading
from dit_accel.training import finetune
from tests.training import tiny_config as _config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def _folder(root, rows, sub=""):
    """A caption folder: a 64x64 png per row (under ``sub``), and metadata.jsonl naming them."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for row in rows:
        path = root / row["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def no_model(monkeypatch):
    """The model loader refuses: a test passes only if the input was refused before any model loaded."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_a_caption_folder_for_a_model_whose_clips_are_not_encoded_is_refused_in_distill_mode(tmp_path, no_model):
    """Before: ``--model tiny-flux --data DIR`` (distill mode) loaded the model and failed at the first batch with
    "--method sla on token grid (16, 16): too many values to unpack (expected 4)", blamed on the method; on
    HunyuanVideo the clips' latents went in without its VAE's scaling factor, without a word."""
    data = _folder(tmp_path / "data", [{"file_name": "a.png", "text": "a cat"}])
    config = _config(tmp_path, None, model="tiny-flux", prompts=None, data=str(data), frames=1, height=64, width=64)
    with pytest.raises(ValueError, match=r"--model tiny-flux: --data supports Wan models only: .*FLUX needs its own "
                                         r"VAE encoding\)\. Distill on --prompts instead"):
        finetune(config)
    assert not (tmp_path / "out").exists()


def test_a_caption_folder_for_a_pipeline_whose_clips_are_not_encoded_is_refused_before_training(tmp_path):
    """The same for a pipeline passed in (its class is known once it is there), before any step."""
    pipe = loading.load_pipeline("tiny-flux", device="cpu", dtype=torch.float32, seed=0)
    data = _folder(tmp_path / "data", [{"file_name": "a.png", "text": "a cat"}])
    config = _config(tmp_path, None, model=pipe, prompts=None, data=str(data), frames=1, height=64, width=64)
    with pytest.raises(ValueError, match=r"^--data supports Wan models only: .*FLUX needs its own VAE encoding"):
        finetune(config)
    assert not (tmp_path / "out").exists()
    assert not getattr(pipe.transformer, "peft_config", None)


def test_a_caption_folder_whose_clips_all_sit_in_subfolders_is_read(tmp_path):
    """Before: metadata.jsonl may name files in subfolders ("clips/a.png"), but a folder whose clips all sit there was
    refused as one that "holds no images or videos"."""
    from dit_accel.training.data import CaptionDataset

    root = _folder(tmp_path / "data", [{"file_name": "clips/a.png", "text": "a cat"},
                                       {"file_name": "clips/b.png", "text": "a dog"}])
    dataset = CaptionDataset(root, frames=1, height=32, width=32)
    assert dataset.files == ["clips/a.png", "clips/b.png"] and dataset.captions == ["a cat", "a dog"]
    pixels, caption = dataset.item(1)
    assert pixels.shape == (3, 1, 32, 32) and caption == "a dog"
    (root / "metadata.jsonl").write_text("\n")  # nothing named, nothing beside it: still refused, in those words
    with pytest.raises(ValueError, match=r"holds no images or videos .*nor a metadata.jsonl that names any"):
        CaptionDataset(root, frames=1, height=32, width=32)


def test_a_clip_shorter_than_frames_is_named_once_not_padded_without_a_word(tmp_path):
    """Before: a clip with fewer frames than --frames had its last frame repeated without a word (a folder of
    33-frame clips under the default 81 frames trained on clips whose last 48 frames stand still)."""
    from PIL import Image

    from dit_accel._util import DitAccelWarning
    from dit_accel.training.data import CaptionDataset

    root = _folder(tmp_path / "data", [{"file_name": "a.png", "text": "a still"}])
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 120, 240)]
    frames[0].save(root / "short.gif", save_all=True, append_images=frames[1:], duration=100)
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "short.gif", "text": "a flash"}) + "\n")
    dataset = CaptionDataset(root, frames=9, height=32, width=32)
    with pytest.warns(DitAccelWarning, match=r"--data short.gif has 3 frame\(s\), fewer than --frames 9: its last "
                                             r"frame is repeated 6 times") as caught:
        pixels, _ = dataset.item(dataset.files.index("short.gif"))
        dataset.item(dataset.files.index("short.gif"))  # drawn again: not said again
        dataset.item(dataset.files.index("a.png"))  # an image is one frame, whatever --frames says
    assert len([w for w in caught if issubclass(w.category, DitAccelWarning)]) == 1
    assert pixels.shape == (3, 9, 32, 32) and torch.equal(pixels[:, 2], pixels[:, 8])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DitAccelWarning)  # long enough: nothing to say
        CaptionDataset(root, frames=3, height=32, width=32).item(dataset.files.index("short.gif"))


@pytest.mark.parametrize("targets, says", [
    ("to_q,condition_embedder", r"^--target-modules to_q,condition_embedder: condition_embedder names "
                                r"WanTimeTextImageEmbedding layers \(e\.g\. condition_embedder\), which LoRA cannot "
                                r"adapt: .*name the layers inside it instead, e\.g\. "
                                r"condition_embedder\.time_embedder\.linear_1"),
    ("to_q,norm_q", r"^--target-modules to_q,norm_q: norm_q names RMSNorm layers \(e\.g\. blocks\.0\.attn1\.norm_q\), "
                    r"which LoRA cannot adapt: .*name Linear layers instead"),
], ids=["a-block", "a-norm"])
def test_a_target_module_lora_cannot_adapt_is_named_in_one_line(targets, says, prompts_file, tmp_path):
    """Before: peft's message printed the whole module (a block: dozens of lines of its repr) and named neither the
    target nor a layer to name instead."""
    with pytest.raises(ValueError, match=says) as err:
        finetune(_config(tmp_path, prompts_file, target_modules=targets))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, says", [
    (dict(lr_warmup_steps=10), r"--lr-warmup-steps 10 is past --steps 4: the last step trains at 40% of --lr"),
    (dict(method=dit_accel.VSA(sparsity=0.9), vsa_decay_steps=8),
     r"--vsa-decay-steps 8 is past --steps 4: the last step trains at 38% of the target sparsity"),
], ids=["warmup", "vsa-decay"])
def test_a_schedule_longer_than_the_run_is_said(change, says, prompts_file, tmp_path):
    """Before: a warmup (or VSA's sparsity decay) longer than --steps ended the run below --lr (below the sparsity
    its weights folder names) without a word. Said, not refused: a run trained in sessions continues it."""
    import warnings

    from dit_accel._util import DitAccelWarning
    from dit_accel.training import validate_config

    with pytest.warns(DitAccelWarning, match=says):
        validate_config(_config(tmp_path, prompts_file, steps=4, **change))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DitAccelWarning)
        validate_config(_config(tmp_path, prompts_file, steps=10, **change))  # the schedule ends within the run


def test_a_cp_for_other_process_counts_is_refused_before_the_model_loads(prompts_file, tmp_path, no_model):
    """Before: ``--cp 2,1`` in one process loaded the model (minutes for a real one), then said only "needs 2
    processes; 1 were launched"."""
    with pytest.raises(ValueError, match=r"--cp ulysses=2,ring=1 needs 2 processes; 1 was launched\. Launch 2 "
                                         r"\(accelerate launch --multi_gpu --num_processes 2 "):
        finetune(_config(tmp_path, prompts_file, cp=(2, 1)))
    assert not (tmp_path / "out").exists()


def test_an_sla_learning_rate_scale_without_sla_projections_is_refused(prompts_file, tmp_path, no_model):
    """Before: ``--sla-lr-scale 5`` under a method that trains no SLA projection was ignored without a word."""
    from dit_accel.training import validate_config

    with pytest.raises(ValueError, match=r"--sla-lr-scale 5 applies to the SLA projections, which only --method sla .*"
                                         r"--method gna has none\. Drop --sla-lr-scale\."):
        finetune(_config(tmp_path, prompts_file, method=dit_accel.GNA(), sla_lr_scale=5.0))
    validate_config(_config(tmp_path, prompts_file, sla_lr_scale=5.0))  # under SLA: taken
    validate_config(_config(tmp_path, prompts_file, method=dit_accel.GNA(), sla_lr_scale=1.0))  # the default
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launched, flag, trains", [("bf16", None, "bf16"), ("bf16", "no", "no"), (None, None, "no"),
                                                    ("fp16", "bf16", "bf16")])
def test_the_cli_trains_in_the_precision_accelerate_launch_was_given(launched, flag, trains, monkeypatch, tmp_path,
                                                                     prompts_file):
    """Before: --mixed-precision's default "no" overrode `accelerate launch --mixed_precision bf16` (passed on as
    ACCELERATE_MIXED_PRECISION), so the run trained in float32 without a word."""
    import argparse

    from dit_accel.cli.finetune import _add_arguments, config_from_args

    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    argv = ["--method", "sla", "--prompts", str(prompts_file), "--output", str(tmp_path / "out")]
    args = parser.parse_args(argv + (["--mixed-precision", flag] if flag else []))
    assert config_from_args(args).mixed_precision == trains


def test_a_launch_precision_finetune_cannot_train_in_is_refused_naming_it(monkeypatch, tmp_path, prompts_file):
    import argparse

    from dit_accel.cli.finetune import _add_arguments, config_from_args

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    args = parser.parse_args(["--method", "sla", "--prompts", str(prompts_file), "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"accelerate launch --mixed_precision fp8 \(ACCELERATE_MIXED_PRECISION\) is "
                                         r"not one finetune trains in"):
        config_from_args(args)


@pytest.mark.parametrize("method, frames, says", [
    (dit_accel.Radial(), 1, r"--method radial needs at least 3 latent frames to be sparse; token grid \(1, 8, 8\)"),
    (dit_accel.Tile(window=(8, 8, 8)), 5, r"--method tile runs dense attention on this model at 5x32x32"),
], ids=["radial", "tile"])
def test_a_method_that_cannot_be_sparse_at_the_size_is_refused_before_the_model_loads(method, frames, says,
                                                                                       prompts_file, tmp_path,
                                                                                       no_model):
    """Before: read from an embedded (or local, or cached) model folder's configs, the token grid was known before the
    model loaded, but a method that cannot be sparse on it was refused only once the model had loaded (minutes for a
    real one)."""
    with pytest.raises(ValueError, match=says):
        finetune(_config(tmp_path, prompts_file, model="tiny-shapes", method=method, frames=frames, height=32,
                         width=32))
    assert not (tmp_path / "out").exists()


def test_context_parallelism_on_a_family_it_is_not_tested_on_is_refused_before_the_model_loads(prompts_file, tmp_path,
                                                                                                no_model):
    """Before: ``--cp`` with FLUX (or HunyuanVideo) was refused only once the model had loaded."""
    config = _config(tmp_path, prompts_file, model="tiny-flux", frames=1, height=64, width=64, cp=(1, 1))
    with pytest.raises(ValueError, match=r"--model tiny-flux: --cp: context-parallel fine-tuning is tested on Wan "
                                         r"only, not FLUX; run it on one process"):
        finetune(config)


def test_a_pipeline_holding_a_weights_folders_lora_is_told_to_remove_the_handle(prompts_file, tmp_path):
    """Before: a pipeline that ran apply(..., weights=DIR) was told to ``pipe.fuse_lora(); pipe.unload_lora_weights()``,
    and fuse_lora refuses dit_accel's own adapter ("handle.remove() could then not restore the model")."""
    from peft import LoraConfig

    from dit_accel import weights as W

    pipe = loading.load_pipeline("tiny-wan", device="cpu", dtype=torch.float32, seed=0)
    other = loading.load_pipeline("tiny-wan", device="cpu", dtype=torch.float32, seed=0).transformer
    lora, folder = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), tmp_path / "weights"
    with dit_accel.apply(other, dit_accel.SLA(topk=0.5), backend="torch") as trained:
        other.add_adapter(lora)
        W.save_trained_weights(folder, transformer=other, method=dit_accel.SLA(topk=0.5), lora_config=lora,
                               sla_projections=trained.sla_projections())
    handle = dit_accel.apply(pipe, dit_accel.SLA(topk=0.5), weights=str(folder), backend="torch")
    with pytest.raises(ValueError, match=r"holds the LoRA of a dit_accel weights folder \(adapter 'dit_accel', loaded "
                                         r"by dit_accel\.apply\(\.\.\., weights=DIR\).*Call handle\.remove\(\) first"):
        finetune(_config(tmp_path, prompts_file, model=pipe))
    handle.remove()
    assert not getattr(pipe.transformer, "peft_config", None)  # what the message says to do frees the pipeline
    assert not (tmp_path / "out").exists()


def test_a_photo_with_an_exif_orientation_is_trained_upright(tmp_path):
    """Before: a photo stored sideways with an EXIF Orientation tag (as phones write them) was trained sideways."""
    from PIL import Image

    from dit_accel.training.data import CaptionDataset

    root = _folder(tmp_path / "data", [{"file_name": "a.png", "text": "a cat"}])
    stored = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide, 16 tall: the left half red
    stored[:, :16, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    Image.fromarray(stored).save(root / "a.png", exif=exif)
    pixels, _ = CaptionDataset(root, frames=1, height=32, width=16).item(0)  # shown 16 wide, 32 tall: the top red
    red = pixels[0, 0]
    assert red[:16].min() > 0.9 and red[16:].max() < -0.9


@pytest.mark.parametrize("provenance, says", [
    (dict(model_class="FluxTransformer2DModel", model_id="tiny-flux"),
     r"--plan .* was calibrated for a FluxTransformer2DModel \(tiny-flux\); this model's transformer is a "
     r"WanTransformer3DModel"),
    (dict(grids=[[9, 9, 9]]), r"--plan .* was calibrated on token grid \(9, 9, 9\); this run trains at 5x32x32, token "
                              r"grid \(3, 8, 8\)"),
], ids=["another-model", "another-grid"])
def test_a_plan_for_another_model_or_size_is_refused_before_the_model_loads(provenance, says, prompts_file, tmp_path,
                                                                           no_model):
    """Before: read from an embedded (or local, or cached) model folder's configs, the transformer class and token grid
    were known before the model loaded, but a plan calibrated for another was refused only once it had loaded."""
    from dit_accel import SparsePlan
    from dit_accel.plans.sparse_plan import Phase

    prov = {**dict(model_class="WanTransformer3DModel", model_id="tiny-shapes", grids=[[3, 8, 8]]), **provenance}
    plan = SparsePlan((Phase(0, None, {0: dit_accel.GNA(kernel_size=(3, 3, 3))}),), num_layers=2, num_heads=2,
                      provenance=prov)
    plan.save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match=says):
        finetune(_config(tmp_path, prompts_file, model="tiny-shapes", method=None, plan=str(tmp_path / "plan.json"),
                         frames=5, height=32, width=32))
    assert not (tmp_path / "out").exists()


def test_an_empty_file_in_a_caption_folder_is_refused_before_training(tmp_path):
    """Before: an empty clip (an interrupted copy) was found only when a step first drew it, at any step of a long run,
    and the run could not be resumed once it was fixed (its inputs had changed)."""
    from dit_accel.training.data import CaptionDataset

    root = _folder(tmp_path / "data", [{"file_name": "a.png", "text": "a cat"}])
    (root / "clip.mp4").write_bytes(b"")
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "clip.mp4", "text": "a dog"}) + "\n")
    with pytest.raises(ValueError, match=r"--data '.*data': clip\.mp4 is empty \(0 bytes\); copy the file\(s\) again"):
        CaptionDataset(root, frames=5, height=32, width=32)


def test_weights_trained_on_a_pipeline_passed_in_name_the_model_it_was_loaded_from(prompts_file, tmp_path):
    """Before: the weights folder of a run on a pipeline object recorded its type, "<WanPipeline object>", and
    ``generate``/``eval --weights`` refused the folder on every --model ("pass --model <WanPipeline object>")."""
    from argparse import Namespace

    from dit_accel.checkpoints.finetuned import read_weights_info
    from dit_accel.cli.generate import _saved_method

    pipe = loading.load_pipeline("tiny-shapes", device="cpu", dtype=torch.float32, seed=0)
    out = tmp_path / "out"
    finetune(_config(tmp_path, prompts_file, model=pipe, frames=5, height=32, width=32))
    assert loading.same_model(read_weights_info(out)["model"], "tiny-shapes")
    assert _saved_method(Namespace(weights=str(out), model="tiny-shapes")) == dit_accel.SLA(topk=0.5)
