"""Round 7 of odd inputs at the boundaries of save_video / load_video, convert_checkpoint and FinetuneConfig: each
is a clear error naming the argument or file (or, for numpy numbers, accepted), never a traceback from deep inside
or a silent wrong result."""

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.checkpoints.convert import convert_checkpoint
from dit_accel.io import load_video, save_video
from dit_accel.training import FinetuneConfig
from dit_accel.training.config import validate_config

FRAMES = np.full((2, 8, 8, 3), 0.5, np.float32)


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), 1e-9], ids=["nan", "inf", "tiny"])
@pytest.mark.parametrize("fmt", [".mp4", ".gif"])
def test_fps_that_is_not_a_finite_frame_rate_is_refused(tmp_path, fps, fmt):
    with pytest.raises(ValueError, match=r"fps=.* is invalid: must be a finite number >= 0.01"):
        save_video(FRAMES, tmp_path / f"v{fmt}", fps=fps)
    assert not list(tmp_path.iterdir())
    assert load_video(save_video(FRAMES, tmp_path / f"w{fmt}", fps=np.int64(8))).shape == (2, 8, 8, 3)


def test_a_list_of_videos_is_refused_not_cut_to_their_first_frames(tmp_path):
    with pytest.raises(ValueError, match=r"list of 2 items holding \[2, 2\] frames"):
        save_video([FRAMES, FRAMES], tmp_path / "v.png")
    assert not list(tmp_path.iterdir())


def test_a_list_of_frames_of_two_sizes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"different sizes \(H, W\) \[\(4, 4\), \(8, 8\)\]"):
        save_video([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)], tmp_path / "v.png")


@pytest.mark.parametrize("fmt", [".mp4", ".gif", ".png"])
def test_frames_of_height_zero_are_refused(tmp_path, fmt):
    with pytest.raises(ValueError, match="height or width 0"):
        save_video(np.zeros((2, 0, 8, 3), np.uint8), tmp_path / f"v{fmt}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, dtype", [(1000, np.uint16), (-5, np.int16)])
def test_integer_frames_outside_0_255_are_refused_not_clipped(tmp_path, value, dtype):
    with pytest.raises(ValueError, match=rf"integer frames must lie in \[0, 255\]; got min {value}"):
        save_video(np.full((1, 4, 4, 3), value, dtype), tmp_path / "v.png")
    assert load_video(save_video(np.full((1, 4, 4, 3), 200, np.int64), tmp_path / "ok.png")).max() == 200


def test_a_file_in_the_way_of_a_folder_or_a_folder_in_the_way_of_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    (tmp_path / "dir.mp4").mkdir()
    for path, match in ((tmp_path / "taken", "'.*taken' is a file, not a folder"),
                        (tmp_path / "taken" / "v.mp4", "'.*taken' is a file, not a folder"),
                        (tmp_path / "dir.mp4", "it is a folder")):
        with pytest.raises(ValueError, match=match):
            save_video(FRAMES, path)
    assert (tmp_path / "taken").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mp4", "taken"] and not list((tmp_path / "dir.mp4").iterdir())


def test_load_video_names_a_damaged_or_odd_sized_frame_of_a_sequence(tmp_path):
    save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "seq.png")
    (tmp_path / "seq_00001.png").write_bytes(b"not a png")
    with pytest.raises(BadFileError, match=r"seq_00001.png: cannot be decoded"):
        load_video(tmp_path / "seq.png")
    folder = tmp_path / "frames"
    save_video(np.zeros((2, 8, 8, 3), np.uint8), folder)
    save_video(np.zeros((4, 6, 3), np.uint8), folder / "frame_00002.png")
    with pytest.raises(BadFileError, match=r"frame_00002.png: is 6x4 but frame_00000.png is 8x8"):
        load_video(folder)


