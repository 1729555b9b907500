"""Calibrate, eval, bench and info as users drive them (round 11 of the trust audit)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dit_accel.cli.main import main

from .test_bench_gpu import QUICK, TINY, fresh_autotune  # noqa: F401  (the fixture, used by name)


def _strict_json(text: str):
    """``text`` parsed as JSON proper: Python's reader takes NaN and Infinity, which JSON has not (jq, browsers and
    most languages refuse the file)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------- bench gpu: a kernel whose output is not finite
def test_bench_gpu_report_of_a_kernel_returning_nan_is_valid_json_and_lists_the_failure(tmp_path, monkeypatch,
                                                                                      fresh_autotune):  # noqa: F811
    """Before: a sparse call returning NaN gave its row o_error inf, written as `Infinity`: gpu_report.json, the
    acceptance run's record, was not JSON (jq: "Invalid numeric literal") exactly when a kernel was broken. Now the
    value is null there (JSON has no inf) and the failure line names it."""
    import dit_accel.kernels as kernels
    from dit_accel.eval import bench_gpu

    real = kernels.block_sparse_attention

    def broken(q, k, v, layout, *, backend="auto", **kw):
        out = real(q, k, v, layout, backend=backend, **kw)
        return out if backend == "torch" else out * float("nan")  # the fp32 twin (torch) stays right

    monkeypatch.setattr(kernels, "block_sparse_attention", broken)
    report = bench_gpu.bench_gpu(tmp_path, shapes=TINY[:1], densities=(0.5,), methods=("tile",), backward=False,
                                 pytest_gpu=False, **QUICK)
    saved = _strict_json((tmp_path / "gpu_report.json").read_text())
    row = next(r for r in report["rows"] if r["kernel"].startswith("tile"))
    assert row["o_error"] == float("inf")
    on_disk = next(r for r in saved["rows"] if r["kernel"] == row["kernel"] and r["pass"] == row["pass"])
    assert on_disk["o_error"] is None
    assert any("tile" in f and "o_error inf > 0.01" in f for f in saved["failures"])
    assert saved["failures"] == report["failures"]


# ----------------------------------------------------------- eval --compare: rows it cannot pair
PROMPTS = ["a blue square moving up", "a red circle moving left"]


def _results(rows):
    settings = dict(model="tiny-shapes", prompts=PROMPTS, seeds=[0, 1], frames=None, height=None, width=None,
                    steps=4, guidance_scale=None, max_sequence_length=None, device="cpu", dtype="float32")
    return {"settings": settings, "provenance": {}, "rows": rows}


def _samples(psnr):
    keys = [(p, s) for p in PROMPTS for s in (0, 1)]
    return [{"prompt": p, "seed": s, "psnr": v} for (p, s), v in zip(keys, psnr)]


def _write(tmp_path, name, rows):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(_results(rows)))
    return str(tmp_path / name)


