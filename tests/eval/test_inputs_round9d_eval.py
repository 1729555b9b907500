"""`dit-accel eval` as users run it (round 9d of the trust audit): comparing folders, reusing --out."""

import json
from pathlib import Path

import pytest

from dit_accel.cli.main import main
from dit_accel.eval.compare import compare_results

PROMPTS = ["a blue square moving up", "a red circle moving left"]


def _results(**settings):
    base = dict(model="tiny-shapes", prompts=PROMPTS, seeds=[0], frames=None, height=None, width=None, steps=4,
                guidance_scale=None, max_sequence_length=None, device="cpu", dtype="float32", repeats=1, warmup=0)
    samples = [{"prompt": p, "seed": 0, "psnr": 30.0 + i} for i, p in enumerate(PROMPTS)]
    return {"settings": {**base, **settings}, "provenance": {},
            "rows": [{"label": "dense", "samples": samples}, {"label": "tile", "samples": samples}]}


@pytest.mark.parametrize("change, says", [
    ({"model": "tiny-wan"}, "model: 'tiny-shapes' vs 'tiny-wan'"),
    ({"steps": 8}, "steps: 4 vs 8"),
    ({"height": 64}, "height: None vs 64"),
    ({"frames": 9}, "frames: None vs 9"),
    ({"guidance_scale": 3.0}, "guidance_scale: None vs 3.0"),
    ({"max_sequence_length": 16}, "max_sequence_length: None vs 16"),
    ({"dtype": "bfloat16"}, "dtype: 'float32' vs 'bfloat16'"),
], ids=["model", "steps", "height", "frames", "guidance", "max-sequence-length", "dtype"])
def test_compare_refuses_runs_of_other_generation_settings(change, says):
    """Before: only prompts and seeds were checked, so two runs of another model, step count, size, guidance or
    dtype were paired sample by sample as if they had made the same videos (a PSNR against another dense
    baseline reported as a change of the method)."""
    with pytest.raises(ValueError, match="refusing to pair") as err:
        compare_results(_results(), _results(**change))
    assert says in str(err.value)


def test_compare_still_pairs_runs_that_differ_only_in_timing_settings_or_device():
    """What does not change the videos (repeats, warm-up) or is what a comparison of two machines is about
    (device) is not refused."""
    rows = compare_results(_results(), _results(repeats=3, warmup=2, device="cuda"))
    assert {r["label"] for r in rows} == {"dense", "tile"}


def test_compare_from_the_cli_is_one_line_naming_the_setting(tmp_path, capsys):
    for name, results in (("a", _results()), ("b", _results(steps=8))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steps: 4 vs 8" in err


def test_eval_weights_trained_on_another_model_are_refused_before_it_loads(tmp_path, monkeypatch, capsys):
    """Before: `eval --model tiny-shapes-long --frames 63 --weights <tiny-shapes-63's LoRA>` ran the LoRA of another
    model (same architecture, other weights) as a row of this one and exited 0; `generate --weights` refuses it."""
    import dit_accel
    from dit_accel.models import loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before --weights was checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    lora = Path(dit_accel.__file__).parent / "models" / "plans" / "tiny-shapes-63-lora"
    assert main(["eval", "--model", "tiny-shapes-long", "--frames", "63", "--methods", "dense", "--weights",
                 str(lora), "--prompt", "a red circle moving right", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained on tiny-shapes-63" in err
    assert "not on --model tiny-shapes-long" in err
    assert not (tmp_path / "out").exists()
