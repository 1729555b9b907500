"""Round 22 (J): model loading and video files as a user scripts them: each input refused at the boundary with a
line that says what to do, or read as asked, not a raw traceback or a silent wrong answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dit_accel.models.loading import ModelLoadError, load_pipeline
from dit_accel.models.tiny_shapes import TRAINED_MODELS
from dit_accel.videos import count_frames, load_video, save_video


def _frames(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("where", ["folder", "sequence"])
def test_max_frames_limits_a_png_folder_and_a_png_sequence(tmp_path, where):
    """Before: ``load_video(folder, max_frames=2)`` (and count_frames) gave all 4 frames of a PNG folder or a
    ``NAME.png`` sequence; only a video file was cut."""
    path = tmp_path / ("frames" if where == "folder" else "seq.png")
    save_video(_frames(4), path)
    got = load_video(path, max_frames=2)
    assert got.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(got, _frames(4)[:2])
    assert count_frames(path, max_frames=2) == 2
    assert len(load_video(path)) == 4


@pytest.mark.parametrize("limit", [0, -1, 2.5, "2", True], ids=["zero", "negative", "float", "text", "bool"])
@pytest.mark.parametrize("read", [load_video, count_frames], ids=["load_video", "count_frames"])
def test_a_max_frames_that_is_no_whole_number_from_1_is_refused(tmp_path, limit, read):
    """Before: 0 and -1 sliced the decoded frames (none, all but the last) while count_frames counted all of them;
    2.5 and "2" were a raw "slice indices must be integers" (count_frames ignored them); True read one frame."""
    path = save_video(_frames(4), tmp_path / "clip.mp4", fps=8)
    with pytest.raises(ValueError, match=r"max_frames=.* is invalid: give a whole number >= 1 .*or None for all"):
        read(path, max_frames=limit)


@pytest.mark.parametrize("fps", [3e9, 1e30, 1001])
def test_an_fps_past_what_a_video_takes_is_refused_before_writing(tmp_path, fps):
    """Before: ``save_video(frames, "a.mp4", fps=3e9)`` printed ffmpeg's log, then raised a raw FileNotFoundError for
    its temporary file (ffmpeg refused the rate and wrote nothing). The bound is the one of ``generate --fps``."""
    out = tmp_path / "a.mp4"
    with pytest.raises(ValueError, match=r"fps=.* is invalid: must be a finite number >= 0\.01 and at most 1000"):
        save_video(_frames(2), out, fps=fps)
    assert not out.exists()
    assert load_video(save_video(_frames(2), out, fps=1000)).shape == (2, 16, 16, 3)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_a_float8_dtype_is_refused_before_loading(dtype):
    """Before: ``load_pipeline("tiny-wan", dtype=torch.float8_e4m3fn)`` loaded, and the first step failed with a raw
    "Promotion for Float8 Types is not supported"; a folder failed with "couldn't find storage object Float8_e4m3fnStorage; check the values in
    text_encoder/config.json", blaming a file that is fine."""
    with pytest.raises(ValueError, match=rf"dtype={dtype} is a storage dtype .*: pass torch\.bfloat16"):
        load_pipeline("tiny-wan", dtype=dtype)


def _copy_tiny_shapes(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TRAINED_MODELS["tiny-shapes"], folder, ignore=shutil.ignore_patterns("train_log.json"))
    return folder


@pytest.mark.parametrize("name", [5, ["WanPipeline"]], ids=["number", "list"])
def test_a_model_index_whose_class_name_is_no_text_is_named(tmp_path, name):
    """Before: "could not load the pipeline in ...: attribute name must be string, not 'int'" (or 'list'), naming
    neither model_index.json nor _class_name."""
    folder = _copy_tiny_shapes(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
    with pytest.raises(ModelLoadError, match=r"model_index\.json holds _class_name .* \(not the name of a pipeline "
                                             r"class\), not a Diffusers pipeline index"):
        load_pipeline(folder)


@pytest.mark.parametrize("layers", [0, -1])
def test_a_config_that_makes_no_layers_of_the_weights_is_refused(tmp_path, layers):
    """Before: a transformer config.json with ``num_layers`` 0 (or -1) loaded a model without any block, all the
    weights' blocks dropped with a log line, and the pipeline ran it without a word (the check for dropped layers
    knew a layer list only from the layers the model had)."""
    folder = _copy_tiny_shapes(tmp_path)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    given = config["num_layers"]
    config_file.write_text(json.dumps({**config, "num_layers": layers}))
    with pytest.raises(ModelLoadError, match=rf"transformer: its weights hold {given} layers of blocks, and its "
                                             r"config\.json makes 0 \(blocks\.0 and up would be dropped"):
        load_pipeline(folder)


@pytest.mark.parametrize("left_out", ["vae", "scheduler"])
def test_a_model_index_that_leaves_out_a_component_names_it(tmp_path, left_out):
    """Before: "could not load the pipeline in ...: Pipeline <class '...WanPipeline'> expected [...], but only {...}
    were passed", naming neither model_index.json nor what to do. An optional component (Wan's transformer_2) may
    still be left out."""
    folder = _copy_tiny_shapes(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != left_out}))
    with pytest.raises(ModelLoadError, match=rf"model_index\.json names no {left_out}, which a WanPipeline takes .*: "
                                             r"download the folder again, or add each entry as \[library, class\]"):
        load_pipeline(folder)
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "transformer_2"}))
    assert type(load_pipeline(folder)).__name__ == "WanPipeline"
