"""Round 19 of the eval inputs: what a run keeps when it fails part-way, reference images of other bit depths, and
the options a bench is given.

- the dense cache keeps each sample as it is made: a baseline that fails at its last sample keeps the others;
- a FID feature network, or an LPIPS backbone, that cannot take the frames is a skip line, not a traceback after
  every row has run;
- a 16-bit grey PNG in ``--real`` is scaled to 8 bits, not clipped to white;
- ``bench_overhead`` honours a config row's apply() options (and refuses those a lone call cannot run);
  ``bench_cpu --backward`` times the SLA patterns too; ``host_path``/``traffic --json`` are checked first;
- ``--compare`` pairs the same prompts and seeds in another order; ``--out`` with a file named cache is refused;
- report.md says when a verdict rests on fewer than 5 pairs, and keeps a many-line error in its table row.
"""
import types

import numpy as np
import pytest
import torch


# ------------------------------------------------------------------ a fake pipeline: one colour per prompt and seed
class _Pipe:
    """Frames of one grey level per call (no model); ``fail_at``: the call (1-based) that raises, as an OOM would."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator=None, output_type="np", num_frames=2, height=8, width=8,
                 num_inference_steps=1):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory (fake)")
        level = (len(prompt) * 7 + generator.initial_seed()) % 10 / 10
        return types.SimpleNamespace(frames=np.full((1, num_frames, height, width, 3), level, np.float32))


def _settings(prompts):
    from dit_accel.eval.runner import EvalSettings

    return EvalSettings(model="fake", prompts=prompts, seeds=[0], frames=2, height=8, width=8, steps=1, warmup=0)


# ------------------------------------------------------------------ the dense cache keeps what a failed run made
def test_a_dense_baseline_that_fails_part_way_keeps_the_samples_it_made(tmp_path):
    """Before: the dense samples were written to the cache only once every one had been generated, so a baseline
    of 50 prompts that ran out of memory (or was stopped) at the 50th kept none, and the next run made all 50
    again. Now each is cached as it is made: the rerun makes only the one that failed."""
    from dit_accel.eval.runner import _dense_row
    from dit_accel.eval.timing import StageTimer

    prompts = ["a cat", "a red dog", "a blue bird"]
    settings = _settings(prompts)
    samples = [(p, 0) for p in prompts]
    pipe = _Pipe(fail_at=3)
    with StageTimer(pipe, "cpu") as timer, pytest.raises(RuntimeError, match="out of memory"):
        _dense_row(pipe, timer, settings, samples, tmp_path, lambda m: None, model_sha256="state:fake")
    assert len(list(tmp_path.glob("dense_*.npz"))) == 2  # the two made before the failure
    pipe = _Pipe()
    with StageTimer(pipe, "cpu") as timer:
        row, generated = _dense_row(pipe, timer, settings, samples, tmp_path, lambda m: None,
                                    model_sha256="state:fake")
    assert (generated, pipe.calls) == (1, 1)
    fresh = _Pipe()
    for (prompt, seed), video in zip(samples, row["videos"]):  # each cached sample is its own prompt's video
        level = fresh(prompt, generator=torch.Generator().manual_seed(seed)).frames[0]
        assert np.array_equal(video, (level * 255 + 0.5).astype(np.uint8))


# ------------------------------------------------------------------ FID: a network that cannot take the frames
def test_a_fid_network_that_fails_on_the_frames_is_a_skip_line_not_a_traceback():
    """Before: a ``--fid-weights pkg:factory`` network built for other image sizes raised its RuntimeError ("mat1
    and mat2 shapes cannot be multiplied") from the scoring, after every row had been generated: a traceback and
    no report. Now FID is skipped with a warning naming the frame size, and the other metrics stand."""
    from dit_accel.eval.runner import _Scorers

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))  # takes 16x16 images only
    scorers = _Scorers(_settings(["a cat"]), lpips=False, clip_model=None, clip_scorer=None, fid_weights=None,
                       fid_feature=net, real_dir=None, frame_size=(8, 8))
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(2)]
    dense = {"label": "dense", "videos": videos, "times": None}
    row = {"label": "tile", "videos": [v[::-1].copy() for v in videos], "times": None}
    scorers.score(row, dense, [("a cat", 0), ("a dog", 0)])
    assert row["fid_dense"] is None and row["psnr"] is not None
    line = next(line for line in scorers.warnings if line.startswith("FID skipped"))
    assert "the feature network failed on 8x8 frames (RuntimeError" in line


# ------------------------------------------------------------------ --real: 16-bit grey PNGs
def test_a_16_bit_grey_png_in_real_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """Before: PIL's conversion of a 16-bit grey PNG (mode I;16) to RGB clips at 255, so a mid-grey image of
    32768/65535 was read as white, and FID vs --real compared white frames without a word."""
    from PIL import Image

    from dit_accel.eval.fid import FrameFolder

    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    frames = next(FrameFolder(str(tmp_path), (4, 4)).batches(8))
    assert frames.shape == (1, 3, 4, 4)
    want = torch.tensor(np.round(levels / 65535 * 255) / 255, dtype=torch.float32)
    assert torch.allclose(frames[0, 0], want, atol=1e-6) and torch.equal(frames[0, 0], frames[0, 2])


# ------------------------------------------------------------------ bench_overhead: a config's apply() options
def test_bench_overhead_times_a_config_row_with_its_backend_and_dense_layers(tmp_path, capsys):
    """Before: ``--method-config`` rows lost their dit_accel.apply options without a word: ``backend: torch`` and
    ``dense_layers: [0]`` timed the row under backend auto (masked dense attention at this size) with every layer
    sparse, printed as that row's overhead."""
    import json

    from dit_accel.eval import bench_overhead

    config = tmp_path / "methods.yaml"
    config.write_text("tile:\n  tile: [1, 8, 8]\n  window: [3, 1, 1]\n  backend: torch\n  dense_layers: [0]\n")
    bench_overhead.main(["--method-config", str(config), "--rounds", "1", "--calls", "1", "--copies", "1"])
    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert facts["backends"]["tile"] == ["torch"]


@pytest.mark.parametrize("option", ["dense_steps: 1", "dense_last_steps: 1", "weights: some/folder"])
def test_bench_overhead_refuses_a_config_option_a_lone_transformer_call_cannot_run(option, tmp_path, capsys):
    from dit_accel.eval import bench_overhead

    config = tmp_path / "methods.yaml"
    config.write_text(f"tile:\n  tile: [1, 8, 8]\n  window: [3, 1, 1]\n  {option}\n")
    with pytest.raises(SystemExit) as exit_:
        bench_overhead.main(["--method-config", str(config), "--rounds", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"row tile sets {option.split(':')[0]}, which a lone transformer call cannot run" in err


# ------------------------------------------------------------------ bench_cpu --backward: every pattern
def test_bench_cpu_backward_times_the_sla_pattern_too(capsys):
    """Before: ``--backward`` timed forward+backward of the layout patterns only; an ``sla-*`` pattern's row was
    left out of the table without a word, though SLA's PyTorch twin trains (its backward runs)."""
    from dit_accel.eval import bench_cpu

    assert bench_cpu.main(["--patterns", "band,sla-0.5", "--n", "128", "--block", "64", "--threads", "1",
                           "--rounds", "1", "--no-flex", "--backward"]) == 0
    table = capsys.readouterr().out.split("| pattern |")[-1]
    assert "| band fwd+bwd |" in table and "| sla-0.5 fwd+bwd | 0.500 | 1 |" in table


# ------------------------------------------------------------------ --compare: the same prompts in another order
def _results(prompts, seeds, psnr):
    from dit_accel.eval.provenance import prompts_sha256

    samples = [{"prompt": p, "seed": s, "psnr": psnr[(p, s)]} for p in prompts for s in seeds]
    return {"settings": {"model": "tiny-shapes", "prompts": prompts, "seeds": seeds},
            "provenance": {"prompts_sha256": prompts_sha256(prompts)},
            "rows": [{"label": "tile", "samples": samples}]}


def test_compare_pairs_folders_of_the_same_prompts_and_seeds_in_another_order():
    """Before: a second eval run from a sorted copy of the prompt file (or with --seeds 1,0) was refused as 'the
    prompts differ' ('the seeds differ ([1, 0] vs [0, 1])'), though its samples pair by prompt and seed."""
    from dit_accel.eval.compare import compare_results

    prompts = ["a red circle moving left", "a blue square moving up", "a green circle moving down"]
    a_psnr = {(p, s): 30.0 + i + s for i, p in enumerate(prompts) for s in (0, 1)}
    b_psnr = {key: value + 1.5 for key, value in a_psnr.items()}
    a = _results(prompts, [0, 1], a_psnr)
    b = _results(sorted(prompts), [1, 0], b_psnr)
    (row,) = [c for c in compare_results(a, b) if c["metric"] == "psnr"]
    assert row["diff"]["n"] == 6 and row["diff"]["mean"] == pytest.approx(1.5)


def test_compare_of_other_prompts_names_a_prompt_only_one_folder_has():
    from dit_accel.eval.compare import compare_results

    a = _results(["a red circle moving left"], [0], {("a red circle moving left", 0): 30.0})
    b = _results(["a blue circle moving left"], [0], {("a blue circle moving left", 0): 30.0})
    with pytest.raises(ValueError, match="the prompts differ .*'a red circle moving left' only in A"):
        compare_results(a, b)


# ------------------------------------------------------------------ eval --out holding a file named cache
def test_eval_out_with_a_file_where_the_cache_goes_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """Before: ``--out DIR`` where DIR/cache was a file (and no --cache-dir) ended in "dit-accel eval: [Errno 17]
    File exists: 'DIR/cache'", which named neither the flag nor what to do."""
    from dit_accel.cli.main import main
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the cache folder was checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    (tmp_path / "cache").write_text("notes")
    assert main(["eval", "--model", "tiny-wan", "--methods", "dense", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dit-accel eval: --out {tmp_path}: {tmp_path / 'cache'} is a file, where the dense cache goes "
                   "(--cache-dir's default, OUT/cache); move the file, or pass --cache-dir DIR")
    assert (tmp_path / "cache").read_text() == "notes"


# ------------------------------------------------------------------ report.md: a verdict of fewer than 5 pairs
def test_a_significant_difference_of_fewer_than_five_pairs_says_so_in_the_report():
    """Before: with 2 prompt-seed pairs (both videos right under dense, both wrong under a method) report.md's
    "Significant differences from dense" listed "tile, GT all - dense: worse than dense" with no word of the
    count, while the table beside it marks such cells "(n<5)": not meaningful."""
    from dit_accel.eval.report import paired_section
    from dit_accel.eval.stats import analyse

    def row(label, ok, **extra):
        samples = [{"prompt": f"p{i}", "seed": 0, "groundtruth_ok": {"all_ok": ok}} for i in range(2)]
        return {"label": label, "samples": samples, **extra}

    rows = [row("dense", True), row("dense~sdpa-math", True, floor="backend"), row("tile", False)]
    analyse(rows)
    assert rows[2]["verdict"]["groundtruth"] == "worse than dense"
    text = "\n".join(paired_section({"rows": rows}))
    assert "- tile, GT all - dense: worse than dense (n = 2 < 5 pairs: not meaningful)" in text


# ------------------------------------------------------------------ host_path / traffic --json
def test_host_path_refuses_a_json_path_it_cannot_write_before_measuring(tmp_path, monkeypatch, capsys):
    """Before: ``--json`` was opened only after the measurement: a folder (or a path under a file) ended the run in
    an IsADirectoryError traceback, its numbers lost."""
    from dit_accel.eval import host_path

    def measured(**kwargs):
        raise AssertionError("measured before --json was checked")

    monkeypatch.setattr(host_path, "measure_host_path", measured)
    with pytest.raises(SystemExit) as exit_:
        host_path.main(["--json", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"--json {tmp_path} is a folder; give a file path" in capsys.readouterr().err


def test_traffic_writes_its_json_into_a_folder_not_made_yet(tmp_path, monkeypatch, capsys):
    """Before: ``--json out/traffic.json`` with no ``out/`` yet ended in a FileNotFoundError traceback after the
    counting; now the folder is made and the file written whole."""
    import json

    from dit_accel.eval import traffic

    cases = {"tile": {"ops": 3, "bytes": 4096, "units": 1.0}}
    monkeypatch.setattr(traffic, "measure_traffic", lambda **kwargs: cases)
    path = tmp_path / "out" / "traffic.json"
    traffic.main(["--grid", "4,4,4", "--json", str(path)])
    assert json.loads(path.read_text()) == {"grid": [4, 4, 4], "heads": 2, "head_dim": 64, "cases": cases}
    with pytest.raises(SystemExit):
        traffic.main(["--grid", "4,4,4", "--json", str(tmp_path)])
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ LPIPS: frames its backbone cannot take
class _PoolingLPIPS(torch.nn.Module):
    """torchmetrics' LPIPS as far as frame sizes go: AlexNet's max-pools (3, stride 2) fail on frames too small
    ("Output size is too small"). Stands in here, where torchvision and the backbone weights are absent."""

    def __init__(self, net_type="alex", normalize=True):
        super().__init__()
        self.pool = torch.nn.Sequential(*[torch.nn.MaxPool2d(3, 2) for _ in range(3)])

    def forward(self, a, b):
        return (self.pool(a) - self.pool(b)).abs().mean()

    def reset(self):
        pass


def test_lpips_on_frames_its_backbone_cannot_take_is_a_skip_line_not_a_traceback(monkeypatch):
    """Before: with torchvision installed, an eval of small frames (a tiny model at --height 16 --width 16) ran
    every row, then AlexNet's pooling raised "Output size is too small" from the first row's scoring: a traceback
    and no report. Now LPIPS is skipped with a line saying why, and PSNR/SSIM are scored."""
    import sys
    import types as pytypes

    import torchmetrics.image.lpip as lpip

    from dit_accel.eval.runner import _Scorers

    monkeypatch.setitem(sys.modules, "torchvision", pytypes.ModuleType("torchvision"))
    monkeypatch.setattr(lpip, "LearnedPerceptualImagePatchSimilarity", _PoolingLPIPS)
    rng = np.random.default_rng(1)
    for size, scored in (((8, 8), False), ((16, 16), True)):
        scorers = _Scorers(_settings(["a cat"]), lpips=True, clip_model=None, clip_scorer=None, fid_weights=None,
                           fid_feature=None, real_dir=None, frame_size=size)
        videos = [rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)]
        row = {"label": "tile", "videos": [v[::-1].copy() for v in videos], "times": None}
        scorers.score(row, {"label": "dense", "videos": videos, "times": None}, [("a cat", 0)])
        assert row["psnr"] is not None and (row["lpips"] is not None) == scored
        skipped = [line for line in scorers.skipped if line.startswith("LPIPS skipped")]
        assert skipped == ([] if scored else [skipped[0]])
        if not scored:
            assert skipped[0].startswith("LPIPS skipped: its alex backbone cannot take 8x8 frames (")


# ------------------------------------------------------------------ report.md: a failed row's error of many lines
def test_a_failed_rows_error_of_many_lines_stays_in_its_table_row(tmp_path):
    """Before: a row's error went into report.md's table as it was: a message of several lines (a Triton compile
    error, a traceback's text) broke the table, and every row after it lost its columns."""
    from dit_accel.eval.report import write_report

    rows = [{"label": "dense", "config": {"method": "dense"}, "density": 1.0, "psnr": 100.0},
            {"label": "tile", "config": {"method": "tile"}, "error": "CompilationError: at 3:4:\n    x = tl.load(p)\n"
                                                                      "    ^ | bad"},
            {"label": "sla", "config": {"method": "sla"}, "density": 0.2, "psnr": 31.5}]
    results = {"rows": rows, "settings": {"model": "tiny-wan", "device": "cpu", "dtype": "float32", "frames": 9,
                                          "height": 64, "width": 64, "steps": 2, "guidance_scale": None,
                                          "seeds": [0], "prompts": ["a cat"], "repeats": 1},
               "versions": {}, "dense_generated": 1, "dense_cached": 0}
    write_report(results, tmp_path / "report.md")
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert table[3].startswith("| tile | defaults | failed: CompilationError: at 3:4: x = tl.load(p) ^ / bad |")
    assert table[4].startswith("| sla |") and all(line.count("|") == table[0].count("|") for line in table)
