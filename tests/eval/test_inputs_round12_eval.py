"""Eval metrics and the developer benchmarks as users drive them (round 12 of the trust audit)."""

import json

import numpy as np
import pytest
import torch

from dit_accel.cli.main import main
from dit_accel.eval import bench_cpu, bench_overhead
from dit_accel.eval.metrics import ssim_per_frame


def _ssim_reference(pred: np.ndarray, ref: np.ndarray, kernel: int, sigma: float) -> list:
    """SSIM per frame of uint8 ``[F, H, W, 3]`` videos in float64, written from its definition (Wang et al.
    2004, C1 = 0.01^2, C2 = 0.03^2 at data range 1) with torchmetrics' conventions: a normalised Gaussian window,
    the frame reflect-padded by half the window, the SSIM map averaged over every pixel and channel."""
    x = np.arange(kernel) - (kernel - 1) / 2
    w1 = np.exp(-x ** 2 / (2 * sigma ** 2))
    w1 /= w1.sum()
    window = np.outer(w1, w1)
    pad = kernel // 2

    def blur(img):
        p = np.pad(img, pad, mode="reflect")
        h, w = img.shape
        return sum(window[i, j] * p[i:i + h, j:j + w] for i in range(kernel) for j in range(kernel))

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for f in range(pred.shape[0]):
        maps = []
        for c in range(3):
            a, b = pred[f, :, :, c] / 255.0, ref[f, :, :, c] / 255.0
            ma, mb = blur(a), blur(b)
            va, vb = np.maximum(blur(a * a) - ma * ma, 0), np.maximum(blur(b * b) - mb * mb, 0)
            cov = blur(a * b) - ma * mb
            maps.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
        out.append(float(np.mean(maps)))
    return out


@pytest.mark.parametrize("grey", [128, 230])
def test_ssim_of_identical_flat_frames_is_one(grey):
    """Before: two identical mid-grey 8x8 videos scored SSIM 0.9996 (float32 cancelled the variances E[x^2] -
    E[x]^2 to noise against C2): a method that reproduced dense exactly on flat frames lost 4e-4 of SSIM."""
    video = np.full((2, 8, 8, 3), grey, dtype=np.uint8)
    assert ssim_per_frame(video, video).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("size", [(8, 8), (16, 20)])
