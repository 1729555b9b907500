"""``dit-accel eval --compare A B``: the paired comparison of two eval results folders.

Both folders must hold results of the same prompts and seeds (in any order), made with the same model, sizes, steps,
guidance, max_sequence_length and dtype (else a one-line refusal naming what differs). Rows with the same label are paired sample by sample (same prompt and seed); for each metric
the table gives A's and B's means and the mean of B - A with its 95% t-interval and paired-test p. Times are compared
only between runs on one device (GPU or CPU model, as the provenance records it); else :func:`unpaired_rows` says so.

Example::

    dit-accel eval --compare eval_before/ eval_after/
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

from .stats import METRICS, paired_test, summarize

__all__ = ["load_results", "compare_results", "unpaired_rows", "format_comparison"]


def load_results(folder) -> dict:
    """results.json of an eval folder (or that file itself); ValueError naming the folder when it is missing or
    unreadable, or ``folder`` is no path."""
    from ..atomic_files import BadFileError, commit_journal, finish_for_reader

    path = _results_path(folder)
    journal = commit_journal(path)
    if journal.exists():  # an eval killed after its commit point: its report set goes in whole first
        try:
            finish_for_reader(journal, path)
        except BadFileError as err:
            raise ValueError(f"--compare {err}") from None
    if not path.is_file():
        raise ValueError(f"--compare {folder}: no results.json there; expected a `dit-accel eval --out` folder")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--compare {path}: cannot be read ({type(err).__name__}); run the eval again") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list) \
            or not isinstance(results.get("settings"), dict):
        raise ValueError(f"--compare {path}: not a dit-accel eval results file (no settings and rows)")
    problem = _rows_problem(results["rows"])
    if problem:  # else a KeyError or AttributeError traceback half-way through the pairing
        raise ValueError(f"--compare {path}: not a dit-accel eval results file ({problem}); compare the "
                         "results.json of two `dit-accel eval --out` runs")
    return results


def _results_path(folder) -> Path:
    """The results.json of ``folder`` (or that file itself, given as such); ValueError naming the argument or the
    path. Before: None was os.fspath's TypeError, and a folder that is not there or a file "no results.json there"."""
    import os

    if not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"folder={folder!r:.80} is invalid: load_results takes the path (a str or os.PathLike) of "
                         "a `dit-accel eval --out` folder" + (" and reads its results.json; this is already "
                                                              "results" if isinstance(folder, dict) else ""))
    here = Path(folder)
    if here.is_file() and here.name == "results.json":  # (the file itself: its folder is meant)
        return here
    if not here.exists():
        raise ValueError(f"--compare {folder}: no such folder, so no results.json there; give the --out folder of a "
                         "`dit-accel eval` run")
    if not here.is_dir():
        raise ValueError(f"--compare {folder}: a file, not a folder; give the --out folder of a `dit-accel eval` "
                         "run (the folder that holds its results.json)")
    return here / "results.json"


