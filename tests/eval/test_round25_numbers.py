"""Round 25 (trust): the numbers ``dit-accel eval`` reports, against independent computations from their published
definitions, and the faults that made one silently wrong or a raw traceback:

- ``StageTimer.stop()`` called twice added a second span to ``total`` (a 0.05 s run read 0.15 s); without ``start``
  it was a TypeError about NoneType;
- ``median_times`` of a run without a stage, with a None or a NaN time: a KeyError, a TypeError, or the NaN sorted
  into the median; a dense cache entry with such times was reused (now: dropped and generated again);
- ``measure_call(calls=0)`` was a ZeroDivisionError, ``repeats=0`` "no median for empty data";
- ``--compare``: a NaN sample made A's mean NaN while B's mean kept the pair that B - A left out; an Infinity was
  refused as "values[1] is inf", naming no row;
- the CLIP score of a list of prompts was 0.0 without a word; ``score_many(videos, "a cat")`` scored the letters;
- ``analyse`` paired rows by position: a row whose samples were in another order was paired prompt against another
  prompt, every difference and verdict wrong.
"""
import json
import math
import statistics
import time

import numpy as np
import pytest
import torch


# ------------------------------------------------------------------ independent definitions
def _psnr(a: np.ndarray, b: np.ndarray) -> list:
    """PSNR per frame, data range 1, from MSE (float64): 10 log10(1 / MSE)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(1)
    return [10 * math.log10(1.0 / m) if m > 0 else math.inf for m in mse]


def _frechet(fa: np.ndarray, fb: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), sample covariances (N - 1), scipy's sqrtm."""
    import scipy.linalg

    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def _t_interval(x, level=0.95):
    import scipy.stats

    x = np.asarray(x, dtype=np.float64)
    half = scipy.stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


