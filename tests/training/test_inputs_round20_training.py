"""Round 20 of the input audit: fine-tuning (the launch's precision, LoRA ranks and targets, damaged data files)."""

import json

import numpy as np
import pytest

from dit_accel.atomic_files import BadFileError
from dit_accel.training import finetune
from dit_accel.training.config import validate_config
from tests.training import tiny_config as _config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def _folder(root, names):
    """A caption folder: a 64x64 png per name, and metadata.jsonl naming them."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"picture {n}"}) + "\n"
                                                 for n in names))
    return root


@pytest.mark.parametrize("launched, given, trains", [("bf16", None, "bf16"), ("fp16", None, "fp16"),
                                                     (None, None, "no"), ("bf16", "no", "no")])
def test_the_python_api_trains_in_the_precision_accelerate_launch_was_given(launched, given, trains, monkeypatch,
                                                                             tmp_path, prompts_file):
    """Before: FinetuneConfig's default mixed_precision="no" overrode `accelerate launch --mixed_precision bf16`
    (ACCELERATE_MIXED_PRECISION), so a script run under it trained in float32 without a word (the CLI followed the
    launch). An explicit value stays explicit."""
    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    kw = {} if given is None else {"mixed_precision": given}
    config = _config(tmp_path, prompts_file, **kw)
    validate_config(config)
    assert config.mixed_precision == trains
    assert config.settings()["mixed_precision"] == trains  # (the run record holds what it trained in)


def test_a_launch_precision_the_python_api_cannot_train_in_is_refused(monkeypatch, tmp_path, prompts_file):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match=r"accelerate launch --mixed_precision fp8 \(ACCELERATE_MIXED_PRECISION\) is "
                                         r"not one finetune trains in: choose no, fp16 or bf16"):
        validate_config(_config(tmp_path, prompts_file))


def test_a_rank_past_the_adapted_layers_width_is_refused_before_training(tmp_path, prompts_file):
    """Before: --rank 512 on tiny-wan's 64-wide attention layers was taken without a word (a LoRA whose rank cannot
    pass 64, scaled down by alpha / 512)."""
    with pytest.raises(ValueError, match=r"^--rank 65 is past the width of the adapted layer blocks\.0\.attn1\.to_\w+ "
                                         r"\(64 -> 64 features\): .* the widest allowed here is 64\. Pass --rank 64 or "
                                         r"less"):
        finetune(_config(tmp_path, prompts_file, rank=65))
    assert not (tmp_path / "out").exists()


def test_resume_takes_the_same_target_modules_in_another_order(tmp_path, prompts_file):
    """Before: a run trained with --target-modules to_q,to_k refused --resume with to_k,to_q (or to_q,to_k,to_k) as
    "a different run (target_modules: ['to_q', 'to_k'] -> ['to_k', 'to_q'])"; peft adapts the same layers."""
    first = finetune(_config(tmp_path, prompts_file, target_modules=("to_q", "to_k")))
    again = finetune(_config(tmp_path, prompts_file, target_modules="to_k, to_q,to_k", resume=True))
    assert again["resumed_from"] == 1 and again["loss"] == first["loss"]
    with pytest.raises(ValueError, match=r"a different run \(target_modules: \['to_\w', 'to_\w'\] -> \['to_q'\]\)"):
        finetune(_config(tmp_path, prompts_file, target_modules=("to_q",), resume=True))


def test_a_duplicated_target_module_is_recorded_once(tmp_path, prompts_file):
    config = _config(tmp_path, prompts_file, target_modules=("to_q", "to_k", "to_q"))
    validate_config(config)
    assert config.target_modules == ("to_q", "to_k")


@pytest.mark.parametrize("damage", ["truncated", "renamed"])
def test_a_damaged_picture_in_a_caption_folder_is_refused_before_training(damage, tmp_path):
    """Before: a damaged (non-empty) picture was found only when a step first drew it, possibly hours into a run;
    a run resumed once it was fixed is refused (its inputs changed)."""
    from dit_accel.training.data import CaptionDataset

    root = _folder(tmp_path / "data", ["a.png", "b.jpg", "c.png"])
    whole = (root / "b.jpg").read_bytes()
    (root / "b.jpg").write_bytes(whole[:len(whole) // 2] if damage == "truncated" else b"not a picture at all")
    with pytest.raises(BadFileError, match=r"^\S+b\.jpg: cannot be decoded \(.*\); expected an image .* that decodes: "
                                           r"copy the file\(s\) again, or leave them out of --data"):
        CaptionDataset(root, frames=1, height=32, width=32)


def test_a_truncated_video_in_a_caption_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from dit_accel.models import loading
    from dit_accel.videos import save_video

    root = _folder(tmp_path / "data", ["a.png"])
    save_video(np.zeros((9, 32, 32, 3), dtype=np.uint8), root / "clip.mp4", fps=8)
    whole = (root / "clip.mp4").read_bytes()
    (root / "clip.mp4").write_bytes(whole[:len(whole) // 2])
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "clip.mp4", "text": "a clip"}) + "\n")

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    config = _config(tmp_path, None, mode="data", prompts=None, data=str(root))
    with pytest.raises(BadFileError, match=r"clip\.mp4: cannot be decoded \("):
        finetune(config)
    assert not (tmp_path / "out").exists()


def test_a_long_clip_decodes_only_the_frames_a_sample_takes(tmp_path):
    """Before: every frame of a clip was decoded each time a step drew it (a minute of HD video: gigabytes of memory
    and seconds per step), where the sample keeps the first --frames."""
    import tracemalloc

    from dit_accel.training.data import CaptionDataset
    from dit_accel.videos import save_video

    root = tmp_path / "data"
    root.mkdir()
    clip = np.random.default_rng(0).integers(0, 255, (160, 64, 64, 3), dtype=np.uint8)
    save_video(clip, root / "long.mp4", fps=16)  # 160 frames: 1.9 MB decoded
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "long.mp4", "text": "a long clip"}) + "\n")
    data = CaptionDataset(root, frames=5, height=64, width=64)
    tracemalloc.start()
    try:
        pixels, _ = data.item(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (3, 5, 64, 64)
    assert peak < 1_000_000, f"{peak} bytes at the peak: more frames decoded than the 5 kept"


def test_target_modules_that_all_match_nothing_are_told_the_closest_names(tmp_path, prompts_file):
    """Before: peft's "Target modules {'to_K', 'to_Q'} not found in the base model. Please check the target modules and
    try again.", naming no layer that is there (a name that matched nothing beside others that did got the names)."""
    with pytest.raises(ValueError, match=r"^--target-modules to_Q,to_K: to_Q, to_K not found: no layer of "
                                         r"WanTransformer3DModel is named so; did you mean to_q or .*\? Layers LoRA "
                                         r"can adapt there end in e\.g\. .*to_k"):
        finetune(_config(tmp_path, prompts_file, target_modules=("to_Q", "to_K")))
    assert not (tmp_path / "out").exists()


