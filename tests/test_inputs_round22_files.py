"""Round 22, files and twins: the training's clips read by the one video reader and checked whole at start-up, the
calibration's q/k/v files written atomically, one kohya-alpha check, ``dit-accel convert``'s messages in its flags,
and ``apply(weights=)`` checking the folder once."""

import json
import sys

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

D = 12  # tiny Wan: 2 layers, 2 heads of 12, model dim 24


def _caption_folder(root, clips):
    """A caption folder with a 32x32 png and the given ``{name: frames}`` clips (saved by save_video)."""
    from PIL import Image

    from dit_accel.videos import save_video

    root.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "a.png")
    rng = np.random.default_rng(22)
    for name, frames in clips.items():
        save_video(rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8), root / name, fps=8)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"sample {n}"}) + "\n"
                                                 for n in ["a.png", *clips]))
    return root


# ----------------------------------------------------------------------------- 1, 2: one reader, whole clips
def test_the_start_up_check_reads_clips_with_the_reader_training_uses(tmp_path, monkeypatch):
    """Before: the check opened videos with its own imageio reader (the first frame), beside videos.load_video that
    the steps read them with."""
    from dit_accel import videos
    from dit_accel.training.data import CaptionDataset

    root = _caption_folder(tmp_path / "data", {"clip.mp4": 9, "anim.gif": 4})
    seen = []
    count_frames = getattr(videos, "count_frames", None)

    def spy(path, max_frames=None):
        seen.append((path.name, max_frames))
        return count_frames(path, max_frames)

    monkeypatch.setattr(videos, "count_frames", spy, raising=False)
    data = CaptionDataset(root, frames=5, height=32, width=32)
    assert sorted(seen) == [("anim.gif", 5), ("clip.mp4", 1)]  # (a video file's other frames: see _probe)
    x, _ = data.item(data.files.index("clip.mp4"))
    assert tuple(x.shape) == (3, 5, 32, 32)


def test_count_frames_is_load_videos_length_without_its_memory(tmp_path):
    from dit_accel.videos import count_frames, load_video

    root = _caption_folder(tmp_path / "data", {"clip.mp4": 9})
    for limit in (None, 1, 5, 50):
        assert count_frames(root / "clip.mp4", limit) == len(load_video(root / "clip.mp4", max_frames=limit))
    (root / "clip.mp4").write_bytes((root / "clip.mp4").read_bytes()[:300])
    with pytest.raises(BadFileError, match=r"clip\.mp4: cannot be decoded \("):
        count_frames(root / "clip.mp4", 5)


