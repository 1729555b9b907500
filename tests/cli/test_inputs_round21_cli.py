"""Round 21: ``dit-accel generate``, ``info`` and ``convert`` inputs refused before the work, not after it."""

from __future__ import annotations

import pytest

from dit_accel.cli.main import main


def _no_load(monkeypatch):
    """Loading fails loudly: a check that should refuse before the model loads must not reach it."""
    import dit_accel.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.mark.parametrize("fps", ["2000000000000", "100000"])
def test_an_fps_no_video_takes_is_refused_before_loading(tmp_path, capsys, monkeypatch, fps):
    """Before: ``--fps 2000000000000`` generated the video, then ffmpeg refused the rate: a BrokenPipeError traceback
    and no output; ``--fps 100000`` wrote an .mp4 no player shows."""
    _no_load(monkeypatch)
    out = tmp_path / "a.mp4"
    assert main(["generate", "--model", "tiny-wan", "--out", str(out), "--fps", fps, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--fps must be an integer from 1 to 1000; got {fps}" in err and "Traceback" not in err
    assert not out.exists()


def test_an_out_with_a_suffix_and_a_trailing_slash_is_refused(tmp_path, capsys, monkeypatch):
    """Before: ``--out run/e.mp4/`` (a folder, by its slash) wrote the file ``run/e.mp4``."""
    _no_load(monkeypatch)
    out = f"{tmp_path / 'e.mp4'}/"
    assert main(["generate", "--model", "tiny-wan", "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} ends with a slash, which names a folder, but 'e.mp4' has the suffix '.mp4'" in err
    assert not (tmp_path / "e.mp4").exists()


def test_an_out_folder_with_a_dot_in_its_name_is_named_as_a_folder(tmp_path, capsys, monkeypatch):
    """Before: ``--out run.v2`` (an existing folder) was refused for its "unknown suffix '.v2'; use .mp4, .gif, .png
    or a folder path": a folder path is what was given."""
    _no_load(monkeypatch)
    folder = tmp_path / "run.v2"
    folder.mkdir()
    assert main(["generate", "--model", "tiny-wan", "--out", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder}: a folder whose name ends with '.v2', which is read as a file suffix" in err
    assert str(folder / "frames") in err and list(folder.iterdir()) == []


def test_a_byte_order_mark_before_a_prompt_is_not_part_of_it(tmp_path):
    """Before: ``--prompt "$(cat prompt.txt)"`` of a file saved with a UTF-8 byte-order mark passed U+FEFF to the
    tokenizer as the prompt's first character, and the sidecar recorded it."""
    import json

    out = tmp_path / "a.png"
    assert main(["generate", "--model", "tiny-flux", "--steps", "1", "--height", "16", "--width", "16", "--quiet",
                 "--prompt", "\ufeffa cat", "--out", str(out)]) == 0
    assert json.loads((tmp_path / "a.png.json").read_text())["settings"]["prompt"] == "a cat"
