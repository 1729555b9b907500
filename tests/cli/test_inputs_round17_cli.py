"""Round 17, file I/O and the info/selftest/bench commands: frame files numbered without padding, UTF-16 text files,
output file paths ending with a slash, ``bench sass --search`` beside filters it does not read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dit_accel.cli.main import main


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dit-accel {command}"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- load_video: frame order
@pytest.mark.parametrize("layout", ["folder", "pattern"])
def test_load_video_reads_unpadded_frame_numbers_in_order(tmp_path, layout):
    """Before: frames another tool wrote without padding (ffmpeg's ``%d.png``: 1.png ... 12.png) were read in the
    order of their names, 1, 10, 11, 12, 2, ..., 9: a scrambled video, without an error."""
    from PIL import Image

    from dit_accel.videos import load_video

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 13):
        name = folder / f"{i}.png" if layout == "folder" else tmp_path / f"clip_{i}.png"
        Image.fromarray(np.full((2, 2, 3), i * 10, np.uint8)).save(name)
    video = load_video(folder if layout == "folder" else tmp_path / "clip.png")
    assert (video[:, 0, 0, 0] // 10).tolist() == list(range(1, 13))


def test_save_video_frames_still_load_in_order(tmp_path):
    """The zero-padded frames save_video writes keep their order (a name sort and a number sort agree)."""
    from dit_accel.videos import load_video, save_video

    frames = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8) * 20
    save_video(frames, tmp_path / "out")
    assert (load_video(tmp_path / "out")[:, 0, 0, 0] // 20).tolist() == list(range(12))


# ----------------------------------------------------------------------------- read_text: UTF-16 files
@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_read_json_reads_a_utf16_file(tmp_path, codec):
    """Before: a JSON file saved as UTF-16 (Notepad's "Unicode", PowerShell 5's ``>``) was refused as "is binary
    (holds NUL bytes)": a plan, prompt list or method config that is plain text."""
    from dit_accel.atomic_files import read_json, read_text

    path = tmp_path / "config.json"
    data = '{"prompt": "a fox in snow, é"}\n'.encode(codec)
    if codec == "utf-16-be":
        data = b"\xfe\xff" + data
    path.write_bytes(data)
    assert read_json(path) == {"prompt": "a fox in snow, é"}
    assert not read_text(path).startswith("\ufeff")


@pytest.mark.parametrize("content, problem", [(b"\xff\xfe\x00\x01", "is binary"), (b"\xff\xfe{}", "is not UTF-8"),
                                              (b"\xff\xfe" + "a fox".encode("utf-16-le") + b"\x00", "is binary")])
def test_read_text_still_refuses_bytes_that_only_start_like_a_utf16_mark(tmp_path, content, problem):
    """Bytes after the mark that decode to no text (odd length, control characters, no ASCII at all) keep their
    one-line refusal."""
    from dit_accel.atomic_files import BadFileError, read_text

    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(BadFileError, match=problem):
        read_text(path)


def test_info_plan_reads_a_utf16_plan(tmp_path, capsys):
    """``dit-accel info --plan`` of a plan re-saved as UTF-16 prints it instead of "is binary"."""
    from dit_accel.models.tiny_shapes import TINY_SHAPES_PLAN

    plan = tmp_path / "plan.json"
    plan.write_bytes(TINY_SHAPES_PLAN.read_text(encoding="utf-8").encode("utf-16"))
    assert main(["info", "--plan", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == str(plan)


# ----------------------------------------------------------------------------- output files ending with a slash
def test_file_error_refuses_a_path_ending_with_a_slash(tmp_path):
    """Before: ``--out results/`` (a folder's name, not there yet) passed, and the results were written to a FILE
    named ``results`` (pathlib drops the slash)."""
    from dit_accel.cli.checks import file_error

    problem = file_error(f"{tmp_path}/results/", "--out", "bench.json")
    assert problem is not None and "ends with a slash" in problem and "results/bench.json" in problem
    assert file_error(str(tmp_path / "results.json"), "--out", "bench.json") is None


def test_bench_kernels_out_ending_with_a_slash_writes_no_file(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", "kernels", "--modelled", "--shapes", "Wan2.1 480p", "--densities", "0.1",
                 "--out", f"{out}/"]) == 2
    assert "ends with a slash" in _one_line(capsys, "bench kernels")
    assert not out.exists()


# ----------------------------------------------------------------------------- bench sass --search
@pytest.mark.parametrize("flags", [["--kernel", "fwd"], ["--dtype", "float16"], ["--head-dim", "64"], ["--no-dense"],
                                   ["--family", "sla"]])
def test_bench_sass_search_refuses_filters_it_does_not_read(capsys, monkeypatch, flags):
    """Before: ``bench sass --search sla --kernel fwd`` compiled and ranked every kernel of the family (minutes on
    a CPU, an hour for block_sparse), the filter dropped without a word."""
    from dit_accel.kernels import sass

    monkeypatch.setattr(sass, "search", lambda *a, **k: pytest.fail("compiled although a flag was ignored"))
    assert main(["bench", "sass", "--arch", "90", "--search", "sla", *flags]) == 2
    assert f"{flags[0]} does not apply to --search" in _one_line(capsys, "bench sass")


def test_bench_sass_search_names_a_group_without_candidate(capsys, monkeypatch):
    """Before: a group none of whose candidates compiled printed "no candidate compiled" alone, without the
    group (arch, kernel, dtype, head dim) it was about."""
    from dit_accel.kernels import sass

    monkeypatch.setattr(sass, "search", lambda *a, **k: {(90, "fwd", "torch.bfloat16", 64, False):
                                                         [{"name": "sla_fwd-x", "error": "ptxas failed"}]})
    assert main(["bench", "sass", "--arch", "90", "--search", "sla"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("90 fwd torch.bfloat16 64 False") and line.endswith("no candidate compiled"), line



# ----------------------------------------------------------------------------- atomic_write through a symlink
@pytest.mark.parametrize("kind", ["json", "mp4"])
def test_atomic_write_through_a_symlink_replaces_the_file_it_names(tmp_path, kind):
    """Before: writing to a path that is a symbolic link (``out.json -> /data/run/out.json``) replaced the link by a
    new file beside it, and the file the link named kept the OLD content without a word (``open(path, "w")``,
    ``torch.save`` and ``safetensors`` write through the link)."""
    import os

    from dit_accel.atomic_files import atomic_write_json, is_temp_name
    from dit_accel.videos import load_video, save_video

    real = tmp_path / "data" / f"out.{kind}"
    real.parent.mkdir()
    link = tmp_path / f"out.{kind}"
    if kind == "json":
        real.write_text('{"old": 1}')
        os.symlink(os.path.relpath(real, tmp_path), link)
        atomic_write_json(link, {"new": 2})
        assert json.loads(real.read_text()) == {"new": 2}
    else:
        save_video(np.zeros((2, 4, 4, 3), np.uint8), real)
        os.symlink(real, link)
        save_video(np.full((3, 4, 4, 3), 255, np.uint8), link)
        assert load_video(real).shape[0] == 3
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert not [p for p in (*tmp_path.iterdir(), *real.parent.iterdir()) if is_temp_name(p)]


# ----------------------------------------------------------------------------- bench kernels --plot
@pytest.mark.parametrize("name", ["speed.txt", "speed"])
def test_bench_kernels_refuses_a_plot_name_with_no_image_suffix_before_running(tmp_path, capsys, monkeypatch, name):
    """Before: ``--plot speed.txt`` ran the whole benchmark, then matplotlib's ValueError came as a traceback;
    ``--plot speed`` wrote ``speed.png`` and printed "wrote speed", a file that does not exist."""
    from dit_accel.eval import bench

    monkeypatch.setattr(bench, "bench_kernels", lambda *a, **k: pytest.fail("benchmarked before the --plot check"))
    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--plot", str(tmp_path / name)]) == 2
    err = _one_line(capsys, "bench kernels")
    assert "--plot" in err and ".png" in err and ".svg" in err


def test_bench_kernels_takes_a_plot_name_matplotlib_writes(tmp_path, capsys, monkeypatch):
    from dit_accel.eval import bench

    def stop(*a, **k):
        raise KeyboardInterrupt  # (past every check: the benchmark itself is not run here)

    monkeypatch.setattr(bench, "bench_kernels", stop)
    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--plot", str(tmp_path / "speed.SVG")]) == 130


def test_atomic_folder_through_a_symlink_replaces_the_folder_it_names(tmp_path):
    """Before: ``atomic_folder("runs/latest")`` with ``latest -> run3`` put a new folder in the link's place, left the
    link behind under a temporary name, and ``run3`` kept its OLD files."""
    import os

    from dit_accel.atomic_files import atomic_folder, is_temp_name

    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "a.txt").write_text("old")
    os.symlink("run3", tmp_path / "latest")
    with atomic_folder(tmp_path / "latest") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "run3" / "a.txt").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p)]