def _rows_problem(rows: list) -> str:
    """What the pairing needs and a row lacks: a label, and samples of a prompt and an integer seed each."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("label"), str):
            return f"row {i} has no label"
        samples = row.get("samples") or []
        if not isinstance(samples, list) or not all(
                isinstance(s, dict) and isinstance(s.get("prompt"), str) and isinstance(s.get("seed"), int)
                and not isinstance(s.get("seed"), bool) for s in samples):
            return f"row {row['label']!r} has samples without a prompt and an integer seed"
        for sample in samples:
            truth = sample.get("groundtruth_ok")  # (was float()'s or .get's error, naming no row)
            ok = truth.get("all_ok") if isinstance(truth, dict) else None
            if truth is not None and not (isinstance(truth, dict) and (ok is None or isinstance(ok, bool))):
                return (f"row {row['label']!r} has a groundtruth_ok of {truth!r:.60}, not a dict whose all_ok is "
                        "true, false or null")
            # (json reads Infinity: summarize refused it as "values[1] is inf", naming no row or file)
            bad = [key for key, _, _ in METRICS if key != "groundtruth" and sample.get(key) is not None
                   and (isinstance(sample[key], bool) or not isinstance(sample[key], (int, float))
                        or math.isinf(sample[key]))]
            if bad:
                finite = "finite " if isinstance(sample[bad[0]], float) else ""
                return (f"row {row['label']!r} has a {bad[0]} of {sample[bad[0]]!r}, not a {finite}number (prompt "
                        f"{sample['prompt']!r:.40}, seed {sample['seed']}; null for a missing one)")
    return ""


def _check_results(results, name: str) -> None:
    """``results`` a dict that :func:`load_results` returns; ValueError saying so (before: a folder's path was an
    AttributeError "'str' object has no attribute 'get'", a dict of something else a KeyError 'rows')."""
    import os

    if isinstance(results, (str, os.PathLike)):
        raise ValueError(f"{name}={os.fspath(results)!r} is a path: compare_results and unpaired_rows take "
                         f"results, read with load_results({os.fspath(results)!r}) (the folder of a `dit-accel eval "
                         "--out` run)")
    problem = "" if isinstance(results, dict) and isinstance(results.get("rows"), list) \
        and isinstance(results.get("settings"), dict) else "no settings and rows"
    problem = problem or _rows_problem(results["rows"])
    if problem:
        raise ValueError(f"{name} is not a dit-accel eval results dict ({problem}): pass load_results(folder), or "
                         "the dict run_eval returns")


def _values(row: dict, key: str) -> dict:
    out = {}
    for s in row.get("samples") or []:
        if key == "groundtruth":
            value = (s.get("groundtruth_ok") or {}).get("all_ok")
        else:
            value = s.get(key)
        if value is not None and not math.isnan(value):  # (a NaN, as None, is a missing sample: kept, it made A's
            out[(s["prompt"], int(s["seed"]))] = float(value)  # mean NaN, B's over a pair that B - A left out)
    return out


def compare_results(a: dict, b: dict) -> List[dict]:
    """Per common row label and metric: ``label``, ``metric``, ``a``, ``b`` (means), ``diff`` (summary of
    B - A per sample) and ``test``. ValueError when the prompts or seeds differ, or no label is shared."""
    from .provenance import same_inputs

    _check_results(a, "a")
    _check_results(b, "b")
    why = same_inputs(a, b)
    if why:
        raise ValueError(f"--compare: refusing to pair these folders: {why}")
    labels_b = {r["label"]: r for r in b["rows"] if r.get("samples")}
    common = [r for r in a["rows"] if r.get("samples") and r["label"] in labels_b]
    if not common:
        raise ValueError("--compare: the two folders share no row label with scored samples "
                         f"(A: {', '.join(r['label'] for r in a['rows'])}; B: {', '.join(labels_b) or 'none'})")
    out = []
    apart = _devices_apart(a, b)
    for row_a in common:
        row_b = labels_b[row_a["label"]]
        for key, direction, _ in METRICS:
            if apart and key in _TIMES:  # (the difference would be the machines', not the change's)
                continue
            va, vb = _values(row_a, key), _values(row_b, key)
            keys = [k for k in va if k in vb]
            if not keys:
                continue
            xa, xb = [va[k] for k in keys], [vb[k] for k in keys]
            out.append({"label": row_a["label"], "metric": key, "direction": direction,
                        "a": sum(xa) / len(xa), "b": sum(xb) / len(xb),
                        "diff": summarize([y - x for x, y in zip(xa, xb)], [k[0] for k in keys]),
                        "test": paired_test(xb, xa)})
    return out


def unpaired_rows(a: dict, b: dict) -> List[str]:
    """The rows of either folder that :func:`compare_results` could not pair, one line each: a row that failed (no
    scored samples) in A or B, or a label only one folder has. Else a method that broke after a change would leave
    the table without a word."""
    _check_results(a, "a")
    _check_results(b, "b")
    rows = {side: {r["label"]: r for r in results["rows"]} for side, results in (("A", a), ("B", b))}
    apart = _devices_apart(a, b)
    out = [f"times ({', '.join(_TIMES)}): A ran on {apart[0]}, B on {apart[1]}, so their difference is the "
           "devices'; compare the times of two runs on one device"] if apart else []
    for label in dict.fromkeys([*rows["A"], *rows["B"]]):
        present = {side: rows[side].get(label) for side in ("A", "B")}
        missing = [side for side, row in present.items() if row is None]
        if missing:
            out.append(f"{label}: only in {'B' if missing == ['A'] else 'A'}")
            continue
        failed = [f"failed in {side} ({_short(row.get('error'))})" for side, row in present.items()
                  if not row.get("samples")]
        if failed:
            out.append(f"{label}: {', '.join(failed)}")
    return out


_TIMES = ("time_transformer", "time_total")


def _devices_apart(a: dict, b: dict):
    """``(device of A, device of B)`` as their provenance records them (GPU or CPU model) where they differ, else
    None. Before: the times of a CPU and a GPU run were paired as if one change had made the difference."""
    da, db = ((results.get("provenance") or {}).get("device") if isinstance(results.get("provenance"), dict) else None
              for results in (a, b))
    return (da, db) if isinstance(da, str) and isinstance(db, str) and da != db else None


def _short(error) -> str:
    """A row's error on one line (a traceback's text may span several), or what its absence means."""
    return " ".join(error.split())[:120] if isinstance(error, str) else "no scored samples"


def format_comparison(a_dir, b_dir, comparison: List[dict]) -> str:
    from .report import markdown_table

    rows = []
    for c in comparison:
        d, t = c["diff"], c["test"]
        ci = f"[{d['ci'][0]:.4g}, {d['ci'][1]:.4g}]" if d.get("ci") else "-"
        rows.append([c["label"], c["metric"], f"{c['a']:.4g}", f"{c['b']:.4g}", f"{d['mean']:+.4g}", ci,
                     "-" if t is None else f"{t['p']:.3g}",
                     "-" if t is None else ("yes" if t["significant"] else "no")
                     + ("" if d.get("meaningful") else " (n<5: not meaningful)"), str(d["n"])])
    header = ["row", "metric", f"A ({a_dir})", f"B ({b_dir})", "B - A", "95% CI", "p", "significant", "pairs"]
    return markdown_table(header, rows)
