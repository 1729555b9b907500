"""`dit-accel eval` end to end on tiny-wan: report files, dense cache reuse, metrics with offline weights."""
import json

import numpy as np
import pytest
import torch

from dit_accel.cli.main import main
from dit_accel.eval.runner import MethodSpec, load_method_specs

from tests.eval.offline_models import TinyFeatures, tiny_clip


def test_method_config_file_forms(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("gna: {kernel_size: [2, 2, 2], dense_steps: 1}\n"
                   "radial: [{decay: 1.0, block_size: 64}, {decay: 0.5, block_size: 64, label: r-half}]\n"
                   "sla: {topk: 0.2}\n")
    specs = load_method_specs(["dense", "gna", "radial", "tile"], str(cfg))
    labels = [s.label for s in specs]
    assert labels == ["gna", "radial#0", "r-half", "tile"]  # sla not asked for; tile on defaults
    assert specs[0].apply_kwargs == {"dense_steps": 1} and specs[0].method.kernel_size == (2, 2, 2)
    assert specs[2].method.decay == 0.5
    lst = tmp_path / "m.json"
    lst.write_text(json.dumps([{"method": "sla", "topk": 0.1}, {"method": "sla", "topk": 0.3, "label": "sla30"}]))
    specs = load_method_specs(None, str(lst))
    assert [s.label for s in specs] == ["sla", "sla30"]
    with pytest.raises(ValueError, match="unknown method 'sparse'; valid methods: dense, gna"):
        MethodSpec.parse("sparse")
    with pytest.raises(ValueError, match="topk"):
        load_method_specs(["sla"], str(_write(tmp_path / "bad.json", {"sla": {"topk": 2.0}})))


@pytest.mark.parametrize("text, message", [
    ("tile: {windoww: [1, 1, 1]}\n", "tile has no option 'windoww'; valid options: tile, window"),
    ("tilee: {window: [1, 1, 1]}\n", "unknown method 'tilee'; valid methods: dense, gna"),
    ("tile: {window: [1, 1\n", "not valid YAML at line 2"),
    ("- {topk: 0.2}\n", "list entries need a 'method' key"),
])
def test_method_config_mistakes_exit_2_with_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(text)
    assert main(["eval", "--model", "tiny-wan", "--methods", "dense,tile", "--method-config", str(cfg),
                 "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().err.strip()
    assert len(out.splitlines()) == 1 and message in out and "Traceback" not in out


def test_default_methods_skip_what_an_image_model_cannot_run(capsys):
    """tiny-flux has no time axis: the default list drops radial with a note; asking for radial is refused."""
    from dit_accel.eval.runner import _fitting
    from dit_accel.models.tiny import TINY_METHOD_DEFAULTS, build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-flux")
    defaults = load_method_specs(["dense", "radial", "tile"], explicit=False,
                                 defaults=TINY_METHOD_DEFAULTS["tiny-flux"])
    kept = _fitting(defaults, pipe, print)
    assert [s.label for s in kept] == ["tile"] and "radial: skipped (FluxPipeline makes images" in \
        capsys.readouterr().out
    with pytest.raises(ValueError, match="radial: FluxPipeline makes images"):
        _fitting(load_method_specs(["radial"]), pipe, print)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    model, tokenizer = tiny_clip()
    model.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    torch.jit.script(TinyFeatures().eval()).save(str(root / "fid.pt"))
    return root


def test_eval_tiny_wan_writes_report_and_reuses_dense_cache(tmp_path, weights, capsys):
    cfg = _write(tmp_path / "methods.json", {"gna": {"kernel_size": [2, 2, 2]}, "radial": {"block_size": 64}})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n# a comment line\n\n")
    out = tmp_path / "out"
    args = ["eval", "--model", "tiny-wan", "--methods", "dense,gna,radial", "--method-config", str(cfg),
            "--prompts", str(prompts), "--seeds", "0", "--frames", "9", "--height", "32", "--width", "64",
            "--steps", "2", "--warmup", "0", "--max-sequence-length", "16", "--out", str(out), "--device", "cpu",
            "--clip-model", str(weights / "clip"), "--fid-weights", str(weights / "fid.pt"), "--no-lpips",
            "--capture", str(tmp_path / "capture")]
    assert main(args) == 0
    for name in ("results.json", "report.md", "pareto.png", "grid.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["dense_generated"] == 1 and res["dense_cached"] == 0
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "dense~seed", "dense~sdpa-math", "gna", "radial"}  # with the dense-vs-dense floor
    for label, row in rows.items():
        assert "error" not in row, row.get("error")
        assert len(row["samples"]) == 1 and len(row["samples"][0]["psnr_per_frame"]) == 9
        assert row["clip"] is not None and row["fid_dense"] is not None
        for stage in ("total", "transformer", "vae_decode", "text_encoder"):
            assert row["times"][stage] > 0
        assert row["times"]["total"] >= row["times"]["transformer"] + row["times"]["vae_decode"]
    assert rows["dense"]["psnr"] == 100.0 and rows["dense"]["fid_dense"] < 1e-3
    # 24 tokens = one 64-token block, so visited density is 1 but the element mask makes it sparse
    assert 0 < rows["gna"]["density"] <= 1 and rows["gna"]["speedup_transformer"] > 0
    assert rows["gna"]["summary"]["sparse_calls"] > 0 and rows["gna"]["psnr"] < 100
    assert res["versions"]["torch"] == torch.__version__ and res["settings"]["frames"] == 9
    assert not any("CLIP" in s or "FID" in s for s in res["skipped"])
    report = (out / "report.md").read_text()
    assert "| gna |" in report and "| radial |" in report and "RANDOM weights" in report
    assert sorted(p.name for p in (tmp_path / "capture").iterdir())[0] == "layer000_step000.pt"

    # Second run: the dense baseline comes from the cache, never regenerated.
    cache_files = sorted((out / "cache").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in cache_files]
    args2 = [a for a in args if a not in ("--capture", str(tmp_path / "capture"))]
    args2[args2.index("dense,gna,radial")] = "dense,gna"
    real = tmp_path / "real"
    real.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(real / f"img{i}.png")
    args2 += ["--real", str(real)]
    assert main(args2) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["dense_generated"] == 0 and res2["dense_cached"] == 1
    assert [p.stat().st_mtime_ns for p in sorted((out / "cache").iterdir())] == mtimes
    assert [r["label"] for r in res2["rows"]] == ["dense", "dense~seed", "dense~sdpa-math", "gna"]
    assert all(r["fid_real"] is not None for r in res2["rows"]) and res2["dense_times_from_cache"]
    assert res2["rows"][-1]["psnr"] == pytest.approx(rows["gna"]["psnr"])  # same seeds, same output
    assert "dense: 0 generated, 1 from cache" in capsys.readouterr().out


def test_eval_missing_weights_skip_lines_and_bad_config_row(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DIT_ACCEL_CLIP_MODEL", raising=False)
    monkeypatch.delenv("DIT_ACCEL_FID_WEIGHTS", raising=False)
    cfg = _write(tmp_path / "m.json", {"gna": {"kernel_size": [9, 9, 9]}})  # larger than the tiny grid
    out = tmp_path / "out"
    rc = main(["eval", "--model", "tiny-wan", "--methods", "gna", "--method-config", str(cfg), "--prompt", "a cat",
               "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--max-sequence-length", "16",
               "--warmup", "0",
               "--out", str(out), "--device", "cpu", "--no-lpips"])
    text = capsys.readouterr().out
    assert rc == 1  # a failed method row is reported, not raised
    assert "CLIP score skipped" in text and "FID skipped" in text
    res = json.loads((out / "results.json").read_text())
    assert "kernel_size" in [r for r in res["rows"] if not r.get("floor")][1]["error"]
    assert "failed" in (out / "report.md").read_text()
    assert (out / "pareto.png").exists() and (out / "grid.png").exists()


def test_eval_bad_model_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("dit-accel eval:") and "no-such-model" in out[0]


def test_frame_grid_has_headers_difference_maps_and_psnr(tmp_path):
    """grid.png: a header row, each frame followed by |frame - dense| x gain, and the row's PSNR per column."""
    from PIL import Image

    from dit_accel.eval.metrics import psnr_per_frame
    from dit_accel.eval.report import frame_grid

    g = np.random.default_rng(0)
    dense = g.integers(0, 200, (5, 32, 80, 3), dtype=np.uint8)
    other = dense.copy()
    other[:, :8] += 40  # a band that differs
    frame_grid(["dense", "tile"], [dense, other], tmp_path / "grid.png", columns=2, diff_gain=4)
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    label_w, header_h, caption_h, tile_w = 110, 16, 14, 80
    assert img.shape == (header_h + 2 * (32 + caption_h), label_w + 2 * 2 * tile_w, 3)
    top = header_h + 32 + caption_h  # the tile row
    frame0 = img[top:top + 32, label_w:label_w + tile_w]
    diff0 = img[top:top + 32, label_w + tile_w:label_w + 2 * tile_w]
    np.testing.assert_array_equal(frame0, other[0])
    np.testing.assert_array_equal(diff0[:8], np.full((8, 80, 3), 160, np.uint8))
    np.testing.assert_array_equal(diff0[8:], 0)
    assert img[top + 32:top + 32 + caption_h, label_w:label_w + tile_w].min() < 128  # the PSNR caption is drawn
    assert img[:header_h, label_w:].min() < 128  # the column headers are drawn
    assert float(psnr_per_frame(other, dense)[0]) < 40


def test_eval_tiny_shapes_reports_ground_truth_and_plots_it(tmp_path, capsys):
    """On tiny-shapes (prompts of its grammar) every row carries the ground-truth accuracies, report.md shows
    them beside PSNR/SSIM and the Pareto plot uses them; a prompt outside the grammar leaves them out."""
    out = tmp_path / "shapes"
    argv = ["eval", "--model", "tiny-shapes", "--methods", "dense,tile", "--prompt", "a blue square moving up",
            "--steps", "1", "--warmup", "0", "--no-lpips", "--quiet", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["groundtruth"]["criteria"] == ["colour", "shape", "motion", "consistency", "all"]
    assert results["settings"]["guidance_scale"] == 2.0  # the model's own call settings (WanPipeline: 5.0)
    for row in results["rows"]:
        assert set(row["groundtruth"]) == {"colour", "shape", "motion", "consistency", "all", "n"}
        assert set(row["samples"][0]["groundtruth_ok"]) == {"colour_ok", "shape_ok", "motion_ok", "consistent",
                                                             "all_ok"}
    tile = next(r for r in results["rows"] if r["label"] == "tile")
    assert tile["density"] == pytest.approx(1 / 3) and tile["psnr"] is not None
    report = (out / "report.md").read_text()
    assert "| GT colour | GT shape | GT motion | GT consistency | GT all | PSNR dB |" in report
    assert "synthetic clips" in report and (out / "pareto.png").stat().st_size > 0

    other = tmp_path / "other"
    assert main([*argv[:-1], str(other), "--prompt", "a cat"]) == 0
    results = json.loads((other / "results.json").read_text())
    assert results["groundtruth"] is None and all("groundtruth" not in r for r in results["rows"])
    assert "GT all" not in (other / "report.md").read_text()
