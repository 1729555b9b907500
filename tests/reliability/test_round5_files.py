"""Issue 47, files: a PNG output killed mid-write, a reader of a plan beside a half-committed report, a journal
in a copied folder. Each case is the fault as a user meets it (a killed ``generate``/``calibrate``, a copied
folder), and ends in the old complete artefact, the new one, or one line naming the file."""

import json
import shutil

import numpy as np
import pytest

from dit_accel import atomic_files as _io
from dit_accel.cli.main import main
from dit_accel.io import load_video, save_video
from dit_accel.plans.sparse_plan import SparsePlan

from .faults import kill_points, run_killed, write_points

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "tiny-wan", "--frames", "9", "--height", "32", "--width", "64", "--steps", "2", "--quiet"]


def _generate(out, seed):
    assert main(["generate", *TINY, "--seed", str(seed), "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def frame_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    refs = {}
    for seed in (0, 1):
        _generate(root / f"seed{seed}", seed)
        refs[seed] = load_video(root / f"seed{seed}")
        assert len(refs[seed]) == 9
    assert all(not np.array_equal(a, b) for a, b in zip(refs[0], refs[1]))  # every frame tells the runs apart
    return root, refs


@pytest.mark.parametrize("layout", ["folder", "sequence"])
def test_a_killed_png_output_loads_as_one_run_never_a_mix(tmp_path, frame_runs, layout):
    """``generate --out frames/`` (or ``--out x.png``) over an earlier output, killed at every write point."""
    root, refs = frame_runs

    def target(case):
        return case / "frames" if layout == "folder" else case / "x.png"

    def first(case):
        if layout == "folder":
            shutil.copytree(root / "seed0", target(case))
        else:
            save_video(refs[0], target(case))

    count = tmp_path / "count"
    count.mkdir()
    first(count)
    total = write_points(lambda: _generate(target(count), 1))
    assert total >= 9
    seen = set()
    for k in kill_points(total, 8, seed=47):
        case = tmp_path / f"kill{k}"
        case.mkdir()
        first(case)
        assert run_killed(lambda: _generate(target(case), 1), k) == "killed"
        frames = load_video(target(case))
        seed = next((s for s, ref in refs.items() if np.array_equal(frames, ref)), None)
        assert seed is not None, f"kill at write point {k} of {total}: a mix of two runs loaded without an error"
        seen.add(seed)
    assert seen == {0, 1}


def test_a_shorter_png_output_killed_after_its_commit_has_no_frames_of_the_longer_one(tmp_path):
    rng = np.random.default_rng(0)
    long, short = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    for k in range(1, 12):
        out = tmp_path / f"k{k}" / "frames"
        save_video(long, out)
        if run_killed(lambda: save_video(short, out), k) == "finished":
            break
        got = load_video(out)
        assert np.array_equal(got, long) or np.array_equal(got, short), k


# ------------------------------------------------------------------ readers finish a pending commit
def _plan(window) -> SparsePlan:
    return SparsePlan.from_json({"format": "dit_accel.sparse_plan", "format_version": 1, "num_layers": 2,
                                 "phases": [{"steps": [0, None], "default": {"method": "dense"},
                                             "layers": {"1": {"method": "tile", "tile": [1, 4, 4],
                                                              "window": [1, window, window]}}}]})


def _write_set(folder, window, label):
    from dit_accel.calibrate.run import write_outputs

    write_outputs(folder / "plan.json", folder / "plan_report", _plan(window),
                  {"label": label, "phase_tables": []}, {})


def test_a_plan_read_after_calibrate_was_killed_past_its_commit_point_comes_with_its_own_report(tmp_path,
                                                                                                 monkeypatch):
    """calibrate killed after the plan's rename and before the report's: SparsePlan.load (generate --plan)
    finishes the commit, so the plan beside the report is the report's plan."""
    import dit_accel.calibrate.report as run  # (where write_outputs renders them)

    monkeypatch.setattr(run, "render_report", lambda result: f"# {result['label']} {result['plan_sha256']}\n")
    monkeypatch.setattr(run, "heatmap_png", lambda tables, densities, sha: sha.encode())
    _write_set(tmp_path / "base", 1, "old")
    total = write_points(lambda: _write_set(tmp_path / "base", 2, "new"))
    checked = 0
    for k in range(1, total + 1):
        case = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "base", case)
        _write_set(case, 1, "old")
        assert run_killed(lambda: _write_set(case, 2, "new"), k) in ("killed", "finished")
        if not (case / ".plan.json.dit_accel-commit.json").exists():
            continue
        checked += 1
        plan = SparsePlan.load(case / "plan.json")  # what generate --plan does
        report = json.loads((case / "plan_report" / "calibration.json").read_text())
        assert report["plan_sha256"] == plan.content_hash(), k
        assert not (case / ".plan.json.dit_accel-commit.json").exists()
    assert checked >= 2  # kills after the commit point were exercised


def test_a_pending_commit_a_reader_cannot_finish_is_refused_naming_the_plan(tmp_path):
    folder = tmp_path / "out"
    _write_set_plain(folder, 1)
    journal = folder / ".plan.json.dit_accel-commit.json"
    journal.write_text(json.dumps({"commit": [["/elsewhere/.dit_accel-tmp-1-x-y-plan.json", "/elsewhere/plan.json"]]}))
    with pytest.raises(ValueError) as err:
        SparsePlan.load(folder / "plan.json")
    assert "plan.json" in str(err.value) and "unfinished commit" in str(err.value) and "\n" not in str(err.value)


def _write_set_plain(folder, window):
    folder.mkdir(parents=True, exist_ok=True)
    _io.commit_files({folder / "plan.json": json.dumps(_plan(window).to_json()),
                      folder / "report" / "note.md": f"window {window}\n"}, _io.commit_journal(folder / "plan.json"))


# ------------------------------------------------------------------ journals name files relative to their folder
def test_finishing_a_journal_in_a_copied_folder_never_touches_the_original(tmp_path):
    """An eval run killed past its commit point, its folder copied, eval run on the copy: the copy's files are
    finished, the original's stay as they were."""
    original = tmp_path / "run"
    original.mkdir()
    (original / "results.json").write_text("old\n")
    journal = _io.commit_journal(original / "results.json")

    def killed_writer():
        _io.commit_files({original / "results.json": "new\n", original / "report.md": "new\n"}, journal)

    total = write_points(lambda: None)
    assert total == 0
    for k in range(1, 8):
        shutil.rmtree(original)
        original.mkdir()
        (original / "results.json").write_text("old\n")
        if run_killed(killed_writer, k) == "finished":
            break
        if not journal.exists():
            continue
        before = {p.name: p.read_bytes() for p in original.iterdir()}
        copy = tmp_path / f"copy{k}"
        shutil.copytree(original, copy)
        _io.finish_commit(_io.commit_journal(copy / "results.json"))
        assert {p.name: p.read_bytes() for p in original.iterdir()} == before, k  # the original untouched
        assert (copy / "results.json").read_text() == "new\n"
        assert not any(_io.is_temp_name(p) for p in copy.iterdir())


def test_a_journal_naming_files_outside_its_folder_is_refused(tmp_path):
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "a.json").write_text("keep\n")
    tmp = _io.temp_name(outside / "a.json")
    tmp.write_text("evil\n")
    folder = tmp_path / "run"
    folder.mkdir()
    journal = _io.commit_journal(folder / "results.json")
    for pair in ([str(tmp), str(outside / "a.json")], [f"../victim/{tmp.name}", "../victim/a.json"]):
        journal.write_text(json.dumps({"commit": [pair], "folder": "/somewhere/else"}))
        with pytest.raises(_io.BadFileError, match="outside its folder"):
            _io.finish_commit(journal)
        assert (outside / "a.json").read_text() == "keep\n"