def test_held_out_clips_that_the_run_trains_on_too_are_refused(tmp_path, monkeypatch):
    """Before: only --eval-data naming the --data folder itself was refused; clips copied into --eval-data and left in
    --data (under any name) gave a "held-out" loss measured on clips the run trains on, without a word."""
    import shutil

    from dit_accel.models import loading

    data = _folder(tmp_path / "data", ["a.png", "b.png", "c.png"])
    held = _folder(tmp_path / "held", ["x.png"])
    shutil.copy(data / "b.png", held / "x.png")

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    config = _config(tmp_path, None, mode="data", prompts=None, data=str(data), eval_data=str(held), eval_batches=1)
    with pytest.raises(ValueError, match=r"^--eval-data '.*held' holds 1 file\(s\) that --data '.*data' trains on too "
                                         r"\(x\.png = b\.png\): the held-out loss would be measured on training clips"):
        finetune(config)
    assert not (tmp_path / "out").exists()


def test_resume_under_another_launch_precision_says_how_to_continue(tmp_path, prompts_file, monkeypatch):
    """A run trained in float32, resumed with the precision unset under `accelerate launch --mixed_precision bf16`
    (which it now follows), is told which setting to pass, not only that the settings differ."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    finetune(_config(tmp_path, prompts_file))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match=r"holds a different run \(mixed_precision: 'no' -> 'bf16' \(an unset "
                                         r"--mixed-precision follows accelerate launch; pass --mixed-precision no"):
        finetune(_config(tmp_path, prompts_file, steps=2, resume=True))
    again = finetune(_config(tmp_path, prompts_file, steps=2, resume=True, mixed_precision="no"))
    assert again["resumed_from"] == 1


def test_a_vsa_decay_with_no_stair_in_it_is_said(tmp_path, prompts_file):
    """Before: --vsa-decay-interval 5 over --vsa-decay-steps 2 trained steps 1 and 2 dense (student = teacher: a loss
    of 1e-14, nothing learned) and jumped to the target at step 3, without a word."""
    import warnings

    import dit_accel
    from dit_accel._util import DitAccelWarning

    vsa = dict(method=dit_accel.VSA(sparsity=0.5), steps=8, vsa_decay_steps=2)
    with pytest.warns(DitAccelWarning, match=r"--vsa-decay-interval 5 is not below --vsa-decay-steps 2: steps 1 to 2 "
                                             r"train dense \(sparsity 0\) and the next jumps to the target"):
        validate_config(_config(tmp_path, prompts_file, vsa_decay_interval=5, **vsa))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DitAccelWarning)
        validate_config(_config(tmp_path, prompts_file, vsa_decay_interval=1, **vsa))
        validate_config(_config(tmp_path, prompts_file, **{**vsa, "vsa_decay_steps": None, "steps": 4}))  # 1 step


def test_quiet_keeps_warnings_off_the_terminal_and_in_the_log(tmp_path, prompts_file, monkeypatch):
    """Before: `accelerate launch -m dit_accel.cli.finetune --quiet` (finetune's own entry point) printed every warning
    all the same, in Python's format, and the log its help named ("they stay in the output folder's log") held none."""
    import warnings

    from dit_accel.cli.finetune import main

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    out = tmp_path / "out"
    argv = ["--method", "sla", "--topk", "0.5", "--prompts", str(prompts_file), "--output", str(out), "--steps", "1",
            "--rank", "2", "--frames", "9", "--height", "64", "--width", "128", "--max-sequence-length", "16",
            "--eval-batches", "0", "--gradient-accumulation-steps", "1", "--lr-warmup-steps", "4", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert not [m for m in shown if "--lr-warmup-steps" in m]
    log = json.loads((out / "finetune_log.json").read_text())
    assert any("--lr-warmup-steps 4 is past --steps 1" in m for m in log["warnings"])


def test_resume_takes_the_same_dense_layers_in_another_spelling(tmp_path, prompts_file):
    """Before: --dense-layers 1 was refused on --resume as 1,1 (and 0,2 as 2,0): "a different run (dense_layers: [1] ->
    [1, 1])", though the same layers run dense."""
    first = finetune(_config(tmp_path, prompts_file, dense_layers=[1]))
    again = finetune(_config(tmp_path, prompts_file, dense_layers=[1, 1], resume=True))
    assert again["resumed_from"] == 1 and again["loss"] == first["loss"]
    record = tmp_path / "out" / "finetune_run.json"  # as an earlier version recorded it: as given
    record.write_text(json.dumps({**json.loads(record.read_text()), "dense_layers": [1, 1]}))
    assert finetune(_config(tmp_path, prompts_file, dense_layers=[1], resume=True))["resumed_from"] == 1
    config = _config(tmp_path, prompts_file, dense_layers=(2, 0, 2))
    validate_config(config)
    assert config.dense_layers == [0, 2]
