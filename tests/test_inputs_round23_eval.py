"""Round 23 ("trust") of the eval inputs: the statistics, the results folders and the eval CLI.

- ``t_ppf``/``t_cdf`` at df = inf (the normal distribution) and huge df; a bad df, p or t named;
- ``paired_test``/``summarize``/``bootstrap_ci`` take any iterable of numbers, read once, and name a bad entry
  (a nested list, a 2-D array, text, a bool) or bad cluster labels;
- ``load_results`` names a path that is none, not there, or a file, and takes a results.json itself;
- ``dit-accel eval --quiet`` turns the eval's progress bars off;
- a ``--stacks`` row whose cache needs cache-dit names ``--stacks`` (not ``--cache``) and how to install it.
"""
import json
import math

import numpy as np
import pytest

from dit_accel.cli.main import main
from dit_accel.eval import compare, stats


# ------------------------------------------------------------------ Student's t
@pytest.mark.parametrize("df", [math.inf, 1e300, 1e9], ids=["inf", "1e300", "1e9"])
def test_t_quantile_at_infinite_df_is_the_normal_one(df):
    """Before: t_ppf(0.975, inf) was -1.0 and t_cdf(1, inf) NaN (the normal's 1.95996 and 0.84134 are right)."""
    assert stats.t_ppf(0.975, df) == pytest.approx(1.959963984540054, abs=1e-8)
    assert stats.t_cdf(1.0, df) == pytest.approx(0.8413447460685429, abs=1e-8)


@pytest.mark.parametrize("p, df, name", [(0.975, 0, "df"), (0.975, -1, "df"), (0.975, math.nan, "df"),
                                         (0.975, "3", "df"), (0.975, True, "df"), (math.nan, 3, "p"),
                                         (1.5, 3, "p"), (0.0, 3, "p"), ("a", 3, "p")],
                         ids=["df0", "df-neg", "df-nan", "df-str", "df-bool", "p-nan", "p-big", "p0", "p-str"])
def test_t_quantile_names_a_bad_argument(p, df, name):
    """Before: df='3' or p='a' were a TypeError from a comparison, df=nan a NaN quantile."""
    with pytest.raises(ValueError, match=rf"^{name}=.* is invalid: .*(number > 0|probability in \(0, 1\))"):
        stats.t_ppf(p, df)


def test_t_cdf_names_a_nan_t():
    with pytest.raises(ValueError, match=r"^t=nan is invalid"):
        stats.t_cdf(math.nan, 3)
    with pytest.raises(ValueError, match=r"^df=nan is invalid"):
        stats.t_cdf(1.0, math.nan)


# ------------------------------------------------------------------ samples of any iterable
def test_statistics_take_generators_and_arrays_read_once():
    """Before: a generator was "object of type 'generator' has no len()"."""
    a, b = [1.0, 2.0, 3.0, 4.5], [1.1, 2.3, 2.9, 4.0]
    want = stats.paired_test(a, b)
    assert stats.paired_test((x for x in a), iter(b)) == want
    assert stats.paired_test(np.array(a), tuple(b)) == want
    assert stats.summarize(x for x in a)["mean"] == pytest.approx(np.mean(a))
    assert stats.summarize(a, (c for c in "aabb"))["n"] == 4
    assert stats.bootstrap_ci(x for x in a) == stats.bootstrap_ci(a)


@pytest.mark.parametrize("bad, entry, hint", [
    ([[1, 2], [3, 4]], r"\[0\] is \[1, 2\]", "flatten"),
    (np.ones((3, 2)), r"\[0\] is array", "flatten"),
    (np.ones((3, 1)), r"\[0\] is array", "flatten"),
    (["1", "2", "3"], r"\[0\] is '1'", "float()"),
    ([True, False, True], r"\[0\] is True", "float(x) for a bool"),
], ids=["nested", "2d", "column", "text", "bools"])
def test_statistics_name_an_entry_that_is_no_number(bad, entry, hint):
    """Before: a list of lists was "float() argument must be ... not 'list'", a 2-D array's rows were summed by the
    bootstrap without a word, and text of numbers ("1") and bools were taken as numbers."""
    with pytest.raises(ValueError, match=rf"^a{entry}.*expected a number") as err:
        stats.paired_test(bad, [0.0] * len(bad))
    assert hint in str(err.value)
    with pytest.raises(ValueError, match=rf"^values{entry}"):
        stats.summarize(bad)
    with pytest.raises(ValueError, match=rf"^values{entry}"):
        stats.bootstrap_ci(bad)


@pytest.mark.parametrize("bad", [5, None, "0.1,0.2", {0: 0.1, 1: 0.2}, {0.1, 0.2}, np.float64(3.0)],
                         ids=["int", "none", "str", "dict", "set", "scalar"])
def test_statistics_name_samples_that_are_no_sequence(bad):
    """Before: "object of type 'int' has no len()", or a string's characters read one by one."""
    with pytest.raises(ValueError, match=r"^b=.* is invalid: an ordered sequence of numbers"):
        stats.paired_test([1.0, 2.0], bad)
    with pytest.raises(ValueError, match=r"^values=.* is invalid: an ordered sequence of numbers"):
        stats.summarize(bad)


