"""run_eval's settings are checked before the model loads or a file is written (round 8 of the input audit)."""

import numpy as np
import pytest

from dit_accel.eval.runner import EvalSettings, run_eval
from dit_accel.models import loading


def _settings(**kw):
    base = dict(model="tiny-wan", prompts=["a cat"], seeds=[0], frames=5, height=32, width=32, steps=1,
                max_sequence_length=8, warmup=0)
    return EvalSettings(**{**base, **kw})


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.mark.parametrize("change, says", [
    ({"prompts": ["a cat", "a dog", "a cat"]}, "prompts repeat 'a cat'"),
    ({"seeds": [0, 1, 0]}, r"--seeds repeats a seed \(0,1,0\)"),
], ids=["repeated-prompt", "repeated-seed"])
def test_a_repeated_prompt_or_seed_is_refused_not_counted_twice(tmp_path, no_load, change, says):
    """Before: the repeated (prompt, seed) videos were generated twice and counted twice in the paired statistics,
    and the dense~seed floor paired each with its identical twin (PSNR 100 dB: a floor of no difference)."""
    with pytest.raises(ValueError, match=says):
        run_eval(_settings(**change), [], tmp_path / "out", lpips=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, says", [
    ({"prompts": "a cat"}, r"prompts='a cat' is invalid: give a list of prompts"),
    ({"seeds": "12"}, r"--seeds '12' is invalid"),
    ({"seeds": []}, r"--seeds \[\] is invalid: give at least one integer seed"),
    ({"seeds": [-1]}, r"--seeds must be integers >= 0"),
    ({"frames": 0}, "--frames must be an integer >= 1"),
    ({"guidance_scale": float("nan")}, "--guidance-scale must be a finite number"),
    ({"repeats": 0}, "--repeats must be an integer >= 1"),
    ({"warmup": -1}, "--warmup must be an integer >= 0"),
    ({"device": "abacus"}, "--device abacus is not a torch device"),
    ({"dtype": "float13"}, "--dtype 'float13' is invalid"),
], ids=["prompts-str", "seeds-str", "seeds-empty", "seed-negative", "frames-0", "guidance-nan", "repeats-0",
        "warmup-negative", "device-bogus", "dtype-bogus"])
def test_bad_settings_are_refused_naming_the_setting_before_the_model_loads(tmp_path, no_load, change, says):
    """Before: a text of prompts ran one video per character and a text of seeds one seed per digit (silently);
    no seeds failed with IndexError after the model loaded; a bogus device or dtype with torch's RuntimeError or
    AttributeError; frames 0, repeats 0, warmup -1, a negative seed and a NaN guidance ran without a word."""
    with pytest.raises(ValueError, match=says):
        run_eval(_settings(**change), [], tmp_path / "out", lpips=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_good_settings_pass_the_check_numpy_seeds_included():
    _settings(seeds=np.array([0, 3]), prompts=("a cat", "a dog"), guidance_scale=5, frames=None).check()
