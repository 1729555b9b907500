"""Paired statistics of eval rows: per-sample differences, 95% intervals and paired tests.

Every row of ``dit-accel eval`` is generated from the same (prompt, seed) samples as the dense
baseline, so quality and time are compared *per sample*: the spread between prompts (often far
larger than any gap between methods) cancels out of a paired difference. This module holds the
statistics only (no torch, no scipy at run time):

- :func:`t_cdf` / :func:`t_ppf`: Student's t distribution through the regularized incomplete beta
  function (a continued fraction, evaluated here), accurate to ~1e-10.
- :func:`summarize`: mean, standard deviation, the 95% t-interval and a bootstrap interval over
  clusters (prompts) with a fixed seed; ``meaningful`` is False below :data:`MIN_PAIRS` pairs.
- :func:`paired_test`: the paired t-test of two aligned lists (two-sided p).

Example::

    >>> s = summarize([0.1, 0.3, -0.2, 0.4, 0.0])
    >>> s["mean"], s["ci"]        # 0.12, (-0.19.., 0.43..)
    >>> paired_test([1, 2, 3, 4, 5], [1.1, 2.3, 2.9, 4.4, 5.2])["p"]
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["MIN_PAIRS", "ALPHA", "METRICS", "INDISTINGUISHABLE", "t_cdf", "t_ppf", "summarize", "paired_test",
           "bootstrap_ci", "per_sample", "analyse"]

MIN_PAIRS = 5  # fewer prompt-seed pairs than this: the interval is reported as not meaningful
ALPHA = 0.05  # two-sided: 95% intervals, significance at p < 0.05


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


_NORMAL_DF = 1e8  # from here on the normal distribution is closer to Student's t than the beta function in floats


def _check_df(df) -> float:
    """``df`` a number > 0 (``math.inf``: the normal distribution); ValueError naming it. Before: df=inf gave
    t_ppf(0.975, inf) = -1.0 (the normal's 1.96 is right) and df=nan a NaN, without a word."""
    from .._util import is_number

    if not (is_number(df) and df > 0):  # (NaN fails df > 0)
        raise ValueError(f"df={df!r} is invalid: the degrees of freedom, a number > 0 (n - 1 for n pairs; math.inf "
                         "for the normal distribution)")
    return float(df)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) of Student's t with ``df`` degrees of freedom (``math.inf``: the standard normal)."""
    from .._util import is_number

    df = _check_df(df)
    if not is_number(t) or math.isnan(t):
        raise ValueError(f"t={t!r} is invalid: a real number (math.inf allowed), not NaN")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if df >= _NORMAL_DF:
        return 0.5 * math.erfc(-float(t) / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, then it is exact to ~1e-12; within ~1e-8 for
    df past 1e6). ValueError naming ``p`` outside (0, 1) or NaN, or ``df`` not > 0."""
    from .._util import is_number

    if not (is_number(p) and 0.0 < p < 1.0):
        raise ValueError(f"p={p!r} is invalid: a probability in (0, 1), e.g. 0.975 for a two-sided 95% interval")
    df = _check_df(df)
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def _missing(value) -> bool:
    """None or NaN, of any float type: a numpy float32 or a 0-d tensor is no ``float``, and its NaN was kept
    (a mean of NaN over n pairs called meaningful)."""
    return value is None or math.isnan(float(value))


def _check_interval(level, seed, resamples: int = 1) -> None:
    """``level`` a fraction in (0, 1), ``seed`` an integer >= 0 and ``resamples`` an integer >= 1; ValueError naming
    the argument. Before: level=95 (a percentage) failed as "p must lie in (0, 1); got 48.0", level=0 gave a
    zero-width interval without a word, and resamples=0 or seed=-1 were numpy's IndexError or ValueError."""
    from .._util import is_int, is_number

    if not (is_number(level) and 0 < level < 1):
        raise ValueError(f"level={level!r} is invalid: the interval's coverage as a fraction in (0, 1), e.g. 0.95 "
                         f"(the default {1.0 - ALPHA:g}; not a percentage)")
    if not (is_int(seed) and seed >= 0):
        raise ValueError(f"seed={seed!r} is invalid: the bootstrap's seed, an integer >= 0")
    if not (is_int(resamples) and resamples >= 1):
        raise ValueError(f"resamples={resamples!r} is invalid: the number of bootstrap resamples, an integer >= 1 "
                         "(default 2000)")


