"""calibrate() (the Python API) checks its settings as `dit-accel calibrate` does, before any model loads
(round 8 of the input audit)."""

import pytest

from dit_accel.calibrate import CalibrationSettings, calibrate
from dit_accel.models import loading


def _settings(**kw):
    base = dict(model="tiny-shapes", prompts=["a red circle moving right", "a blue square moving left"],
                min_psnr=25, steps=2, seeds=[0])
    return CalibrationSettings(**{**base, **kw})


CASES = [
    ("repeated-prompt", {"prompts": ["a red circle moving right", "a blue square moving left",
                                     "a red circle moving right"]}, "prompts repeat 'a red circle moving right'"),
    ("repeated-seed", {"seeds": [0, 0]}, r"--seeds repeats a seed"),
    ("no-seeds", {"seeds": []}, r"--seeds \[\] is invalid"),
    ("prompts-str", {"prompts": "a red circle moving right"}, "give a list of prompts"),
    ("min-psnr-nan", {"min_psnr": float("nan")}, r"--min-psnr must be a number of dB in \(0, 100\]"),
    ("min-psnr-500", {"min_psnr": 500}, r"--min-psnr must be a number of dB in \(0, 100\]"),
    ("max-layer-error-inf", {"max_layer_error": float("inf")}, "--max-layer-error must be a finite number"),
    ("frames-0", {"frames": 0}, "--frames must be an integer >= 1"),
    ("guidance-nan", {"guidance_scale": float("nan")}, "--guidance-scale must be a finite number"),
    ("warmup-negative", {"warmup": (-1,)}, "--warmup-candidates must be step counts >= 0"),
    ("max-sample-mb-0", {"max_sample_mb": 0}, "--max-sample-mb must be a finite number of MiB > 0"),
    ("methods-unknown", {"methods": ("tile", "nope")}, r"--methods \('tile', 'nope'\) is invalid"),
    ("methods-str", {"methods": "tile,sla"}, r"--methods 'tile,sla' is invalid"),
    ("candidates-unknown", {"candidates": "huge"}, "--candidates 'huge' is invalid"),
    ("arch-unknown", {"arch": "z80"}, "--arch z80 --kernel current: no cost-model constants"),
    ("kernel-unknown", {"kernel": "warp9"}, "--arch h100 --kernel warp9"),
    ("backend-unknown", {"backend": "nope"}, "--backend 'nope' is invalid"),
    ("tile-zero", {"tile": (0, 8, 8)}, r"--tile \(0, 8, 8\) is invalid"),
    ("tile-rank", {"tile": (8, 8)}, "--tile .* has 2 sizes, but the token grid of tiny-shapes has 3 dimensions"),
    ("device-bogus", {"device": "abacus"}, "--device abacus is not a torch device"),
    ("dtype-bogus", {"dtype": "float13"}, "--dtype 'float13' is invalid"),
]


@pytest.mark.parametrize("change, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_settings_are_refused_before_any_model_loads(tmp_path, monkeypatch, change, says):
    """Before: CalibrationSettings.check() checked few of what the CLI checks. A repeated prompt or seed counted
    the same video twice (and a repeated prompt could sit on both sides of the validation split); a NaN or
    500 dB budget, an infinite layer error, NaN guidance, frames 0 or a negative warm-up ran to a plan without a
    word; methods, candidates, arch, kernel and tile were refused only after the dense run, device and dtype
    with torch's RuntimeError/AttributeError, no seeds with "max() arg is an empty sequence"."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    with pytest.raises(ValueError, match=says):
        calibrate(_settings(**change), tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_good_settings_reach_the_model_loader(tmp_path, monkeypatch):
    seen = []

    def stop(model, **k):
        seen.append(model)
        raise loading.ModelLoadError("stopped in the test")

    monkeypatch.setattr(loading, "load_pipeline", stop)
    with pytest.raises(loading.ModelLoadError, match="stopped in the test"):
        calibrate(_settings(tile=(1, 8, 8), methods=("tile", "sla"), seeds=(0, 1), max_layer_error=0.2),
                  tmp_path / "plan.json", progress=False, log=lambda m: None)
    assert seen == ["tiny-shapes"]


@pytest.mark.parametrize("tile", [(1.5, 8, 8), "188", (1, True, 8)], ids=["float", "str", "bool"])
def test_a_candidate_tile_of_other_than_whole_numbers_is_refused(tile):
    """Before: check_candidate_tile read 1.5 as 1 and a string as its characters' digits."""
    from dit_accel.calibrate.candidates import check_candidate_tile

    with pytest.raises(ValueError, match="one whole number >= 1 per grid dimension"):
        check_candidate_tile(tile)
    assert check_candidate_tile((1, 8, 8)) == (1, 8, 8)