def test_convert_refuses_a_dict_whose_keys_are_not_names(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({0: torch.zeros(4, 4), "blocks.0.self_attn.proj_l.bias": torch.zeros(4)}, path)
    with pytest.raises(BadFileError, match=r"ck.pt: holds tensors under 1 keys that are no strings \(e.g. 0\)"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_projections_of_size_zero(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"blocks.0.self_attn.proj_l.weight": torch.zeros(0, 0), "blocks.0.self_attn.proj_l.bias": torch.zeros(0)},
               path)
    with pytest.raises(ValueError, match=r"layer 0's proj_l must be .* with D > 0; got .*\(0, 0\)"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _config(tmp_path, **kw):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(tmp_path / "out"),
                prompts=str(tmp_path / "p.txt"), steps=1, rank=2, frames=5, height=32, width=64,
                max_sequence_length=8, progress=False, eval_batches=0)
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("prompts", [["a cat"], []], ids=["list", "empty-list"])
def test_prompts_given_as_a_list_is_refused_naming_the_option(tmp_path, prompts):
    with pytest.raises(ValueError, match=r"--prompts .* is invalid: give the path of a text file"):
        validate_config(_config(tmp_path, prompts=prompts))


def test_numpy_numbers_are_numbers_in_a_finetune_config(tmp_path):
    config = _config(tmp_path, steps=np.int64(3), seed=np.int64(2), lr=np.float32(1e-4), log_every=np.int64(1),
                     gradient_accumulation_steps=np.int64(2))
    validate_config(config)
    settings = config.settings()  # JSON: a numpy scalar could not be recorded
    assert settings["steps"] == 3 and settings["seed"] == 2 and type(config.lr) is float


@pytest.mark.parametrize("field, value, expect", [
    ("dense_layers", np.array([0, 1]), [0, 1]),
    ("dense_layers", 2, [0, 1]),
    ("dense_layers", "0,1", "--dense-layers '0,1' is invalid"),
    ("dense_layers", [-1], r"--dense-layers \[-1\] is invalid"),
    ("cp", [1, 1], (1, 1)),
    ("cp", (1,), r"--cp \(1,\) is invalid: \(ulysses, ring\)"),
    ("cp", (0, 2), r"--cp \(0, 2\) is invalid"),
    ("cp", "1,1", "--cp '1,1' is invalid"),
], ids=["dl-numpy", "dl-count", "dl-str", "dl-negative", "cp-list", "cp-one", "cp-zero", "cp-str"])
def test_dense_layers_and_cp_are_checked_when_the_run_is(tmp_path, field, value, expect):
    config = _config(tmp_path, **{field: value})
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            validate_config(config)
    else:
        validate_config(config)
        assert getattr(config, field) == expect and config.settings()[field] == list(expect)


@pytest.mark.parametrize("targets", [{"to_q"}, 5], ids=["set", "int"])
def test_target_modules_of_another_kind_is_refused_naming_the_option(tmp_path, targets):
    with pytest.raises(ValueError, match="--target-modules .* is invalid: a comma-separated string or a list"):
        validate_config(_config(tmp_path, target_modules=targets))


# ------------------------------------------------------------ the last audit's leftovers (the maintainer's)
@pytest.mark.parametrize("field, value", [("output", 5), ("data", ["clip.mp4"])], ids=["output-int", "data-list"])
def test_finetune_paths_of_another_kind_are_refused_naming_the_option(tmp_path, field, value):
    """Before: output=5 was accepted (a folder named "5"), data=[...] failed later in pathlib."""
    with pytest.raises(ValueError, match=rf"--{field} .* is invalid: expected a path"):
        validate_config(_config(tmp_path, **{field: value}))


@pytest.mark.parametrize("field", ["lr", "log_every", "seed", "alpha", "sla_lr_scale"])
def test_finetune_numbers_refuse_a_bool(tmp_path, field):
    """Before: True passed as 1 (an lr of 1.0, a seed of 1, ...)."""
    with pytest.raises(ValueError, match=rf"--{field.replace('_', '-')} True"):
        validate_config(_config(tmp_path, **{field: True}))


def test_load_video_and_convert_name_a_path_that_is_none(tmp_path):
    """Before: pathlib's and torch's TypeErrors; the same file as checkpoint and transformer_2 was converted twice."""
    with pytest.raises(ValueError, match=r"path=None is invalid: give the path of a video"):
        load_video(None)
    with pytest.raises(ValueError, match=r"checkpoint=None is invalid: expected a path"):
        convert_checkpoint(None, tmp_path / "out")
    path = tmp_path / "ck.pt"
    torch.save({"blocks.0.self_attn.proj_l.weight": torch.zeros(4, 4), "blocks.0.self_attn.proj_l.bias": torch.zeros(4)},
               path)
    with pytest.raises(ValueError, match=r"transformer_2=.* is the checkpoint itself"):
        convert_checkpoint(path, tmp_path / "out", transformer_2=path)
    assert not (tmp_path / "out").exists()