def _numbers(values, name: str) -> List[Optional[float]]:
    """``values``, any iterable of numbers with None or NaN for a missing sample (a list, a generator, a 1-D array),
    read once into floats; ValueError naming the argument and the entry. Before: a generator was "object of type
    'generator' has no len()", a list of lists "float() argument must be ... not 'list'", a 2-D array's rows
    summed in the bootstrap without a word, and an inf (another tool's PSNR of identical frames) made the mean inf
    and the interval, t and p NaN, reported as "not significant"."""
    from collections.abc import Mapping, Set

    from .._util import is_bool

    example = "one number per sample, None for a missing one, e.g. [0.1, 0.3, None]"
    if isinstance(values, (str, bytes, Mapping, Set)) or not hasattr(values, "__iter__") \
            or getattr(values, "ndim", 1) == 0:
        raise ValueError(f"{name}={values!r:.80} is invalid: an ordered sequence of numbers ({example})")
    out: List[Optional[float]] = []
    for i, v in enumerate(values):
        try:  # (text, a bool and an array of one are no number here, though float() takes them)
            if isinstance(v, (str, bytes)) or getattr(v, "ndim", 0) or is_bool(v):
                raise TypeError
            out.append(None if v is None else float(v))
        except (TypeError, ValueError):
            hint = ("pass float(x) for a bool" if is_bool(v) else "convert text with float()"
                    if isinstance(v, (str, bytes)) else "flatten nested lists or a 2-D array first (numpy's .ravel())")
            raise ValueError(f"{name}[{i}] is {v!r:.60}: expected a number ({example}); {hint}")
        if out[-1] is not None and math.isinf(out[-1]):
            raise ValueError(f"{name}[{i}] is {v!r}: the statistics need finite values; cap it (a PSNR of identical "
                             "frames: dit_accel.eval.metrics.PSNR_CAP, as psnr_per_frame does) or pass None for a "
                             "missing sample")
    return out


def _labels(clusters, n: int) -> list:
    """``clusters`` read once: one hashable label (a prompt, an int) per value; ValueError naming it."""
    if isinstance(clusters, (str, bytes)) or not hasattr(clusters, "__iter__"):
        raise ValueError(f"clusters={clusters!r:.80} is invalid: one label per value, e.g. each sample's prompt")
    labels = list(clusters)
    if len(labels) != n:  # (zip dropped the values past the shorter list)
        raise ValueError(f"clusters: {len(labels)} labels for {n} values; give one label per value")
    for i, label in enumerate(labels):
        try:
            hash(label)
        except TypeError:
            raise ValueError(f"clusters[{i}] is {label!r:.60}: a label must be hashable, such as the sample's prompt "
                             "or an int") from None
    return labels


