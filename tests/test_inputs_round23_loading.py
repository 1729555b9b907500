"""Round 23 (L): damaged model folders, animated and damaged picture and video files, GIF rates and unknown model
versions: each named at the boundary with what to do, or read whole, not a raw decoder line or a silent wrong
answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest

from dit_accel.atomic_files import BadFileError
from dit_accel.cli.info import model_settings
from dit_accel.models.loading import ModelLoadError, load_pipeline
from dit_accel.models.tiny_shapes import TRAINED_MODELS
from dit_accel.videos import GifRateWarning, count_frames, load_video, save_video


def _frames(n: int = 4, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _copy_tiny_shapes(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TRAINED_MODELS["tiny-shapes"], folder, ignore=shutil.ignore_patterns("train_log.json"))
    return folder


@pytest.mark.parametrize("file, content, problem", [
    ("tokenizer/tokenizer_config.json", "", r"is empty \(0 bytes\)"),
    ("tokenizer/tokenizer_config.json", "{not json", r"is not valid JSON \(Expecting property name .*\)"),
    ("tokenizer/tokenizer_config.json", "[1, 2]", "holds a JSON list"),
    ("scheduler/scheduler_config.json", "[1]", "holds a JSON list"),
    ("vae/config.json", "", r"is empty \(0 bytes\)"),
], ids=["tokenizer-empty", "tokenizer-no-json", "tokenizer-list", "scheduler-list", "vae-config-empty"])
def test_a_damaged_json_file_of_a_component_is_named_with_what_to_do(tmp_path, file, content, problem):
    """Before: an empty tokenizer_config.json was "could not load the tokenizer ...: Expecting value: line 1 column 1
    (char 0)" (a list: "pop expected at most 1 argument, got 2"), naming no file; a scheduler_config.json holding a
    list was "We couldn't connect to 'https://huggingface.co'"; an empty config.json named the file but not what to
    do. Now each is the file, what it holds and "copy or download <component> again", as a list config.json was."""
    folder = _copy_tiny_shapes(tmp_path)
    (folder / file).write_text(content)
    component = file.split("/")[0]
    what = "config" if file.endswith("/config.json") else file.split("/")[1]
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(folder)
    assert str(err.value).startswith(str(folder / file) + " ")
    assert f", not the {component}'s {what} (a JSON object of its settings): copy or download " \
           f"{folder / component} again" in str(err.value)
    import re

    assert re.search(problem, str(err.value))


@pytest.mark.parametrize("content", ["", "{bad"], ids=["empty", "no-json"])
def test_a_damaged_model_index_says_what_to_do(tmp_path, content):
    """Before: Diffusers' "It looks like the config file at '.../model_index.json' is not a valid JSON file", without
    what to do, while an index holding a list was told which folder to pass."""
    folder = _copy_tiny_shapes(tmp_path)
    (folder / "model_index.json").write_text(content)
    with pytest.raises(ModelLoadError, match=r"model_index\.json is (empty|not valid JSON).*, not a Diffusers pipeline "
                                             r"index .*: pass the folder that `pipe\.save_pretrained\(\)`"):
        load_pipeline(folder)


@pytest.mark.parametrize("entry", ["left out", [None, None]], ids=["no-entry", "null"])
def test_a_model_index_without_a_transformer_is_refused_by_load_and_info(tmp_path, entry):
    """Before: WanPipeline takes its transformer as optional, so a model_index.json without one (or with [null, null])
    loaded a pipeline without a transformer; generate then failed in apply() with "needs a Diffusers pipeline with a
    `transformer`", naming no file, and ``info --model`` said the transformer "has no dit_accel preset"."""
    folder = _copy_tiny_shapes(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if k != "transformer"} if entry == "left out" \
        else {**index, "transformer": entry}
    (folder / "model_index.json").write_text(json.dumps(index))
    found = "no entry" if entry == "left out" else r"\[null, null\]"
    line = (rf"model_index\.json names no transformer \({found}\), "
            r"the component dit_accel makes sparse: write \"transformer\": \[\"diffusers\", "
            r"\"WanTransformer3DModel\"\] there .*, or download the folder again")
    with pytest.raises(ModelLoadError, match=line):
        load_pipeline(folder)
    with pytest.raises(ValueError, match=line):
        model_settings(str(folder))


@pytest.mark.parametrize("fps, plays", [(60, "50"), (1000, "50"), (30, "33.3"), (40, "50")])
def test_a_gif_that_cannot_play_at_fps_warns_at_what_it_plays(tmp_path, fps, plays):
    """Before: save_video(frames, "x.gif", fps=1000) wrote 20 ms frames (50 fps, 20x slow) and fps=40 played at 50,
    silently (``dit-accel generate`` noted it; the API did not)."""
    with pytest.warns(GifRateWarning, match=rf"x\.gif plays at {plays} frames per second for fps={fps}: a GIF's frame "
                                         r"delays are whole hundredths .*; write \.mp4 for this fps"):
        save_video(_frames(3), tmp_path / "x.gif", fps=fps)
    assert len(load_video(tmp_path / "x.gif")) == 3


