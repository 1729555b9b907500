"""A weights folder's dit_accel_method.json names its layout ("format"): a newer one than this dit_accel reads, or
one that is not a whole number, is refused naming the file (as plans refuse a newer format_version)."""

import json

import pytest

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.checkpoints.finetuned import METHOD_FILE
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune, load_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, prompts_file):
    out = tmp_path_factory.mktemp("weights")
    finetune(FinetuneConfig(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(out), prompts=str(prompts_file),
                            steps=1, lr=1e-3, rank=2, progress=False, eval_batches=0, gradient_accumulation_steps=1,
                            frames=9, height=64, width=128, max_sequence_length=16))
    return out


def _with_format(folder, value):
    path = folder / METHOD_FILE
    info = json.loads(path.read_text())
    if value is None:
        info.pop("format")
    else:
        info["format"] = value
    path.write_text(json.dumps(info))
    return path


@pytest.mark.parametrize("value, expect", [
    (9, r"its \"format\" is 9, written by a newer dit-accel; this dit_accel reads up to 1; expected .*upgrade "
        r"dit-accel"),
    ("1", r"its \"format\" is '1'; expected a whole number"),
    (1.5, r"its \"format\" is '1.5'; expected a whole number"),
    (True, r"its \"format\" is 'True'; expected a whole number"),
], ids=["newer", "string", "float", "bool"])
def test_unreadable_format_is_refused_naming_the_file(folder, value, expect):
    path = _with_format(folder, value)
    try:
        with pytest.raises(BadFileError, match=expect) as err:
            load_method(folder)
        assert err.value.path == str(path)
        pipe = build_tiny_pipeline("tiny-wan")
        processors = dict(pipe.transformer.attn_processors)
        with pytest.raises(BadFileError, match=expect):
            dit_accel.apply(pipe, dit_accel.SLA(topk=0.5), weights=str(folder))
        assert dict(pipe.transformer.attn_processors) == processors  # the model as it was
        assert not getattr(pipe.transformer, "peft_config", None)
    finally:
        _with_format(folder, 1)


@pytest.mark.parametrize("value", [1, None], ids=["current", "absent"])
def test_readable_format_loads(folder, value):
    _with_format(folder, value)
    try:
        pipe = build_tiny_pipeline("tiny-wan")
        handle = dit_accel.apply(pipe, load_method(folder), weights=str(folder))
        assert handle.lora_adapter
        handle.remove()
    finally:
        _with_format(folder, 1)
