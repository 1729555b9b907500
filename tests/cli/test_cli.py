"""dit-accel CLI: generate end to end on tiny models, info, option parsing, clear errors."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dit_accel
from dit_accel.cli.main import main
from dit_accel.cli.options import add_method_options, int_tuple, method_from_args, schedule_from_args
from dit_accel.io import load_video
from dit_accel.methods import GNA, SLA, Dense, Radial, Tile

REPO = Path(__file__).resolve().parents[2]
SIDECAR_KEYS = {"output", "label", "model", "method", "schedule", "settings", "output_shape", "timing",
                "density", "versions"}


def _parse(argv):
    p = argparse.ArgumentParser(prog="t")
    add_method_options(p)
    return p, p.parse_args(argv)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv, expected", [
    ([], Dense()),
    (["--method", "tile", "--tile", "6,8,8", "--window", "3x3x3"], Tile(tile=(6, 8, 8), window=(3, 3, 3))),
    (["--method", "gna", "--kernel-size", "7", "--stride", "1,2,2", "--causal"],
     GNA(kernel_size=7, stride=(1, 2, 2), is_causal=True)),
    (["--method", "radial", "--decay", "0.95", "--block-size", "64", "--sink-frames", "none"],
     Radial(decay=0.95, block_size=64, sink_frames=())),
    (["--method", "sla", "--topk", "0.1", "--block-size", "128", "--feature-map", "elu"],
     SLA(topk=0.1, block_q=128, feature_map="elu")),
], ids=["dense", "tile", "gna", "radial", "sla"])
def test_method_from_args(argv, expected):
    _, args = _parse(argv)
    assert method_from_args(args) == expected


def test_defaults_layering_and_schedule():
    _, args = _parse(["--method", "tile", "--window", "1,1,1", "--dense-layers", "0,2", "--dense-steps", "3"])
    m = method_from_args(args, defaults={"tile": (1, 8, 8), "window": (3, 3, 3), "unrelated": 1})
    assert m == Tile(tile=(1, 8, 8), window=(1, 1, 1))  # flag beats default, default beats class default
    s = schedule_from_args(args, defaults={"dense_steps": 12, "dense_last_steps": 2})
    assert s == {"dense_steps": 3, "dense_last_steps": 2, "dense_layers": [0, 2], "backend": "auto"}
    _, args = _parse(["--dense-layers", "1"])
    assert schedule_from_args(args)["dense_layers"] == 1
    assert int_tuple("(6, 8, 8)") == (6, 8, 8) and int_tuple("7") == 7


def test_a_presets_fit_never_retiles_the_tile_a_user_spelled_out():
    """`generate --method tile --tile 6,8,8 --window 3,3,3` on a model whose recommended Tile fits the grid
    (fit=True) runs the user's tile, not one the plan would choose; without tile flags the preset's fit stays,
    and --fit-grid asks for it."""
    preset = {"tile": (6, 8, 8), "window": (3, 3, 3), "fit": True}
    _, args = _parse(["--method", "tile", "--tile", "6,8,8", "--window", "3,3,3"])
    assert method_from_args(args, defaults=preset) == Tile(tile=(6, 8, 8), window=(3, 3, 3))
    _, args = _parse(["--method", "tile", "--window", "1,3,3"])
    assert method_from_args(args, defaults=preset).fit is False
    _, args = _parse(["--method", "tile"])
    assert method_from_args(args, defaults=preset).fit is True
    _, args = _parse(["--method", "tile", "--tile", "6,8,8", "--fit-grid"])
    assert method_from_args(args, defaults=preset).fit is True


@pytest.mark.parametrize("argv, flag", [
    (["--method", "tile", "--window", "0,3,3"], "--window"),
    (["--method", "radial", "--window", "3"], "--window"),
    (["--method", "sla", "--topk", "1.5"], "--topk"),
    (["--method", "gna", "--kernel-size", "3", "--stride", "5"], "--stride"),
    (["--tile", "a,b"], "--tile"),
    (["--dense-steps", "-1"], "--dense-steps"),
], ids=["zero-window", "wrong-method", "topk-range", "stride-gt-kernel", "not-a-tuple", "negative-steps"])
def test_bad_method_options_name_the_flag(argv, flag, capsys):
    p, args = (None, None)
    with pytest.raises(SystemExit) as exc:
        p, args = _parse(argv)
        method_from_args(args, parser=p)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err.splitlines()[-1], err


# ----------------------------------------------------------------------------- main / info
def test_help_is_fast_and_lists_commands():
    code = ("import sys; from dit_accel.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY' if {'torch', 'diffusers'} & set(sys.modules) else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for cmd in ("generate", "info", "finetune", "eval", "bench"):
        assert cmd in out.stdout
    assert out.stdout.strip().endswith("LIGHT")


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "diffusers", "tiny-wan", "WanTransformer3DModel", "training-free top-k", "torch",
                 "tiny-shapes", "tiny model trained on synthetic clips"):
        assert word in out
    assert main(["info", "--model", "tiny-shapes"]) == 0  # its own grid-sized settings first
    out = capsys.readouterr().out.split("settings for tiny-shapes")[1]
    assert out.index("tile: tile=(4, 4, 4), window=(1, 1, 3)") < out.index(
        "density 0.3333 (visited blocks), token density 0.3333 on grid 4x12x12")  # 1 x 1/3 x 1 by hand
    for name, density in (("tiny-shapes-long", "0.1875"), ("tiny-shapes-63", "0.0938")):  # 3 of 16 and 32 frames
        assert main(["info", "--model", name]) == 0, capsys.readouterr().out
        out = capsys.readouterr().out.split(f"settings for {name}")[1]
        assert out.index("tile: tile=(1, 12, 12), window=(3, 1, 1), block_size=144") < out.index(
            f"density {density} (visited blocks)")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["torch"] == "usable"
    assert info["autotune"]["cache"].endswith("autotune.json") and "enabled" in info["autotune"]


def test_info_names_the_configurations_each_gpu_runs(monkeypatch):
    """A GPU outside the compiled targets runs the configurations of the one whose shared memory it has."""
    import torch

    from dit_accel.cli.info import _device_info

    gpus = [("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA GeForce RTX 5090", (12, 0)), ("NVIDIA A10", (8, 6))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][1])
    assert _device_info("cuda")["cuda_devices"] == [
        "0: NVIDIA H100 80GB HBM3 (sm_90; Triton kernels: its own configurations)",
        "1: NVIDIA GeForce RTX 5090 (sm_120; Triton kernels: sm_89's configurations)",
        "2: NVIDIA A10 (sm_86; Triton kernels: sm_89's configurations)"]


def test_info_shows_the_backend_the_environment_forces_or_why_its_value_is_none(monkeypatch, capsys):
    """``DIT_ACCEL_BACKEND=bogus`` fails every call that reads it, while info listed the backends as usable."""
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "bogus")
    assert main(["info", "--json"]) == 0
    backends = json.loads(capsys.readouterr().out)["backends"]
    assert "DIT_ACCEL_BACKEND='bogus' is not a backend; allowed: triton" in backends["DIT_ACCEL_BACKEND"]
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "Torch")
    assert main(["info", "--json"]) == 0
    backends = json.loads(capsys.readouterr().out)["backends"]
    assert backends["DIT_ACCEL_BACKEND"] == "torch: calls that ask for auto run it" and backends["torch"] == "usable"
    monkeypatch.delenv("DIT_ACCEL_BACKEND")
    assert main(["info", "--json"]) == 0
    assert "DIT_ACCEL_BACKEND" not in json.loads(capsys.readouterr().out)["backends"]


def test_info_lists_the_stored_autotune_choices(tmp_path, monkeypatch, capsys):
    """A choice the autotuner stored (here with injected timings, no GPU) shows in `dit-accel info`."""
    import torch

    from dit_accel.kernels import autotune
    from dit_accel.kernels.backends import Request

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    autotune.clear()
    q = torch.zeros(1, 2, 128, 64)
    shape = autotune.ShapeClass.of("block_sparse", Request.of(q, q, q, 64, 64), 0.2)
    times = {"triton": 2.0, "flex": 3.0}
    assert autotune.choose(shape, {k: (lambda: None) for k in times}, lambda fn, *a: times.pop(next(iter(times))))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel autotuning" in out and "block_sparse" in out and "triton (triton 2.000 ms, flex 3.000 ms" in out
    autotune.clear()


# ----------------------------------------------------------------------------- generate
def _sidecar(path):
    return json.loads(Path(str(path) + ".json").read_text())


def test_generate_tiny_wan_sparse_in_process(tmp_path, capsys):
    out = tmp_path / "wan.mp4"
    argv = ["generate", "--model", "tiny-wan", "--frames", "9", "--height", "128", "--width", "128", "--steps", "2",
            "--method", "tile", "--tile", "1,8,8", "--window", "1,1,1", "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    video = load_video(out)
    assert video.shape == (9, 128, 128, 3)
    meta = _sidecar(out)
    assert SIDECAR_KEYS <= set(meta)
    assert "random weights" in meta["label"] and "random weights" in capsys.readouterr().out
    assert meta["method"] == {"method": "tile", "tile": [1, 8, 8], "window": [1, 1, 1]}
    assert meta["settings"]["frames"] == 9 and meta["settings"]["steps"] == 2
    t = meta["timing"]
    assert t["transformer_calls"] == 2 * 2  # classifier-free guidance: two calls per step
    assert 0 < t["transformer_s"] <= t["end_to_end_s"]
    layers = meta["density"]["per_layer"]
    assert [r["layer"] for r in layers] == ["blocks.0.attn1", "blocks.1.attn1"]
    # grid (3, 8, 8), one 64-token tile per frame, window 1: each frame attends only to itself.
    for row in layers:
        assert row["sparse_calls"] == 4 and row["density"] == pytest.approx(1 / 3)
        assert row["token_density"] == pytest.approx(1 / 3)  # whole-frame tiles: no partial blocks
    assert meta["density"]["mean"] == pytest.approx(1 / 3)
    # 192 tokens, one key block of three per query block: on CPU "auto" runs it as one gathered flash call.
    assert meta["schedule"]["backend"] == "auto" and meta["backends_used"] == ["one-pass"]
    assert {row["backend"] for row in layers} == {"one-pass"}


def test_generate_says_when_a_sparse_method_runs_dense(tmp_path, capsys):
    """A window that covers the grid: one clean warning line naming layer and grid, recorded in the sidecar;
    --quiet hides it from the terminal only. PNG frames are listed as written; a frame count the VAE rounds
    is noted; --guidance-scale and --guidance are one option."""
    out = tmp_path / "vid.png"
    argv = ["generate", "--model", "tiny-wan", "--frames", "8", "--height", "64", "--width", "64", "--steps", "1",
            "--guidance", "2",
            "--method", "tile", "--tile", "6,8,8", "--window", "3,3,3", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    # Our warning lines, and any raw Python warning raised from our sources ("dit_accel/x.py:12: UserWarning").
    lines = [line for line in captured.err.splitlines()
             if "dit-accel: warning" in line or re.search(r"dit_accel/\S+\.py:\d+: \w*Warning", line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("dit-accel: warning: Tile(") and "blocks.0.attn1" in lines[0]
    assert "covers the whole grid (3, 4, 4)" in lines[0] and ".py:" not in lines[0]
    assert "made 9 frames for --frames 8" in captured.out and "9 frames" in captured.out
    meta = _sidecar(out)
    assert meta["output"] == [str(tmp_path / f"vid_{i:05d}.png") for i in range(9)]
    assert all(Path(p).is_file() for p in meta["output"]) and not out.exists()
    assert meta["settings"]["guidance"] == 2.0
    assert len(meta["warnings"]) == 1 and "covers the whole grid" in meta["warnings"][0]
    assert meta["summary"]["sparse_calls"] == 0 and meta["backends_used"] == []
    assert all(r["dense_reason"].startswith("dense (the window covers the whole grid") for r in
               meta["density"]["per_layer"])
    assert main([*argv, "--quiet", "--guidance-scale", "2"]) == 0
    assert "dit-accel: warning" not in capsys.readouterr().err
    assert len(_sidecar(out)["warnings"]) == 1


def test_generate_default_model_off_its_plan_runs_its_frame_window_after_dense_steps(tmp_path, monkeypatch, capsys):
    """The default model (tiny-shapes-63) at another step count than its plan's: Tile's frame window, without the
    plan's LoRA, after the dense steps of the plan that held its budget without a LoRA (the shipped one, or for a
    plan shipped with a LoRA the one it replaced; sparse from the first step it loses the object), and a note."""
    from dit_accel.cli.generate_args import DEFAULT_MODEL
    from dit_accel.models.tiny_shapes import shapes_model

    model = shapes_model(DEFAULT_MODEL)
    dense_steps = model.schedule["dense_steps"]
    alone = model.plan if model.plan_weights is None else (
        REPO / "docs" / "calibrate_evidence" / "tiny-shapes-63-6-dense-steps" / "plan.json")
    assert dit_accel.SparsePlan.load(alone).provenance["quality"]["plan"].endswith(f"after {dense_steps} dense steps")
    monkeypatch.chdir(tmp_path)
    steps = dense_steps + 1  # one sparse step after the dense ones
    assert main(["generate", "--steps", str(steps), "--quiet"]) == 0, capsys.readouterr().err
    meta = _sidecar(tmp_path / "outputs" / f"{DEFAULT_MODEL}-tile.mp4")
    assert meta["method"]["window"] == [3, 1, 1] and meta["method"]["block_size"] == 144
    assert meta["schedule"]["dense_steps"] == dense_steps and "weights" not in meta["schedule"]  # no LoRA off the plan
    assert (f"this call sets num_inference_steps {steps}: the uniform default Tile after {dense_steps} dense steps runs "
            "instead") in meta["default_note"]
    assert meta["density"]["mean"] == pytest.approx(3 / model.grid[0])


def test_generate_tiny_shapes_off_its_plan_runs_sla_beside_dense(tmp_path, monkeypatch, capsys):
    """tiny-shapes without a method, and fewer steps than the shipped plan's: SLA at its grid-sized setting (and a
    note saying why not the plan), a dense run of the same call, the ground truth of both, and with
    --side-by-side one video with dense left and SLA right."""
    from dit_accel.models.tiny_shapes import TINY_SHAPES_METHODS

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny-shapes", "--steps", "2", "--side-by-side"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    video, pair = tmp_path / "outputs" / "tiny-shapes-sla.mp4", tmp_path / "outputs" / "tiny-shapes-sla-vs-dense.mp4"
    from dit_accel.cli.generate import _strip_height

    # dense and SLA side by side (48 + 2 + 48 wide) under a strip that names each
    assert load_video(video).shape == (7, 48, 48, 3) and load_video(pair).shape == (7, 48 + _strip_height(48), 98, 3)
    meta = _sidecar(video)
    assert meta["model"] == "tiny-shapes" and meta["model_kind"] == "embedded" and "synthetic clips" in meta["label"]
    assert meta["settings"]["prompt"] == "a red circle moving right"
    assert meta["method"]["method"] == "sla" and meta["method"]["topk"] == TINY_SHAPES_METHODS["sla"]["topk"]
    assert meta["density"]["mean"] == pytest.approx(1 / 3)
    cmp = meta["compare_dense"]
    assert cmp["side_by_side"] == str(Path("outputs") / pair.name) and cmp["psnr_db"] > 0
    assert cmp["dense_attention_s"] > 0 and meta["timing"]["attention_s"] > 0
    assert {"colour_ok", "shape_ok", "motion_ok", "consistent"} <= set(meta["quality"]["method"])
    assert meta["quality"]["dense"] is not None
    for needle in ("method sla (topk=0.3", "visited density 0.333", "self-attention", "vs dense",
                   'ground truth for "a red circle moving right": colour', "left dense, right sla",
                   "trained on synthetic clips",
                   "note: tiny-shapes' calibrated plan is for its default call (7x48x48, 12 steps) and this call "
                   "sets num_inference_steps 2: the uniform default SLA runs instead"):
        assert needle in out, out
    assert "calibrated plan" in meta["default_note"]


@pytest.mark.parametrize("argv, needle", [
    (["--side-by-side", "--no-compare-dense"], "--side-by-side needs the dense run"),
    (["--side-by-side", "--method", "dense"], "pick one with --method"),
], ids=["no-dense", "dense-method"])
def test_generate_side_by_side_needs_a_dense_run_and_a_method(tmp_path, argv, needle, capsys):
    assert main(["generate", *argv, "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_generate_tiny_shapes_other_prompt_and_dense(tmp_path, capsys):
    """A prompt outside the grammar still generates (quality skipped, said why); --method dense: no comparison."""
    out = tmp_path / "d.gif"
    assert main(["generate", "--method", "dense", "--prompt", "a cat", "--steps", "1", "--out", str(out),
                 "--quiet"]) == 0
    meta = _sidecar(out)
    assert meta["compare_dense"] is None and meta["method"] == {"method": "dense"}
    assert "does not follow" in meta["quality"]["skipped"]
    assert "ground-truth quality: skipped" in capsys.readouterr().out


def test_generate_tiny_flux_writes_png(tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-flux", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    assert load_video(out).shape == (1, 64, 64, 3)
    assert _sidecar(out)["pipeline"] == "FluxPipeline"


@pytest.mark.parametrize("model, extra, shape, pipeline", [
    ("tiny-skyreels-v2", [], (17, 128, 128, 3), "SkyReelsV2Pipeline"),
    ("tiny-wan-vace", [], (17, 128, 128, 3), "WanVACEPipeline"),
    ("tiny-sd3", [], (1, 64, 64, 3), "StableDiffusion3Pipeline"),
    ("tiny-cogview4", [], (1, 64, 64, 3), "CogView4Pipeline"),
    ("tiny-qwenimage", [], (1, 64, 64, 3), "QwenImagePipeline"),
    ("tiny-flux2", [], (1, 64, 64, 3), "Flux2KleinPipeline"),
    ("tiny-chroma", [], (1, 64, 64, 3), "ChromaPipeline"),  # its additive text mask (presets/chroma.py)
])
def test_generate_tiny_family_pipeline_with_gna(tmp_path, model, extra, shape, pipeline):
    """At the tiny defaults (grid (5, 8, 8) for the videos, (16, 16) for the image) the model's grid-sized
    GNA option runs sparse and the output is written."""
    if model in ("tiny-skyreels-v2", "tiny-wan-vace"):
        pytest.importorskip("ftfy", reason="Diffusers' SkyReels-V2 / VACE pipelines clean prompts with ftfy")
    out = tmp_path / ("clip.gif" if shape[0] > 1 else "img.png")
    assert main(["generate", "--model", model, "--method", "gna", "--steps", "1", *extra, "--out", str(out),
                 "--quiet"]) == 0
    assert load_video(out).shape == shape
    meta = _sidecar(out)
    assert meta["pipeline"] == pipeline and meta["model"] == model and meta["method"]["method"] == "gna"
    assert 0 < meta["density"]["mean"] < 1


def test_generate_tiny_flux_prints_no_library_notices(tmp_path):
    """A fresh process (Transformers warns once per process): no torchvision fallback notice on stderr."""
    out = tmp_path / "img.png"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dit_accel", "generate", "--model", "tiny-flux", "--steps", "1", "--out", str(out),
           "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and out.is_file()


def test_generate_subprocess_python_m(tmp_path):
    out = tmp_path / "clip.gif"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dit_accel", "generate", "--model", "tiny-wan", "--frames", "5", "--height", "32",
           "--width", "48",
           "--steps", "1", "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert load_video(out).shape == (5, 32, 48, 3)
    assert SIDECAR_KEYS <= set(_sidecar(out))


@pytest.mark.parametrize("argv, needle", [
    (["--frames", "0"], "--frames"),
    (["--model", "./no/such/folder"], "neither"),
    (["--method", "tile", "--window", "0"], "--window"),
    (["--method", "radial", "--topk", "0.5"], "--topk"),
    (["--dtype", "int8"], "--dtype"),
    (["--out", "clip.avi"], "--out"),
], ids=["zero-frames", "missing-folder", "zero-window", "flag-of-other-method", "bad-dtype", "bad-suffix"])
def test_generate_bad_args_fail_fast_with_clear_errors(argv, needle, capsys):
    try:
        code = main(["generate", *argv, "--quiet"])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)


def test_offline_hub_id_is_one_short_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    code = main(["generate", "--model", "nobody/not-a-real-model", "--out", str(tmp_path / "x.mp4"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "HF_HUB_OFFLINE" in err[0] and "tiny-wan" in err[0] and "local folder" in err[0]


def test_load_pipeline_from_saved_folder(tmp_path):
    import torch

    from dit_accel.models.loading import ModelLoadError, load_pipeline
    from dit_accel.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-flux", seed=3)
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(str(tmp_path / "flux"))
    assert type(loaded).__name__ == "FluxPipeline"
    a, b = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.tokenizer_2("héllo").input_ids == pipe.tokenizer_2("héllo").input_ids
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_info_degrades_when_modules_are_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dit_accel.kernels", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "dit_accel.pipelines.presets", None)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.count("unavailable (") == 5, out  # backends, classes, autotuning, self-check verdicts, kernel status


def test_generate_takes_the_published_setting_and_names_its_source():
    """A Wan 2.1 model (not a tiny one) gets the radial reference scripts' setting, and the sidecar's
    defaults_source names that repository; a method without a published setting names the preset."""
    from dit_accel.cli.generate import _model_defaults
    from dit_accel.models.tiny import build_tiny_pipeline
    from dit_accel.pipelines.presets import published_settings

    pipe = build_tiny_pipeline("tiny-wan")  # a WanTransformer3DModel with 16 channels: the Wan 2.1 family
    fields, schedule, source = _model_defaults("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pipe, "radial", True)
    ref = published_settings(pipe.transformer, "radial", "Wan 2.1")[0]
    method, kwargs = ref.build()
    assert source == f"published for Wan 2.1: {ref.source}" and "radial-attention" in source
    assert fields == {k: v for k, v in method.to_dict().items() if k != "method"} and schedule == kwargs
    _, _, source = _model_defaults("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pipe, "gna", True)
    assert source == "WanTransformer3DModel preset (dit_accel default)"


def test_generate_without_ftfy_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """SkyReels-V2 / Wan VACE pipelines need ftfy (else a bare NameError inside Diffusers): said up front."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ftfy" else real(name, *a))
    code = main(["generate", "--model", "tiny-skyreels-v2", "--steps", "1", "--out", str(tmp_path / "x.gif"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install ftfy" in err[0] and "tiny-skyreels-v2" in err[0]
