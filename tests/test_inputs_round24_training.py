"""Round 24 (trust), fine-tuning: bad inputs and faults get a clear error naming the option and what to do, and a
failed run leaves the output folder as it was."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from dit_accel.training import finetune
from dit_accel.training.config import validate_config
from tests.training import PROMPTS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def test_a_huge_rank_is_refused_before_peft_allocates_the_adapters(tmp_path, prompts_file, monkeypatch):
    """Before: --rank 1000000000 made peft allocate 256 GB for the first adapter (a raw RuntimeError from the CPU
    allocator, or the machine swapping) before the rank check that names the layer ran."""
    from diffusers.loaders.peft import PeftAdapterMixin

    monkeypatch.setattr(PeftAdapterMixin, "add_adapter", lambda *a, **k: pytest.fail("the adapters were allocated"))
    with pytest.raises(ValueError, match=r"^--rank 1000000000 is past the width of the adapted layer blocks\.0\.attn1\."
                                         r"to_\w+ \(64 -> 64 features\): .*Pass --rank 64 or less"):
        finetune(tiny_config(tmp_path, prompts_file, rank=10 ** 9))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["batch_size", "gradient_accumulation_steps", "steps"])
def test_counts_past_2_31_are_refused_naming_the_option(tmp_path, prompts_file, name):
    """Before: --batch-size 2**70 failed in torch.rand ("Overflow when unpacking long long", a raw TypeError) and
    --gradient-accumulation-steps 2**70 in the loss's division (a raw OverflowError), once the model had loaded."""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{flag} {2 ** 70} is invalid: must be at most 2147483647 \(2\*\*31 - 1\)"):
        validate_config(tiny_config(tmp_path, prompts_file, **{name: 2 ** 70}))
    validate_config(tiny_config(tmp_path, prompts_file, **{name: 2 ** 31 - 1}))  # the largest allowed


@pytest.mark.parametrize("name", ["data", "eval_data", "prompts"])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, prompts_file, name, monkeypatch):
    """Before: "" was Path("") = ".", the current folder: --data "" in data mode trained on whatever metadata.jsonl
    the current folder held, and --prompts "" was refused as "--prompts '.' does not exist"."""
    monkeypatch.chdir(tmp_path)
    kw = {"prompts": None, "mode": "data", "data": str(tmp_path)} if name != "prompts" else {}
    kw[name] = ""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{flag} '' is empty: give the path of .*, or leave {flag} out\.$"):
        validate_config(tiny_config(tmp_path, prompts_file, **kw))


def _checkpointed(tmp_path):
    """Two checkpoints of a one-tensor run (steps 1 and 2) in ``tmp_path/out``, and the run's live pieces."""
    from dit_accel.training.checkpoints import _save_checkpoint

    params = {"transformer.w": torch.nn.Parameter(torch.zeros(3))}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3)
    out = tmp_path / "out"
    for step in (1, 2):
        _save_checkpoint(out, step, params, optimizer, None, [0.5] * step, limit=0)
    return out, params, optimizer


def test_a_resume_that_falls_back_to_an_older_checkpoint_says_so_in_the_log(tmp_path, prompts_file):
    """Before: the warning that the latest checkpoint was damaged (and the run went back to the one before) was only
    a Python warning: --quiet hid it and finetune_log.json's "warnings" did not list it, so a run that silently lost
    its last checkpoint's steps looked resumed from where it stopped."""
    from dit_accel.training.loop import _resume

    out, params, optimizer = _checkpointed(tmp_path)
    (out / "checkpoints" / "step-000002" / "trainable.safetensors").write_bytes(b"damaged")
    config = tiny_config(tmp_path, prompts_file, steps=3, resume=True)
    trainer = SimpleNamespace(config=config, accelerator=SimpleNamespace(is_main_process=True), params=params,
                              optimizer=optimizer, scaler=None, resumed_eval_start=None)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        start, losses, resumed = _resume(trainer, out)
    assert (start, resumed) == (1, 1)
    said = config.__dict__["_warnings"]  # what finetune_log.json's "warnings" lists (finetune._run_warnings)
    assert len(said) == 1 and "step-000002/trainable.safetensors" in said[0]
    assert said[0].endswith("resuming from the previous checkpoint, step-000001")


