"""Calibration, eval and their reports as users drive them (round 10 of the trust audit)."""

import json

import numpy as np
import pytest

from dit_accel.cli.main import main

OFF_GRAMMAR = "a purple hexagon spinning"  # tiny-shapes' checker knows 'a COLOUR SHAPE moving DIRECTION' only
CALIBRATE_FAST = ["--min-psnr", "25", "--phases", "1", "--warmup-candidates", "1", "--candidates", "small",
                  "--methods", "tile,sla", "--search-iters", "1", "--cost-terms", "tiles", "--no-progress", "--quiet",
                  "--seeds", "0", "--validate", "1", "--steps", "2", "--sensitivity", "uniform", "--uniform-options",
                  "0", "--no-baseline"]


# ----------------------------------------------------------- calibrate: prompts outside tiny-shapes' grammar
def test_calibrate_report_with_a_prompt_the_checker_cannot_read_runs_without_ground_truth(tmp_path, capsys):
    """Before: `calibrate --model tiny-shapes` (ground truth reported by default) with a prompt outside the
    checker's grammar ran the whole dense generation, then died with "prompt 'a purple hexagon spinning' does not
    follow ..." (exit 2, no plan). Now the plan is written on the PSNR budget, with a note that ground truth is
    not reported (as eval skips it)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(OFF_GRAMMAR + "\n")
    out = tmp_path / "plan.json"
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out", str(out), *CALIBRATE_FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: ground truth not reported: prompt 'a purple hexagon spinning' does not follow" in captured.out
    result = json.loads((tmp_path / "plan_report" / "calibration.json").read_text())
    assert result["groundtruth"] is None and out.is_file()


def test_calibrate_require_with_a_prompt_the_checker_cannot_read_is_refused_before_the_model_loads(
        tmp_path, monkeypatch, capsys):
    from dit_accel.models import loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n" + OFF_GRAMMAR + "\n")
    code = main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--out",
                 str(tmp_path / "plan.json"), "--groundtruth", "require", *CALIBRATE_FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--groundtruth require: prompt 'a purple hexagon spinning' does not follow" in err
    assert "or use --groundtruth report" in err
    assert not (tmp_path / "plan.json").exists()


# ----------------------------------------------------------- eval: a row whose output is NaN
def test_eval_row_with_nan_output_fails_its_row_instead_of_scoring_black_frames(tmp_path, monkeypatch):
    """Before: a method whose transformer output overflowed to NaN was cast to uint8 (NaN -> 0: black frames) and
    scored like a video: the row got a PSNR, an SSIM and a ground-truth score of frames nobody generated. Now the
    row fails with the reason, the dense row and the report stand."""
    import contextlib

    import torch

    from dit_accel.eval import runner
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-shapes")
    in_method_row = []
    real_context = runner._cache_context

    @contextlib.contextmanager
    def flagged(*args):  # entered only around a method row's generations
        in_method_row.append(True)
        try:
            with real_context(*args):
                yield
        finally:
            in_method_row.pop()

    monkeypatch.setattr(runner, "_cache_context", flagged)
    hook = pipe.transformer.register_forward_hook(
        lambda m, i, out: (out[0] * torch.nan,) + tuple(out[1:]) if in_method_row and isinstance(out, tuple)
        else (out.__class__(sample=out.sample * torch.nan) if in_method_row and hasattr(out, "sample") else out))
    settings = runner.EvalSettings(model="tiny-shapes", prompts=["a red circle moving left"], seeds=[0], steps=2,
                                   frames=7, height=48, width=48, device="cpu", dtype="float32", warmup=0)
    try:
        results = runner.run_eval(settings, runner.load_method_specs(["tile"]), tmp_path / "out", pipe=pipe,
                                  lpips=False, floor_backend="none", log=lambda m: None)
    finally:
        hook.remove()
    rows = {r["label"]: r for r in results["rows"]}
    assert rows["dense"]["psnr"] == 100.0  # dense ran untouched
    tile = rows["tile"]
    assert "NaN or inf" in tile.get("error", ""), tile
    assert tile.get("psnr") is None and "samples" not in tile
    assert "failed: ValueError: the pipeline returned" in (tmp_path / "out" / "report.md").read_text()


# ----------------------------------------------------------- eval --compare: files that are not eval results
def _eval_results(rows):
    return {"settings": {"model": "tiny-shapes", "prompts": ["a red circle moving left"], "seeds": [0]},
            "provenance": {}, "rows": rows}


SAMPLE = {"prompt": "a red circle moving left", "seed": 0, "psnr": 30.0}


@pytest.mark.parametrize("rows, says", [
    ([{"samples": [SAMPLE]}], "row 0 has no label"),
    (["dense"], "row 0 has no label"),
    ([{"label": "tile", "samples": [{"psnr": 30.0}]}], "row 'tile' has samples without a prompt and an integer seed"),
    ([{"label": "tile", "samples": [{**SAMPLE, "seed": "0"}]}], "row 'tile' has samples without a prompt and an"),
    ([{"label": "tile", "samples": [{**SAMPLE, "psnr": "30 dB"}]}], "row 'tile' has a psnr of '30 dB', not a number"),
], ids=["no-label", "row-not-a-dict", "sample-no-prompt", "seed-a-string", "psnr-a-string"])
def test_compare_of_results_it_cannot_pair_is_one_line_naming_the_file(tmp_path, capsys, rows, says):
    """Before: a results.json of another tool (or hand-edited) with rows and settings passed the file check, then
    the pairing died with a KeyError 'label' / 'prompt', AttributeError or ValueError traceback."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_eval_results(rows)))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{tmp_path / 'a' / 'results.json'}: not a dit-accel eval results file ({says}" in err


