"""Round 22 (H): faults a user scripting the eval, calibration and statistics APIs could hit, each refused at the
boundary with a message that names the argument and says what to do (or made to work)."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.eval import metrics, stats
from dit_accel.eval.fidelity import bench_fidelity


# ------------------------------------------------------------------ numpy values in the settings
def test_eval_settings_with_numpy_values_are_plain_after_check():
    """steps=np.int64 and a numpy seed array passed check() and failed after the model loaded, in the dense cache
    key's JSON ("Object of type int64 is not JSON serializable")."""
    from dit_accel.eval.runner import EvalSettings, dense_cache_key

    settings = EvalSettings("tiny-wan", np.array(["a cat", "a dog"]), seeds=np.array([0, 1]), steps=np.int64(2),
                            frames=np.int64(1), guidance_scale=np.float32(1.0), repeats=np.int64(1))
    settings.check()
    assert settings.seeds == [0, 1] and settings.prompts == ["a cat", "a dog"]
    assert type(settings.steps) is int and type(settings.guidance_scale) is float and type(settings.repeats) is int
    json.dumps(asdict(settings))
    assert dense_cache_key(settings, "a cat", 0)


def test_calibration_settings_with_numpy_seeds_can_seed_a_generator():
    """numpy seeds passed check() and failed in the dense run, torch.Generator().manual_seed: "an integer is
    required"."""
    from dit_accel.calibrate import CalibrationSettings

    settings = CalibrationSettings("tiny-shapes", ["a red circle moving left"], seeds=np.array([0, 1]),
                                   min_psnr=np.float32(20), steps=np.int64(2), warmup=(np.int64(1),),
                                   batch_size=np.int64(2))
    settings.check()
    for seed in settings.seeds:
        torch.Generator().manual_seed(seed)
    assert type(settings.min_psnr) is float and settings.warmup == (1,) and type(settings.warmup[0]) is int
    json.dumps(asdict(settings))


# ------------------------------------------------------------------ metrics: what a video is
@pytest.mark.parametrize("video", ["dense.mp4", None], ids=["path", "none"])
def test_metrics_refuse_a_path_or_none_by_name(video):
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="load_video" if video else "video must be frames"):
        metrics.psnr_per_frame(video, frames)


@pytest.mark.parametrize("kind", ["arrays", "tensors", "images"])
def test_metrics_refuse_frames_of_different_sizes(kind):
    """A list of frames of two sizes was numpy's "inhomogeneous shape after 1 dimensions"."""
    from PIL import Image

    small, large = np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    frames = {"arrays": [large, small], "tensors": [torch.from_numpy(large), torch.from_numpy(small)],
              "images": [Image.fromarray(large), Image.fromarray(small)]}[kind]
    with pytest.raises(ValueError, match=r"frame 0 is \(8, 8, 3\), frame 1 is \(4, 4, 3\)"):
        metrics.to_frames(frames)
    assert metrics.to_frames(frames[:1] * 2).shape == (2, 3, 8, 8)


def test_metrics_say_how_to_score_a_grey_video_against_an_rgb_one():
    """Grey [F, H, W, 1] frames against RGB ones of the same size were told to "generate both with the same
    --frames/--height/--width", which they had."""
    grey = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    rgb = np.repeat(grey, 3, axis=-1)
    with pytest.raises(ValueError, match=r"colour channels only.*as_rgb\(to_frames\(video\)\)"):
        metrics.psnr_per_frame(grey, rgb)
    as_rgb = [metrics.as_rgb(metrics.to_frames(v)) for v in (grey, rgb)]
    assert metrics.psnr_per_frame(*as_rgb).tolist() == [metrics.PSNR_CAP] * 2


# ------------------------------------------------------------------ statistics arguments
@pytest.mark.parametrize("kwargs, name", [({"level": 95}, "level"), ({"level": 0}, "level"),
                                          ({"level": float("nan")}, "level"), ({"seed": -1}, "seed")],
                         ids=["percent", "zero", "nan", "negative-seed"])
def test_summarize_names_a_bad_level_or_seed(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}=.* is invalid"):
        stats.summarize([0.1, 0.3, -0.2, 0.4, 0.0], **kwargs)


@pytest.mark.parametrize("resamples", [0, -1, 2.5])
def test_bootstrap_names_bad_resamples(resamples):
    with pytest.raises(ValueError, match="resamples=.* is invalid"):
        stats.bootstrap_ci([0.1, 0.2, 0.3], resamples=resamples)


def test_statistics_refuse_infinite_values():
    """An inf (another tool's PSNR of identical frames) gave a mean of inf and NaN intervals and p, reported as
    "not significant"."""
    with pytest.raises(ValueError, match=r"values\[1\] is inf.*PSNR_CAP"):
        stats.summarize([30.0, math.inf, 31.0])
    with pytest.raises(ValueError, match=r"a\[2\] is inf"):
        stats.paired_test([30.0, 31.0, math.inf], [29.0, 30.0, 31.0])
    assert stats.summarize([30.0, None, float("nan"), 31.0])["n"] == 2  # missing ones are still dropped


# ------------------------------------------------------------------ bench_fidelity arguments
@pytest.fixture
def capture(tmp_path):
    q = torch.randn(1, 2, 64, 16)
    torch.save({"q": q, "k": q.clone(), "v": q.clone(), "grid": (4, 4, 4), "layer": 0, "layer_name": "x", "step": 0},
               tmp_path / "layer000_step000.pt")
    return tmp_path


@pytest.mark.parametrize("methods, match", [
    ({}, "non-empty mapping"), ([dit_accel.Dense()], "non-empty mapping"),
    ({"tile": "tile"}, r"methods\['tile'\] is 'tile', not a method config"),
    ({"tile": dit_accel.Tile}, r"methods\['tile'\] is <class .*not a method config")],
    ids=["empty", "list", "name", "class"])
def test_bench_fidelity_refuses_methods_that_are_not_configs(capture, methods, match):
    with pytest.raises(ValueError, match=match):
        bench_fidelity(capture, methods, log=lambda _: None)


@pytest.mark.parametrize("kwargs, match", [({"backend": "nope"}, "backend='nope' is invalid"),
                                           ({"device": "gpu"}, "device gpu is not a torch device")],
                         ids=["backend", "device"])
def test_bench_fidelity_refuses_a_bad_backend_or_device(capture, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_fidelity(capture, {"dense": dit_accel.Dense()}, log=lambda _: None, **kwargs)
    assert bench_fidelity(capture, {"dense": dit_accel.Dense()}, log=lambda _: None)["rows"]


# ------------------------------------------------------------------ compare_results arguments
@pytest.mark.parametrize("given, match", [
    ("eval_before/", r"a='eval_before/' is a path.*load_results\('eval_before/'\)"),
    ({}, "a is not a dit-accel eval results dict \\(no settings and rows\\)"),
    ({"settings": {}, "rows": [{"samples": []}]}, r"a is not a dit-accel eval results dict \(row 0 has no label\)")],
    ids=["folder", "empty", "row-without-label"])
def test_compare_results_names_what_it_takes(given, match):
    """A folder's path was AttributeError "'str' object has no attribute 'get'", another dict a KeyError 'rows'."""
    from dit_accel.eval.compare import compare_results, unpaired_rows

    with pytest.raises(ValueError, match=match):
        compare_results(given, {"settings": {}, "rows": []})
    with pytest.raises(ValueError, match=match):
        unpaired_rows(given, {"settings": {}, "rows": []})
