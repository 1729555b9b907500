"""A fine-tuning run that diverges writes no weights, leaves its output folder as it was and says so (Python API:
NonFiniteOutputError; CLI: one line, exit status 1); optimizer flags out of range are refused before the model
loads, naming the flag."""

import re

import pytest
import torch

import dit_accel
from dit_accel.errors import NonFiniteOutputError
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune, validate_config
from dit_accel.training import loop
from tests.training import probe, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)  # token grid (3, 4, 8)
# lr 1e6 blows the LoRA up in two steps: the training loss stays finite, the held-out loss is NaN
# (the run of the audit: "loss 0.05774 -> 6.961, held-out loss 0.0153 -> nan; weights in ft8", exit 0).
DIVERGES = 1e6


def _config(output, prompts, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output),
                prompts=str(prompts), steps=2, lr=1e-3, rank=4, seed=0, progress=False, eval_batches=1,
                gradient_accumulation_steps=1, **SHAPE)
    base.update(kw)
    return FinetuneConfig(**base)


def test_diverged_run_writes_nothing_and_leaves_folder_and_model_as_they_were(prompts_file, tmp_path):
    out = tmp_path / "ft"
    finetune(_config(out, prompts_file, steps=1))  # a good run: its weights must survive the bad --overwrite below
    before = snapshot(out)
    assert "dit_accel_method.json" in before and "checkpoints/step-000001/trainable.safetensors" in before
    pipe = build_tiny_pipeline("tiny-wan")
    reference = probe(pipe.transformer)
    with pytest.raises(NonFiniteOutputError, match=r"^the run diverged \(held-out loss nan, training loss [0-9.e-]+ "
                                                   r"-> [0-9.e+-]+\): nothing was written to .*ft; lower --lr "
                                                   r"\(now 1e6\)$"):
        finetune(_config(out, prompts_file, model=pipe, lr=DIVERGES, overwrite=True))
    assert snapshot(out) == before  # the earlier run's weights, log, run record and checkpoint, byte for byte
    # the caller's pipeline: no dit_accel processors, no LoRA, the same output as before the run
    assert not getattr(pipe.transformer, "peft_config", None)
    assert torch.equal(probe(pipe.transformer), reference)

    new = tmp_path / "new"
    with pytest.raises(NonFiniteOutputError, match="nothing was written"):
        finetune(_config(new, prompts_file, lr=DIVERGES))
    assert not new.exists()  # a run that diverged in a new folder leaves no folder


def test_diverged_resume_keeps_the_checkpoints_it_resumed_from(prompts_file, tmp_path, monkeypatch):
    """Step 3 writes a checkpoint (the limit of 1 removes step 2's), step 4 turns the weights NaN: the folder gets
    back step 2's checkpoint and the run record of 2 steps, and loses step 3's."""
    out = tmp_path / "ft"
    kw = dict(steps=2, checkpoint_every=1, checkpoints_total_limit=1, eval_batches=0)
    finetune(_config(out, prompts_file, **kw))
    before = snapshot(out)
    assert [k for k in before if k.startswith("checkpoints/step-") and "/" not in k[12:]] == ["checkpoints/step-000002"]
    saved = []
    real_step, real_save = loop._Trainer.step, loop._save_checkpoint

    def poisoned_step(self, step, first):
        loss = real_step(self, step, first)
        if step == 3:
            with torch.no_grad():
                next(iter(self.params.values())).fill_(float("nan"))
        return loss

    def recorded_save(out, step, *args, **kwargs):
        saved.append(step)
        return real_save(out, step, *args, **kwargs)

    monkeypatch.setattr(loop._Trainer, "step", poisoned_step)
    monkeypatch.setattr(loop, "_save_checkpoint", recorded_save)
    with pytest.raises(NonFiniteOutputError, match=r"diverged \(NaN or inf weights after step 4, training loss"):
        finetune(_config(out, prompts_file, **dict(kw, steps=4, resume=True)))
    assert saved == [3]  # step 3 was checkpointed (and removed step 2's), step 4 was not
    assert snapshot(out) == before


def test_cli_diverged_run_exits_1_with_one_line(prompts_file, tmp_path, capsys):
    from dit_accel.cli.finetune import main

    out = tmp_path / "ft8"
    rc = main(["--model", "tiny-wan", "--method", "sla", "--topk", "0.5", "--prompts", str(prompts_file),
               "--lr", "1e6", "--steps", "2", "--rank", "4", "--frames", "9", "--height", "64", "--width", "128",
               "--max-sequence-length", "16", "--gradient-accumulation-steps", "1", "--eval-batches", "1",
               "--output", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "weights in" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dit-accel finetune: error: the run diverged (held-out loss nan"), err
    assert err[0].endswith(f"nothing was written to {out}; lower --lr (now 1e6)")
    assert not out.exists()


@pytest.mark.parametrize("flag, value, expect", [
    ("--max-grad-norm", "-1", r"--max-grad-norm -1.0 is invalid: must be a number >= 0 \(.*0 disables"),
    ("--weight-decay", "-1", r"--weight-decay -1.0 is invalid: must be a number >= 0"),
    ("--weight-decay", "nan", r"--weight-decay nan is invalid: must be a number >= 0"),
    ("--max-sequence-length", "0", r"--max-sequence-length 0 is invalid: must be a positive integer"),
], ids=["max-grad-norm-negative", "weight-decay-negative", "weight-decay-nan", "max-sequence-length-0"])
def test_cli_refuses_optimizer_flags_out_of_range_before_loading(flag, value, expect, prompts_file, tmp_path, capsys,
                                                                 monkeypatch):
    from dit_accel.cli.finetune import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(loop, "_load_pipe", no_load)
    out = tmp_path / "out"
    rc = main(["--model", "tiny-wan", "--method", "sla", "--prompts", str(prompts_file), "--steps", "1",
               "--output", str(out), flag, value])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("dit-accel finetune: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(expect, err), err
    assert not out.exists()


def test_zero_grad_norm_and_weight_decay_stay_allowed(prompts_file, tmp_path):
    validate_config(_config(tmp_path / "out", prompts_file, max_grad_norm=0, weight_decay=0))
    validate_config(_config(tmp_path / "out", prompts_file, max_grad_norm=0.5, weight_decay=0.01))