# ------------------------------------------------------------------ PSNR, FID, statistics: exact
@pytest.mark.parametrize("kind", ["float", "uint8-hwc"])
def test_psnr_per_frame_is_the_mse_formula_on_data_range_one_and_identical_frames_read_the_cap(kind):
    from dit_accel.eval.metrics import PSNR_CAP, psnr_per_frame

    rng = np.random.default_rng(0)
    a = rng.random((3, 3, 9, 7)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    if kind == "uint8-hwc":  # 0-255 frames are scaled, not read as a range of 255
        a, b = ((x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1) for x in (a, b))
        expected = _psnr(a / 255.0, b / 255.0)
    else:
        expected = _psnr(a, b)
    assert psnr_per_frame(a, b).tolist() == pytest.approx(expected, abs=1e-4)  # float32 MSE: ~1e-6 dB
    assert psnr_per_frame(a, a).tolist() == [PSNR_CAP] * 3  # inf capped, as the docs say


@pytest.mark.parametrize("n,dims", [(10, 4), (3, 4), (6, 16)], ids=["n>d", "n<d", "n<<d"])
def test_frechet_distance_is_the_formula_with_scipys_sqrtm_even_when_the_covariance_is_singular(n, dims):
    from dit_accel.eval.fid import frechet_distance

    weight = torch.randn(3 * 4 * 4, dims, generator=torch.Generator().manual_seed(dims))

    class Features(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).float() @ weight

    torch.manual_seed(n)
    a, b = torch.rand(n, 3, 4, 4), torch.rand(n, 3, 4, 4) * 0.8
    got = frechet_distance(a, b, Features())
    expected = _frechet((a.flatten(1) @ weight).double().numpy(), (b.flatten(1) @ weight).double().numpy())
    assert got == pytest.approx(expected, rel=1e-5)  # torchmetrics returns it in float32
    assert frechet_distance(a, a, Features()) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("values", [[0.1, 0.3, -0.2, 0.4, 0.0], [1.0, 2.0], [0.3, 0.1, 0.2]], ids=["n5", "n2", "n3"])
def test_summary_interval_and_paired_test_equal_scipys_t_interval_and_ttest_rel(values):
    import scipy.stats

    from dit_accel.eval.stats import paired_test, summarize

    s = summarize(values)
    assert s["mean"] == pytest.approx(np.mean(values)) and s["sd"] == pytest.approx(np.std(values, ddof=1))
    assert s["ci"] == pytest.approx(_t_interval(values), rel=1e-9)  # two-sided 95%, df = n - 1
    assert s["meaningful"] is (len(values) >= 5)
    base = [10.0 + i for i in range(len(values))]
    test = paired_test([b + v for b, v in zip(base, values)], base)
    ref = scipy.stats.ttest_rel([b + v for b, v in zip(base, values)], base)
    assert (test["df"], test["t"], test["p"]) == (len(values) - 1, pytest.approx(ref.statistic, rel=1e-9),
                                                  pytest.approx(ref.pvalue, rel=1e-7))


def test_equal_differences_give_a_zero_width_interval_and_one_pair_none():
    from dit_accel.eval.stats import paired_test, summarize

    s = summarize([0.5, 0.5, 0.5, 0.5])
    assert s["ci"] == (0.5, 0.5) and s["sd"] == 0.0  # scipy's t.interval gives NaN here
    assert paired_test([1.5, 2.5], [1.0, 2.0])["p"] == 0.0 and paired_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    one = summarize([3.0])
    assert one["ci"] is None and one["meaningful"] is False and "not meaningful" in one["note"]


def _row(label, times, order=("a", "b", "c", "d", "e"), **extra):
    return {"label": label, "config": {}, **extra,
            "samples": [{"prompt": p, "seed": 0, "time_total": t} for p, t in zip(order, times)]}


def test_the_verdict_at_the_floor_boundary_is_indistinguishable_and_beyond_it_worse():
    from dit_accel.eval.stats import INDISTINGUISHABLE, _verdict, analyse

    dense = _row("dense", [1.0] * 5)
    floor = _row("dense~seed", [0.75, 1.25, 1.0, 1.0, 1.0], floor="seed")  # differences -0.25, 0.25, 0, 0, 0
    rows = [dense, floor, _row("m", [2.0, 2.5, 2.0, 1.5, 2.0])]
    analyse(rows)
    reach = max(abs(e) for e in _t_interval([-0.25, 0.25, 0.0, 0.0, 0.0]))
    assert rows[1]["paired"]["time_total"]["ci"] == pytest.approx((-reach, reach))
    assert rows[2]["paired"]["time_total"]["ci"] == pytest.approx(_t_interval([1.0, 1.5, 1.0, 0.5, 1.0]))
    assert rows[2]["verdict"]["time_total"] == "worse than dense"  # slower: time's better direction is down
    summary = {"mean": 0.3, "ci": (0.1, 0.5)}  # the rule itself: within the floor's reach, ends included
    assert _verdict(summary, "delta", -1, 0.3, None, None) == INDISTINGUISHABLE
    assert _verdict(summary, "delta", -1, 0.2999, None, None) == "worse than dense"
    assert _verdict(summary, "delta", 1, 0.2999, None, None) == "better than dense"
    assert _verdict({"mean": 0.3, "ci": (-0.1, 0.7)}, "delta", 1, 0.2, None, None) == "not significant"


def test_analyse_refuses_a_row_whose_samples_are_not_in_denses_order():
    """Before: row y (the same times as x, its prompts listed in another order) was paired by position, its
    per-sample differences and verdict computed against other prompts' dense times without a word."""
    from dit_accel.eval.stats import analyse

    dense = _row("dense", [1.0, 2.0, 3.0, 4.0, 5.0])
    x = _row("x", [1.0, 2.0, 3.0, 4.0, 5.0])
    y = _row("y", [2.0, 1.0, 3.0, 4.0, 5.0], order=("b", "a", "c", "d", "e"))  # the same times as x, reordered
    with pytest.raises(ValueError, match=r"analyse: row 'y' is not paired with dense \(its sample 0 is \(prompt, "
                                         r"seed\) \('b', 0\), dense's \('a', 0\)\); give every row the samples of "
                                         r"rows\[0\] in its order"):
        analyse([dense, x, y])
    with pytest.raises(ValueError, match=r"row 'x' is not paired with dense \(it has 4 samples, dense 5\)"):
        analyse([dense, _row("x", [1.0, 2.0, 3.0, 4.0])])
    rows = [dense, x]
    analyse(rows)  # aligned rows pass, and pair as they did
    assert rows[1]["paired"]["time_total"]["mean"] == 0.0


# ------------------------------------------------------------------ speedup direction and per-sample figures
def test_eval_row_speedup_is_dense_time_over_method_time_and_psnr_the_per_video_mean():
    from dit_accel.eval.runner import _Scorers

    scorers = _Scorers.__new__(_Scorers)
    scorers.lpips = scorers.clip = scorers.fid = None
    rng = np.random.default_rng(1)
    ref = [rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8) for _ in range(2)]
    out = [np.clip(r.astype(int) + rng.integers(-9, 10, r.shape), 0, 255).astype(np.uint8) for r in ref]
    dense = {"videos": ref, "times": {"transformer": 3.0, "total": 4.0}}
    row = {"videos": out, "times": {"transformer": 1.0, "total": 2.0}, "sample_times": []}
    scorers.score(row, dense, [("a", 0), ("b", 0)])
    assert (row["speedup_transformer"], row["speedup_e2e"]) == (3.0, 2.0)  # dense / method: > 1 is faster
    per_video = [_psnr(o / 255.0, r / 255.0)[0] for o, r in zip(out, ref)]
    assert row["psnr"] == pytest.approx(np.mean(per_video), abs=1e-4)


