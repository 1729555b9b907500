"""Fine-tuning on tiny-wan under faults: killed at seeded write points, damaged checkpoints and run files,
resumes that must be refused, and --overwrite next to files the run never wrote.

The reference is one uninterrupted 3-step run (a checkpoint each step). A killed run must either load as
that run's weights or refuse to load in one line, and ``--resume`` must always finish it bit-identical to
the reference.
"""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training.finetune import CKPT_DIR, RUN_FILE
from dit_accel.checkpoints.finetuned import LORA_FILE, METHOD_FILE, SLA_FILE

from .faults import KINDS, assert_one_line, damage, kill_points, run_killed, write_points

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red fox in snow\nwaves at sunset\n")
    return p


def _config(output, prompts, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output), steps=3,
                prompts=None if prompts is None else str(prompts),
                lr=2e-3, rank=4, seed=0, progress=False, eval_batches=0, gradient_accumulation_steps=1,
                checkpoint_every=1, **SHAPE)
    base.update(kw)
    return FinetuneConfig(**base)


def _weights(folder):
    return {name: load_file(str(folder / name)) for name in (LORA_FILE, SLA_FILE)}


def _same_weights(a, b) -> bool:
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompts):
    """The uninterrupted run, and how many write points it passes."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = {}
    points = write_points(lambda: result.update(finetune(_config(out, prompts))))
    return {"out": out, "loss": result["loss"], "weights": _weights(out), "points": points}


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_loads_as_reference_or_refuses(out, reference) -> str:
    """A killed run's weights folder: absent, the reference's weights, or one line naming a file."""
    return _check_loads_as_one_of(out, [reference])


def _check_loads_as_one_of(out, references) -> str:
    """``"no weights yet"``, ``"refused"`` (one line naming a file, nothing loaded) or the index of the
    reference whose weights it holds (``"ref0"``...); a folder that loads anything else fails."""
    from dit_accel.models.tiny import build_tiny_pipeline
    from dit_accel.checkpoints.finetuned import load_into

    if not (out / METHOD_FILE).exists():
        return "no weights yet"
    transformer = build_tiny_pipeline("tiny-wan").transformer
    handle = dit_accel.apply(transformer, dit_accel.SLA(topk=0.5))
    try:
        load_into(handle, out)
    except ValueError as err:
        assert_one_line(err, out)
        assert "dit_accel" not in (getattr(transformer, "peft_config", None) or {})  # nothing was loaded
        return "refused"
    held = _weights(out)
    for i, ref in enumerate(references):
        if _same_weights(held, ref["weights"]):
            return f"ref{i}"
    raise AssertionError(f"{out} loads without an error but holds none of the complete runs' weights")


def test_killed_runs_load_as_the_reference_or_refuse_and_resume_to_it(tmp_path, prompts, reference):
    assert reference["points"] > 10
    for k in kill_points(reference["points"], 6):
        out = tmp_path / f"kill{k}"
        assert run_killed(lambda: finetune(_config(out, prompts)), k) == "killed"
        _check_loads_as_reference_or_refuses(out, reference)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a kill leaves no damaged checkpoint: nothing to fall back from
            resumed = finetune(_config(out, prompts, resume=True))
        assert resumed["loss"] == reference["loss"], k
        assert _same_weights(_weights(out), reference["weights"]), k
        assert not [p for p in out.rglob("*") if p.name.startswith(".dit_accel-tmp-")], k


def test_continued_run_killed_while_replacing_the_weights_never_loads_a_mix(tmp_path, prompts, reference):
    """The issue's case: resuming a 3-step run to 4 steps rewrites the weights folder in place; killed between
    the new LoRA and the new method file, the folder must refuse to load (it holds step-4 LoRA beside step-3
    SLA projections), and the next --resume must finish the 4-step run exactly."""
    four = tmp_path / "four"
    shutil.copytree(reference["out"], four)
    total = write_points(lambda: finetune(_config(four, prompts, steps=4, resume=True)))
    want = {"out": four, "weights": _weights(four)}
    # From the end: log (2 points), then the weights folder: after the method file's rename, its temporary
    # complete, before it, before the SLA file's rename (new LoRA beside old SLA), before the LoRA's rename.
    mixed = [total - 5, total - 4, total - 3]
    for k in sorted(set(mixed) | set(kill_points(total, 3))):
        out = tmp_path / f"kill{k}"
        shutil.copytree(reference["out"], out)
        assert run_killed(lambda: finetune(_config(out, prompts, steps=4, resume=True)), k) == "killed"
        outcome = _check_loads_as_one_of(out, [reference, want])
        assert outcome == "refused" if k in mixed else outcome != "refused", (k, outcome)
        finetune(_config(out, prompts, steps=4, resume=True))
        assert _same_weights(_weights(out), want["weights"]), k


def test_steps_below_the_checkpoint_are_refused_and_nothing_changes(reference, prompts):
    out = reference["out"]
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"--resume --steps 2: .* holds a checkpoint at step 3, past step 2; pass "
                                         r"--steps 3 or more") as info:
        finetune(_config(out, prompts, steps=2, resume=True))
    assert_one_line(info.value, out)
    assert _snapshot(out) == before


def test_resume_with_changed_inputs_is_refused(tmp_path, reference, prompts):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    other = tmp_path / "prompts.txt"
    other.write_text(prompts.read_text() + "a third prompt\n")
    record = json.loads((out / RUN_FILE).read_text())
    record["prompts"] = str(other)  # the same path as recorded, other contents
    (out / RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="holds a different run \\(the contents of --prompts changed\\)"):
        finetune(_config(out, other, resume=True))


@pytest.mark.parametrize("name, kind", [("state.json", k) for k in KINDS + ("other-step",)]
                         + [("trainable.safetensors", "binary"), ("trainable.safetensors", "truncated"),
                            ("optimizer.pt", "empty"), ("optimizer.pt", "garbage")])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, prompts, name, kind):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    if kind == "other-step":  # valid JSON of the wrong structure: the state of step 2 in step 3's folder
        shutil.copy(out / CKPT_DIR / "step-000002" / name, out / CKPT_DIR / "step-000003" / name)
    else:
        damage(out / CKPT_DIR / "step-000003" / name, kind)
    with pytest.warns(dit_accel.DitAccelWarning, match=f"step-000003/{name}.*resuming from the previous "
                                                       "checkpoint, step-000002"):
        resumed = finetune(_config(out, prompts, resume=True))
    assert resumed["resumed_from"] == 2 and resumed["loss"] == reference["loss"]
    assert _same_weights(_weights(out), reference["weights"])
    log = json.loads((out / "finetune_log.json").read_text())
    assert [row["step"] for row in log["loss"]] == [1, 2, 3]


def test_no_good_checkpoint_is_one_line(tmp_path, reference, prompts):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    for step in ("step-000002", "step-000003"):
        damage(out / CKPT_DIR / step / "trainable.safetensors", "truncated")
    with pytest.warns(dit_accel.DitAccelWarning):
        with pytest.raises(BadFileError, match="step-000002/trainable.safetensors: .*no older checkpoint") as info:
            finetune(_config(out, prompts, resume=True))
    assert_one_line(info.value, out)


@pytest.mark.parametrize("kind", KINDS + ("list",))
def test_damaged_run_file_is_one_line(tmp_path, reference, prompts, kind):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    if kind == "list":
        (out / RUN_FILE).write_text("[]")
    else:
        damage(out / RUN_FILE, kind)
    for resume in (True, False):
        with pytest.raises(ValueError) as info:
            finetune(_config(out, prompts, resume=resume))
        assert_one_line(info.value, out / RUN_FILE)


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, reference, prompts):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    (out / "notes.txt").write_text("mine")
    (out / CKPT_DIR / "README").write_text("mine too")
    (out / "data").mkdir()
    (out / "data" / "clip.mp4").write_bytes(b"x")
    finetune(_config(out, prompts, steps=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / CKPT_DIR / "README").read_text() == "mine too"
    assert (out / "data" / "clip.mp4").read_bytes() == b"x"
    assert sorted(p.name for p in (out / CKPT_DIR).iterdir()) == ["README", "step-000001"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_without_a_run_is_described_and_kept(tmp_path, prompts, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"someone else's")
    with pytest.raises(ValueError) as info:
        finetune(_config(out, prompts, overwrite=overwrite))
    text = str(info.value)
    assert "holds 2 file(s) that are not a fine-tuning run (notes.txt, pytorch_lora_weights.safetensors; no " \
           "finetune_run.json)" in text and "Nothing there is deleted" in text
    assert "pass --overwrite" not in text and "--resume" not in text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_prompts_file_is_one_line(tmp_path, prompts, kind):
    bad = tmp_path / "prompts.txt"
    shutil.copy(prompts, bad)
    damage(bad, kind)
    if kind in ("truncated", "garbage"):  # still text: prompts, fine
        return
    with pytest.raises(ValueError, match="is empty|is binary|not UTF-8") as info:
        finetune(_config(tmp_path / "out", bad))
    assert_one_line(info.value, bad)
    assert not (tmp_path / "out").exists()


def test_binary_metadata_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "clip.gif").write_bytes(b"GIF89a")
    (data / "metadata.jsonl").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="metadata.jsonl: is binary") as info:
        finetune(_config(tmp_path / "out", None, mode="data", data=str(data)))
    assert_one_line(info.value, data / "metadata.jsonl")


def test_resume_after_the_model_files_changed_is_refused(tmp_path, prompts, monkeypatch):
    from safetensors.torch import save_file

    from dit_accel.models.tiny import build_tiny_pipeline

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    build_tiny_pipeline("tiny-wan").save_pretrained(model)
    out = tmp_path / "run"
    finetune(_config(out, prompts, model=str(model), steps=1))
    assert json.loads((out / RUN_FILE).read_text())["model_sha256"].startswith("files:")
    (weights,) = (model / "transformer").glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors = {k: v * 1.5 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"holds a different run \\(the files of --model {model} changed\\)"):
        finetune(_config(out, prompts, model=str(model), steps=2, resume=True))


def test_sigkilled_cli_run_is_refused_by_generate_in_one_line(tmp_path, prompts, reference, capsys):
    """End to end in a fresh interpreter: `dit-accel finetune --resume --steps 4` SIGKILLed after the new LoRA
    replaced the old one; `dit-accel generate --weights` then names the file instead of running a mix."""
    import os
    import subprocess
    import sys

    from dit_accel.cli.main import main

    count = tmp_path / "count"
    shutil.copytree(reference["out"], count)
    total = write_points(lambda: finetune(_config(count, prompts, steps=4, resume=True)))
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    args = ["finetune", "--model", "tiny-wan", "--method", "sla", "--topk", "0.5", "--prompts", str(prompts),
            "--output", str(out), "--frames", "9", "--height", "64", "--width", "128", "--max-sequence-length", "16",
            "--rank", "4", "--lr", "2e-3", "--seed", "0", "--eval-batches", "0", "--gradient-accumulation-steps", "1",
            "--checkpoint-every", "1", "--steps", "4", "--resume", "--quiet"]
    env = {**os.environ, "DIT_ACCEL_TEST_KILL_AT": str(total - 5), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "dit_accel", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    rc = main(["generate", "--model", "tiny-wan", "--weights", str(out), "--frames", "9", "--height", "64", "--width",
               "128", "--steps", "1", "--quiet", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"{out / LORA_FILE}: content differs from the sha256" in err, err
    assert main(args) == 0  # --resume finishes the 4-step run
    assert "step-000004" in {p.name for p in (out / CKPT_DIR).iterdir()}


def test_overwrite_killed_half_way_can_be_overwritten_again(tmp_path, prompts, reference):
    count = tmp_path / "count"
    shutil.copytree(reference["out"], count)
    total = write_points(lambda: finetune(_config(count, prompts, steps=1, overwrite=True)))
    for k in kill_points(total, 3, seed=6) + [1, 2]:
        out = tmp_path / f"kill{k}"
        if out.exists():
            continue
        shutil.copytree(reference["out"], out)
        (out / "notes.txt").write_text("mine")
        assert run_killed(lambda: finetune(_config(out, prompts, steps=1, overwrite=True)), k) == "killed"
        assert (out / RUN_FILE).is_file(), k  # still a run
        finetune(_config(out, prompts, steps=1, overwrite=True))
        assert (out / "notes.txt").read_text() == "mine"
        assert sorted(p.name for p in (out / CKPT_DIR).iterdir()) == ["step-000001"], k