def test_compare_names_the_rows_it_could_not_pair(tmp_path, capsys):
    """Before: a row that failed in B (after a change broke the method) or a row only one folder has was left out
    of the table without a word, and with the rows left equal the output even said the folders 'may be copies of
    one run'. Now each such row is noted, and the copies note is not given."""
    same = _samples([30.0, 31.0, 32.0, 33.0])
    a = _write(tmp_path, "a", [{"label": "dense", "samples": same}, {"label": "tile", "samples": same},
                               {"label": "gna", "samples": same}])
    b = _write(tmp_path, "b", [{"label": "dense", "samples": same},
                               {"label": "tile", "error": "RuntimeError: CUDA error:\nillegal memory access"},
                               {"label": "sla", "samples": same}])
    assert main(["eval", "--compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "note: not compared: tile: failed in B (RuntimeError: CUDA error: illegal memory access)" in out
    assert "note: not compared: gna: only in A" in out and "note: not compared: sla: only in B" in out
    assert "may be copies" not in out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "psnr" in line] == \
        ["| dense"]


def test_compare_of_two_complete_folders_notes_nothing_and_pairs_b_minus_a(tmp_path, capsys):
    psnr_a, psnr_b = [30.0, 20.0, 25.0, 35.0], [31.0, 23.0, 24.0, 36.5]
    a = _write(tmp_path, "a", [{"label": "tile", "samples": _samples(psnr_a)}])
    b = _write(tmp_path, "b", [{"label": "tile", "samples": _samples(psnr_b)}])
    assert main(["eval", "--compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "not compared" not in out
    line = next(x for x in out.splitlines() if x.startswith("| tile | psnr"))
    assert f"| {np.mean(np.subtract(psnr_b, psnr_a)):+.4g} |" in line


# ----------------------------------------------------------- bench kernels --modelled --shapes
def test_bench_modelled_shapes_with_an_empty_entry_keeps_only_the_named_shapes(tmp_path, capsys):
    """Before: `--modelled --shapes "FLUX 1024,"` (a trailing comma) kept every GPU shape (the empty entry matched
    all), and `--shapes ""` modelled all five; the timed run already read both as it does now."""
    out = tmp_path / "m.json"
    assert main(["bench", "kernels", "--modelled", "--shapes", "FLUX 1024,", "--densities", "0.1", "--kernels",
                 "current", "--json", str(out)]) == 0
    assert {r["shape"] for r in json.loads(out.read_text())["rows"]} == {"FLUX 1024px"}
    capsys.readouterr()
    assert main(["bench", "kernels", "--modelled", "--shapes", "", "--densities", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shapes '' matches none of the GPU shapes" in err


# ----------------------------------------------------------- info: flags --plan and --clear do not read
@pytest.mark.parametrize("argv, named", [
    (["--plan", "PLAN", "--model", "tiny-wan"], "--model does not apply to --plan"),
    (["--plan", "PLAN", "--device", "cpu"], "--device does not apply to --plan"),
    (["--clear", "--model", "tiny-shapes"], "--model does not apply to --clear"),
    (["--clear", "--plan", "PLAN"], "--plan does not apply to --clear"),
], ids=["plan-model", "plan-device", "clear-model", "clear-plan"])
def test_info_refuses_flags_plan_and_clear_would_drop(argv, named, monkeypatch, capsys):
    """Before: `info --plan plan.json --model tiny-wan` printed the plan and exit 0, as if it had been checked
    against tiny-wan (--model was never read), and `info --clear --model ...` cleared and dropped --model."""
    from dit_accel.kernels import autotune, selfcheck
    from dit_accel.models.tiny_shapes import TINY_SHAPES_PLAN

    cleared = []
    monkeypatch.setattr(autotune, "clear", lambda: cleared.append("autotune"))
    monkeypatch.setattr(selfcheck, "clear", lambda: cleared.append("selfcheck"))
    argv = [str(TINY_SHAPES_PLAN) if a == "PLAN" else a for a in argv]
    assert main(["info", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and named in err and captured.out == ""
    assert cleared == []  # refused before anything was forgotten
    assert main(["info", "--plan", str(TINY_SHAPES_PLAN)]) == 0  # alone, as before
    assert "steps" in capsys.readouterr().out


# ----------------------------------------------------------- any command: its reader closed the pipe
def test_a_reader_that_closes_stdout_ends_the_command_quietly(tmp_path):
    """Before: `dit-accel info --plan plan.json | head -1` (any command whose output outlives its reader) ended in a
    BrokenPipeError traceback on stderr. Now it stops quietly with 141, as a shell reports a writer a closed pipe
    ended."""
    from dit_accel.models.tiny_shapes import TINY_SHAPES_PLAN

    proc = subprocess.Popen([sys.executable, "-m", "dit_accel.cli.main", "info", "--plan", str(TINY_SHAPES_PLAN)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # closed before the command writes (its imports take seconds)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_a_broken_pipe_other_than_stdout_keeps_its_traceback(monkeypatch):
    """Only a closed stdout is quiet: another pipe that broke (a subprocess, a socket) is not hidden."""
    from dit_accel.cli import info

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info, "run", broken)
    with pytest.raises(BrokenPipeError):
        main(["info"])


# ----------------------------------------------------------- bench fidelity: no method ran
def _image_capture(folder):
    import torch

    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
    torch.save({"q": q, "k": k, "v": v, "grid": (16, 16), "layer": 0, "step": 0, "layer_name": "blocks.0"},
               folder / "layer000_step000.pt")
    return q, k, v


def test_bench_fidelity_where_no_method_runs_is_refused_and_writes_nothing(tmp_path, capsys):
    """Before: `bench fidelity --methods tile,radial` on an image model's capture (Tile's default tile is 3-D,
    Radial needs frames) printed a note per method, an empty table, wrote fid.json without rows and exited 0."""
    _image_capture(tmp_path / "cap")
    out = tmp_path / "fid.json"
    assert main(["bench", "fidelity", "--capture", str(tmp_path / "cap"), "--methods", "tile,radial", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dit-accel bench fidelity: no method ran on the captures of")
    assert "tile on layer000_step000.pt: ValueError" in err and "token grid (16, 16)" in err
    assert not out.exists()


def test_bench_fidelity_keeps_the_rows_of_the_methods_that_ran(tmp_path, capsys):
    """One method that fits: its row, the other's failure as a note; dense's error is 0 against SDPA itself."""
    _image_capture(tmp_path / "cap")
    out = tmp_path / "fid.json"
    assert main(["bench", "fidelity", "--capture", str(tmp_path / "cap"), "--methods", "dense,radial", "--out",
                 str(out)]) == 0
    assert "radial on layer000_step000.pt: ValueError" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense"]
    assert rows[0]["rel_l2"] == pytest.approx(0.0, abs=1e-7) and rows[0]["cosine"] == pytest.approx(1.0)


# ----------------------------------------------------------- eval --compare: one model name, other weights
def test_compare_refuses_runs_of_one_model_name_with_other_weights(tmp_path, capsys):
    """Before: results.json named the model only by its --model text, so two runs of `--model ./model` from two
    project folders (or of a folder retrained in place) were paired as one model: each method's PSNR against
    another dense baseline was reported as the change between the runs. Now eval records the weights' sha256 (the
    dense cache's key) and --compare refuses runs whose weights differ."""
    import shutil

    from dit_accel.eval import runner
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-shapes")
    settings = runner.EvalSettings(model="tiny-shapes", prompts=["a red circle moving left"], seeds=[0], steps=2,
                                   frames=7, height=48, width=48, device="cpu", dtype="float32", warmup=0)
    results = runner.run_eval(settings, [], tmp_path / "a", pipe=pipe, lpips=False, floor_backend="none",
                              log=lambda m: None)
    sha = results["provenance"]["model_sha256"]
    assert sha.startswith("files:")
    key = runner.dense_cache_key(runner.EvalSettings(**results["settings"]), settings.prompts[0], 0,
                                 model_sha256=sha, pipeline=type(pipe).__name__)
    assert (tmp_path / "a" / "cache" / f"dense_{key}.npz").is_file()  # the hash that keyed the dense cache
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0  # the same weights: paired
    capsys.readouterr()
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    saved["provenance"]["model_sha256"] = "files:" + "0" * 64
    (tmp_path / "b" / "results.json").write_text(json.dumps(saved))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to pair" in err
    assert f"the model's weights differ (--model tiny-shapes: sha256 {sha[:18]} vs files:000000000000)" in err


# ----------------------------------------------------------- bench layouts: methods a grid has no setting of
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_bench_layouts_with_no_setting_of_the_methods_at_the_grids_says_so(json_flag, capsys):
    """Before: `bench layouts --grids tiny --methods radial` (the tiny-shapes-63 grid has its shipped plan's Tile
    settings only) printed a bare table header, or with --json nothing at all, and exited 0."""
    assert main(["bench", "layouts", "--grids", "tiny", "--methods", "radial", *json_flag]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and captured.out == ""
    assert "no setting of --methods radial at tiny-shapes-63 (there: tiny-shapes-63: tile)" in err


def test_bench_layouts_json_lines_are_json_and_their_tile_densities_are_window_over_frames(capsys):
    """The rows that do exist: one strict JSON object a line; a Tile window of w frames over the 32 one-frame tiles
    of tiny-shapes-63 (windows kept inside the grid) visits w of 32 key tiles per query tile."""
    import re

    assert main(["bench", "layouts", "--grids", "tiny", "--methods", "tile", "--json"]) == 0
    rows = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["method"] == "tile" and r["grid"] == [32, 12, 12] for r in rows)
    for r in rows:
        tile, window = (tuple(map(int, re.search(rf"{k}=\(([\d, ]+)\)", r["config"])[1].split(",")))
                        for k in ("tile", "window"))
        assert tile == (1, 12, 12) and window[1:] == (1, 1)
        assert r["density"] == pytest.approx(window[0] / 32, abs=1e-5)


# ----------------------------------------------------------- calibrate --costs measured with the cost model's flags
@pytest.mark.parametrize("flags, named", [
    (["--arch", "h200"], "--arch h200 prices the cost model"),
    (["--kernel", "ws"], "--kernel ws prices the cost model"),
    (["--cost-terms", "tiles", "--arch", "h200"], "--arch h200, --cost-terms tiles price the cost model"),
], ids=["arch", "kernel", "terms-and-arch"])
def test_calibrate_costs_measured_refuses_the_cost_models_flags_before_the_model_loads(flags, named, tmp_path,
                                                                                       monkeypatch, capsys):
    """Before: `calibrate --costs measured --arch h200` (or --kernel, --cost-terms) ran the whole calibration
    timing candidates on --device and never read them, while its help lists them as the cost model's."""
    from dit_accel.models import loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out", str(tmp_path / "p.json"),
                 "--min-psnr", "25", "--costs", "measured", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert named in err and "which --costs measured does not use" in err and "or use --costs model" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_calibrate_costs_measured_alone_or_the_model_with_its_flags_reach_the_loader(tmp_path, monkeypatch):
    from dit_accel.calibrate import CalibrationSettings, calibrate
    from dit_accel.models import loading

    seen = []

    def stop(model, **k):
        seen.append(model)
        raise loading.ModelLoadError("stopped in the test")

    monkeypatch.setattr(loading, "load_pipeline", stop)
    for options in ({"costs": "measured"}, {"costs": "model", "arch": "h200", "cost_terms": "tiles"}):
        settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving left"], min_psnr=25,
                                       steps=2, **options)
        with pytest.raises(loading.ModelLoadError, match="stopped in the test"):
            calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert seen == ["tiny-shapes", "tiny-shapes"]


# ----------------------------------------------------------- bench kernels: --out and --plot one file
def test_bench_kernels_with_out_and_plot_naming_one_file_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """Before: `bench kernels --out bench.json --plot bench.json` ran the benchmark, wrote the JSON, then the PNG
    over it (both "wrote bench.json"): the results were lost. Now it is refused before the run."""
    from dit_accel.eval import bench

    def refuse(*a, **k):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "bench_kernels", refuse)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "kernels", "--device", "cpu", "--out", "bench.json", "--plot",
                 str(tmp_path / "bench.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name one file: the plot would replace the results" in err
    assert list(tmp_path.iterdir()) == []