def test_out_of_memory_is_one_line_naming_the_sizes_and_the_folder_is_left_as_it_was(tmp_path, prompts_file,
                                                                                     monkeypatch, capsys):
    """Before: --frames 1000000001 (or a large --batch-size) ended in a raw RuntimeError from the CPU allocator (CUDA's
    OutOfMemoryError on a GPU), deep inside the forward, naming no option."""
    from dit_accel.cli import finetune as cli
    from dit_accel.training import loop

    def no_memory(self, step, first):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 512000002048 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(loop._Trainer, "step", no_memory)
    out = tmp_path / "out"
    rc = cli.main(["--model", "tiny-wan", "--method", "sla", "--topk", "0.5", "--prompts", str(prompts_file),
                   "--output", str(out), "--steps", "1", "--rank", "4", "--eval-batches", "0", "--frames", "9",
                   "--height", "64", "--width", "128", "--max-sequence-length", "16", "--quiet",
                   "--gradient-accumulation-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0] == ("dit-accel finetune: error: out of memory while fine-tuning (it tried to allocate 476.8 GiB): "
                      "lower --batch-size (now 1) or --frames/--height/--width (now 9x64x128), or pass "
                      "--gradient-checkpointing and --mixed-precision bf16 (--gradient-accumulation-steps keeps the "
                      "samples per step with smaller micro-batches).")
    assert not out.exists()


def test_cuda_out_of_memory_is_named_and_other_errors_pass_through(tmp_path, prompts_file):
    from dit_accel.training.finetune import _out_of_memory

    config = tiny_config(tmp_path, prompts_file, batch_size=4, gradient_checkpointing=True, mixed_precision="bf16")
    problem = _out_of_memory(config, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."))
    assert isinstance(problem, MemoryError) and isinstance(problem, RuntimeError)  # (as torch's own is)
    assert str(problem).startswith("out of memory while fine-tuning (it tried to allocate 2.00 GiB): lower "
                                   "--batch-size (now 4) or --frames/--height/--width (now 9x64x128) (")
    assert _out_of_memory(config, RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_damaged_run_record_says_what_to_do(tmp_path, prompts_file):
    """Before: "finetune_run.json: holds a JSON list; expected the run record `dit-accel finetune` writes (a JSON object
    of settings)", with no way out named."""
    from dit_accel.training.checkpoints import _check_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "finetune_run.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"finetune_run\.json: holds a JSON list; expected the run record .*: "
                                         r"--overwrite starts the run again .*, or choose another --output$"):
        _check_output(tiny_config(tmp_path, prompts_file, resume=True), 1)
    assert json.loads((out / "finetune_run.json").read_text()) == [1]


def test_a_resumed_runs_summary_says_whose_steps_the_losses_are(monkeypatch, capsys):
    """Before: "2 steps this session (resumed at step 2 of 4), loss 0.0001303 -> 0.0001311": the first loss was step
    1's, of the session before, read as this session's."""
    import argparse

    import dit_accel.training
    from dit_accel.cli import finetune as cli

    result = {"loss": [0.5, 0.4, 0.3, 0.2], "steps_this_session": 2, "resumed_from": 2, "steps": 4, "output": "out"}
    monkeypatch.setattr(cli, "config_from_args", lambda args: None)
    monkeypatch.setattr(dit_accel.training, "finetune", lambda config: result)
    assert cli._run(argparse.Namespace()) == 0
    assert capsys.readouterr().out.strip() == ("finetune: 2 steps this session (resumed at step 2 of 4), loss 0.5 at "
                                               "step 1 -> 0.2 at step 4; weights in out")


def test_sigterm_ends_the_run_as_ctrl_c_does_and_overwrite_gets_the_old_run_back(tmp_path, prompts_file, monkeypatch,
                                                                                capsys):
    """Before: SIGTERM (timeout, docker stop, a scheduler's preemption) killed the process at once: a run with
    --overwrite lost the run it was replacing (set aside, removed by the next run), and a new folder kept a run record
    without weights, which the next run refused as "another fine-tuning run"."""
    import os
    import signal

    from dit_accel.cli import finetune as cli
    from dit_accel.training import loop
    from tests.training import snapshot

    out = tmp_path / "out"
    argv = ["--model", "tiny-wan", "--method", "sla", "--topk", "0.5", "--prompts", str(prompts_file), "--output",
            str(out), "--steps", "1", "--rank", "4", "--eval-batches", "0", "--frames", "9", "--height", "64", "--width",
            "128", "--max-sequence-length", "16", "--quiet", "--gradient-accumulation-steps", "1"]
    assert cli.main(argv) == 0
    before = snapshot(out)
    capsys.readouterr()

    def terminated(self, step, first):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0.0

    monkeypatch.setattr(loop._Trainer, "step", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(argv + ["--overwrite", "--seed", "1"]) == 143
    assert capsys.readouterr().err.strip() == (
        "dit-accel finetune: stopped (SIGTERM): checkpoints written so far stay in --output for --resume; a run stopped "
        "before its first checkpoint left --output as it was.")
    assert snapshot(out) == before
    assert signal.getsignal(signal.SIGTERM) is handler
    assert cli.main(argv[:argv.index("--output") + 1] + [str(tmp_path / "new")] + argv[argv.index("--output") + 2:]) \
        == 143
    assert not (tmp_path / "new").exists()


def test_a_folder_of_images_records_the_one_frame_grid_it_trained_on(tmp_path):
    """Before: --data of images only under --frames 9 (tiny-wan's default 17 too) trained on one-frame samples (token
    grid (1, 4, 8)), but the weights folder and the log recorded frames 9 and the video grid (3, 4, 8), which no
    sample had."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray((np.random.default_rng(0).random((64, 128, 3)) * 255).astype("uint8")).save(data / name)
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n'
                                         '{"file_name": "b.png", "text": "a dog"}\n')
    finetune(tiny_config(tmp_path, None, prompts=None, mode="data", data=str(data)))
    info = json.loads((tmp_path / "out" / "dit_accel_method.json").read_text())
    log = json.loads((tmp_path / "out" / "finetune_log.json").read_text())
    assert (info["frames"], info["token_grid"], log["token_grid"]) == (1, [1, 4, 8], [1, 4, 8])
