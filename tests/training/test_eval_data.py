"""``--eval-data``: the held-out loss of a data-mode run measured on clips kept out of training (before: the held-out
batches were drawn from the training clips, at noise levels and timesteps of their own, so the "held-out" loss said
how well the run fitted its clips, not how it does on others)."""
import json

import pytest

import dit_accel
from dit_accel.cli.finetune import config_from_args, register
from dit_accel.models import loading
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training import data as data_mod
from dit_accel.training.checkpoints import _run_record

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root, seed, n=2):
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        frames = [Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)) for _ in range(5)]
        frames[0].save(root / f"clip{i}.gif", save_all=True, append_images=frames[1:], duration=100)
        rows.append({"file_name": f"clip{i}.gif", "text": f"clip {seed} {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(tmp_path, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), mode="data", data=str(_folder(tmp_path / "data", 0)),
                output=str(tmp_path / "out"), steps=1, rank=2, frames=5, height=32, width=64, max_sequence_length=8,
                progress=False, eval_batches=1)
    return FinetuneConfig(**{**base, **kw})


def test_the_held_out_batches_are_drawn_from_eval_data_and_training_from_data(tmp_path, monkeypatch):
    drawn = []
    item = data_mod.CaptionDataset.item

    def spy(self, i):
        drawn.append(self.flag)
        return item(self, i)

    monkeypatch.setattr(data_mod.CaptionDataset, "item", spy)
    held_out = _folder(tmp_path / "held_out", 1)
    res = finetune(_config(tmp_path, eval_data=str(held_out)))
    # a training step of 1 clip from --data; the held-out batch before the step and after it from --eval-data
    assert drawn == ["--eval-data", "--data", "--eval-data"]
    assert res["eval_loss_start"] is not None
    record = json.loads((tmp_path / "out" / "finetune_run.json").read_text())
    assert record["eval_data"] == "../held_out" and record["eval_inputs_sha256"]


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the inputs were checked"))


@pytest.mark.parametrize("change, says", [
    (dict(mode="distill", data=None, prompts="P"), r"--eval-data .* needs --data"),
    (dict(eval_batches=0), r"--eval-data .* is unused with --eval-batches 0"),
    (dict(eval_data="DATA"), r"--eval-data .* is --data itself"),
    (dict(eval_data="MISSING"), r"--eval-data '.*missing' does not exist or is not a folder"),
    (dict(eval_data=5), r"--eval-data 5 is invalid: expected a path"),
], ids=["no-data", "no-batches", "the-training-clips", "missing", "not-a-path"])
def test_an_eval_data_that_cannot_serve_is_refused_before_the_model_loads(change, says, tmp_path, prompts_file,
                                                                          no_model):
    config = _config(tmp_path, eval_data=str(_folder(tmp_path / "held_out", 1)))
    fill = {"P": str(prompts_file), "DATA": config.data, "MISSING": str(tmp_path / "missing")}
    change = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ValueError, match=says):
        finetune(FinetuneConfig(**{**config.__dict__, **change}))
    assert not (tmp_path / "out").exists()


def test_the_run_record_changes_with_the_held_out_clips(tmp_path):
    held_out = _folder(tmp_path / "held_out", 1)
    config = _config(tmp_path, eval_data=str(held_out))
    before = _run_record(config, 1)
    (held_out / "metadata.jsonl").write_text((held_out / "metadata.jsonl").read_text().replace("clip 1 0", "other"))
    after = _run_record(config, 1)
    assert before["eval_inputs_sha256"] != after["eval_inputs_sha256"]
    assert before["inputs_sha256"] == after["inputs_sha256"]
    assert "eval_inputs_sha256" not in _run_record(_config(tmp_path / "plain"), 1)


def test_the_cli_flag_reaches_the_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--model", "tiny-wan", "--mode", "data", "--data", str(tmp_path / "d"),
                              "--eval-data", str(tmp_path / "e"), "--method", "sla", "--output", str(tmp_path / "o")])
    assert config_from_args(args).eval_data == str(tmp_path / "e")