def bootstrap_ci(values: Sequence[float], clusters: Optional[Sequence] = None, *, resamples: int = 2000,
                 seed: int = 0, level: float = 1.0 - ALPHA) -> Optional[tuple]:
    """Percentile bootstrap interval of the mean, resampling whole ``clusters`` (e.g. prompts, so that the
    seeds of one prompt stay together) with a fixed ``seed``; None for fewer than 2 clusters."""
    _check_interval(level, seed, resamples)
    values = _numbers(values, "values")
    labels = range(len(values)) if clusters is None else _labels(clusters, len(values))
    kept = [(v, c) for v, c in zip(values, labels) if not _missing(v)]  # (a NaN made both ends NaN)
    x = np.array([v for v, _ in kept], dtype=np.float64)
    labels = [c for _, c in kept]
    groups: Dict[object, List[int]] = {}
    for i, c in enumerate(labels):
        groups.setdefault(c, []).append(i)
    members = list(groups.values())
    if len(members) < 2:
        return None
    sums = np.array([x[m].sum() for m in members])
    counts = np.array([len(m) for m in members], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(members), size=(resamples, len(members)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def summarize(values: Sequence[Optional[float]], clusters: Optional[Sequence] = None, *, seed: int = 0,
              level: float = 1.0 - ALPHA) -> Optional[dict]:
    """Mean and 95% intervals of per-sample differences (None and NaN entries dropped; None if none left).

    Returns ``n``, ``mean``, ``sd``, ``ci`` (the t-interval ``mean +- t_{0.975, n-1} sd / sqrt(n)``; None
    for n < 2), ``ci_bootstrap`` (over ``clusters``, see :func:`bootstrap_ci`), ``meaningful`` (n >=
    :data:`MIN_PAIRS`) and ``note`` when it is not.
    """
    _check_interval(level, seed)
    values = _numbers(values, "values")
    labels = range(len(values)) if clusters is None else _labels(clusters, len(values))
    pairs = [(v, c) for v, c in zip(values, labels) if not _missing(v)]
    if not pairs:
        return None
    x = np.array([v for v, _ in pairs])
    n = len(x)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else None
    ci = None
    if n > 1:
        half = t_ppf(1.0 - (1.0 - level) / 2.0, n - 1) * sd / math.sqrt(n)
        ci = (mean - half, mean + half)
    out = {"n": n, "mean": mean, "sd": sd, "ci": ci,
           "ci_bootstrap": bootstrap_ci(x, [c for _, c in pairs], seed=seed, level=level),
           "meaningful": n >= MIN_PAIRS}
    if n < MIN_PAIRS:
        out["note"] = f"{n} prompt-seed pair(s) < {MIN_PAIRS}: the interval is not meaningful"
    return out


def paired_test(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Optional[dict]:
    """Paired t-test of ``a - b`` (pairs where either is missing dropped): ``n``, ``mean`` (of a - b),
    ``t``, ``df``, two-sided ``p`` and ``significant`` (p < :data:`ALPHA`); None for fewer than 2 pairs.
    Identical differences (zero spread) give p = 1 when they are all 0, else p = 0."""
    a, b = _numbers(a, "a"), _numbers(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired_test needs aligned samples (a[i] and b[i] from the same prompt and seed); got "
                         f"{len(a)} and {len(b)}")
    d = np.array([x - y for x, y in zip(a, b) if not _missing(x) and not _missing(y)])
    n = len(d)
    if n < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / (sd / math.sqrt(n))
        p = _betainc((n - 1) / 2.0, 0.5, (n - 1) / (n - 1 + t * t))  # = 2 P(T > |t|), without 1 - cdf cancelling
    return {"n": n, "mean": mean, "t": t, "df": n - 1, "p": p, "significant": p < ALPHA}


# ------------------------------------------------------------- eval rows
#: (key, better direction, kind): "value" metrics are already distances to dense on the same sample (PSNR, SSIM,
#: LPIPS); "delta" metrics are the row's per-sample value minus dense's (ground truth, CLIP, seconds).
METRICS = (("groundtruth", 1, "delta"), ("psnr", 1, "value"), ("ssim", 1, "value"), ("lpips", -1, "value"),
           ("clip", 1, "delta"), ("time_transformer", -1, "delta"), ("time_total", -1, "delta"))
INDISTINGUISHABLE = "indistinguishable from dense (within the dense-vs-dense floor)"


def _sample_value(sample: dict, key: str) -> Optional[float]:
    if key == "groundtruth":
        ok = (sample.get("groundtruth_ok") or {}).get("all_ok")
        return None if ok is None else float(ok)
    value = sample.get(key)
    return None if value is None else float(value)


def per_sample(row: dict, dense: dict, key: str, kind: str) -> List[Optional[float]]:
    """The row's per-sample paired values of one metric (aligned with dense's samples)."""
    values = [_sample_value(s, key) for s in row.get("samples") or []]
    if kind == "value":
        return values
    base = [_sample_value(s, key) for s in dense.get("samples") or []]
    return [None if v is None or b is None else v - b for v, b in zip(values, base)]


def _floor_reach(floors: List[dict], key: str) -> Optional[float]:
    """How far dense moves from dense on a delta metric: the largest |interval end| of the floor rows."""
    reach = [max(abs(s["ci"][0]), abs(s["ci"][1])) if s.get("ci") else abs(s["mean"])
             for f in floors for s in [(f.get("paired") or {}).get(key)] if s]
    return max(reach) if reach else None


def analyse(rows: List[dict], *, seed: int = 0) -> None:
    """Paired statistics of eval rows, written into them: ``row["paired"][metric]`` (:func:`summarize` of
    the per-sample differences against dense, clustered by prompt), ``row["tests"][metric]`` (the paired
    t-test against the best other method row) and ``row["verdict"][metric]``.

    ``rows[0]`` is dense; rows with ``"floor"`` set are the dense-vs-dense floor. A delta metric is
    ``indistinguishable`` when its mean lies within the floor's reach (the largest interval end of the
    floor rows), ``better``/``worse`` when its interval excludes 0 beyond the floor, else ``not
    significant``. A distance metric (PSNR, SSIM, LPIPS) is indistinguishable unless it is significantly
    farther from dense than the backend floor (paired test against that row), else ``differs``.
    """
    dense = rows[0]
    scored = [r for r in rows[1:] if r.get("samples")]
    for r in scored:
        _check_aligned(r, dense)
    floors = [r for r in scored if r.get("floor")]
    backend_floor = next((r for r in floors if r["floor"] == "backend"), None)
    methods = [r for r in scored if not r.get("floor")]
    clusters = [s["prompt"] for s in dense.get("samples") or []]
    for key, direction, kind in METRICS:
        values = {id(r): per_sample(r, dense, key, kind) for r in scored}
        for r in scored:
            summary = summarize(values[id(r)], clusters[:len(values[id(r)])], seed=seed)
            if summary is not None:
                r.setdefault("paired", {})[key] = summary
        # Another backend's speed is a real difference, not noise: times are judged against the seed floor.
        reach = _floor_reach([f for f in floors if not key.startswith("time") or f["floor"] == "seed"], key) \
            if kind == "delta" else None
        ranked = sorted((r for r in methods if key in (r.get("paired") or {})),
                        key=lambda r: -direction * r["paired"][key]["mean"])
        for r in methods:
            summary = (r.get("paired") or {}).get(key)
            if summary is None:
                continue
            others = [o for o in ranked if o is not r]
            if others:
                test = paired_test(values[id(r)], values[id(others[0])])
                if test is not None:
                    r.setdefault("tests", {})[key] = {"against": others[0]["label"], **test}
            r.setdefault("verdict", {})[key] = _verdict(summary, kind, direction, reach, values[id(r)],
                                                        values.get(id(backend_floor)) if backend_floor else None)


def _check_aligned(row: dict, dense: dict) -> None:
    """Sample i of ``row`` and of ``dense`` from one (prompt, seed): the statistics pair them by position.
    ValueError naming the row and sample; before, rows whose samples were in another order (merged, sorted or cut
    results) were paired prompt against another prompt, and every difference and verdict was wrong."""
    keys = [[(s.get("prompt"), s.get("seed")) for s in r.get("samples") or []] for r in (row, dense)]
    if keys[0] == keys[1]:
        return
    i = next((i for i, (a, b) in enumerate(zip(*keys)) if a != b), min(map(len, keys)))
    found = (f"its sample {i} is (prompt, seed) {keys[0][i]!r:.80}, dense's {keys[1][i]!r:.80}"
             if i < min(map(len, keys)) else f"it has {len(keys[0])} samples, dense {len(keys[1])}")
    raise ValueError(f"analyse: row {row.get('label')!r} is not paired with dense ({found}); give every row the "
                     "samples of rows[0] in its order (sort each row's samples by dense's prompt and seed)")


def _verdict(summary: dict, kind: str, direction: int, reach, values, floor_values) -> str:
    ci = summary.get("ci")
    if kind == "value":
        if floor_values is None:
            return "no backend floor to compare with"
        test = paired_test(values, floor_values)
        if test is None:
            return "too few pairs"
        if test["significant"] and direction * test["mean"] < 0:
            return "differs from dense (beyond the dense-vs-dense floor)"
        return INDISTINGUISHABLE
    if reach is not None and abs(summary["mean"]) <= reach:
        return INDISTINGUISHABLE
    if ci is None:
        return "too few pairs"
    if ci[0] > 0 or ci[1] < 0:
        return "better than dense" if direction * summary["mean"] > 0 else "worse than dense"
    return "not significant"