# ------------------------------------------------------------------ eval cache: wrong size, temporaries of killed writers
def test_a_wrong_size_eval_cache_entry_names_the_file_and_is_generated_again(tmp_path):
    from dit_accel.eval.runner import EvalSettings, load_method_specs, run_eval
    from dit_accel.models.tiny import build_tiny_pipeline

    folder = tmp_path / "tiny-wan"
    build_tiny_pipeline("tiny-wan").save_pretrained(folder)
    specs = load_method_specs(["gna"], None, defaults={"gna": {"kernel_size": (2, 2, 2)}})

    def run(out, width, log):
        settings = EvalSettings(model=str(folder), prompts=["a red cat"], seeds=[0], frames=9, height=32,
                                width=width, steps=2, warmup=0)
        return run_eval(settings, specs, out, lpips=False, log=log.append)

    first = run(tmp_path / "a", 64, [])
    run(tmp_path / "b", 48, [])
    (entry,) = sorted((tmp_path / "a" / "cache").glob("dense_*.npz"))
    (other,) = sorted((tmp_path / "b" / "cache").glob("dense_*.npz"))
    shutil.copy(other, entry)  # an entry of another size under this run's key
    log = []
    again = run(tmp_path / "a", 64, log)
    warning = [line for line in log if entry.name in line]
    assert len(warning) == 1 and "32x48" in warning[0] and "\n" not in warning[0], log
    assert again["dense_generated"] == 1
    assert [r.get("psnr") for r in again["rows"]] == [r.get("psnr") for r in first["rows"]]


def test_temporaries_of_killed_writers_are_swept_on_the_next_write_to_their_folder(tmp_path):
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    folder = tmp_path / "outputs"
    for k in (1, 2):
        assert run_killed(lambda: save_video(frames, folder / "clip.mp4"), k) == "killed"
    assert run_killed(lambda: save_video(frames, folder / "frames"), 1) == "killed"
    left = [p for p in folder.rglob("*") if _io.is_temp_name(p)]
    assert left  # what a kill leaves
    save_video(frames, folder / "other.gif")
    save_video(frames, folder / "frames")
    assert not [p for p in folder.rglob("*") if _io.is_temp_name(p)]
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f"{_io._TMP_MARK}999999999-{_io._HOST}-abcdef12-dense_x.npz"
    stale.write_bytes(b"half an entry")
    from dit_accel.eval import runner

    class _Stop(Exception):
        pass

    def stop(*a, **k):
        raise _Stop

    import unittest.mock as mock

    with mock.patch.object(runner, "model_fingerprint", stop), pytest.raises(_Stop):
        runner._dense_row(None, None, mock.Mock(model="x"), [], cache, print)
    assert not stale.exists()


def test_eval_compare_reads_a_killed_evals_report_set_whole(tmp_path):
    """``eval --compare`` of a folder whose eval was killed after its commit point reads the new results with
    the new report beside them (the reader finishes the commit), never the new results beside the old report."""
    from dit_accel.eval.compare import load_results

    def results(label):
        return json.dumps({"settings": {"label": label}, "rows": []})

    def write(folder, label):
        _io.commit_files({folder / "results.json": results(label), folder / "report.md": f"# {label}\n"},
                         _io.commit_journal(folder / "results.json"))

    finished_by_reader = 0
    for k in range(1, 8):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        write(folder, "old")
        if run_killed(lambda: write(folder, "new"), k) == "finished":
            break
        pending = _io.commit_journal(folder / "results.json").exists()
        label = load_results(folder)["settings"]["label"]
        assert (folder / "report.md").read_text() == f"# {label}\n", k
        finished_by_reader += pending
    assert finished_by_reader >= 1