# ------------------------------------------------------------------ timings
class _Pipe:
    pass


def test_stage_timer_stop_twice_or_without_start_is_refused_not_summed():
    """Before: a second stop() added another span to total (0.05 s read 0.15 s); one without start() was
    "unsupported operand type(s) for -: 'float' and 'NoneType'"."""
    from dit_accel.eval.timing import StageTimer

    timer = StageTimer(_Pipe())
    with pytest.raises(RuntimeError, match=r"StageTimer.stop\(\) without a run to stop: call timer.start\(\) before "
                                           r"each timed pipeline call, then stop\(\) once after it"):
        timer.stop()
    timer.start()
    time.sleep(0.01)
    first = timer.stop()["total"]
    with pytest.raises(RuntimeError, match="without a run to stop"):
        timer.stop()
    timer.start()
    assert timer.stop()["total"] < first  # a new run starts from its own start


@pytest.mark.parametrize("runs,problem", [
    ([{"total": 1.0, "transformer": 0.5}, {"total": 2.0}], r"run 1 of 2: it has no 'transformer' time, which run 0 "),
    ([{"total": 1.0}, {"total": None}], r"run 1 of 2: times\['total'\] is None, not a finite number of seconds"),
    ([{"total": 1.0}, {"total": float("nan")}, {"total": 3.0}], r"run 1 of 3: times\['total'\] is nan"),
    ([{"transformer": 1.0}], r"run 0 of 1: times .* are not a dict of seconds per stage with a 'total'"),
], ids=["missing-stage", "none", "nan", "no-total"])
def test_median_times_names_the_run_that_is_no_timing(runs, problem):
    from dit_accel.eval.timing import median_times

    with pytest.raises(ValueError, match=r"median_times: " + problem + r".*pass the dicts StageTimer.stop\(\) returned"):
        median_times(runs)


def test_median_times_is_the_median_per_stage_of_an_even_count():
    from dit_accel.eval.timing import median_times

    runs = [{"total": t, "transformer": t / 2} for t in (4.0, 1.0, 3.0, 2.0)]
    assert median_times(runs) == {"total": 2.5, "transformer": 1.25}  # the mean of the two middle values
    assert median_times(runs) == {k: statistics.median(r[k] for r in runs) for k in runs[0]}


@pytest.mark.parametrize("times", [{}, {"total": None}, {"total": "1.0"}, {"total": 1.0, "transformer": -1.0}],
                         ids=["empty", "none", "text", "negative"])
def test_a_dense_cache_entry_with_times_that_are_no_timing_is_damaged(tmp_path, times):
    """Before: it was reused, and median_times failed with a KeyError or TypeError after every row had run (or a
    negative time went into every speedup); a damaged entry is dropped and generated again (the caller's warning)."""
    from dit_accel.atomic_files import BadFileError
    from dit_accel.eval.runner import _read_dense_entry

    path = tmp_path / "dense_0123.npz"
    np.savez_compressed(path, frames=np.zeros((2, 8, 8, 3), np.uint8), times=json.dumps(times))
    with pytest.raises(BadFileError, match=r"dense_0123.npz: holds times.*; expected a dense cache entry"):
        _read_dense_entry(path)


@pytest.mark.parametrize("options,name", [({"calls": 0}, "calls=0"), ({"repeats": 0}, "repeats=0"),
                                          ({"calls": 2.5}, "calls=2.5"), ({"calls": True}, "calls=True")])
def test_measure_call_refuses_calls_or_repeats_below_one(options, name):
    from dit_accel.eval.timing import CpuCallTimer, measure_call

    with pytest.raises(ValueError, match=rf"measure_call: {name} is invalid: an integer >= 1"):
        measure_call(lambda: None, CpuCallTimer(), graph=False, **options)


# ------------------------------------------------------------------ --compare
def _results(values):
    from dit_accel.eval.provenance import prompts_sha256

    prompts = ["a cat", "a dog", "a fox"]
    samples = [{"prompt": p, "seed": 0, "psnr": v} for p, v in zip(prompts, values)]
    return {"settings": {"prompts": prompts, "seeds": [0]}, "provenance": {"prompts_sha256": prompts_sha256(prompts)},
            "rows": [{"label": "sla", "samples": samples}]}


