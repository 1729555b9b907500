"""Fine-tuning and conversion: what a failed run leaves behind, a pipeline that already holds LoRA, and LoRA with a
missing half (round 10 of the input audit)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.checkpoints.convert import convert_checkpoint
from dit_accel.checkpoints.finetuned import LORA_FILE, SLA_FILE, write_weights_folder
from dit_accel.models import tiny as T
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training import data as data_mod
from dit_accel.training import loop
from tests.training import probe, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)  # token grid (3, 4, 8)
D = 12  # tiny Wan: 2 layers, 2 heads of 12


def _config(output, prompts, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output), prompts=str(prompts),
                steps=1, lr=1e-3, rank=2, seed=0, progress=False, eval_batches=1, gradient_accumulation_steps=1,
                **SHAPE)
    return FinetuneConfig(**{**base, **kw})


def _model_state(transformer):
    """What a run may change on a pipeline passed in: processors, adapters, trainable flags, mode, output."""
    return {"processors": {k: type(v).__name__ for k, v in transformer.attn_processors.items()},
            "adapters": list(getattr(transformer, "peft_config", None) or {}),
            "grad": {n: p.requires_grad for n, p in transformer.named_parameters()},
            "training": transformer.training, "output": probe(transformer)}


def _same(a, b):
    assert {k: v for k, v in a.items() if k != "output"} == {k: v for k, v in b.items() if k != "output"}
    assert torch.equal(a["output"], b["output"])


def test_a_refused_run_leaves_the_callers_pipeline_as_it_was(prompts_file, tmp_path):
    """Before: --target-modules matching nothing was refused after apply(): the caller's pipeline kept dit_accel's
    SLA processors (and its parameters requires_grad=False), so it ran sparse from then on."""
    pipe = build_tiny_pipeline("tiny-wan")
    before = _model_state(pipe.transformer)
    with pytest.raises(ValueError, match=r"--target-modules nothing_here: .*not found"):
        finetune(_config(tmp_path / "out", prompts_file, model=pipe, target_modules=("nothing_here",)))
    _same(_model_state(pipe.transformer), before)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["default", "mine"])
def test_a_pipeline_that_holds_lora_is_refused_naming_its_adapters(name, prompts_file, tmp_path):
    """Before: an adapter named "default" was refused as "--target-modules to_q,...: Adapter with name default already
    exists. Please use a different name" (no option names it); any other name trained silently with the user's LoRA
    switched off in the student and left out of the dense teacher, and stayed inactive on the pipeline afterwards."""
    from peft import LoraConfig

    pipe = build_tiny_pipeline("tiny-wan")
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False),
                                 adapter_name=name)
    before = _model_state(pipe.transformer)
    with pytest.raises(ValueError, match=rf"^model: its transformer already holds LoRA adapters \['{name}'\] .*"
                                         r"pipe\.fuse_lora\(\); pipe\.unload_lora_weights\(\)\) or remove it "
                                         rf"\(pipe\.delete_adapters\(\['{name}'\]\)\)") as err:
        finetune(_config(tmp_path / "out", prompts_file, model=pipe))
    assert "--target-modules" not in str(err.value)
    _same(_model_state(pipe.transformer), before)
    assert pipe.transformer.active_adapters() == [name]
    assert not (tmp_path / "out").exists()
    pipe.fuse_lora(components=["transformer"])  # the advice: the LoRA goes into the weights, no adapter stays
    pipe.unload_lora_weights()
    assert not getattr(pipe.transformer, "peft_config", None)
    assert torch.allclose(probe(pipe.transformer), before["output"], atol=1e-5)


def _data_folder(root: Path, broken: str = "") -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"random picture {i}"})
    if broken:
        (root / broken).write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a picture")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _data_config(out, data, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), mode="data", data=str(data), output=str(out),
                steps=1, rank=2, frames=5, height=32, width=64, max_sequence_length=8, progress=False, eval_batches=0)
    return FinetuneConfig(**{**base, **kw})


def test_a_run_that_fails_mid_training_puts_back_what_overwrite_replaced(tmp_path, monkeypatch):
    """A picture of the dataset that cannot be decoded is found when a step draws it, after --overwrite set the
    earlier run aside. Before: the error deleted the earlier run (weights, log, checkpoint) and left a folder holding
    only the new run record. (The folder's up-front decoding check is switched off here, so the damage is found by a
    step, as a video damaged after its first frame is: that check refuses this picture before anything is set
    aside.)"""
    monkeypatch.setattr(data_mod, "_check_decodable", lambda *args: None)
    out = tmp_path / "ft"
    finetune(_data_config(out, _data_folder(tmp_path / "good")))
    before = snapshot(out)
    assert LORA_FILE in before and "checkpoints/step-000001/trainable.safetensors" in before
    bad = _data_folder(tmp_path / "bad", broken="img3.png")  # 4 pictures, 4 steps: every one is drawn
    with pytest.raises(BadFileError, match=r"img3\.png: cannot be decoded"):
        finetune(_data_config(out, bad, steps=4, overwrite=True))
    assert snapshot(out) == before
    with pytest.raises(BadFileError, match=r"img3\.png: cannot be decoded"):
        finetune(_data_config(tmp_path / "new", bad, steps=4))
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_after_a_checkpoint_keeps_it_to_resume_from(tmp_path, monkeypatch):
    """The other side of the rule: a session that wrote a checkpoint before failing (out of memory, say) leaves it,
    and --resume continues from it."""
    data = _data_folder(tmp_path / "good")
    step = loop._Trainer.step

    def failing(self, i, first):
        if i == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(self, i, first)

    monkeypatch.setattr(loop._Trainer, "step", failing)
    out = tmp_path / "ft"
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune(_data_config(out, data, steps=2, checkpoint_every=1))
    assert (out / "checkpoints" / "step-000001" / "state.json").is_file() and not (out / LORA_FILE).exists()
    monkeypatch.setattr(loop._Trainer, "step", step)
    assert finetune(_data_config(out, data, steps=2, checkpoint_every=1, resume=True))["resumed_from"] == 1


def _turbo_state(extra):
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight"] = torch.randn(D, D, generator=g) * 0.3
        state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.bias"] = torch.randn(D, generator=g) * 0.1
    return {**state, **extra}


_A, _B = torch.full((4, 2 * D), 0.1), torch.full((2 * D, 4), 0.1)


@pytest.mark.parametrize("lora, says", [
    ({"net.blocks.0.self_attn.q.lora_A.weight": _A, "net.blocks.0.self_attn.q.lora_B.weight": _B,
      "net.blocks.1.self_attn.q.lora_A.weight": _A},
     r"holds lora_A of blocks\.1\.attn1\.to_q but no lora_B; expected both lora_A and lora_B"),
    ({"net.blocks.0.self_attn.q.lora_B.weight": _B}, r"holds lora_B of blocks\.0\.attn1\.to_q but no lora_A"),
    ({"net.blocks.0.self_attn.q.lora_A.weight": _A, "net.blocks.0.self_attn.q.lora_B.weight": _B[:, :3]},
     r"the LoRA of blocks\.0\.attn1\.to_q has rank \{'A': 4, 'B': 3\}"),
], ids=["A-without-B", "B-without-A", "ranks-differ"])
def test_convert_refuses_a_lora_with_a_missing_half(lora, says, tmp_path):
    """Before: convert wrote the folder; loaded, the module without lora_B got peft's zero lora_B without a word
    (only a log line "missing keys"), so that layer ran without its LoRA."""
    path = tmp_path / "turbo.pth"
    torch.save(_turbo_state(lora), path)
    with pytest.raises(BadFileError, match=rf"turbo\.pth: {says}"):
        convert_checkpoint(path, tmp_path / "w", method=dit_accel.SLA.reference(topk=0.5))
    assert not (tmp_path / "w").exists()


def test_a_weights_folder_whose_lora_lacks_a_half_is_refused_at_load(tmp_path):
    """A folder another tool wrote (hashes valid): its LoRA has lora_A of two modules, lora_B of one. Before: apply
    loaded it, the second module with a zero lora_B."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from safetensors.torch import save_file

    lora = {"blocks.0.attn1.to_q.lora_A.weight": _A, "blocks.0.attn1.to_q.lora_B.weight": _B,
            "blocks.1.attn1.to_q.lora_A.weight": _A.clone()}
    projections = {f"blocks.{i}.attn1.{p}": torch.zeros((D, D) if p == "weight" else (D,))
                   for i in range(2) for p in ("weight", "bias")}
    method = dit_accel.SLA.reference(topk=0.5)

    def write(staging):
        save_file(projections, str(staging / SLA_FILE))
        WanLoraLoaderMixin.save_lora_weights(staging, transformer_lora_layers=lora, weight_name=LORA_FILE)

    out = write_weights_folder(tmp_path / "w", write, {"format": 1, "method": method.to_dict(), "dense_layers": None,
                                                       "files": {"lora": LORA_FILE, "sla_projections": SLA_FILE}})
    model = T.build_tiny_transformer("wan")
    processors = {k: type(v).__name__ for k, v in model.attn_processors.items()}
    with pytest.raises(BadFileError, match=r"pytorch_lora_weights\.safetensors: holds lora_A of "
                                           r"blocks\.1\.attn1\.to_q but no lora_B"):
        dit_accel.apply(model, method, backend="torch", weights=out)
    assert not getattr(model, "peft_config", None)
    assert {k: type(v).__name__ for k, v in model.attn_processors.items()} == processors


