"""dit_accel.eval.stats against hand-computed values and scipy; the row analysis on hand-made rows."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from dit_accel.eval import stats


@pytest.mark.parametrize("df", [1, 2, 3, 4.5, 7, 23, 200])
def test_t_distribution_matches_scipy(df):
    for t in (-6.0, -2.1, -0.3, 0.0, 0.7, 1.96, 9.0):
        assert stats.t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), abs=1e-11)
    for p in (0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 0.999):
        assert stats.t_ppf(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-12)


def test_t_values_by_hand():
    # df = 1 is the Cauchy distribution: P(T <= 1) = 3/4; df = 2 has t_0.975 = sqrt(2 / (0.05 * (2 - 0.05))) ...
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)
    assert stats.t_ppf(0.975, 2) == pytest.approx(4.302652729911275, abs=1e-9)  # table value 4.303
    assert stats.t_ppf(0.975, 4) == pytest.approx(2.776445105197793, abs=1e-9)  # table value 2.776


def test_summarize_by_hand():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), half width t_{.975,4} * sqrt(2.5) / sqrt(5) = 2.7764 * 0.7071 = 1.9632
    assert s["n"] == 5 and s["mean"] == 3.0 and s["sd"] == pytest.approx(math.sqrt(2.5))
    assert s["ci"] == pytest.approx((3 - 1.963243161, 3 + 1.963243161), abs=1e-8)
    assert s["meaningful"] and "note" not in s
    lo, hi = s["ci_bootstrap"]
    assert 1.0 <= lo < 3.0 < hi <= 5.0
    assert stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0])["ci_bootstrap"] == (lo, hi)  # fixed seed: reproducible
    few = stats.summarize([0.5, None, 1.5, float("nan")])
    assert few["n"] == 2 and not few["meaningful"] and "not meaningful" in few["note"]
    assert stats.summarize([None]) is None
    assert stats.summarize([2.0])["ci"] is None


def test_bootstrap_resamples_whole_prompts():
    # Two prompts, each with its three seeds identical: resampling prompts gives means 1, 2 or 3 only.
    values = [1, 1, 1, 3, 3, 3]
    lo, hi = stats.bootstrap_ci(values, ["a", "a", "a", "b", "b", "b"], resamples=500)
    assert lo == 1.0 and hi == 3.0
    assert stats.bootstrap_ci([1.0, 2.0], ["a", "a"]) is None


def test_paired_test_matches_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(size=12)
    b = a + rng.normal(0.4, 0.6, size=12)
    mine = stats.paired_test(list(a), list(b))
    ref = sps.ttest_rel(a, b)
    assert mine["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert mine["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert mine["df"] == 11 and mine["significant"] == (ref.pvalue < 0.05)
    assert stats.paired_test([1, 2, 3], [1, 2, 3])["p"] == 1.0
    assert stats.paired_test([2, 3, 4], [1, 2, 3])["p"] == 0.0
    assert stats.paired_test([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="aligned"):
        stats.paired_test([1, 2], [1])


def _row(label, gt, psnr, times, floor=None):
    samples = [{"prompt": f"p{i // 2}", "seed": i % 2, "psnr": p, "groundtruth_ok": {"all_ok": g},
                "time_transformer": t, "time_total": t} for i, (g, p, t) in enumerate(zip(gt, psnr, times))]
    row = {"label": label, "samples": samples}
    if floor:
        row["floor"] = floor
    return row


def test_analyse_verdicts_and_best_other_row():
    n = 8
    dense = _row("dense", [1] * n, [100.0] * n, [1.0] * n)
    seed = _row("dense~seed", [1, 0, 1, 1, 1, 1, 0, 1], [18.0 + i % 3 for i in range(n)],
                [1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0, 1.0], floor="seed")
    backend = _row("dense~math", [1] * n, [60.0 + i % 2 for i in range(n)], [1.0] * n, floor="backend")
    close = _row("close", [1] * n, [62.0 + i % 2 for i in range(n)], [0.5 + 0.01 * i for i in range(n)])
    broken = _row("broken", [0] * n, [15.0 + i % 2 for i in range(n)], [0.4 + 0.01 * (i % 3) for i in range(n)])
    rows = [dense, seed, backend, close, broken]
    stats.analyse(rows)
    assert "paired" not in dense
    assert close["verdict"]["psnr"] == stats.INDISTINGUISHABLE  # closer to dense than the backend floor
    assert close["verdict"]["groundtruth"] == stats.INDISTINGUISHABLE
    assert close["verdict"]["time_transformer"] == "better than dense"  # faster, far beyond the floor's spread
    assert broken["verdict"]["psnr"].startswith("differs")
    assert broken["verdict"]["groundtruth"] == "worse than dense"
    assert broken["paired"]["groundtruth"]["mean"] == -1.0
    assert close["tests"]["psnr"]["against"] == "broken" and broken["tests"]["psnr"]["against"] == "close"
    assert broken["tests"]["psnr"]["significant"] and broken["tests"]["psnr"]["mean"] == pytest.approx(-47.0)
    assert "verdict" not in seed and seed["paired"]["psnr"]["n"] == n


def test_paired_test_tiny_p_values_do_not_round_to_zero():
    rng = np.random.default_rng(5)
    a = rng.normal(size=24)
    b = a + 3.0 + rng.normal(0, 0.3, size=24)
    mine = stats.paired_test(list(a), list(b))
    ref = sps.ttest_rel(a, b)
    assert 0 < mine["p"] and mine["p"] == pytest.approx(ref.pvalue, rel=1e-6)
