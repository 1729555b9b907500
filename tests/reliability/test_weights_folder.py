"""The weights folder (LoRA + SLA projections + method file): killed writers and damaged files.

A folder is written by :func:`dit_accel.checkpoints.finetuned.save_trained_weights` (``finetune``) and
:func:`dit_accel.checkpoints.convert.convert_checkpoint`. Killed at any write point, it must load as the old
complete folder, the new complete one, or raise one line naming a file; a bad folder must raise
before anything is loaded into the model.
"""

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.checkpoints.finetuned import (ADAPTER_NAME, LORA_FILE, METHOD_FILE, SLA_FILE, load_into, load_method,
                               lora_state_dict, save_trained_weights, sla_state_dict)

from .faults import KINDS, assert_one_line, damage, kill_points, run_killed, write_points

pytestmark = pytest.mark.usefixtures("one_thread")
METHOD = dit_accel.SLA(topk=0.5)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _student(seed: int):
    """A tiny-wan transformer under SLA with a LoRA adapter; LoRA and projections drawn from ``seed``."""
    transformer = build_tiny_pipeline("tiny-wan").transformer
    handle = dit_accel.apply(transformer, METHOD)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for module in handle.sla_projections().values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer, handle, config


def _write(folder, student):
    transformer, handle, config = student
    save_trained_weights(folder, transformer=transformer, method=METHOD, lora_config=config,
                         sla_projections=handle.sla_projections(), extra={"dense_layers": None})


def _tensors(transformer, handle, adapter):
    return {**{f"lora.{k}": v for k, v in lora_state_dict(transformer, adapter).items()},
            **{f"sla.{k}": v for k, v in sla_state_dict(handle.sla_projections()).items()}}


@pytest.fixture(scope="module")
def students():
    return {seed: _student(seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def expected(students):
    return {seed: _tensors(s[0], s[1], "default") for seed, s in students.items()}


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory, students):
    folder = tmp_path_factory.mktemp("weights") / "old"
    _write(folder, students[0])
    return folder


def _fresh():
    transformer = build_tiny_pipeline("tiny-wan").transformer
    return transformer, dit_accel.apply(transformer, METHOD)


def _untouched(transformer, handle, before) -> None:
    assert ADAPTER_NAME not in (getattr(transformer, "peft_config", None) or {})
    after = sla_state_dict(handle.sla_projections())
    assert all(torch.equal(after[k], before[k]) for k in before)


def _load_outcome(folder, expected):
    """``0`` or ``1`` (the complete folder of that seed loaded), or the one-line error; a failed load
    leaves the model as it was."""
    transformer, handle = _fresh()
    before = sla_state_dict(handle.sla_projections())
    try:
        load_into(handle, folder)
    except ValueError as err:
        assert_one_line(err, folder)
        _untouched(transformer, handle, before)
        return err
    got = _tensors(transformer, handle, ADAPTER_NAME)
    for seed, want in expected.items():
        if got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want):
            return seed
    raise AssertionError("the folder loaded without an error but holds a mix of two writes")


def test_writer_killed_at_every_write_point(tmp_path, students, expected, old_folder):
    total = write_points(lambda: _write(tmp_path / "count", students[1]))
    assert total >= 4
    outcomes = []
    for k in kill_points(total, total):
        case = tmp_path / f"kill{k}"
        shutil.copytree(old_folder, case)
        assert run_killed(lambda: _write(case, students[1]), k) == "killed"
        outcomes.append(_load_outcome(case, expected))
    assert outcomes[0] == 0 and outcomes[-1] == 1  # before the first rename: old; after the last: new
    mixed = [o for o in outcomes if isinstance(o, BadFileError)]
    assert mixed and all("content differs from the sha256" in str(e) for e in mixed)
    # The next write over a killed one cleans up and is complete.
    _write(tmp_path / f"kill{outcomes.index(mixed[0]) + 1}", students[1])
    assert _load_outcome(tmp_path / f"kill{outcomes.index(mixed[0]) + 1}", expected) == 1


