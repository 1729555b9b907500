"""One writer per output path: a second writer of a video, a PNG frame folder or a committed file set is refused
with one line, never mixed with the first; and the lock-file fallback of systems without ``fcntl``."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from dit_accel.atomic_files import BusyError, commit_files, commit_journal, lock_name, locked, update_json
from dit_accel.cli.main import main
from dit_accel.videos import load_video, save_video

TINY = ["--model", "tiny-wan", "--frames", "9", "--height", "32", "--width", "64", "--steps", "1", "--quiet"]


@pytest.fixture
def holder(tmp_path):
    """``hold(path)``: another process that holds ``path``'s output lock until the test ends."""
    procs = []

    def hold(path):
        code = textwrap.dedent(f"""
            import sys, time
            from dit_accel.atomic_files import locked
            with locked({str(path)!r}, wait=False):
                print("held", flush=True)
                sys.stdin.read()
        """)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


def _frames(value, n=3):
    return np.full((n, 8, 8, 3), value, dtype=np.uint8)


def test_a_second_generate_into_the_same_out_is_refused_in_one_line(tmp_path, holder, capsys):
    out = tmp_path / "v.mp4"
    save_video(_frames(10), out, fps=8)
    before = out.read_bytes()
    holder(out)  # the first run, still writing
    assert main(["generate", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another writer" in err and str(out) in err and "Traceback" not in err
    assert out.read_bytes() == before and not (tmp_path / "v.mp4.json").exists()


@pytest.mark.parametrize("target", ["frames", "seq.png"])
def test_a_second_writer_of_a_png_output_is_refused_and_the_first_frames_stay(tmp_path, holder, target):
    path = tmp_path / target
    save_video(_frames(10), path, fps=8)
    holder(path)
    with pytest.raises(BusyError, match="another writer .* is writing this output"):
        save_video(_frames(200, 5), path, fps=8)
    assert load_video(path).shape[0] == 3 and int(load_video(path).max()) == 10


def test_a_second_commit_of_one_file_set_is_refused(tmp_path, holder):
    journal = commit_journal(tmp_path / "plan.json")
    holder(journal)
    with pytest.raises(BusyError):
        commit_files({tmp_path / "plan.json": "{}"}, journal)
    assert not (tmp_path / "plan.json").exists()


def test_the_thread_holding_an_output_may_write_it_and_another_thread_may_not(tmp_path):
    out = tmp_path / "frames"
    refused = []

    def other():
        try:
            save_video(_frames(1), out, fps=8)
        except BusyError as err:
            refused.append(err)

    with locked(out, wait=False):
        save_video(_frames(7), out, fps=8)  # the holder itself (generate holds its --out while saving)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(refused) == 1 and int(load_video(out).max()) == 7
    save_video(_frames(9), out, fps=8)  # released
    assert int(load_video(out).max()) == 9


# ----------------------------------------------------------------------------- without fcntl (Windows)
@pytest.fixture
def no_fcntl(monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_file_fallback_names_its_holder_and_is_removed(tmp_path, no_fcntl):
    store = tmp_path / "autotune.json"
    with locked(store):
        text = lock_name(store).read_text().split()
        assert text[0] == str(os.getpid())
    assert not lock_name(store).exists()
    update_json(store, lambda p: {}, lambda d: {**d, "a": 1})
    assert '"a": 1' in store.read_text() and not lock_name(store).exists()


def test_lock_file_fallback_refuses_a_live_holder_at_once(tmp_path, no_fcntl, holder):
    out = tmp_path / "v.mp4"
    lock = lock_name(out)
    holder(out)  # a live process holding it through the fallback too (its lock file exists)
    assert lock.exists()
    with pytest.raises(BusyError, match=f"process {lock.read_text().split()[0]}"):
        save_video(_frames(1), out, fps=8)
    assert not out.exists()


def test_lock_file_fallback_takes_over_the_lock_of_a_dead_process(tmp_path, no_fcntl):
    from dit_accel import atomic_files

    out = tmp_path / "frames"
    lock_name(out).write_text(f"{_dead_pid()} {atomic_files._HOST}\n")
    save_video(_frames(4), out, fps=8)  # not refused: its holder is gone
    assert int(load_video(out).max()) == 4 and not lock_name(out).exists()


def test_lock_file_fallback_waits_for_a_live_holder_then_times_out(tmp_path, no_fcntl):
    from dit_accel import atomic_files

    store = tmp_path / "s.json"
    lock_name(store).write_text(f"{os.getppid()} {atomic_files._HOST}\n")  # alive, and not this process
    with locked(store, timeout=0.2):  # waits, then takes the lock over (a holder stuck past the timeout)
        assert lock_name(store).read_text().split()[0] == str(os.getpid())
    assert not lock_name(store).exists()
