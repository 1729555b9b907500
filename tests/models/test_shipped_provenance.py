"""Provenance in shipped files names paths relative to the package, never the training machine's absolute paths;
the writers (finetune's run record and log, train_tiny's log and model index) record them that way."""

import json
import os
import re
from pathlib import Path

import pytest

import dit_accel
from dit_accel.models.loading import model_fingerprint
from dit_accel.models.tiny_shapes import shapes_model
from dit_accel.training.config import FinetuneConfig

MODELS = Path(dit_accel.__file__).resolve().parent / "models"
_ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|~)")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_no_shipped_file_names_an_absolute_path():
    found = []
    for path in sorted(MODELS.rglob("*.json")):
        found += [f"{path.relative_to(MODELS)}: {s}" for s in _strings(json.loads(path.read_text()))
                  if _ABSOLUTE.match(s)]
    assert not found, found


def test_the_shipped_lora_records_its_model_as_it_is_shipped():
    lora = shapes_model("tiny-shapes-63").plan_weights
    run = json.loads((lora / "finetune_run.json").read_text())
    assert run["model_sha256"] == model_fingerprint("tiny-shapes-63")  # the files it was trained on, as shipped
    assert run["plan_path"] == "dit_accel/models/plans/tiny-shapes-63.json" and run["output"] == "."


def test_finetune_records_its_files_relative_to_its_output_folder(tmp_path):
    plan = shapes_model("tiny-shapes-63").plan
    config = FinetuneConfig(model="tiny-shapes-63", output=str(tmp_path / "runs" / "ft"),
                            data=str(tmp_path / "clips"), prompts=str(tmp_path / "runs" / "prompts.txt"), plan=str(plan))
    settings = config.settings()
    assert settings["output"] == "." and settings["data"] == "../../clips" and settings["prompts"] == "../prompts.txt"
    assert settings["plan_path"] == "dit_accel/models/plans/tiny-shapes-63.json"
    assert not any(_ABSOLUTE.match(s) for s in _strings(settings)), settings
    assert os.path.normpath(tmp_path / "runs" / "ft" / settings["data"]) == str(tmp_path / "clips")


def test_a_run_file_of_an_earlier_version_with_absolute_paths_still_resumes(tmp_path):
    from dit_accel.atomic_files import atomic_write_json
    from dit_accel.training.checkpoints import _check_output, _run_record
    from dit_accel.training.config import RUN_FILE

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "ft"
    out.mkdir()
    config = FinetuneConfig(model="tiny-shapes", output=str(out), prompts=str(prompts), resume=True)
    record = _run_record(config, 1)
    assert record["prompts"] == "../prompts.txt"
    atomic_write_json(out / RUN_FILE, {**record, "prompts": str(prompts), "output": str(out)})  # as 0.2 wrote it
    assert _check_output(config, 1)[0] == out  # the same run: resumed, not refused
    other = tmp_path / "other.txt"  # (another file of the same prompts is the same run: round 22's test)
    other.write_text("a blue square moving left\n")
    record = _run_record(FinetuneConfig(model="tiny-shapes", output=str(out), prompts=str(other), resume=True), 1)
    atomic_write_json(out / RUN_FILE, {**record, "prompts": str(other)})
    with pytest.raises(ValueError, match="different run"):
        _check_output(config, 1)