# ----------------------------------------------------------------------------- bench gpu --out
@pytest.mark.parametrize("kind", ["empty", "file"])
def test_bench_gpu_checks_its_out_folder_first(tmp_path, capsys, kind):
    """Before: ``bench gpu --out ""`` wrote gpu_report.json into the working folder, and ``--out FILE`` stopped with
    an OSError (status 1, not a usage error) once the GPU was found."""
    (tmp_path / "report").write_text("x")
    out = {"empty": "", "file": str(tmp_path / "report")}[kind]
    assert main(["bench", "gpu", "--out", out]) == 2
    assert "--out" in _one_line(capsys, "bench gpu")


def test_commit_files_through_a_symlink_replaces_the_file_it_names(tmp_path):
    """``commit_files`` (generate's video, comparison and sidecar; save_video's PNG frames) writes through a link as
    atomic_write does: before, the link was replaced and the file it named kept the old content."""
    import os

    from dit_accel.atomic_files import commit_files, commit_journal

    real = tmp_path / "data" / "run.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "run.json"
    os.symlink(real, link)
    commit_files({link: "new", tmp_path / "other.txt": "x"}, commit_journal(link))
    assert link.is_symlink() and real.read_text() == "new" and (tmp_path / "other.txt").read_text() == "x"
    assert not commit_journal(link).exists()