@pytest.mark.parametrize("hashes", [True, False], ids=["with-hashes", "legacy-no-hashes"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [METHOD_FILE, LORA_FILE, SLA_FILE])
def test_damaged_file_is_one_line_and_nothing_is_loaded(tmp_path, old_folder, expected, name, kind, hashes):
    folder = tmp_path / "w"
    shutil.copytree(old_folder, folder)
    if not hashes:  # a folder written before the hashes were recorded: the readers themselves must catch it
        info = json.loads((folder / METHOD_FILE).read_text())
        info.pop("sha256")
        (folder / METHOD_FILE).write_text(json.dumps(info))
    damage(folder / name, kind)
    err = _load_outcome(folder, expected)
    assert isinstance(err, ValueError)
    assert_one_line(err, folder / name)


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "holds a JSON list; expected the JSON object"),
    ('{"method": 5, "files": {}}', "its \"method\" entry is '5'"),
    ('{"method": {"method": "sla", "topk": "many"}, "files": {}}', "its method config is not valid"),
    ('{"method": {"method": "nope"}, "files": {}}', "its method config is not valid"),
    ('{"method": {"method": "sla", "topk": 0.5}, "files": [1]}', "its \"files\" entry"),
    ('{"method": {"method": "sla", "topk": 0.5}, "files": {"lora": 5}}', "its \"files\" entry"),
    ('{"method": {"method": "sla", "topk": 0.5}, "files": {"lora": "../x"}}', "its \"files\" entry"),
    ('{"method": {"method": "sla", "topk": 0.5}, "files": {}, "sha256": [1]}', "its sha256 table is list"),
    ('{"method": {"method": "sla", "topk": 0.5}, "files": {}, "sha256": {"gone.safetensors": "00"}}',
     "gone.safetensors: missing, but dit_accel_method.json lists it"),
], ids=["list", "method-int", "bad-value", "unknown-method", "files-list", "files-int", "files-outside", "sha-list",
        "sha-missing-file"])
def test_method_file_of_the_wrong_structure(tmp_path, old_folder, expected, content, match):
    folder = tmp_path / "w"
    shutil.copytree(old_folder, folder)
    (folder / METHOD_FILE).write_text(content)
    err = _load_outcome(folder, expected)
    assert isinstance(err, ValueError) and match in str(err), str(err)
    if "sha256" not in content and "files\": {}" in content and "\"method\": {" in content:
        with pytest.raises(ValueError, match="method config is not valid"):
            load_method(folder)


@pytest.mark.parametrize("name, dim, match", [(SLA_FILE, 0, "has shape"), (LORA_FILE, 1, "has shape"),
                                             (LORA_FILE, 0, "has rank")], ids=["sla", "lora-features", "lora-rank"])
def test_tensors_of_the_wrong_shape_raise_before_loading(tmp_path, old_folder, expected, name, dim, match):
    """Valid safetensors files of another model size (no hashes: the shapes themselves are checked)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = tmp_path / "w"
    shutil.copytree(old_folder, folder)
    info = json.loads((folder / METHOD_FILE).read_text())
    info.pop("sha256")
    (folder / METHOD_FILE).write_text(json.dumps(info))
    with safe_open(str(folder / name), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(folder / name))
    key = sorted(tensors)[0]  # blocks.0.attn1.to_k.lora_A / the first projection weight
    shape = list(tensors[key].shape)
    shape[dim] += 1
    tensors[key] = torch.zeros(shape)
    save_file(tensors, str(folder / name), metadata=metadata)
    err = _load_outcome(folder, expected)
    assert isinstance(err, ValueError) and match in str(err), str(err)
    assert_one_line(err, folder / name)


def test_lora_file_without_tensors_is_one_line(tmp_path, old_folder, expected):
    folder = tmp_path / "w"
    shutil.copytree(old_folder, folder)
    info = json.loads((folder / METHOD_FILE).read_text())
    info.pop("sha256")
    (folder / METHOD_FILE).write_text(json.dumps(info))
    save_file({}, str(folder / LORA_FILE))
    err = _load_outcome(folder, expected)
    assert isinstance(err, BadFileError) and "holds no LoRA tensors" in str(err)


@pytest.mark.parametrize("name", [SLA_FILE, LORA_FILE])
def test_apply_with_a_truncated_file_loads_no_lora(tmp_path, old_folder, name):
    """The issue's case: `apply(..., weights=DIR)` with a truncated SLA file used to load the LoRA first."""
    folder = tmp_path / "w"
    shutil.copytree(old_folder, folder)
    damage(folder / name, "truncated")
    transformer = build_tiny_pipeline("tiny-wan").transformer
    with pytest.raises(ValueError) as info:
        dit_accel.apply(transformer, METHOD, weights=folder)
    assert_one_line(info.value, folder / name)
    assert ADAPTER_NAME not in (getattr(transformer, "peft_config", None) or {})