def test_a_target_module_that_matches_nothing_is_named_though_others_match(prompts_file, tmp_path):
    """Before: --target-modules to_q,to_k,to_v,to_out0 (a typo of to_out.0) trained LoRA on to_q, to_k and to_v only,
    without a word, and the weights folder listed to_out0 among the trained targets."""
    pipe = build_tiny_pipeline("tiny-wan")
    before = _model_state(pipe.transformer)
    with pytest.raises(ValueError, match=r"^--target-modules to_q,to_k,to_v,to_out0: to_out0 matched no layer of "
                                         r"WanTransformer3DModel \(the other names did\); did you mean to_out\.0"):
        finetune(_config(tmp_path / "out", prompts_file, model=pipe, target_modules=("to_q", "to_k", "to_v", "to_out0")))
    _same(_model_state(pipe.transformer), before)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("eval_batches", [1, 0], ids=["held-out-batch", "first-step"])
def test_a_data_file_that_cannot_be_decoded_is_not_blamed_on_the_method(eval_batches, tmp_path):
    """Before: a picture drawn by the first forward (held-out batch or first step) that cannot be decoded was reported
    as "--method sla on token grid (2, 2, 4): .../img0.png: cannot be decoded ...", as if the method did not fit."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a picture")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "a picture"}) + "\n")
    with pytest.raises(BadFileError, match=r"^\S+img0\.png: cannot be decoded \(") as err:
        finetune(_data_config(tmp_path / "out", data, eval_batches=eval_batches))
    assert "--method" not in str(err.value) and "token grid" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_convert_names_the_transformer_2_that_is_missing(tmp_path, capsys):
    """Before: "dit-accel convert: checkpoint '.../low.pth' is not a file", naming the wrong argument, and only after
    reading the whole first checkpoint."""
    from dit_accel.cli.main import main

    path = tmp_path / "high.pth"
    torch.save(_turbo_state({}), path)
    assert main(["convert", str(path), "--out", str(tmp_path / "w"), "--transformer-2", str(tmp_path / "low.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dit-accel convert: --transformer-2 ") and "low.pth' is not a file: give the low-noise " \
        "expert's checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_prompt_or_line(tmp_path):
    """Files saved by Windows editors start with a UTF-8 byte-order mark. Before: the first prompt was "\\ufeffa cat"
    (an invisible character the text encoder embedded) and metadata.jsonl's first line was refused as "expected a
    JSON object with 'file_name' and 'text'"."""
    from PIL import Image

    from dit_accel.training.data import CaptionDataset, read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\r\na dog\r\n".encode("utf-8-sig"))
    assert read_prompts(prompts) == ["a cat", "a dog"]
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(data / "red.png")
    (data / "metadata.jsonl").write_bytes((json.dumps({"file_name": "red.png", "text": "red"}) + "\n").encode("utf-8-sig"))
    assert CaptionDataset(data, frames=1, height=8, width=8).captions == ["red"]


