"""The CLI's inputs checked before any expensive work, and its words true: each test makes the user's call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dit_accel.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ Ctrl-C in the first seconds
_SLOW_IMPORT = textwrap.dedent("""
    import importlib.abc, signal, sys, time

    # Ctrl-C as a terminal delivers it: a test process may run with SIGINT ignored or blocked (inherited by its
    # children, whose Python then never raises KeyboardInterrupt: two full-suite CI runs timed out here).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    class SlowImport(importlib.abc.MetaPathFinder):
        # stands for the seconds a subcommand's module takes to import torch and Diffusers: work in short steps,
        # as an import does (one 60 s sleep would miss a SIGINT that lands between the print and the sleep's
        # system call: the interpreter notices it only when the sleep ends)
        def find_spec(self, name, path, target=None):
            if name == "dit_accel.cli.generate":
                print("importing", flush=True)
                for _ in range(600):
                    time.sleep(0.1)
            return None

    sys.meta_path.insert(0, SlowImport())
    from dit_accel.cli.main import main
    sys.exit(main(["generate", "--help"]))
""")


def test_ctrl_c_while_a_command_imports_exits_130_with_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_IMPORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "importing"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "dit-accel: interrupted"


# ------------------------------------------------------------------ devices torch knows but dit-accel does not run
@pytest.mark.parametrize("device", ["mps", "meta", "banana"])
@pytest.mark.parametrize("command", [
    ["generate"],
    ["eval", "--model", "tiny-shapes", "--methods", "dense"],
    ["calibrate", "--model", "tiny-shapes", "--min-psnr", "20"],
    ["info"],
    ["bench", "kernels", "--quick"],
], ids=["generate", "eval", "calibrate", "info", "bench-kernels"])
def test_devices_other_than_cpu_and_cuda_are_refused_in_one_line(command, device, tmp_path, capsys):
    extra = []
    if command[0] in ("generate", "eval"):
        extra = ["--out", str(tmp_path / "o")]
    if command[0] == "calibrate":
        prompts = tmp_path / "p.txt"
        prompts.write_text("a red square moving left\n")
        extra = ["--prompts", str(prompts), "--out", str(tmp_path / "plan.json")]
    assert main([*command, *extra, "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err and "cpu" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bench_gpu_without_a_gpu_advises_what_runs_here_on_stderr(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    for device in ([], ["--device", "cpu"]):
        assert main(["bench", "gpu", "--out", str(tmp_path), *device]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "bench kernels --device cpu" in err
        # the advice it gives is a command that runs here, not one bench gpu refuses
        assert "use --device cpu" not in err


# ------------------------------------------------------------------ --cache options
@pytest.fixture
def no_model_load(monkeypatch):
    """A check that is meant to come before the model: loading one fails the test."""
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.mark.parametrize("cache, said", [
    ("fbcache:threshold=abc", "threshold must be a number"),
    ("fbcache:threshold=-1", "threshold must be >= 0"),
    ("fbcache:threshold=nan", "threshold must be a finite number"),
    ("taylorseer:cache_interval=0", "cache_interval must be >= 1"),
    ("taylorseer:cache_interval=2.5", "cache_interval must be an integer"),
    ("", "names no cache"),
], ids=["abc", "negative", "nan", "interval-0", "interval-float", "empty"])
@pytest.mark.parametrize("command", [["generate", "--model", "tiny-flux", "--method", "dense"],
                                     ["eval", "--model", "tiny-flux", "--methods", "dense"]], ids=["generate", "eval"])
def test_bad_cache_options_are_refused_before_the_model_loads(command, cache, said, tmp_path, capsys, no_model_load):
    assert main([*command, "--cache", cache, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "--cache" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_run_with_a_cache_says_what_it_skipped(tmp_path, capsys):
    import json

    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-flux", "--method", "dense", "--cache", "fbcache:threshold=0.9",
                 "--steps", "3", "--height", "64", "--width", "64", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "img.png.json").read_text())
    cache = record["cache"]
    layers = record["summary"]["layers"]
    assert cache["attention_calls_expected"] == layers * record["timing"]["transformer_calls"]
    assert cache["attention_calls_ran"] == record["summary"]["sparse_calls"] + record["summary"]["dense_calls"]
    assert 0 < cache["attention_calls_skipped"] == cache["attention_calls_expected"] - cache["attention_calls_ran"]
    line = next(x for x in printed.splitlines() if x.startswith("cache fbcache"))
    assert f"skipped {cache['attention_calls_skipped']} of {cache['attention_calls_expected']}" in line


# ------------------------------------------------------------------ eval: methods, seeds, compare
@pytest.mark.parametrize("argv, said", [
    (["--methods", ""], "--methods '' names no method"),
    (["--methods", " , "], "names no method"),
    (["--seeds=-1"], "--seeds must be integers >= 0 (and < 2**63); got -1"),
    (["--seeds", "0,-3"], "got -3"),
    (["--guidance", "nan"], "--guidance-scale must be a finite number"),
], ids=["methods-empty", "methods-commas", "seeds-negative", "seeds-one-negative", "guidance-nan"])
def test_eval_refuses_what_calibrate_and_generate_refuse(argv, said, tmp_path, capsys, no_model_load):
    assert main(["eval", "--model", "tiny-shapes", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1


def test_eval_refuses_a_capture_folder_of_another_run_before_the_model_loads(tmp_path, capsys, no_model_load):
    held = tmp_path / "cap"
    held.mkdir()
    (held / "layer000_step000.pt").write_bytes(b"x")
    assert main(["eval", "--model", "tiny-shapes", "--out", str(tmp_path / "o"), "--capture", str(held)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--capture: capture=" + repr(str(held)) + " already holds 1 capture file (layer000_step000.pt);"
                        " pass an empty folder or remove them") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_seed_check_is_shared_by_generate_eval_and_calibrate(tmp_path, capsys, no_model_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    calls = {"generate": ["generate", "--seed", "-1", "--out", str(tmp_path / "g.mp4")],
             "eval": ["eval", "--model", "tiny-shapes", "--seeds", "-1", "--out", str(tmp_path / "e")],
             "calibrate": ["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20",
                           "--seeds", "-1", "--out", str(tmp_path / "plan.json")]}
    for name, argv in calls.items():
        assert main(argv) == 2, name
        assert ">= 0 (and < 2**63); got -1" in capsys.readouterr().err, name


def _results_folder(folder: Path, value: float) -> Path:
    import json

    folder.mkdir()
    samples = [{"prompt": p, "seed": 0, "psnr": value + i} for i, p in enumerate(("a", "b"))]
    (folder / "results.json").write_text(json.dumps({
        "settings": {"prompts": ["a", "b"], "seeds": [0]}, "rows": [{"label": "tile", "samples": samples}]}))
    return folder


def test_eval_compare_of_a_folder_with_itself_is_refused(tmp_path, capsys):
    from dit_accel.eval.compare import load_results

    folder = _results_folder(tmp_path / "a", 30.0)
    try:
        load_results(str(folder))
    except ValueError as exc:  # the folder this test writes is not what eval writes: the test must say so
        pytest.fail(f"test fixture is not a results folder: {exc}")
    assert main(["eval", "--compare", str(folder), str(folder) + "/"]) == 2
    err = capsys.readouterr().err.strip()
    assert "both name the same folder" in err and len(err.splitlines()) == 1
    copy = _results_folder(tmp_path / "b", 30.0)
    assert main(["eval", "--compare", str(folder), str(copy)]) == 0
    assert "note: A and B hold the same mean for every row and metric" in capsys.readouterr().out


# ------------------------------------------------------------------ settings that were silently ignored
@pytest.mark.parametrize("argv, said", [
    (["--guidance", "nan"], "--guidance-scale must be a finite number; got nan"),
    (["--guidance", "inf"], "--guidance-scale must be a finite number; got inf"),
    (["--out", ""], "--out is empty"),
    (["--out", "  "], "--out is empty"),
], ids=["guidance-nan", "guidance-inf", "out-empty", "out-blank"])
def test_generate_refuses_settings_it_used_to_ignore(argv, said, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


@pytest.mark.parametrize("argv, named", [
    (["--search-iters", "3"], "--search-iters 3"),
    (["--layer-groups", "2", "--probe-videos", "2"], "--probe-videos 2, --layer-groups 2"),
    (["--sensitivity", "uniform"], "--sensitivity uniform"),
    (["--uniform-options", "0"], "--uniform-options 0"),
], ids=["search-iters", "two", "sensitivity", "uniform-options"])
def test_calibrate_warmup_search_names_the_options_it_does_not_read(argv, named, tmp_path, capsys, no_model_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20",
                 "--search", "warmup", "--out", str(tmp_path / "plan.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "not apply to --search warmup" in err and len(err.splitlines()) == 1


def test_a_size_past_the_rotary_embeddings_reach_is_refused_before_the_run(tmp_path, capsys):
    """tiny-wan's rotary table holds 64 positions per axis (patch 2, VAE 8: 1,024 pixels): --width 1040 failed in
    the first step with "shape '[1, 1, ...]' is invalid"; 1,024 runs."""
    out = tmp_path / "v.mp4"
    for flag, value, most in (("--width", "1040", "1024"), ("--height", "1032", "1024"), ("--frames", "257", "253")):
        assert main(["generate", "--model", "tiny-wan", "--method", "dense", "--no-compare-dense", "--steps", "1",
                     flag, value, "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"dit-accel generate: error: {flag} {value} is past what WanTransformer3DModel's rotary "
                       f"embedding covers (64 positions per axis, rope_max_seq_len): give {flag} {most} or less")
        assert not out.exists()
    assert main(["generate", "--model", "tiny-wan", "--method", "dense", "--no-compare-dense", "--steps", "1",
                 "--frames", "1", "--height", "16", "--width", "1024", "--quiet", "--out", str(out)]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    for command in (["eval", "--methods", "tile", "--out", str(tmp_path / "ev")],
                    ["calibrate", "--prompts", str(prompts), "--min-psnr", "20", "--out", str(tmp_path / "c.json")]):
        assert main([command[0], "--model", "tiny-wan", "--width", "1040", *command[1:]]) == 2
        assert "--width 1040 is past what WanTransformer3DModel's rotary embedding covers" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


# ------------------------------------------------------------------ words that were wrong
def test_the_frames_note_names_the_models_own_frame_rule(tmp_path, capsys):
    """tiny-shapes' VAE compresses time by 2: it takes 2k+1 frames, where Wan's takes 4k+1."""
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "tiny-shapes", "--method", "dense", "--no-compare-dense", "--frames", "4",
                 "--steps", "1", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    note = next(line for line in printed.splitlines() if "frames for --frames 4" in line)
    assert "made 5 frames" in note and "2k+1" in note and "4k+1" not in note


def test_info_on_a_folder_that_is_not_a_model_says_so(tmp_path, capsys):
    folder = tmp_path / "my_videos"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model\n")
    assert main(["info", "--model", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert "is not a Diffusers model folder (no model_index.json)" in err and len(err.strip().splitlines()) == 1
    assert "WanTransformer3DModel" not in err and out == ""
    (folder / "model_index.json").write_text('{"transformer": ["diffusers", "MyTransformer"]}')
    assert main(["info", "--model", str(folder)]) == 2
    assert "its transformer (MyTransformer) has no dit_accel preset" in capsys.readouterr().err


# ------------------------------------------------------------------ numbers to their precision
@pytest.mark.parametrize("seconds, shown", [
    (3.9326003, "3.93 s"), (11.3256379, "11.3 s"), (1234.5, "1230 s"), (0.5, "500 ms"), (0.0412345, "41.2 ms"),
    (0.9996, "1.00 s"), (9.996, "10.0 s"), (0.00012345, "0.123 ms"), (0.0, "0 s"), (None, "n/a"),
])
def test_times_print_to_three_significant_figures(seconds, shown):
    from dit_accel._util import format_time

    assert format_time(seconds) == shown
    assert format_time(seconds, "/sample") == (shown + "/sample" if seconds is not None else "n/a")


def test_ratios_print_to_two_decimals():
    from dit_accel._util import format_ratio

    assert format_ratio(11325.6379 / 3932.6003) == "2.88x" and format_ratio(1.0) == "1.00x"
    assert format_ratio(None) == "n/a" and format_ratio(0.5, "") == "0.50"


def test_the_calibrated_plan_line_prints_times_to_their_precision():
    """The main job printed `attention timed on cpu 3932.6003 ms/sample vs dense 11325.6379`."""
    from dit_accel.cli.generate_report import _plan_quality_lines

    quality = {"plan": "tile w3x1x1", "modelled_ms": 3932.6003, "dense_modelled_ms": 11325.6379,
               "priced": "timed on cpu", "validation": {"videos": 4, "psnr": 28.83, "psnr_worst": 26.01},
               "baseline": {"label": "uniform sla k0.15", "modelled_ms": 4314.6071, "psnr": 19.9, "psnr_worst": 18.0}}
    first, second = _plan_quality_lines(quality)
    assert first == "calibrated: tile w3x1x1; attention timed on cpu 3.93 s/sample vs dense 11.3 s (2.88x)"
    assert "(sla k0.15, 4.31 s/sample)" in second


# ------------------------------------------------------------------ help text
def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_read_well(capsys):
    calibrate = _help(["calibrate"], capsys)
    baseline = calibrate[calibrate.index("--no-baseline "):].split(" --batch-size")[0]
    assert "(default: True)" not in baseline  # the flag skips the baseline: "default True" read as the opposite
    generate = _help(["generate"], capsys)
    tile = generate[generate.index("--tile T,H,W "):].split(" --fit-grid")[0]
    block = generate[generate.index("--block-size BLOCK_SIZE "):].split(" --strategy")[0]
    for text, parts in ((tile, ("gna:", "tile:", "vsa:")), (block, ("radial:", "sla:", "tile:"))):
        for part in parts:
            assert text.count(part) == 1, text  # each method's words once
    top = _help([], capsys)
    assert "VSA" in top.split("positional arguments")[0]


def test_the_api_page_lists_vsa_with_the_other_configs():
    api = (ROOT / "docs" / "api.md").read_text()
    assert "# Dense | GNA | Tile | Radial | SLA | VSA" in api
    assert "| `VSA(topk=None, sparsity=None, tile=(4, 4, 4))` |" in api