@pytest.mark.parametrize("fps, frames", [(16, 3), (25, 3), (50, 3), (1000, 1)])
def test_a_gif_that_plays_near_its_fps_writes_without_a_warning(tmp_path, fps, frames):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_video(_frames(frames), tmp_path / "x.gif", fps=fps)


def _animated(path, frames):
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    extra = {"lossless": True} if path.suffix == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, **extra)
    return path


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_an_animated_png_or_webp_is_read_whole(tmp_path, suffix):
    """Before: an animated PNG read as its first frame alone (count_frames: 1), and any WebP was "cannot be decoded
    (RuntimeError: `FFMPEG` can not handle the given uri.)"."""
    path = _animated(tmp_path / f"a{suffix}", _frames(4))
    np.testing.assert_array_equal(load_video(path), _frames(4))
    assert count_frames(path) == 4 and len(load_video(path, max_frames=2)) == 2
    from PIL import Image

    Image.fromarray(_frames(1)[0]).save(tmp_path / f"still{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(load_video(tmp_path / f"still{suffix}"), _frames(1))


def test_an_animated_png_in_a_frame_folder_is_refused(tmp_path):
    """Before: a frame folder holding an animated PNG gave its first frame, the others dropped unremarked."""
    from PIL import Image

    (tmp_path / "frames").mkdir()
    Image.fromarray(_frames(1)[0]).save(tmp_path / "frames" / "0.png")
    _animated(tmp_path / "frames" / "1.png", _frames(3))
    with pytest.raises(BadFileError, match=r"1\.png: is an animated PNG of 3 frames, in a sequence of PNG frames; "
                                           r"expected one picture per frame file \(pass the animated PNG alone"):
        load_video(tmp_path / "frames")


def test_a_gif_damaged_after_its_first_frame_names_the_frame(tmp_path):
    """Before: "cannot be decoded (IndexError: index out of range)", naming no frame."""
    path = save_video(_frames(12, 32), tmp_path / "v.gif", fps=10)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(BadFileError, match=r"v\.gif: cannot be decoded \(.*\) from frame [1-9]\d* \(from 0\) on; "
                                           r"expected a whole file \(copy or write it again\)"):
        load_video(path)


def test_a_video_cut_short_after_its_header_is_refused_with_the_frame(tmp_path):
    """Before: an mp4 with its index first (faststart), cut in half, read as 11 of its 24 frames, silently; a video
    whose audio track runs longer than its frames is still read whole."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    source = save_video(_frames(24, 32), tmp_path / "v.mp4", fps=8)
    fast = tmp_path / "fast.mp4"
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", str(source), "-c", "copy", "-movflags", "+faststart",
                    str(fast)], check=True)
    data = fast.read_bytes()
    fast.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match=r"fast\.mp4: decodes \d+ frames, and its header says 3 s at 8 fps \(about "
                                           r"24\): it is cut short or damaged after frame \d+ \(from 0\); expected a "
                                           r"whole video file \(copy or download it again\)"):
        load_video(fast)
    with pytest.raises(BadFileError, match="cut short"):
        count_frames(fast)
    sound = tmp_path / "sound.mp4"
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", str(source), "-f", "lavfi", "-i", "sine=d=6", "-c:v",
                    "copy", str(sound)], check=True)
    assert len(load_video(sound)) == 24


@pytest.mark.parametrize("model", ["Wan 2.3", "Wan2.5", "wan 3"])
def test_info_model_with_a_version_of_no_known_family_says_did_you_mean(model):
    """Before: ``dit-accel info --model 'Wan 2.3'`` printed Wan 2.1's settings (the hub word "wan" matched), as if
    Wan 2.3 were Wan 2.1."""
    with pytest.raises(ValueError, match=rf"^'{model}' is no model family dit_accel knows \(did you mean Wan 2\.\d or "
                                         r"Wan 2\.\d\?\): pass one of the families \(.*Wan 2\.1, Wan 2\.2\), .*; "
                                         r"`dit-accel info` without --model lists the supported transformer classes"):
        model_settings(model)
    from dit_accel.pipelines.presets import unknown_version

    families = {"Wan 2.1", "Wan 2.2", "HunyuanVideo"}  # (a known family in other spellings, and other models, pass)
    assert [unknown_version(m, families) for m in ("wan2.2", "Wan-2.1", "HunyuanVideo 1.5", "tiny-shapes-63")] == [""] * 4


def test_generate_says_a_gifs_played_rate_once(tmp_path, capsys):
    """save_video's GifRateWarning is for the Python API; ``dit-accel generate`` has its own output note (in the
    sidecar too), so the terminal says it once, not twice."""
    from dit_accel.cli.main import main

    out = tmp_path / "x.gif"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "--model", "tiny-wan", "--method", "dense", "--frames", "5", "--height", "32",
                     "--width", "32", "--steps", "1", "--fps", "60", "--out", str(out)]) == 0
    assert not [w for w in caught if issubclass(w.category, GifRateWarning)]
    assert capsys.readouterr().out.count("x.gif plays at 50 frames per second") == 1