def test_convert_overwrite_replaces_a_weights_folder_only(tmp_path):
    """Before: --overwrite wrote into any folder with files, and a converted checkpoint without LoRA then deleted the
    folder's own pytorch_lora_weights.safetensors (a Diffusers LoRA the user kept there)."""
    from safetensors.torch import save_file

    path = tmp_path / "turbo.pth"
    torch.save(_turbo_state({}), path)
    mine = tmp_path / "my-lora"
    mine.mkdir()
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": _A}, str(mine / LORA_FILE))
    (mine / "README.md").write_text("my LoRA")
    before = snapshot(mine)
    with pytest.raises(ValueError, match=r"holds 2 file\(s\) that are no weights folder \(README\.md, "
                                         r"pytorch_lora_weights\.safetensors; no dit_accel_method\.json\): overwrite "
                                         r"replaces a weights folder only, and nothing there is deleted"):
        convert_checkpoint(path, mine, overwrite=True)
    assert snapshot(mine) == before
    out = convert_checkpoint(path, tmp_path / "w")  # a weights folder is replaced, as before
    assert convert_checkpoint(path, out, overwrite=True) == out


@pytest.mark.parametrize("case", ["no-adapter", "other-adapter", "method-name"])
def test_save_trained_weights_refuses_what_it_cannot_write_and_leaves_no_folder(case, tmp_path):
    """Before: AttributeError 'WanTransformer3DModel' object has no attribute 'peft_config' (no adapter), KeyError
    'nope' (adapter_name of no adapter), AttributeError 'str' object has no attribute 'to_dict' (method="sla"); the
    first two left an empty output folder behind."""
    from peft import LoraConfig

    from dit_accel.training import save_trained_weights

    model = T.build_tiny_transformer("wan")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    kw = dict(transformer=model, method=dit_accel.SLA(topk=0.5), lora_config=config)
    if case == "no-adapter":
        error, says = ValueError, r"adapter_name='default': the transformer has no such LoRA adapter \(its adapters: \[\]\)"
    elif case == "other-adapter":
        model.add_adapter(config)
        kw["adapter_name"] = "nope"
        error, says = ValueError, r"adapter_name='nope': .*\(its adapters: \['default'\]\)"
    else:
        kw.update(method="sla", lora_config=None)
        error, says = TypeError, r"method='sla' is invalid: the dit_accel method config"
    with pytest.raises(error, match=says):
        save_trained_weights(tmp_path / "w", **kw)
    assert not (tmp_path / "w").exists()