def test_compare_pairs_by_prompt_and_seed_and_leaves_a_nan_sample_out_of_both_sides():
    """Before: A's mean was NaN and B's the mean over all three, while B - A was over the two pairs left."""
    from dit_accel.eval.compare import compare_results

    a, b = _results([30.0, float("nan"), 32.0]), _results([33.0, 31.0, 31.0])
    b["rows"][0]["samples"].reverse()  # paired by (prompt, seed), not by position
    b["rows"][0]["samples"][0]["psnr"], b["rows"][0]["samples"][2]["psnr"] = 31.0, 33.0
    (c,) = compare_results(a, b)
    assert (c["a"], c["b"], c["diff"]["n"]) == (31.0, 32.0, 2)
    assert c["diff"]["mean"] == pytest.approx(c["b"] - c["a"]) == 1.0
    assert compare_results(_results([float("nan")] * 3), b) == []  # no pair left: no row (was a TypeError)


def test_compare_refuses_an_infinite_metric_naming_the_row_prompt_and_seed():
    from dit_accel.eval.compare import compare_results

    with pytest.raises(ValueError, match=r"a is not a dit-accel eval results dict \(row 'sla' has a psnr of inf, "
                                         r"not a finite number \(prompt 'a dog', seed 0; null for a missing one\)"):
        compare_results(_results([30.0, math.inf, 32.0]), _results([31.0] * 3))


# ------------------------------------------------------------------ CLIP score prompts
def _scorer():
    from dit_accel.eval.clip import ClipScorer

    return ClipScorer.__new__(ClipScorer)  # (the prompt is checked before the model is used)


@pytest.mark.parametrize("prompt", [["a cat", "a dog"], None, "", "  ", 3], ids=["list", "none", "empty", "blank",
                                                                                  "int"])
def test_clip_score_refuses_a_prompt_that_is_not_one_text(prompt):
    """Before: a list of two prompts scored 0.0 against one video without a word; None and "" were the tokenizer's
    errors about pretokenized batches and a reshape."""
    scorer = _scorer()
    with pytest.raises(ValueError, match=r"prompt=.* is invalid: the CLIP score compares frames with one text, the "
                                         r"prompt they were generated from \(a non-empty str\)"):
        scorer(torch.rand(2, 3, 8, 8), prompt)


def test_clip_score_many_refuses_one_text_as_the_prompts_and_names_a_bad_entry():
    scorer = _scorer()
    videos = [torch.rand(2, 3, 8, 8)] * 2
    with pytest.raises(ValueError, match=r"prompts='ab' is one text: score_many takes one prompt per video, e\.g\. "
                                         r"\['ab'\] \* len\(videos\)"):
        scorer.score_many(videos, "ab")  # (was the prompts "a" and "b")
    with pytest.raises(ValueError, match=r"prompts\[1\]=None is invalid"):
        scorer.score_many(videos, ["a cat", None])


@pytest.mark.parametrize("truth", [{"all_ok": "yes"}, ["x"]], ids=["text", "a-list"])
def test_compare_refuses_a_groundtruth_that_is_no_verdict_naming_the_row(truth):
    """Before: float()'s "could not convert string to float: 'yes'" and "'list' object has no attribute 'get'"."""
    from dit_accel.eval.compare import compare_results

    bad = _results([30.0] * 3)
    bad["rows"][0]["samples"][0]["groundtruth_ok"] = truth
    with pytest.raises(ValueError, match=r"b is not a dit-accel eval results dict \(row 'sla' has a groundtruth_ok "
                                         r"of .*, not a dict whose all_ok is true, false or null\)"):
        compare_results(_results([30.0] * 3), bad)


def test_temporal_figures_are_their_documented_formulas():
    from dit_accel.eval.temporal import temporal_report

    rng = np.random.default_rng(2)
    video = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    x, r = video / 255.0, ref / 255.0
    steps = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))  # mean |x[t+1] - x[t]| per step
    out = temporal_report(video, ref)
    assert out["motion"] == pytest.approx(steps.mean(), rel=1e-5)
    assert out["motion_ratio"] == pytest.approx(steps.mean() / np.abs(np.diff(r, axis=0)).mean(), rel=1e-5)
    assert out["temporal_error"] == pytest.approx(np.abs(np.diff(x, axis=0) - np.diff(r, axis=0)).mean(), rel=1e-5)
    assert out["frozen"] is False and out["loop_period"] is None