def test_a_clip_damaged_after_its_first_frame_is_refused_before_training(tmp_path):
    """Before: the check decoded a clip's first frame only, so a gif cut after it passed, and the run failed when
    a step first drew it (hours in, maybe), with "cannot be decoded (BadFileError: ... cannot be decoded (...": the
    reader's error wrapped in a second one."""
    from PIL import Image

    from dit_accel.training.data import CaptionDataset

    root = _caption_folder(tmp_path / "data", {"anim.gif": 12})
    whole = (root / "anim.gif").read_bytes()
    (root / "anim.gif").write_bytes(whole[:len(whole) // 2])
    with Image.open(root / "anim.gif") as im:
        im.load()  # its first frame decodes: what the check used to look at
    with pytest.raises(BadFileError) as err:
        CaptionDataset(root, frames=9, height=32, width=32)
    text = str(err.value)
    assert text.startswith(f"{root / 'anim.gif'}: cannot be decoded (OSError: image file is truncated"), text
    assert "BadFileError" not in text and text.count("cannot be decoded") == 1
    assert text.endswith("that decodes: copy the file(s) again, or leave them out of --data "
                         f"{str(root)!r} and its metadata.jsonl")


# ----------------------------------------------------------------------------- 3: atomic q/k/v files
def test_a_sample_file_cut_short_by_a_crash_is_never_left_under_its_name(tmp_path, monkeypatch):
    """Before: QKVSampler torch.save'd to the final name: a run killed mid-write left a truncated layer000_step000.pt
    that a later run read."""
    from dit_accel.calibrate.sampling import QKVSampler

    sampler = QKVSampler([(0, 2)], per_bucket=1, folder=str(tmp_path / "qkv"))
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(torch, "save", crash)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(KeyboardInterrupt):
        sampler.save(0, "blocks.0.attn1", (1, 2, 4), 1, q, q, q)
    assert sorted(p.name for p in (tmp_path / "qkv").iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    sampler.save(1, "blocks.1.attn1", (1, 2, 4), 1, q, q, q)
    saved = torch.load(tmp_path / "qkv" / "layer001_step001.pt", weights_only=True)
    assert torch.equal(saved["q"], q) and saved["layer"] == 1


# ----------------------------------------------------------------------------- 4: one kohya-alpha check
def test_apply_and_the_node_refuse_a_kohya_alpha_with_one_check_and_message(tmp_path):
    from dit_accel.checkpoints.lora_checks import check_lora_modules, kohya_alpha, kohya_alpha_problem
    from dit_accel.comfyui.weights import _check_no_kohya_alpha
    from dit_accel.models.tiny import build_tiny_transformer

    path = tmp_path / "pytorch_lora_weights.safetensors"
    state = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 2 * D),
             "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(2 * D, 4),
             "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(8.0)}
    assert kohya_alpha(state) == "transformer.blocks.0.attn1.to_q.alpha"
    assert kohya_alpha({k: v for k, v in state.items() if "alpha" not in k}) is None
    with pytest.raises(ValueError) as applied:
        check_lora_modules(build_tiny_transformer("wan"), path, state)
    assert str(applied.value) == f"{path}: {kohya_alpha_problem('blocks.0.attn1.to_q.alpha')}"
    with pytest.raises(ValueError) as node:
        _check_no_kohya_alpha(path, state)
    assert str(node.value) == f"dit_accel: {path} {kohya_alpha_problem(kohya_alpha(state), node=True)}"
    assert "nor does this node" in str(node.value) and "this node" not in str(applied.value)


# ----------------------------------------------------------------------------- 5: convert's messages in flags
def _convert_err(capsys, argv):
    capsys.readouterr()
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dit-accel convert: ") and err.count("\n") == 1, err
    return err


def test_convert_names_the_flags_the_user_typed(tmp_path, capsys):
    """Before: "transformer_2='x' is not a file", "output='w' is a file", "pass overwrite=True (--overwrite)",
    "or None": convert_checkpoint's Python arguments, which no flag of the command spells."""
    ckpt = tmp_path / "high.pth"
    g = torch.Generator().manual_seed(0)
    torch.save({f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.{p}": torch.randn(*((D, D) if p == "weight" else
                                                                                      (D,)), generator=g)
                for i in range(2) for p in ("weight", "bias")} | {"blocks.0.self_attn.q.weight": torch.zeros(D, D)},
               ckpt)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    out = str(tmp_path / "w")
    cases = [
        ([str(tmp_path / "nope.pth"), "--out", out], f"checkpoint {str(tmp_path / 'nope.pth')!r} is not a file"),
        ([str(ckpt), "--transformer-2", str(tmp_path / "low.pth"), "--out", out],
         f"--transformer-2 {str(tmp_path / 'low.pth')!r} is not a file: give the low-noise expert's checkpoint"),
        ([str(ckpt), "--transformer-2", str(ckpt), "--out", out],
         f"--transformer-2 {str(ckpt)!r} is the checkpoint itself: give the low-noise expert's own checkpoint (Wan "
         "2.2 A14B), or leave out --transformer-2"),
        ([str(ckpt), "--out", str(tmp_path / "afile")], f"--out {str(tmp_path / 'afile')!r} is a file; give a folder"),
        ([str(ckpt), "--out", str(tmp_path / "full")],
         f"--out {str(tmp_path / 'full')!r} is a folder with files in it; pass --overwrite to replace them"),
        ([str(ckpt), "--out", out], "(projection-only fine-tuning), pass --skip-base-weights; for a fully"),
    ]
    for argv, says in cases:
        err = _convert_err(capsys, argv)
        assert says in err, (says, err)
        for python_name in ("checkpoint=", "output=", "transformer_2", "overwrite=", "base_weights", "None"):
            assert python_name not in err, (python_name, err)
    assert not (tmp_path / "w").exists()
    # the Python API keeps naming its own arguments
    from dit_accel.checkpoints.convert import convert_checkpoint

    with pytest.raises(ValueError, match=r"^transformer_2='.*high\.pth' is the checkpoint itself: .*, or None$"):
        convert_checkpoint(ckpt, out, transformer_2=ckpt)
    with pytest.raises(ValueError, match=r"^output='.*full' is a folder with files in it; pass overwrite=True "
                                         r"\(--overwrite\)"):
        convert_checkpoint(ckpt, tmp_path / "full")


# ----------------------------------------------------------------------------- 6: apply checks weights once
@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    from peft import LoraConfig

    from dit_accel.checkpoints.finetuned import save_trained_weights
    from dit_accel.models.tiny import build_tiny_pipeline

    method = dit_accel.SLA(topk=0.5)
    transformer = build_tiny_pipeline("tiny-wan").transformer
    handle = dit_accel.apply(transformer, method)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    transformer.add_adapter(config)
    folder = tmp_path_factory.mktemp("w22") / "weights"
    save_trained_weights(folder, transformer=transformer, method=method, lora_config=config,
                         sla_projections=handle.sla_projections(), extra={"dense_layers": None})
    handle.remove()
    transformer.delete_adapters(["default"])
    return transformer, method, folder


def test_apply_checks_the_weights_folder_once(weights_folder, monkeypatch):
    """Before: apply(weights=) checked the folder against the layers (method file, safetensors headers) before the
    model changed, and handle.load_weights checked it all again after: 0.26 ms of a tiny folder's, read twice."""
    from dit_accel.pipelines import apply_checks

    transformer, method, folder = weights_folder
    calls = []
    real = apply_checks._check_weights_folder

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    for module in ("dit_accel.pipelines.apply", "dit_accel.pipelines.handle"):
        monkeypatch.setattr(sys.modules[module], "_check_weights_folder", counted)
    handle = dit_accel.apply(transformer, method, backend="torch", weights=folder)
    try:
        assert len(calls) == 1
        assert handle._adapters and handle.sla_projections()
        handle.load_weights(folder)  # on its own, load_weights still checks first
        assert len(calls) == 2
    finally:
        handle.remove()


def test_apply_still_refuses_a_folder_that_does_not_fit_before_changing_the_model(weights_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from dit_accel.checkpoints.finetuned import METHOD_FILE, SLA_FILE

    transformer, method, folder = weights_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    sla = load_file(str(bad / SLA_FILE))
    save_file({k: v[:1] if k.endswith("bias") else v for k, v in sla.items()}, str(bad / SLA_FILE))
    info = json.loads((bad / METHOD_FILE).read_text())
    info.pop("sha256", None)
    (bad / METHOD_FILE).write_text(json.dumps(info))
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(ValueError, match=r"bias"):
        dit_accel.apply(transformer, method, backend="torch", weights=bad)
    after = transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
