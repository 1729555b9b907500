"""Issue 47 items 5 and 6: the stores in the cache folder (``selfcheck.json``, ``autotune.json``).

- An entry with a missing or mistyped field (an edited file, another version's) is dropped with one warning
  naming the file, and checked or timed again: never a KeyError in the attention call.
- Two processes sharing one cache folder keep each other's entries: each store re-reads and merges the file
  under a lock file before writing. Tested with two real processes.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.kernels import autotune, selfcheck

REPO = Path(__file__).resolve().parents[2]
SHAPE = {"head_dim": 64, "block_q": 64, "block_k": 64}
CPU = torch.device("cpu")


@pytest.fixture()
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.ENV_FAULT, raising=False)
    monkeypatch.delenv(selfcheck.ENV_SELFCHECK, raising=False)
    for module, names in ((selfcheck, ("_MEMORY", "_FAST")), (autotune, ("_MEMORY", "_LOADED"))):
        for name in names:
            monkeypatch.setattr(module, name, {})
    monkeypatch.setattr(selfcheck, "_LOADED", [])
    monkeypatch.setattr(selfcheck, "_WARNED", set())
    monkeypatch.setattr(selfcheck, "_REGISTRY", dict(selfcheck._REGISTRY))
    return tmp_path


def _variant(name, error):
    return selfcheck.register(selfcheck.Variant(
        name=name, family="test", backend="test", applies=lambda device: None,
        check=lambda device, dtype, shape: selfcheck.Result(error, 1e-3, "a test problem")))


@pytest.mark.parametrize("missing", ["error", "tolerance", "problem", "seconds", "ok"])
def test_a_selfcheck_verdict_missing_a_field_is_checked_again_with_one_warning(fresh, missing):
    _variant("test.failing", 1.0)
    key = selfcheck._key("test.failing", CPU, torch.float32, SHAPE)
    entry = {"variant": "test.failing", "ok": False, "error": 1.0, "tolerance": 1e-3, "problem": "p", "seconds": 0.1}
    del entry[missing]
    (fresh / "selfcheck.json").write_text(json.dumps({key: entry}))
    with pytest.warns(dit_accel.DitAccelWarning) as record:
        assert selfcheck.usable("test.failing", CPU, torch.float32, SHAPE) is False
    texts = [str(w.message) for w in record]
    assert any("selfcheck.json" in t and "missing or wrong fields" in t for t in texts), texts
    assert all("\n" not in t for t in texts)
    stored = json.loads((fresh / "selfcheck.json").read_text())[key]
    assert stored["error"] == 1.0 and stored["problem"] == "a test problem"  # checked again, stored whole


@pytest.mark.parametrize("missing", ["date", "times_ms", "choice"])
def test_an_autotune_entry_missing_a_field_is_timed_again_with_one_warning(fresh, missing):
    shape = autotune.ShapeClass(device_name="cpu", torch="t", triton="tr", dit_accel="d", family="block_sparse",
                                dtype="float32", head_dim=64, density="any")
    entry = {"choice": "a", "times_ms": {"a": 1.0, "b": 2.0}, "warmup": 1, "repeats": 1, "rejected": [],
             "skipped": {}, "date": "2026-01-01 00:00 UTC"}
    del entry[missing]
    (fresh / "autotune.json").write_text(json.dumps({shape.key(): entry}))
    with pytest.warns(dit_accel.DitAccelWarning, match="autotune.json.*missing or wrong fields"):
        info = autotune.info()  # dit-accel info read every field: KeyError: 'date'
    assert info["choices"] == {}
    assert autotune.choose(shape, {"a": lambda: 0, "b": lambda: 0}, timer=lambda fn, w, r: 1.0) == "a"
    assert "date" in json.loads((fresh / "autotune.json").read_text())[shape.key()]


# ------------------------------------------------------------------ two processes, one cache folder
WRITER = textwrap.dedent("""
    import sys, torch
    from dit_accel.kernels import autotune, selfcheck
    which, n = sys.argv[1], int(sys.argv[2])
    for i in range(n):
        shape = autotune.ShapeClass(device_name="cpu", torch="t", triton="tr", dit_accel="d", family=which,
                                    dtype="float32", head_dim=16 * (i + 1), density="any")
        autotune.choose(shape, {"a": lambda: 0, "b": lambda: 0}, timer=lambda fn, w, r: 1.0)
        name = f"test.{which}.{i}"
        selfcheck.register(selfcheck.Variant(name=name, family="test", backend="test", applies=lambda d: None,
                                             check=lambda d, t, s: selfcheck.Result(0.0, 1e-3, "p")))
        assert selfcheck.usable(name, "cpu", torch.float32, {"head_dim": 64, "block_q": 64, "block_k": 64})
""")


def test_two_processes_sharing_a_cache_folder_keep_each_others_entries(tmp_path):
    env = {**os.environ, "DIT_ACCEL_CACHE": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(selfcheck.ENV_FAULT, None)
    n = 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, which, str(n)], env=env, stderr=subprocess.PIPE)
             for which in ("first", "second")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    tuned = json.loads((tmp_path / "autotune.json").read_text())
    checked = json.loads((tmp_path / "selfcheck.json").read_text())
    for which in ("first", "second"):
        assert sum(k.split("|")[4] == which for k in tuned) == n, (which, len(tuned))
        assert sum(k.startswith(f"test.{which}.") for k in checked) == n, (which, len(checked))