def test_compare_still_pairs_well_formed_results_and_says_b_minus_a(tmp_path, capsys):
    """The paired difference is B - A per (prompt, seed), re-derived here by hand."""
    prompts = ["a red circle moving left", "a blue square moving up"]
    psnr_a, psnr_b = [30.0, 20.0, 25.0, 35.0], [31.0, 23.0, 24.0, 36.5]
    for name, psnr in (("a", psnr_a), ("b", psnr_b)):
        samples = [{"prompt": p, "seed": s, "psnr": v} for (p, s), v in zip([(p, s) for p in prompts for s in (0, 1)],
                                                                             psnr)]
        if name == "b":
            samples.reverse()  # another order on disk: pairs still by (prompt, seed)
        results = {"settings": {"model": "tiny-shapes", "prompts": prompts, "seeds": [0, 1]}, "provenance": {},
                   "rows": [{"label": "tile", "samples": samples}]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| tile | psnr"))
    diffs = np.subtract(psnr_b, psnr_a)
    assert f"| {np.mean(psnr_a):.4g} | {np.mean(psnr_b):.4g} | {diffs.mean():+.4g} |" in line


# ----------------------------------------------------------- info --clear --json
def test_info_clear_with_json_prints_json(monkeypatch, capsys):
    """Before: `dit-accel info --clear --json` printed a sentence, which a script reading --json cannot parse."""
    from dit_accel.kernels import autotune, selfcheck

    cleared = []
    monkeypatch.setattr(autotune, "clear", lambda: cleared.append("autotune"))
    monkeypatch.setattr(selfcheck, "clear", lambda: cleared.append("selfcheck"))
    assert main(["info", "--clear", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"cleared": {"autotune": str(autotune.cache_path()), "selfcheck": str(selfcheck.cache_path())}}
    assert cleared == ["autotune", "selfcheck"]
    assert main(["info", "--clear"]) == 0
    assert capsys.readouterr().out.startswith("dit-accel info: cleared the autotune choices")


# ----------------------------------------------------------- eval: rows that would share a label
def test_eval_rows_of_one_name_get_distinct_labels(tmp_path, monkeypatch):
    """Before: `--plan a/plan.json --plan b/plan.json` made two rows labelled 'plan' (and a plan file named
    dense.json or tile.json one labelled like the baseline or the tile row): report.md could not tell them apart,
    and `eval --compare` paired both of A's 'plan' rows with B's second one. Now each label is unique, a ' added
    as --method-config does."""
    import shutil

    import dit_accel
    from dit_accel.eval import runner

    shipped = dit_accel.models.tiny_shapes.TINY_SHAPES_PLAN
    plans = []
    for folder, name in (("a", "plan.json"), ("b", "plan.json"), ("c", "dense.json"), ("d", "tile.json")):
        (tmp_path / folder).mkdir()
        plans += ["--plan", str(shutil.copy(shipped, tmp_path / folder / name))]
    seen = {}

    def fake_run_eval(settings, specs, out, **kw):
        seen["labels"] = [s.label for s in specs]
        raise ValueError("stopped in the test")

    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    assert main(["eval", "--model", "tiny-shapes", "--methods", "dense,tile", *plans, "--prompt",
                 "a red circle moving left", "--out", str(tmp_path / "out")]) == 2
    assert seen["labels"] == ["tile", "plan", "plan'", "dense'", "tile'"]
