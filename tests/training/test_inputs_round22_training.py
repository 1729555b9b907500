"""Round 22 of the input audit: fine-tuning output folders (moved runs, two runs on one folder, run records of a newer
version, a checkpoint given as a weights folder)."""

import json
import shutil
import threading

import pytest

import dit_accel
from dit_accel.atomic_files import BadFileError, BusyError, locked
from dit_accel.training import finetune
from tests.training import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

SMALL = dict(frames=5, height=32, width=32)


def _config(tmp_path, prompts_file, **kw):
    return tiny_config(tmp_path, prompts_file, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prompts_file):
    """A finished two-step run (a checkpoint after each step) in ``<tmp>/out``."""
    root = tmp_path_factory.mktemp("run")
    finetune(_config(root, prompts_file, steps=2, checkpoint_every=1))
    return root / "out"


def test_resume_takes_a_moved_run_folder_and_a_copy_of_its_prompts(tmp_path, prompts_file):
    """Before: the run record names its inputs relative to the output folder, so a run folder moved elsewhere (or
    the same prompts in another file) was refused as "a different run (prompts: '../prompts.txt' ->
    '../../prompts.txt')", though its inputs' sha256 were the same."""
    (tmp_path / "a").mkdir()
    first = tmp_path / "a" / "prompts.txt"
    shutil.copy(prompts_file, first)
    done = finetune(_config(tmp_path, first, steps=2, checkpoint_every=1))
    (tmp_path / "runs").mkdir()
    shutil.move(str(tmp_path / "out"), str(tmp_path / "runs" / "out"))
    copy = tmp_path / "copy.txt"
    shutil.copy(prompts_file, copy)
    again = finetune(_config(tmp_path / "runs", copy, steps=3, checkpoint_every=1, resume=True))
    assert again["resumed_from"] == 2 and again["loss"][:2] == done["loss"]
    copy.write_text("another prompt\n")  # other contents are still another run
    with pytest.raises(ValueError, match=r"a different run \(the contents of --prompts changed"):
        finetune(_config(tmp_path / "runs", copy, steps=4, resume=True))


def test_a_second_run_on_an_output_in_use_is_refused(tmp_path, prompts_file):
    """Before: two runs on one --output both trained, wrote their checkpoints into the one folder and each reported
    the weights there as its own (the last to finish won)."""
    taken, release = threading.Event(), threading.Event()

    def other_run():  # another process's run holds the folder (flock: another open file is another holder)
        with locked((tmp_path / "out").absolute(), wait=False):
            taken.set()
            release.wait(60)

    holder = threading.Thread(target=other_run)
    holder.start()
    try:
        assert taken.wait(60)
        with pytest.raises(BusyError, match=r"out: another writer .*is writing this output now"):
            finetune(_config(tmp_path, prompts_file))
    finally:
        release.set()
        holder.join()
    assert not (tmp_path / "out").exists()
    assert finetune(_config(tmp_path, prompts_file))["steps_this_session"] == 1  # free again: it trains


def test_a_run_record_of_a_newer_version_is_refused_as_such(finished_run, tmp_path, prompts_file):
    """Before: "--resume: ... holds a different run (ema_decay: 0.99 -> None); use the same settings", a setting no
    flag of this version sets."""
    shutil.copytree(finished_run, tmp_path / "out")
    record = tmp_path / "out" / "finetune_run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "ema_decay": 0.99}))
    with pytest.raises(BadFileError, match=r"finetune_run\.json: records settings this dit-accel does not know "
                                           r"\(ema_decay\): a newer dit-accel wrote it"):
        finetune(_config(tmp_path, prompts_file, steps=3, checkpoint_every=1, resume=True))


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints/step-000001"])
def test_a_checkpoint_given_as_weights_names_its_run(finished_run, where):
    """Before: "weights=.../checkpoints/step-000001 has no dit_accel_method.json; is it the output folder of
    `dit-accel finetune`?" of the run's own checkpoint."""
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-wan")
    with pytest.raises(ValueError, match=r"is (the checkpoints folder|a training checkpoint) of the `dit-accel "
                                         r"finetune` run in '.*out', not a weights folder: pass weights='.*out'"):
        dit_accel.apply(pipe, dit_accel.SLA(topk=0.5), weights=str(finished_run / where))
    assert dit_accel.apply(pipe, dit_accel.SLA(topk=0.5), weights=str(finished_run)) is not None


@pytest.mark.parametrize("where, says", [
    pytest.param("checkpoints/step-000001", "is a training checkpoint of the `dit-accel finetune` run in", id="checkpoint"),
    pytest.param("unfinished", "is a `dit-accel finetune` run that has not finished", id="unfinished")])
def test_vsa_names_a_run_folder_given_as_weights_as_such(finished_run, tmp_path, where, says):
    """Before: under VSA, the checkpoint of a run, or a run that has not finished, was "neither to_gate_compress gates
    ... nor a dit-accel finetune output; pass the checkpoint's transformer folder" (the gates of a sparse-distilled
    checkpoint), where the other methods said what the folder is."""
    from dit_accel.models.loading import load_pipeline

    folder = finished_run / where
    if where == "unfinished":  # a run killed before its end: its record and no weights yet
        folder = tmp_path / "unfinished"
        folder.mkdir()
        shutil.copy(finished_run / "finetune_run.json", folder)
    with pytest.raises(ValueError, match=r"weights='.*' " + says.replace("`", ".").replace("(", r"\(")):
        dit_accel.apply(load_pipeline("tiny-wan"), dit_accel.VSA(sparsity=0.5), weights=str(folder))