def test_paired_test_refuses_samples_of_other_lengths():
    with pytest.raises(ValueError, match=r"aligned samples .*got 3 and 2"):
        stats.paired_test(iter([1.0, 2.0, 3.0]), iter([1.0, 2.0]))


@pytest.mark.parametrize("clusters, match", [
    ([[1], [2], [3]], r"^clusters\[0\] is \[1\]: a label must be hashable"),
    ("abc", r"^clusters='abc' is invalid: one label per value"),
    (5, r"^clusters=5 is invalid"),
    (["a", "b"], r"^clusters: 2 labels for 3 values"),
], ids=["unhashable", "str", "int", "short"])
def test_cluster_labels_are_named(clusters, match):
    """Before: "unhashable type: 'list'", "'int' object is not iterable", or a string's letters taken as labels."""
    with pytest.raises(ValueError, match=match):
        stats.summarize([0.1, 0.2, 0.3], clusters)
    with pytest.raises(ValueError, match=match):
        stats.bootstrap_ci([0.1, 0.2, 0.3], clusters)


def test_bootstrap_drops_missing_values_as_summarize_does():
    """Before: a None or NaN made both ends of the bootstrap interval NaN."""
    assert stats.bootstrap_ci([1.0, None, 3.0, math.nan, 2.0]) == stats.bootstrap_ci([1.0, 3.0, 2.0])


# ------------------------------------------------------------------ results folders
def _results(folder):
    folder.mkdir()
    rows = [{"label": "tile", "samples": [{"prompt": "p", "seed": s, "psnr": 30.0 + s} for s in (0, 1)]}]
    (folder / "results.json").write_text(json.dumps({"settings": {"model": "tiny-shapes"}, "rows": rows}))
    return folder


@pytest.mark.parametrize("folder", [None, 5, {"rows": []}], ids=["none", "int", "dict"])
def test_load_results_names_an_argument_that_is_no_path(folder):
    """Before: os.fspath's "expected str, bytes or os.PathLike object, not NoneType"."""
    with pytest.raises(ValueError, match=r"^folder=.* is invalid: load_results takes the path .*dit-accel eval --out"):
        compare.load_results(folder)


def test_load_results_names_a_missing_folder_a_file_and_an_empty_folder(tmp_path):
    """Before: all three were "no results.json there"."""
    with pytest.raises(ValueError, match=r"nope: no such folder, so no results.json there; give the --out folder"):
        compare.load_results(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt: a file, not a folder; give the --out folder"):
        compare.load_results(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no results.json there"):
        compare.load_results(tmp_path / "empty")


def test_load_results_takes_the_results_file_itself(tmp_path, capsys):
    folder = _results(tmp_path / "a")
    assert compare.load_results(folder / "results.json") == compare.load_results(folder)
    # --compare of a folder and its own results.json: the same run, refused as two names of one folder
    assert main(["eval", "--compare", str(folder), str(folder / "results.json")]) == 2
    assert "both name the same folder" in capsys.readouterr().err


# ------------------------------------------------------------------ --quiet and the progress bars
def test_quiet_turns_the_eval_progress_bars_off(capsys):
    """Before: `dit-accel eval --quiet` still drew the dense, floor and methods bars on stderr."""
    from dit_accel.cli.eval import _log
    from dit_accel.eval.report import ProgressLine, QuietLog
    from dit_accel.eval.runner import _method_rows

    quiet = _log(True)
    assert isinstance(quiet, QuietLog) and _log(False) is print
    assert _method_rows(None, None, None, [("p", 0)], [], quiet) == []
    assert capsys.readouterr().err == ""
    _method_rows(None, None, None, [("p", 0)], [], print)
    assert "methods" in capsys.readouterr().err  # (without --quiet the bar stays)
    quiet(ProgressLine("dense: 1 generated"))
    quiet("tile: failed: boom")
    assert capsys.readouterr().out == "tile: failed: boom\n"


# ------------------------------------------------------------------ --stacks without cache-dit
def test_stacks_without_cache_dit_names_the_stack_and_the_install(tmp_path, capsys, monkeypatch):
    """Before: `eval --stacks sla+dbcache` said "--cache dbcache: cache-dit is not installed", a flag not given."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit"
                        else find_spec(name, *a))
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-shapes", "--stacks", "sla,sla+dbcache", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--stacks 'sla+dbcache': cache-dit is not installed" in err and "pip install cache-dit" in err
    assert "--cache" not in err and not out.exists()
    assert main(["eval", "--model", "tiny-shapes", "--methods", "sla", "--cache", "dbcache", "--out", str(out)]) == 2
    assert "--cache dbcache: cache-dit is not installed" in capsys.readouterr().err  # (the flag given: --cache)


# ------------------------------------------------------------------ handle statistics
def test_layer_summary_of_rows_without_sparse_calls():
    """Before: rows with a density but no sparse call (merged or hand-made) were a ZeroDivisionError."""
    from dit_accel.pipelines.stats import Stats

    rows = [{"layer": "a", "density": 0.5, "sparse_calls": 0, "dense_calls": 2, "time_ms": None,
             "dense_reason": None, "backend": None}]
    summary = Stats.summarize(rows)
    assert summary["mean_density"] is None and summary["sparsity"] is None and summary["dense_calls"] == 2
    rows.append({**rows[0], "layer": "b", "density": 0.25, "sparse_calls": 4})
    assert Stats.summarize(rows)["mean_density"] == 0.25
