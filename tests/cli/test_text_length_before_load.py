"""``--max-sequence-length`` past the model's tokenizers is refused before the model loads where its folder says the
limit (``tokenizer*/tokenizer_config.json``), in every command and in the fine-tuning API, with the words the
check after loading uses (before: only once the model had loaded, minutes for a real one)."""
import json
import shutil

import pytest

from dit_accel.cli.main import main
from dit_accel.models import loading
from dit_accel.models.tiny_shapes import TRAINED_MODELS

SAYS = "--max-sequence-length 100000: the tokenizer of WanPipeline takes at most 512 tokens; give a length of at " \
       "most 512"


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the check"))


@pytest.mark.parametrize("command", [
    ["generate", "--model", "tiny-shapes", "--method", "tile", "--prompt", "a fox"],
    ["eval", "--model", "tiny-shapes", "--methods", "dense", "--prompt", "a fox"],
    ["calibrate", "--model", "tiny-shapes", "--prompts", "PROMPTS", "--min-psnr", "20"],
    ["finetune", "--model", "tiny-shapes", "--method", "sla", "--prompts", "PROMPTS", "--steps", "1"],
], ids=["generate", "eval", "calibrate", "finetune"])
def test_every_command_refuses_it_before_loading(command, tmp_path, capsys, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n")
    command = [str(prompts) if word == "PROMPTS" else word for word in command]
    out = ["--output" if command[0] == "finetune" else "--out", str(tmp_path / "out")]
    assert main([*command, *out, "--max-sequence-length", "100000"]) == 2
    err = capsys.readouterr().err
    assert SAYS in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_finetuning_api_refuses_it_before_loading(tmp_path, prompts, no_model_load):
    import dit_accel
    from dit_accel.training import FinetuneConfig, finetune

    with pytest.raises(ValueError, match=SAYS):
        finetune(FinetuneConfig(model="tiny-shapes", method=dit_accel.SLA(topk=0.5), output=str(tmp_path / "out"),
                                prompts=str(prompts), steps=1, frames=5, height=32, width=32,
                                max_sequence_length=100000, progress=False))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a fox\n")
    return path


def test_the_limit_read_before_loading_is_the_loaded_tokenizers(tmp_path):
    """Both checks on the same folder, the folder's limit changed to 77 (the loaded tokenizer reads it too)."""
    folder = tmp_path / "model"
    shutil.copytree(TRAINED_MODELS["tiny-shapes"], folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 77}))
    before = loading.early_text_length_error(str(folder), 78)
    after = loading.text_length_error(loading.load_pipeline(str(folder)), 78)
    assert before == after and "takes at most 77 tokens" in before
    assert loading.early_text_length_error(str(folder), 77) is None
    assert loading.early_text_length_error("tiny-wan", 100000) is None  # (built in code: asked once it loads)
