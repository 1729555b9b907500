"""Fine-tuning: what a resumed run reports and what it checks it resumes (round 8 of the input audit)."""

import json

import pytest

import dit_accel
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training.data import CaptionDataset, inputs_digest

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, output, **kw):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output), prompts=str(tmp_path / "p.txt"),
                steps=2, rank=2, frames=5, height=32, width=64, max_sequence_length=8, progress=False,
                eval_batches=1, gradient_accumulation_steps=1, lr=2e-3)
    return FinetuneConfig(**{**base, **kw})


def test_a_resumed_run_reports_the_held_out_loss_of_the_runs_start(tmp_path):
    """Before: the resumed session measured eval_loss_start on the weights of the checkpoint it resumed from, so the
    result and finetune_log.json reported the loss mid-run as the start (the improvement looked smaller)."""
    straight = finetune(_config(tmp_path, tmp_path / "straight"))
    finetune(_config(tmp_path, tmp_path / "resumed", steps=1, checkpoint_every=1))
    resumed = finetune(_config(tmp_path, tmp_path / "resumed", resume=True, checkpoint_every=1))
    assert resumed["resumed_from"] == 1
    assert resumed["eval_loss_start"] == straight["eval_loss_start"]
    assert resumed["eval_loss_end"] == straight["eval_loss_end"]
    log = json.loads((tmp_path / "resumed" / "finetune_log.json").read_text())
    assert log["eval_loss_start"] == straight["eval_loss_start"]
    # (before: --eval-batches could change on resume, and the start loss, over the old batches, was set beside an end
    # loss over the new ones)
    finetune(_config(tmp_path, tmp_path / "batches", steps=1, checkpoint_every=1))
    with pytest.raises(ValueError, match=r"--resume: .* holds a different run \(eval_batches: \d+ -> 3\)"):
        finetune(_config(tmp_path, tmp_path / "batches", resume=True, checkpoint_every=1, eval_batches=3))


def _folder(tmp_path, lines):
    from PIL import Image

    root = tmp_path / "data"
    (root / "clips").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "top.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "clips" / "sub.png")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def test_the_inputs_digest_covers_the_files_metadata_names_in_subfolders(tmp_path):
    """Before: only the folder's top-level files were hashed, so --resume went on over a caption folder whose
    clips/sub.png had changed (a run mixing two data sets) without a word."""
    from PIL import Image

    root = _folder(tmp_path, [{"file_name": "top.png", "text": "red"}, {"file_name": "clips/sub.png", "text": "green"}])
    assert len(CaptionDataset(root, frames=1, height=8, width=8)) == 2
    before = inputs_digest(data=root)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "clips" / "sub.png")
    assert inputs_digest(data=root) != before


@pytest.mark.parametrize("lines, says", [
    ([{"file_name": "top.png", "text": "red"}, {"file_name": "top.png", "text": "blue"}],
     r"metadata.jsonl:2: 'top.png' has a caption already \(line 1\)"),
    ([{"file_name": 5, "text": "red"}], r"metadata.jsonl:1: 'file_name' 5 is invalid"),
    # (before: "./top.png" and "top.png" were two entries of one file, and a file outside the folder was read)
    ([{"file_name": "top.png", "text": "red"}, {"file_name": "./top.png", "text": "blue"}],
     r"metadata.jsonl:2: 'top.png' has a caption already \(line 1\)"),
    ([{"file_name": "top.png", "text": "red"}, {"file_name": "../data/top.png", "text": "red"}],
     r"metadata.jsonl:2: file '../data/top.png' is outside .*: name a file inside the --data folder"),
], ids=["caption-twice", "name-not-text", "same-file-two-spellings", "outside-the-folder"])
def test_metadata_lines_that_cannot_both_hold_are_refused_naming_the_line(tmp_path, lines, says):
    """Before: a file captioned twice trained on its last caption without a word; a file_name that is not a text
    raised a bare TypeError from pathlib."""
    with pytest.raises(ValueError, match=says):
        CaptionDataset(_folder(tmp_path, lines), frames=1, height=8, width=8)
