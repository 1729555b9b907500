"""Round 10, ``dit-accel generate`` as a user runs it, video and image files, and context parallelism: the faults
found, each with the test that failed before (a silent wrong answer or report, or a traceback where one line
belongs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dit_accel.cli.main import main
from dit_accel.io import load_video, save_video


def _one_line(capsys, command: str = "generate") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"dit-accel {command}: "), err
    return lines[0]


# ----------------------------------------------------------------------------- 16-bit and float images
def test_load_video_scales_a_16_bit_png_instead_of_clipping_it(tmp_path):
    """Before: every value above 255 of a 16-bit greyscale PNG read as 255: a ramp came back nearly all white."""
    from PIL import Image

    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    frames = load_video(tmp_path / "ramp.png")
    assert frames.shape == (1, 16, 16, 3) and frames.dtype == np.uint8
    expected = np.clip(np.round(ramp / 257.0), 0, 255).astype(np.uint8)  # 16 bits -> 8 by the 65535 -> 255 scale
    for channel in range(3):
        np.testing.assert_array_equal(frames[0, ..., channel], expected)


def test_save_video_scales_16_bit_and_float_pil_images(tmp_path):
    """Before: a 16-bit PIL image saved white, and a float ("F") one in [0, 1] saved black."""
    from PIL import Image

    grey16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))  # 128 * 257
    grey_float = Image.fromarray(np.full((8, 8), 0.25, np.float32))
    frames = load_video(save_video([grey16, grey_float], tmp_path / "v"))
    assert frames.shape == (2, 8, 8, 3)
    assert (frames[0] == 128).all() and (frames[1] == 64).all()


def test_a_float_pil_image_outside_0_1_is_refused_as_a_float_array_is(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match=r"float frames must lie in \[0, 1\]"):
        save_video([Image.fromarray(np.full((8, 8), 3.0, np.float32))], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- sizes the pipeline rounds
def test_a_height_and_width_the_pipeline_rounds_are_noted_and_recorded(tmp_path, capsys):
    """Before: --height 41 --width 57 on a Flux pipeline made a 40x56 image; under --quiet nothing said so (the
    frame count had a note, the size none), and the sidecar's settings said 41 and 57."""
    out = tmp_path / "f.png"
    assert main(["generate", "--model", "tiny-flux", "--height", "41", "--width", "57", "--quiet", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    sidecar = json.loads((tmp_path / "f.png.json").read_text())
    assert sidecar["output_shape"][1:3] == [40, 56]
    note = "FluxPipeline made 40x56 (height x width) for --height 41 --width 57"
    assert any(n.startswith(note) for n in sidecar["output_notes"]), sidecar["output_notes"]
    assert f"note: {note}" in printed


def test_a_size_the_pipeline_takes_gets_no_note(tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["generate", "--model", "tiny-flux", "--height", "40", "--width", "56", "--quiet", "--out",
                 str(out)]) == 0
    assert "made" not in capsys.readouterr().out
    assert json.loads((tmp_path / "f.png.json").read_text())["output_notes"] == []


# ----------------------------------------------------------------------------- --cp with --cache
@pytest.mark.parametrize("cache", ["fbcache", "magcache:calibrate=true"])
def test_a_cache_that_fails_under_cp_is_refused_before_loading(cache, tmp_path, capsys, monkeypatch):
    """Before: under torchrun the first step failed in Diffusers' hook with a raw traceback ("The size of tensor a
    (288) must match the size of tensor b (576)"), after the model had loaded on every rank. Refused before
    anything starts, so it is checked here without torchrun."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--model", "tiny-shapes", "--method", "tile", "--cp", "ulysses=2", "--cache", cache,
                 "--out", str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys)
    assert f"--cache {cache.partition(':')[0]} does not run under --cp" in line and "taylorseer or pab" in line
    assert list(tmp_path.iterdir()) == []


def test_cache_under_cp_reports_the_calls_one_rank_skipped_and_matches_one_process(tmp_path):
    """Before: the calls that ran were summed over both ranks and compared with one rank's expected calls: pab
    under --cp ulysses=2 reported "skipped 0 of 96" where the same call in one process (the same frames) skipped
    24; and a plan's summary counted each rank's share of a dense call as a call of its own."""
    from tests.torchrun import torchrun

    common = ["--model", "tiny-shapes", "--method", "tile", "--cache", "pab", "--no-compare-dense", "--quiet",
              "--device", "cpu"]
    torchrun(2, "-m dit_accel.cli.generate", "--cp", "ulysses=2", *common, "--out", tmp_path / "cp" / "v.png")
    assert main(["generate", *common, "--out", str(tmp_path / "one" / "v.png")]) == 0
    np.testing.assert_array_equal(load_video(tmp_path / "cp" / "v.png"), load_video(tmp_path / "one" / "v.png"))
    cp, one = (json.loads((tmp_path / name / "v.png.json").read_text())["cache"] for name in ("cp", "one"))
    assert one["attention_calls_skipped"] > 0
    for key in ("attention_calls_expected", "attention_calls_ran", "attention_calls_skipped"):
        assert cp[key] == one[key], (key, cp, one)


def test_the_plan_summary_counts_dense_calls_once_under_cp():
    """The summary sums every rank's share of a call; the line counts calls as one process makes them."""
    from dit_accel.cli.generate_report import _with_dense_calls

    record = {"summary": {"sparse_calls": 32, "dense_calls": 160}, "density": {"mean": 0.5},
              "settings": {"cp": {"ulysses": 2, "ring": 1}}}
    assert "with its 80 dense calls counted as 1" in _with_dense_calls(record)
    record["settings"]["cp"] = None
    assert "with its 160 dense calls counted as 1" in _with_dense_calls(record)


# ----------------------------------------------------------------------------- where the files go
def test_side_by_side_into_a_folder_is_refused_before_and_leaves_the_earlier_output(tmp_path, capsys):
    """Before: with a folder named OUT-vs-dense.mp4, the run replaced the earlier OUT.mp4, removed its sidecar, and
    then failed with a ValueError traceback writing the comparison."""
    out = tmp_path / "v.mp4"
    out.write_bytes(b"earlier video")
    (tmp_path / "v.mp4.json").write_text('{"earlier": 1}')
    (tmp_path / "v-vs-dense.mp4").mkdir()
    assert main(["generate", "--model", "tiny-shapes", "--method", "tile", "--steps", "1", "--quiet",
                 "--side-by-side", "--out", str(out)]) == 2
    line = _one_line(capsys)
    folder = tmp_path / "v-vs-dense.mp4"
    assert f"--side-by-side writes the comparison to {folder}, but {folder} is a folder" in line
    assert out.read_bytes() == b"earlier video" and (tmp_path / "v.mp4.json").read_text() == '{"earlier": 1}'


def test_side_by_side_frames_under_a_file_are_refused_before(tmp_path, capsys):
    (tmp_path / "v-vs-dense").write_text("mine")
    assert main(["generate", "--model", "tiny-shapes", "--method", "tile", "--steps", "1", "--quiet",
                 "--side-by-side", "--out", str(tmp_path / "v")]) == 2
    assert f"but {tmp_path / 'v-vs-dense'} is a file" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-vs-dense"]


def test_out_with_a_tilde_goes_to_the_home_folder(tmp_path, monkeypatch, capsys):
    """``--out=~/x.png`` (the shell leaves a ~ after =): before, a folder named ~ in the current folder got the
    image while "wrote ~/x.png" read as the home folder."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["generate", "--model", "tiny-flux", "--quiet", "--out=~/x.png"]) == 0
    assert (home / "x.png").is_file() and (home / "x.png.json").is_file()
    assert list(cwd.iterdir()) == []
    assert json.loads((home / "x.png.json").read_text())["output"] == str(home / "x.png")


def test_a_run_refused_after_the_flag_checks_leaves_no_folders(tmp_path, capsys):
    """Before: the check that --out is writable made its folders, and a run refused later (here: a --plan that does
    not exist) left them behind, empty."""
    assert main(["generate", "--model", "tiny-shapes", "--plan", str(tmp_path / "missing.json"), "--out",
                 str(tmp_path / "new" / "sub" / "x.mp4")]) == 2
    assert "--plan" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_frames_into_a_new_folder_are_written(tmp_path):
    out = tmp_path / "new" / "frames"
    assert main(["generate", "--model", "tiny-flux", "--quiet", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["frame_00000.png"]
    assert load_video(out).shape == (1, 64, 64, 3)


# ----------------------------------------------------------------------------- flags the pipeline does not take
@pytest.mark.parametrize("model, flags, named", [
    ("tiny-flux2", ["--negative-prompt", "blurry"], "--negative-prompt: Flux2KleinPipeline takes no negative_prompt"),
    ("tiny-minimax-h3", ["--guidance", "3", "--negative-prompt", "x"],
     "--negative-prompt, --guidance-scale: TinyMiniMaxH3Pipeline takes no negative_prompt, guidance_scale"),
    ("tiny-flux", ["--negative-prompt", "blurry"],
     "--negative-prompt: FluxPipeline uses a negative prompt only with true_cfg_scale > 1, and its default is 1.0"),
])
def test_a_flag_the_pipeline_does_not_take_is_refused_not_dropped(model, flags, named, tmp_path, capsys):
    """Before: the call left the value out in silence (the output as without it) while the sidecar's settings
    recorded it as given."""
    out = tmp_path / "x.png"
    assert main(["generate", "--model", model, "--quiet", *flags, "--out", str(out)]) == 2
    assert named in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_frames_1_on_an_image_pipeline_still_runs(tmp_path):
    assert main(["generate", "--model", "tiny-flux", "--quiet", "--frames", "1", "--out", str(tmp_path / "x.png")]) == 0


def test_the_sidecar_records_the_pipeline_defaults_the_call_ran_with(tmp_path):
    """Before: tiny-flux without --guidance recorded "guidance": null, while FluxPipeline ran its default 3.5."""
    import inspect

    from diffusers import FluxPipeline

    assert main(["generate", "--model", "tiny-flux", "--quiet", "--out", str(tmp_path / "x.png")]) == 0
    sidecar = json.loads((tmp_path / "x.png.json").read_text())
    assert sidecar["settings"]["guidance"] is None
    default = inspect.signature(FluxPipeline.__call__).parameters["guidance_scale"].default
    assert sidecar["settings"]["pipeline_defaults"] == {"guidance_scale": default}


@pytest.mark.parametrize("fps, played", [(60, "50"), (30, "33.3"), (10, None)])
def test_a_gif_that_cannot_play_at_fps_says_at_what_it_plays(fps, played, tmp_path, capsys):
    """Before: --fps 60 into a .gif wrote 20 ms frames (50 per second) and the sidecar said fps 60, unremarked."""
    from PIL import Image

    out = tmp_path / "x.gif"
    assert main(["generate", "--model", "tiny-wan", "--method", "dense", "--frames", "5", "--height", "32",
                 "--width", "32", "--steps", "1", "--quiet", "--fps", str(fps), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with Image.open(out) as gif:
        delay = gif.info["duration"]
    notes = json.loads((tmp_path / "x.gif.json").read_text())["output_notes"]
    if played is None:
        assert delay == 100 and notes == [] and "plays at" not in printed
    else:
        assert f"{1000 / delay:.3g}" == played
        assert notes == [f"x.gif plays at {played} frames per second for --fps {fps}: a GIF's frame delays are whole "
                         "hundredths of a second, at least 0.02 s; write .mp4 for this fps"]
        assert f"note: {notes[0]}" in printed


def test_a_full_disk_while_writing_leaves_the_earlier_output_and_its_sidecar(tmp_path, capsys, monkeypatch):
    """Before: the earlier run's sidecar (and its side-by-side video) were removed before the new video was
    written; a write that failed (a full disk) left the earlier video with no record beside it."""
    import errno

    import dit_accel.videos as videos

    out = tmp_path / "v.mp4"
    args = ["generate", "--model", "tiny-shapes", "--method", "tile", "--steps", "1", "--quiet", "--out", str(out)]
    assert main([*args, "--side-by-side"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"v.mp4", "v.mp4.json", "v-vs-dense.mp4"}

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(videos, "_write_mp4", full)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit-accel: error: No space left on device while writing") and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
