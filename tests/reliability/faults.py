"""Fault injection for the reliability suite: kill a writer at its K-th write point, and damage files.

``run_killed(fn, k)`` forks; the child runs ``fn()`` with ``$DIT_ACCEL_TEST_KILL_AT=k`` (see
:mod:`dit_accel.atomic_files`), so it SIGKILLs itself at the K-th write point of the atomic helpers, after a
temporary file is complete or after a rename: the points where a real kill leaves the most behind.
Forking after the imports and the model set-up keeps each case well under a second for the tiny models.
``write_points(fn)`` runs ``fn()`` in this process and counts its write points, which seeds the choice of
kill points.

``damage(path, kind)``: ``truncated`` (the first half of the bytes), ``empty``, ``binary`` (random bytes with
NULs), or ``garbage`` (text that is not the format).
"""

import os
import random
import signal
import traceback

from dit_accel import atomic_files as _io

KINDS = ("truncated", "empty", "binary", "garbage")


def run_killed(fn, kill_at: int) -> str:
    """``"killed"`` when the child died at write point ``kill_at``, ``"finished"`` when it ran to the end."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.environ[_io.ENV_KILL_AT] = str(kill_at)
            _io._points[0] = 0
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the writer failed (status {status})"
    return "finished"


def write_points(fn) -> int:
    """Run ``fn()`` here and return how many write points it passed."""
    before = os.environ.get(_io.ENV_KILL_AT)
    os.environ[_io.ENV_KILL_AT] = "0"  # counts, never kills
    _io._points[0] = 0
    try:
        fn()
        return _io._points[0]
    finally:
        if before is None:
            os.environ.pop(_io.ENV_KILL_AT)
        else:
            os.environ[_io.ENV_KILL_AT] = before


def kill_points(total: int, n: int, seed: int = 26) -> list:
    """``n`` seeded kill points out of ``1..total`` (all of them when ``total <= n``), sorted."""
    points = list(range(1, total + 1))
    return points if total <= n else sorted(random.Random(seed).sample(points, n))


def damage(path, kind: str) -> None:
    data = open(path, "rb").read()
    if kind == "truncated":
        out = data[: max(1, len(data) // 2)]
    elif kind == "empty":
        out = b""
    elif kind == "binary":
        out = bytes(random.Random(0).randrange(256) for _ in range(64)) + b"\x00\x00"
    elif kind == "garbage":
        out = b"this is not the file you are looking for\n"
    else:
        raise ValueError(kind)
    with open(path, "wb") as fh:
        fh.write(out)


def assert_one_line(err: BaseException, path) -> None:
    """The error is one line and names the file."""
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text or os.path.basename(str(path)) in text, (path, text)
