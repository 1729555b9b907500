"""A killed calibrate (and eval) leaves its outputs as one unit: the previous complete set or the new one, and the
next run leaves no temporaries. Killed at every write point of the writers (tests/reliability/faults.py)."""

import json

import pytest

from dit_accel import atomic_files as _io
from dit_accel.calibrate.run import OUTPUT_FILES, recover_outputs, write_outputs
from dit_accel.methods import Tile
from dit_accel.plans.sparse_plan import Phase, SparsePlan

from .faults import run_killed, write_points


def _plan(window) -> SparsePlan:
    return SparsePlan((Phase(0, 2, {0: Tile(tile=(1, 4, 4), window=window)}),), num_layers=2, num_heads=2)


def _result(label: str) -> dict:
    """A calibration result with the keys report.md renders (the numbers are placeholders of this test)."""
    return {"settings": {"model": "tiny-shapes", "steps": 2, "heads": 2, "device": "cpu"},
            "plan_path": "plan.json", "plan_summary": {"phases": 1, "lines": []}, "budget": {"min_psnr": 30.0},
            "objective": label, "cost_model": {"terms": "tiles"}, "cost_terms_note": None,
            "candidates": [{"label": "dense"}], "buckets": [[0, 2]], "step_weights": None, "layer_weights": None,
            "samples": {}, "dense": {"attention_ms": 1.0, "modelled_ms": 1.0},
            "final": {"psnr": 31.0, "psnr_worst": 30.5, "ssim": 0.99, "attention_ms": 0.5, "modelled_ms": 0.5,
                      "warmup_steps": 0, "max_layer_error": 0.1},
            "trace": [], "phase_tables": [{"steps": [0, 2], "labels": [["dense", "dense"], ["dense", "dense"]]}],
            "groundtruth": None, "seconds": {"total": 1.0}, "prompts_sha256": "0" * 64}


def _write(folder, which):
    plan = _plan((1, 3, 3) if which == "old" else (1, 1, 1))
    write_outputs(folder / "plan.json", folder / "plan_report", plan, _result(which), {"dense": 1.0})


def _state(folder) -> str:
    """"old" or "new" when the plan and every report file belong to one write, else a description of the mix."""
    plan = SparsePlan.load(folder / "plan.json")
    which = "old" if plan.to_json()["phases"][0]["layers"]["0"]["window"] == [1, 3, 3] else "new"
    report = folder / "plan_report"
    calibration = json.loads((report / "calibration.json").read_text())
    assert {p.name for p in report.iterdir() if not p.name.startswith(".")} == set(OUTPUT_FILES)
    seen = {"plan": which, "calibration.json": calibration["objective"],
            "plan_sha256": "match" if calibration["plan_sha256"] == plan.content_hash() else "stale",
            "report.md": "old" if "Objective: old" in (report / "report.md").read_text() else "new",
            "heatmap.png": "match" if plan.content_hash().encode() in (report / "heatmap.png").read_bytes() else "stale"}
    if set(seen.values()) <= {which, "match"}:
        return which
    return str(seen)


def _leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith("."))


def test_a_complete_write_names_the_plan_hash_in_every_file_and_leaves_no_temporaries(tmp_path):
    _write(tmp_path, "old")
    assert _state(tmp_path) == "old"
    _write(tmp_path, "new")
    assert _state(tmp_path) == "new" and _leftovers(tmp_path) == []


def test_a_kill_at_every_write_point_leaves_the_old_set_or_the_new_one(tmp_path):
    total = write_points(lambda: _write(tmp_path / "count", "new"))
    assert total >= 6  # four files, the journal, four renames, the journal's removal
    outcomes = set()
    for k in range(1, total + 1):
        folder = tmp_path / f"kill{k}"
        _write(folder, "old")
        assert run_killed(lambda: _write(folder, "new"), k) == "killed"
        if not _io.commit_journal(folder / "plan.json").exists():
            # no commit record: the renames are all done or none started; nothing to finish
            at_rest = _state(folder)
            assert at_rest in ("old", "new"), (k, at_rest)
        recover_outputs(folder / "plan.json", folder / "plan_report")  # what the next run does first
        state = _state(folder)
        assert state in ("old", "new"), (k, state)
        assert _leftovers(folder) == [], (k, _leftovers(folder))
        outcomes.add(state)
        _write(folder, "new")  # and the next run writes over it
        assert _state(folder) == "new" and _leftovers(folder) == []
    assert outcomes == {"old", "new"}  # the kills fell on both sides of the commit point


def test_commit_files_keeps_the_old_set_when_a_writer_raises(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    _io.commit_files({a: "old a", b: "old b"}, _io.commit_journal(a))

    def broken(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        _io.commit_files({a: "new a", b: broken}, _io.commit_journal(a))
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert _leftovers(tmp_path) == []