def test_ssim_matches_a_float64_reference_on_near_flat_frames(size):
    """Smooth frames a grey level or two apart (what a sparse method changes in a generated video's flat
    regions) against the reference written above: float32 put the answer off by up to 1e-4. Frame by frame: the
    frames are scored a few at a time."""
    rng = np.random.default_rng(0)
    h, w = size
    ref = np.full((10, h, w, 3), 200, dtype=np.uint8)  # 10 frames: more than one call's worth (8)
    ref[:, h // 4:h // 2, w // 4:w // 2] = 30
    pred = np.clip(ref.astype(int) + rng.integers(-1, 2, ref.shape), 0, 255).astype(np.uint8)
    kernel = 11 if min(size) >= 11 else 7
    expected = _ssim_reference(pred, ref, kernel, 1.5 * kernel / 11)
    assert ssim_per_frame(pred, ref).tolist() == pytest.approx(expected, abs=2e-7)


@pytest.mark.parametrize("argv,says", [
    (["--threads", "0"], "--threads must be comma-separated counts >= 1 such as 1,2; got '0'"),
    (["--threads", "a"], "--threads must be comma-separated counts >= 1"),
    (["--threads", "1,"], "--threads must be comma-separated counts >= 1"),
    (["--density", "nan"], "--density must be a fraction in (0, 1] such as 0.1; got nan"),
    (["--density", "3"], "--density must be a fraction in (0, 1]"),
    (["--patterns", "foo", "--n", "256"], "--patterns 'foo' is not a pattern; choose from tile-0.117,"),
    (["--patterns", "band,", "--n", "256"], "--patterns '' is not a pattern"),
    (["--patterns", "sla-x"], "--patterns sla-x: sla-TOPK takes a fraction in (0, 1], e.g. sla-0.2"),
    (["--patterns", "band,tile-0.117", "--n", "256"], "--patterns tile-0.117 uses fixed grids: keep --n 8192"),
])
def test_bench_cpu_refuses_a_bad_flag_before_any_work(argv, says, monkeypatch, capsys):
    """Before: `--threads 0` and `--threads a` ended in a RuntimeError / ValueError traceback, `--patterns sla-x`
    in a float() traceback, `--density 3` or `nan` ran (a band of every block, labelled as asked); `--patterns foo
    --n 256` said `foo uses fixed grids`, and `--patterns band,tile-0.117 --n 256` said so only after timing band."""
    def no_work(*a, **k):
        raise AssertionError("a benchmark ran before the flags were checked")

    monkeypatch.setattr(bench_cpu, "run_rounds", no_work)
    monkeypatch.setattr(torch, "randn", no_work)
    with pytest.raises(SystemExit) as exit_:
        bench_cpu.main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_bench_cpu_runs_the_synthetic_patterns_at_any_size(capsys):
    """The checks keep what runs: band, window and SLA at a small N, each row with its true density."""
    assert bench_cpu.main(["--patterns", "band,window,sla-0.5", "--n", "128", "--block", "64", "--rounds", "1",
                           "--threads", "1", "--no-flex", "--heads", "1", "--d", "16"]) == 0
    out = capsys.readouterr().out
    assert "| band | 0.500 | 1 |" in out and "| window | " in out and "| sla-0.5 | 0.500 | 1 |" in out


@pytest.mark.parametrize("grid", ["a,b,c", "5,8", "0,8,8", "5,8,8,"])
def test_bench_overhead_refuses_a_bad_grid_before_the_model_is_built(grid, monkeypatch, capsys):
    """Before: `--grid a,b,c` or `5,8,8,` was an int() traceback, `--grid 5,8` and `0,8,8` a ValueError traceback
    from the tiny model's inputs."""
    monkeypatch.setattr(bench_overhead, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_:
        bench_overhead.main(["--grid", grid])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--grid must be three token counts >= 1, T,H,W such as 5,8,8; got {grid!r}" in err


def test_bench_overhead_refuses_a_missing_method_config_or_a_method_the_grid_cannot_run(tmp_path, capsys):
    """Before: a --method-config that is not there, or a method the grid refuses (GNA's kernel over a 2-frame
    grid), ended in a BadFileError / ValueError traceback; now one usage line naming the file or the method."""
    with pytest.raises(SystemExit) as exit_:
        bench_overhead.main(["--method-config", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "none.yaml: cannot read it: no such file" in err and "Traceback" not in err
    config = tmp_path / "methods.yaml"
    config.write_text("gna:\n  - {label: gna-wide, kernel_size: [3, 3, 3]}\n")
    with pytest.raises(SystemExit) as exit_:
        bench_overhead.main(["--grid", "2,4,4", "--rounds", "1", "--calls", "1", "--copies", "1",
                             "--method-config", str(config)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "exceeds the grid extent 2" in err and "Traceback" not in err


# ----------------------------------------------------------- eval --compare: flags it would drop
def _two_results(tmp_path, psnr_a, psnr_b):
    prompts = ["a red circle moving left", "a blue square moving up"]
    keys = [(p, s) for p in prompts for s in (0, 1)]
    for name, psnr in (("a", psnr_a), ("b", psnr_b)):
        results = {"settings": {"model": "tiny-shapes", "prompts": prompts, "seeds": [0, 1]}, "provenance": {},
                   "rows": [{"label": "tile", "samples": [{"prompt": p, "seed": s, "psnr": v}
                                                          for (p, s), v in zip(keys, psnr)]}]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    return str(tmp_path / "a"), str(tmp_path / "b")


@pytest.mark.parametrize("extra,named", [
    (["--methods", "sla"], "--methods does not apply to --compare"),
    (["--out", "x", "--model", "tiny-wan"], "--model, --out do not apply to --compare"),
    (["--seeds", "0,1", "--no-lpips"], "--seeds, --no-lpips do not apply to --compare"),
])
def test_compare_refuses_the_flags_it_would_drop(extra, named, tmp_path, capsys):
    """Before: `eval --compare A B --methods sla` printed every row's comparison (the flag dropped without a word),
    and `--out DIR` wrote nothing there, exit 0."""
    a, b = _two_results(tmp_path, [30.0, 20.0, 25.0, 35.0], [31.0, 23.0, 24.0, 36.5])
    assert main(["eval", "--compare", a, b, *extra]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and len(captured.err.strip().splitlines()) == 1 and captured.out == ""
    assert not (tmp_path / "x").exists()


def test_compare_alone_gives_the_paired_interval_and_p_of_a_direct_computation(tmp_path, capsys):
    """--compare (with --quiet, which only hushes warnings) still pairs; its interval and p match Student's t with
    3 degrees of freedom written out here (t_0.975 = 3.18245; the closed-form CDF for df = 3)."""
    psnr_a, psnr_b = [30.0, 20.0, 25.0, 35.0], [31.0, 23.0, 24.0, 36.5]
    a, b = _two_results(tmp_path, psnr_a, psnr_b)
    assert main(["eval", "--compare", a, b, "--quiet"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| tile | psnr"))
    d = np.subtract(psnr_b, psnr_a)
    mean, se = d.mean(), d.std(ddof=1) / 2.0
    t = mean / se
    u = t / 3 ** 0.5
    p = 2 * (1 - (0.5 + (u / (1 + u * u) + np.arctan(u)) / np.pi))
    half = 3.182446305284263 * se
    assert f"| {mean:+.4g} | [{mean - half:.4g}, {mean + half:.4g}] | {p:.3g} | no (n<5: not meaningful) | 4 |" in line


# ----------------------------------------------------------- calibrate(): counts of the Python API
@pytest.mark.parametrize("change, says", [
    ({"validate": 0.3}, "--validate must be a whole number >= 0 (0: no validation set); got 0.3"),
    ({"phases": 2.5}, "--phases must be a whole number >= 1; got 2.5"),
    ({"samples_per_bucket": 1.5}, "--samples-per-bucket must be a whole number >= 1; got 1.5"),
    ({"probe_videos": 2.5}, "--probe-videos must be a whole number >= 1; got 2.5"),
    ({"phases": "3"}, "--phases must be a whole number >= 1; got '3'"),
    ({"layer_groups": None}, "--layer-groups must be a whole number >= 0 (0: no layer probes); got None"),
    ({"replay_mb": "big"}, "--replay-mb must be a finite number of MiB >= 0 (0: off); got 'big'"),
], ids=["validate-fraction", "phases-float", "samples-float", "probes-float", "phases-str", "groups-none", "replay-str"])
def test_calibrate_refuses_a_count_that_is_not_a_whole_number_before_the_model_loads(change, says, tmp_path,
                                                                                     monkeypatch):
    """Before: `validate=0.3` (a third, as a fraction), `phases=2.5` or `samples_per_bucket=1.5` passed the check and
    ended in range()'s TypeError after the model had loaded; `phases="3"` or `layer_groups=None` in a TypeError
    from `<`. Now each is one ValueError naming the setting by its flag, before anything loads."""
    from dit_accel.calibrate import CalibrationSettings, calibrate
    from dit_accel.models import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    settings = CalibrationSettings(model="tiny-shapes", prompts=["a red circle moving right"], min_psnr=25, steps=2,
                                   **change)
    with pytest.raises(ValueError) as err:
        calibrate(settings, tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert str(err.value) == says and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------- selftest --json: one shape of row
def test_selftest_json_rows_all_carry_the_keys_its_help_lists(capsys):
    """Before: `selftest --json` gave n/a rows without dtype or tolerance and unchecked rows without tolerance, so a
    script reading `row["dtype"]` (a key --help lists for every row) died with a KeyError on a machine without
    cuDNN. `--budget 0` checks nothing: the n/a and unchecked rows alone, exit 3."""
    assert main(["selftest", "--device", "cpu", "--json", "--budget", "0"]) == 3
    rows = json.loads(capsys.readouterr().out)
    keys = {"variant", "dtype", "problem", "error", "tolerance", "verdict", "seconds"}
    assert rows and all(keys <= set(r) for r in rows)
    assert {r["verdict"] for r in rows} <= {"n/a", "unchecked"} and all(r["reason"] for r in rows)
    assert all(r["tolerance"] is None and r["error"] is None for r in rows)
    assert all(r["dtype"] is None for r in rows if r["verdict"] == "n/a")
    assert all(r["dtype"] in ("float16", "bfloat16", "float32") for r in rows if r["verdict"] == "unchecked")