def test_a_weights_folder_that_cannot_be_written_leaves_no_empty_folder(tmp_path):
    """Before: a write that failed (here: tensors that share memory, which safetensors refuses) left the new folder
    behind, empty; an existing folder stays byte for byte."""
    from safetensors.torch import save_file

    shared = torch.zeros(4)

    def write(staging):
        save_file({"a": shared, "b": shared}, str(staging / SLA_FILE))

    info = {"format": 1, "method": dit_accel.SLA.reference(topk=0.5).to_dict(), "files": {"sla_projections": SLA_FILE}}
    with pytest.raises(RuntimeError, match="share memory"):
        write_weights_folder(tmp_path / "new", write, info)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="share memory"):
        write_weights_folder(kept, write, info)
    assert snapshot(kept) == {"notes.txt": b"mine"}


def test_a_16_bit_greyscale_picture_keeps_its_brightness(tmp_path):
    """Before: PIL's convert("RGB") clipped a 16-bit greyscale PNG at 255, so a ramp from black to white trained as
    a picture 99.6% white."""
    from PIL import Image

    from dit_accel.training.data import CaptionDataset

    data = tmp_path / "data"
    data.mkdir()
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(data / "ramp.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "ramp.png", "text": "a ramp"}) + "\n")
    pixels, _ = CaptionDataset(data, frames=1, height=32, width=32).item(0)
    want = torch.from_numpy(np.round(ramp / 257.0)).float() / 127.5 - 1.0  # the 8-bit picture, in [-1, 1]
    for channel in pixels[:, 0]:
        torch.testing.assert_close(channel, want, atol=1e-5, rtol=0)


def test_a_listed_file_that_is_no_picture_or_video_is_refused_before_training(tmp_path):
    """Before: metadata.jsonl naming notes.txt passed the folder's checks; the run failed when a step drew it
    ("notes.txt: cannot be decoded"), possibly thousands of steps in."""
    from PIL import Image

    from dit_accel.training.data import CaptionDataset

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(data / "red.png")
    (data / "notes.txt").write_text("not a picture")
    rows = [{"file_name": "red.png", "text": "red"}, {"file_name": "notes.txt", "text": "notes"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: 'notes\.txt' is neither an image \(\.png, .*\) nor a "
                                         r"video \(\.mp4, .*\); list only those"):
        CaptionDataset(data, frames=1, height=8, width=8)


def test_convert_refuses_a_checkpoint_holding_a_model_and_its_ema_copy(tmp_path):
    """TurboDiffusion-style training checkpoints can hold the model (net.) and its EMA (net_ema.) side by side. Before:
    both prefixes were stripped and the later tensors (here the EMA's) were converted without a word."""
    state = {f"{prefix}{k[len('net.'):]}": v + offset for prefix, offset in (("net.", 0.0), ("net_ema.", 1.0))
             for k, v in _turbo_state({}).items()}
    path = tmp_path / "train.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'net\.blocks\.0\.self_attn\.attn_op\.local_attn\.proj_l\.weight' and "
                                         r"'net_ema\.blocks\.0\.self_attn\.attn_op\.local_attn\.proj_l\.weight' are one "
                                         r"tensor under two prefixes .*convert cannot tell which one is meant"):
        convert_checkpoint(path, tmp_path / "w")
    assert not (tmp_path / "w").exists()
