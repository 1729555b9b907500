"""Atomic files: every artefact dit_accel writes and reads back goes through here.

Three rules, so that a job killed at any instant leaves either the old complete artefact or the
new complete one, never a mix that loads without an error:

- **One file**: written under a temporary name in the same folder, then renamed over the final
  name (:func:`atomic_write`, :func:`atomic_write_text`, :func:`atomic_write_json`). A rename in one
  folder is atomic on POSIX and Windows, so a reader sees the old file or the new one.
- **A folder of files**: either built in a temporary sibling folder and renamed into place
  (:func:`atomic_folder`, checkpoints), or its files are replaced one by one and a manifest of their
  sha256 (:func:`file_hashes`) is written *last*; the loader checks every file against it
  (:func:`check_hashes`), so a folder whose writer was killed half-way is refused, naming the file.
- **A set of files in several places** (a plan and its report folder): every file is written complete under a
  temporary name beside its final one, then a journal naming each (temporary, final) pair is written
  atomically: the commit point. The renames follow and the journal is removed (:func:`commit_files`). A
  writer killed before the journal leaves the previous set and temporaries; killed after it, the next
  writer (or any reader, :func:`finish_for_reader`) finishes the renames first (:func:`finish_commit`), then
  sweeps the temporaries of dead writers (:func:`remove_stale_temps`). Journals name files relative to their
  folder; a copied or moved journal naming files outside its folder is refused.
- **A store shared by processes** (``autotune.json``, ``selfcheck.json``): re-read, merged and written under
  its lock file (:func:`locked`, :func:`update_json`).
- **One writer per output path**: a writer of an output (a video, a frame folder, a committed set of files)
  holds the output's lock (:func:`locked` with ``wait=False``); a second writer is refused with
  :class:`BusyError` instead of mixing its files with the first one's.
- **A bad file is one line**: :class:`BadFileError` (a ``ValueError``) names the file, what is wrong
  and what was expected. The readers here (:func:`read_json`, :func:`read_text`,
  :func:`load_safetensors`) raise it for truncated, empty, binary and wrongly structured files.

Test hook: ``DIT_ACCEL_TEST_KILL_AT=K`` makes the process SIGKILL itself at the K-th write point
(after a temporary file is complete, and after each rename), so the fault-injection suite
(``tests/reliability``) kills every writer at seeded, reproducible points. Nothing else reads it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

from ._util import NonFiniteConstant, is_lfs_pointer, non_finite_at

__all__ = ["BadFileError", "atomic_write", "atomic_write_text", "atomic_write_json", "json_text", "atomic_folder", "file_hashes",
           "check_hashes", "sha256_file", "folder_digest", "read_json", "read_text", "load_safetensors", "safetensors_keys", "safetensors_shapes", "temp_name", "is_temp_name",
           "remove_stale_temps", "commit_files", "finish_commit", "finish_for_reader", "locked", "lock_name", "BusyError", "update_json", "commit_journal", "recover", "crash_point", "cache_root", "warn_unwritable_cache", "ENV_KILL_AT"]

PathLike = Union[str, os.PathLike]
ENV_KILL_AT = "DIT_ACCEL_TEST_KILL_AT"
_TMP_MARK = ".dit_accel-tmp-"
_points = [0]
# Temporaries name their host too: on a folder shared between machines a process id says nothing about
# another machine's writers, whose temporaries are therefore never cleared from here.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


class BadFileError(ValueError):
    """A file dit_accel reads is missing, truncated, corrupt or of the wrong structure.

    ``str(err)`` is one line: ``<path>: <what is wrong>; expected <what should be there>``.
    ``err.path`` is the file.
    """

    def __init__(self, path: PathLike, problem: str, expected: str) -> None:
        self.path, self.problem, self.expected = str(path), problem, expected
        super().__init__(f"{self.path}: {problem}; expected {expected}")


def cache_root() -> Path:
    """dit_accel's own cache folder: ``$DIT_ACCEL_CACHE``, default ``~/.cache/dit_accel``."""
    return Path(os.environ.get("DIT_ACCEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dit_accel"))


_UNWRITABLE: set = set()


def warn_unwritable_cache(path: PathLike, exc: OSError, *, folder: Optional[PathLike] = None,
                          kept: str = "first-use checks and timings are kept for this process only and run again in "
                                      "the next", setting: str = "DIT_ACCEL_CACHE") -> None:
    """Warn once per folder (``path``'s, or the cache's own ``folder`` above it) that a cache file could not be
    written (a read-only home, ``$DIT_ACCEL_CACHE`` naming a file): the caller keeps its answer for this process only
    (``kept`` says what that costs), so every new process works it out again; ``setting``: the variable to set."""
    import warnings

    folder = str(Path(path).parent if folder is None else folder)
    if folder in _UNWRITABLE:
        return
    _UNWRITABLE.add(folder)
    from ._util import DitAccelWarning

    why = "a file, not a folder" if os.path.isfile(folder) else (exc.strerror or str(exc))
    warnings.warn(f"dit_accel cannot write its cache in {folder} ({why}): {kept}; set {setting} to a writable "
                  "folder", DitAccelWarning, stacklevel=3)


def crash_point() -> None:
    """A write point for the fault-injection tests: SIGKILL this process at the K-th one when
    ``$DIT_ACCEL_TEST_KILL_AT`` is K (never set outside tests)."""
    at = os.environ.get(ENV_KILL_AT)
    if not at:
        return
    _points[0] += 1
    if _points[0] == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: PathLike) -> Path:
    """A temporary sibling of ``path`` that keeps its suffix (libraries pick formats by suffix) and that no
    reader of the folder mistakes for an artefact (it starts with a dot)."""
    path = Path(path)
    return path.with_name(f"{_TMP_MARK}{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}-{path.name}")


def is_temp_name(path: PathLike) -> bool:
    """Whether ``path`` is a temporary name of :func:`temp_name` (a writer that was killed leaves these)."""
    return Path(path).name.startswith(_TMP_MARK)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A full disk (or quota) while writing ``path``'s temporary: an OSError that names ``path`` and what to do
    (libraries that write through a file handle raise it without a file name)."""
    try:
        yield
    except OSError as err:
        if err.errno not in _FULL:
            raise
        raise OSError(err.errno, f"{os.strerror(err.errno)} while writing {path}; free space on that disk (the "
                                 "previous file is unchanged) or write to another folder") from None


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes the file at the temporary path ``tmp``; then it replaces ``path`` in one rename.

    For libraries that write by path (safetensors, ``torch.save``, ``np.savez``, imageio). On any error
    the temporary file is removed and ``path`` is untouched. A ``path`` that is a symbolic link has the file it
    names replaced, as those libraries' own writes do, not the link (the renamed file took the link's place, and
    the file the link named kept the old content). Returns ``path``.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    made = folders_to_make(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        with _naming(path):
            write(tmp)
        _fsync(tmp)
        crash_point()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        remove_empty(made)  # (before: the folders made for the file stayed, empty)
        raise
    crash_point()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(obj, *, indent: Optional[int] = 2, **kwargs) -> str:
    """``obj`` as the JSON text dit_accel's files hold: indented, with a final newline."""
    return json.dumps(obj, indent=indent, **kwargs) + "\n"


def atomic_write_json(path: PathLike, obj, *, indent: Optional[int] = 2, **kwargs) -> Path:
    """Write ``obj`` as JSON (:func:`json_text`) to ``path`` atomically."""
    return atomic_write_text(path, json_text(obj, indent=indent, **kwargs))


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """``with atomic_folder(final) as tmp:`` fill ``tmp``; on success it becomes ``final`` (an old ``final``
    is replaced), on an error it is removed and ``final`` is untouched.

    The swap is two renames (old aside, new in); a kill between them leaves no ``final`` and the old
    folder under a temporary name, never a mixed one. A ``final`` that is a symbolic link has the folder it names
    replaced, not the link (as :func:`atomic_write`).
    """
    path = Path(path)
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        crash_point()
        old = None
        if path.exists():
            old = temp_name(path)
            os.replace(path, old)
            crash_point()
        os.replace(tmp, path)
        crash_point()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: PathLike) -> None:
    """Remove the temporary files and folders that killed writers left in ``folder`` (only names of
    :func:`temp_name` whose process, on this machine, is gone)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not is_temp_name(p):
            continue
        pid, host = (p.name[len(_TMP_MARK):].split("-", 2) + ["", ""])[:2]
        if host != _HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def commit_journal(anchor: PathLike) -> Path:
    """The journal of a file set anchored at ``anchor`` (its main file, or its folder): a hidden sibling."""
    anchor = Path(anchor)
    return anchor.with_name(f".{anchor.name}.dit_accel-commit.json")


Content = Union[str, bytes, Callable[[Path], object]]


def commit_files(files: Dict[PathLike, Content], journal: PathLike, *, remove: Iterable[PathLike] = ()) -> None:
    """Write ``files`` (final path -> text, bytes, or ``write(tmp)``) as one unit: a reader after any kill, once
    :func:`finish_commit` has run, sees the previous files or the new ones, never a mix.

    1. each file is written complete under :func:`temp_name` beside its final path (the previous one stays);
    2. ``journal`` lists the (temporary, final) pairs and the files ``remove`` names (an earlier set's files the
       new one has no place for), written atomically: the commit point;
    3. every temporary is renamed over its final path, the ``remove`` files are deleted, then the journal goes.

    The journal names files relative to its own folder, so a copied folder finishes its own files. On an error
    before the commit point the temporaries are removed and nothing changed.
    """
    journal = Path(journal)
    with locked(journal, wait=False):  # a second writer of the same set is refused, never interleaved
        _commit_files(files, journal, remove)


def _commit_files(files: Dict[PathLike, Content], journal: Path, remove: Iterable[PathLike]) -> None:
    finish_commit(journal)  # a previous writer's committed set goes in first, never over ours
    staged = []
    try:
        for final, content in files.items():
            final = Path(final)
            final = Path(os.path.realpath(final)) if final.is_symlink() else final  # (as atomic_write: the file named)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(final)
            staged.append((tmp, final))
            with _naming(final):
                if callable(content):
                    content(tmp)
                else:
                    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else bytes(content))
            _fsync(tmp)
            crash_point()
        here = journal.parent
        atomic_write_json(journal, {"commit": [[_relative(t, here), _relative(f, here)] for t, f in staged],
                                    "remove": [_relative(r, here) for r in remove],
                                    "folder": os.path.abspath(here)})
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise
    finish_commit(journal)


def _relative(path: PathLike, folder: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


_JOURNAL = "a commit journal of dit_accel ({\"commit\": [[temporary, final], ...]}); remove it if no dit_accel writer made it"


def _journal_paths(journal: Path, record: dict) -> tuple:
    """The (temporary, final) pairs and the files to remove of a journal, as paths; BadFileError for a pair
    that is not a temporary beside its final file, or that lies outside the journal's folder while the journal
    is not where it was written (a copied or moved folder must never rename the original's files)."""
    pairs, removes = record.get("commit"), record.get("remove", [])
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                              for p in pairs):
        raise BadFileError(journal, "has no list of [temporary, final] pairs under 'commit'", _JOURNAL)
    if not isinstance(removes, list) or not all(isinstance(x, str) for x in removes):
        raise BadFileError(journal, "has a 'remove' entry that is not a list of file names", _JOURNAL)
    here = os.path.abspath(journal.parent)
    written_here = record.get("folder") == here

    def resolve(name: str) -> Path:
        full = os.path.normpath(os.path.join(here, name))
        if os.path.commonpath([full, here]) != here and not written_here:
            raise BadFileError(journal, f"names {name!r}, outside its folder {here} (the journal was written in "
                                        f"{record.get('folder', 'another folder')}: a copied or moved folder); it "
                                        "was left unfinished", "a journal naming files inside its own folder; finish "
                                        "the commit where it was written, or remove the journal")
        return Path(full)

    resolved = []
    for tmp, final in pairs:
        tmp, final = resolve(tmp), resolve(final)
        if tmp.parent != final.parent or not is_temp_name(tmp) or not tmp.name.endswith("-" + final.name):
            raise BadFileError(journal, f"pairs {tmp.name!r} with {str(final)!r}, which is not its temporary",
                               _JOURNAL)
        resolved.append((tmp, final))
    return resolved, [resolve(name) for name in removes]


def finish_commit(journal: PathLike) -> bool:
    """Complete the renames of a committed :func:`commit_files` (its writer was killed after the journal) and
    remove the journal; True when there was one. A journal that is not one of ours, or that names files outside
    its folder after being copied or moved, is left alone (BadFileError). Readers of a file set call it too
    (:func:`finish_for_reader`): two finishing at once is harmless."""
    journal = Path(journal)
    if not journal.exists():
        return False
    record = read_json(journal, expected=_JOURNAL)
    pairs, removes = _journal_paths(journal, record)
    for tmp, final in pairs:
        if os.path.lexists(tmp):
            with contextlib.suppress(FileNotFoundError):  # another process finishing the same journal
                os.replace(tmp, final)
            crash_point()
    for path in removes:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()
    crash_point()
    return True


def finish_for_reader(journal: PathLike, what: PathLike) -> None:
    """What a reader of a file set does first: finish the set's pending commit (a writer killed after its commit
    point), or refuse ``what`` with the reason (BadFileError) when it cannot be finished, so that a reader
    never sees the new file beside the previous set's others."""
    try:
        finish_commit(journal)
    except BadFileError as err:
        raise BadFileError(what, f"its set of files has an unfinished commit that cannot be completed ({err.problem}, "
                                 f"in {err.path})", "a complete set of files; " + err.expected) from None
    except OSError as err:
        raise BadFileError(what, f"its set of files has an unfinished commit ({journal}) that this process cannot "
                                 f"complete ({err.strerror or err})", "a complete set of files: run the reader once "
                                 "where it may write to the folder, or write the files again") from None


def recover(journal: PathLike, folders: Iterable[PathLike]) -> None:
    """What a writer does first: finish a committed set of a killed predecessor, then sweep the temporaries that
    dead writers left in ``folders``."""
    finish_commit(journal)
    if lock_name(journal).exists():  # a killed writer's lock file: taken and released, an output's lock file goes
        with contextlib.suppress(BusyError):  # (a live writer holds it: it stays, and that writer removes it)
            with locked(journal, wait=False):
                pass
    for folder in folders:
        remove_stale_temps(folder)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ----------------------------------------------------------------------------- stores shared by processes
def lock_name(path: PathLike) -> Path:
    """The lock file of ``path`` (a hidden sibling; :func:`locked`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class BusyError(RuntimeError):
    """Another writer holds the lock of an output path (:func:`locked` with ``wait=False``). One line: the path,
    the holder where its lock file names one, and what to do."""

    one_line = True  # errors.one_line_error: the message is the whole report

    def __init__(self, path: PathLike, holder: str = "") -> None:
        self.path = str(path)
        who = f" (process {holder})" if holder else ""
        super().__init__(f"{self.path}: another writer{who} is writing this output now; one writer per output path: "
                         "wait for it to finish, or choose another output path")


_HELD: Dict[tuple, int] = {}  # (lock file, thread) -> depth: a thread that holds a lock may take it again
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(path: PathLike, *, timeout: float = 60.0, wait: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (its :func:`lock_name` file) across processes and threads.

    ``fcntl.flock`` where there is one: the system drops the lock of a process that dies, so a killed holder
    never leaves it taken. Elsewhere an ``O_EXCL`` lock file naming its holder, taken over when that process
    is gone (or after ``timeout``). Stores that several processes update (``autotune.json``,
    ``selfcheck.json``) re-read and merge under it (:func:`update_json`). ``wait=False`` is the rule for an output
    path (one writer each): a lock held elsewhere raises :class:`BusyError` at once instead of waiting. The thread
    that holds a lock may take it again (a command holding its output while a writer below it locks it too).
    """
    lock = lock_name(path)
    key = (os.path.abspath(lock), threading.get_ident())
    with _HELD_GUARD:
        depth = _HELD.get(key, 0)
        if depth:
            _HELD[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows)
        fcntl = None
    take = _flock(fcntl, lock, path, wait) if fcntl is not None else _lock_file(lock, path, timeout, wait)
    with take:
        with _HELD_GUARD:
            _HELD[key] = 1
        try:
            yield
        finally:
            with _HELD_GUARD:
                del _HELD[key]


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return " ".join(lock.read_text().split()[:1])
    return ""


@contextlib.contextmanager
def _flock(fcntl, lock: Path, path: PathLike, wait: bool) -> Iterator[None]:
    """``flock`` on the lock file. An output's lock file (``wait=False``) is removed on release, so outputs leave no
    hidden files behind; a lock taken on a file that its holder removed meanwhile is therefore taken again on the
    file now at that name (the one the next writer locks)."""
    while True:
        fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise BusyError(path, _holder(lock)) from None
        try:
            if os.fstat(fd).st_ino == os.stat(str(lock)).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message of a refused writer
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_HOST}\n".encode())
        yield
    finally:
        if not wait:
            with contextlib.suppress(OSError):
                lock.unlink()
        os.close(fd)  # (closing releases the lock)


@contextlib.contextmanager
def _lock_file(lock: Path, path: PathLike, timeout: float, wait: bool) -> Iterator[None]:
    """The lock without ``fcntl``: a file created with ``O_EXCL`` names its holder; a holder that is gone on this
    machine (or, waiting, one held past ``timeout``) is taken over."""
    import time

    start = time.monotonic()
    while True:
        try:
            fd = os.open(str(lock), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            try:
                pid, host = lock.read_text().split()[:2]
                stale = host == _HOST and not _alive(int(pid))
            except (OSError, ValueError):
                stale = False
            if stale or (wait and time.monotonic() - start > timeout):
                with contextlib.suppress(OSError):
                    lock.unlink()
                continue
            if not wait:
                raise BusyError(path, _holder(lock)) from None
            time.sleep(0.01)
    try:
        os.write(fd, f"{os.getpid()} {_HOST}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def update_json(path: PathLike, read: Callable[[Path], dict], change: Callable[[dict], dict], **dump) -> dict:
    """Under :func:`locked`, ``read(path)`` the store as it is now (what other processes wrote since this one
    loaded it included), ``change`` it, and write the result atomically; returns what was written. Two
    processes sharing a cache folder so never lose each other's entries."""
    path = Path(path)
    with locked(path):
        merged = change(read(path) if path.exists() else {})
        atomic_write_json(path, merged, **dump)
    return merged


# ----------------------------------------------------------------------------- content hashes
def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: PathLike, names: Iterable[str]) -> Dict[str, str]:
    """``{name: sha256}`` of files of ``folder``, for a manifest written after them."""
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in names}


def check_hashes(folder: PathLike, hashes: Dict[str, str], manifest: PathLike) -> None:
    """BadFileError naming the first file of ``hashes`` that is missing or differs from its recorded sha256
    (its writer was killed between the file and the manifest ``manifest``, or someone changed it)."""
    folder = Path(folder)
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise BadFileError(manifest, f"its sha256 table is {type(hashes).__name__} {str(hashes)[:80]}",
                           "a mapping of file name to sha256 hex digest")
    for name, digest in sorted(hashes.items()):
        p = folder / name
        if not p.is_file():
            raise BadFileError(p, f"missing, but {Path(manifest).name} lists it",
                               "every file the manifest lists (the folder is incomplete; write it again)")
        if sha256_file(p) != digest:
            raise BadFileError(p, f"content differs from the sha256 recorded in {Path(manifest).name} (its writer "
                                  "was interrupted, or the file was changed afterwards)",
                               "the file written together with the manifest; write the folder again")


def folder_digest(folder: PathLike, memo: Optional[PathLike] = None, warn: Callable[[str], object] = print) -> str:
    """sha256 over every file of ``folder`` (relative path and content; names starting with a dot skipped).

    ``memo``: a JSON file of ``{file: [size, mtime_ns, sha256]}`` so unchanged files (same size and
    modification time) are not read again; a damaged memo is reported through ``warn`` and rebuilt.
    """
    folder = Path(folder)
    memo_path = Path(memo) if memo is not None else None
    known: dict = {}
    if memo_path is not None and memo_path.exists():
        try:
            known = read_json(memo_path, expected="{file: [size, mtime_ns, sha256]} (a memo of file hashes)")
        except ValueError as err:
            warn(f"warning: {err}; hashing the files again")
    fresh = {}
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for p in files:
        st = p.stat()
        key = str(p.resolve())
        entry = known.get(key)
        ok = isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns] \
            and isinstance(entry[2], str)
        fresh[key] = [st.st_size, st.st_mtime_ns, entry[2] if ok else sha256_file(p)]
        h.update(f"{p.relative_to(folder).as_posix()}:{fresh[key][2]}\n".encode())
    if memo_path is not None and any(known.get(k) != v for k, v in fresh.items()):
        try:
            atomic_write_json(memo_path, {**{k: v for k, v in known.items() if isinstance(v, list)}, **fresh},
                              indent=None)
        except OSError:
            pass  # a read-only memo still works, it only hashes again
    return h.hexdigest()


# ----------------------------------------------------------------------------- readers
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
              (b"\xfe\xff", "utf-16-be"))


def _wide_text(data: bytes) -> Optional[str]:
    """``data`` as UTF-16 or UTF-32 text when it starts with that byte-order mark (Notepad's "Unicode", PowerShell
    5's ``>``) and decodes to text: some ASCII (a JSON file's brackets, a newline) and no control character other
    than tab and newlines. None otherwise: bytes that merely start like a mark are binary, or not UTF-8."""
    for bom, codec in _WIDE_BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom):].decode(codec)
            except UnicodeDecodeError:
                return None
            if any(c < "\x80" for c in text) and not any(c < " " and c not in "\t\n\r" for c in text):
                return text
            return None
    return None


def read_text(path: PathLike, *, what: str = "a UTF-8 text file") -> str:
    """The text of ``path``, without the byte-order mark Windows editors put first (it stayed on the first prompt, an
    invisible character the text encoder saw, and made JSON files unreadable). UTF-16 and UTF-32 text that starts with
    its byte-order mark (Notepad's "Unicode", PowerShell 5's ``>``) is read too; BadFileError for a missing,
    unreadable or binary (not UTF-8) file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadFileError(path, "cannot read it: no such file", what) from None
    except IsADirectoryError:
        raise BadFileError(path, "cannot read it: it is a folder", what) from None
    except OSError as err:
        raise BadFileError(path, f"cannot read it ({err.strerror or err})", what) from None
    text = _wide_text(data)
    if text is not None:
        return text
    if b"\x00" in data:
        raise BadFileError(path, "is binary (holds NUL bytes)", what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadFileError(path, f"is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})",
                           what) from None


def read_json(path: PathLike, *, expected: str = "a JSON object", kind: type = dict, finite: bool = True):
    """The JSON value of ``path``, which must be a ``kind`` (dict by default; None: any);
    BadFileError for empty, truncated, binary or wrongly structured files, and, unless not ``finite``, for ``NaN``,
    ``Infinity`` or ``-Infinity`` (no JSON; Python's parser took them, and a NaN setting ran as NaN), naming the key.
    ``finite=False``: a record that may hold them as values (a loss that was NaN) reads them as floats."""
    text = read_text(path, what=expected)
    if not text.strip():
        raise BadFileError(path, "is empty", expected)
    try:
        value = json.loads(text, parse_constant=NonFiniteConstant if finite else None)
    except json.JSONDecodeError as err:
        # A string left open always runs to the end: the file stops inside it.
        truncated = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        why = "is truncated" if truncated else "is not valid JSON"
        raise BadFileError(path, f"{why} ({err.msg} at line {err.lineno}, column {err.colno})", expected) from None
    except RecursionError:  # Python's parser recurses once per nested bracket
        raise BadFileError(path, "nests its arrays or objects too deeply to be read (thousands of levels)",
                           expected) from None
    except ValueError as err:  # (an integer of over 4300 digits: Python's own limit, a ValueError without the file)
        raise BadFileError(path, f"is not valid JSON ({' '.join(str(err).split())[:100]})", expected) from None
    try:  # (a file without these words holds none: nothing to walk)
        found = non_finite_at(value) if "NaN" in text or "Infinity" in text else None
    except RecursionError:
        raise BadFileError(path, "nests its arrays or objects too deeply to be read (thousands of levels)",
                           expected) from None
    if found is not None:
        raise BadFileError(path, f"holds {found[0]} at {found[1]}: no JSON number "
                                 "(JSON has no NaN or Infinity)", f"{expected}, with finite numbers: write a number "
                                                                  "(or null) there, or write the file again")
    if kind is not None and not isinstance(value, kind):
        raise BadFileError(path, f"holds a JSON {type(value).__name__}", expected)
    return value


def read_entries(path: PathLike, *, expected: str, valid: Callable[[str, object], bool], again: str,
                 warn: Optional[Callable[[str], object]] = None) -> dict:
    """The entries of the JSON store ``path`` (``{key: entry}``) that ``valid(key, entry)`` accepts. A damaged
    file, or entries with missing or wrong fields, are dropped with one ``warn`` naming the file (None: silent);
    ``again`` says what the caller then does instead (the self-check and autotune stores share this)."""
    try:
        data = read_json(path, expected=expected, finite=False)  # (dit_accel's own stores: their checks read them)
    except ValueError as err:
        if warn is not None:
            warn(f"dit_accel: {err}; ignoring it ({again})")
        return {}
    bad = [k for k, v in data.items() if not valid(k, v)]
    if bad and warn is not None:
        warn(f"dit_accel: {path}: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} with missing or wrong fields "
             f"(e.g. {bad[0][:60]!r}) ignored ({again}); expected {expected}")
    return {k: v for k, v in data.items() if k not in bad}


def load_safetensors(path: PathLike, *, expected: str = "a safetensors file of tensors"):
    """``{name: tensor}`` of a safetensors file; BadFileError for missing, empty, truncated or corrupt ones."""
    from safetensors.torch import load_file

    return _read_safetensors(path, expected, load_file)


def safetensors_keys(path: PathLike, *, expected: str = "a safetensors file of tensors") -> list:
    """The tensor names of a safetensors file, from its header alone; BadFileError as :func:`load_safetensors`."""
    from safetensors import safe_open

    def keys(name: str) -> list:
        with safe_open(name, framework="pt") as f:
            return list(f.keys())

    return _read_safetensors(path, expected, keys)


def safetensors_metadata(path: PathLike, *, expected: str = "a safetensors file of tensors") -> dict:
    """The ``__metadata__`` strings of a safetensors file's header (``{}`` when it has none); BadFileError as
    :func:`load_safetensors`."""
    from safetensors import safe_open

    def metadata(name: str) -> dict:
        with safe_open(name, framework="pt") as f:
            return dict(f.metadata() or {})

    return _read_safetensors(path, expected, metadata)


def safetensors_shapes(path: PathLike, *, expected: str = "a safetensors file of tensors") -> dict:
    """``{name: shape}`` of a safetensors file's tensors, from its header alone; BadFileError as
    :func:`load_safetensors`."""
    from safetensors import safe_open

    def shapes(name: str) -> dict:
        with safe_open(name, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    return _read_safetensors(path, expected, shapes)


def _read_safetensors(path: PathLike, expected: str, read):
    path = Path(path)
    if path.is_dir():  # (it was said not to exist)
        raise BadFileError(path, "is a folder, not a file", expected)
    if not path.is_file():
        raise BadFileError(path, "does not exist", expected)
    if path.stat().st_size == 0:
        raise BadFileError(path, "is empty", expected)
    if is_lfs_pointer(path):  # (before: "header too large", which says nothing of what the file is)
        raise BadFileError(path, "is a Git LFS pointer (a small text file naming the real file): the repository was "
                                 "cloned without git-lfs", f"{expected}: run `git lfs pull` in the clone, or download "
                                                           "it with `huggingface-cli download`")
    try:
        return read(str(path))
    except Exception as err:  # SafetensorError, OSError, ...: the library's reason, on one line
        reason = " ".join(str(err).split())[:160]
        raise BadFileError(path, f"is not a readable safetensors file ({type(err).__name__}: {reason})",
                           expected) from None


def folders_to_make(*paths) -> List[str]:
    """The folders (each path and its missing parents) that making ``paths`` would create, deepest first: what
    :func:`remove_empty` takes back when the operation that made them fails."""
    made = set()
    for path in paths:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            continue
        path = os.path.abspath(os.fspath(path))
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            made.add(path)
            path = os.path.dirname(path)
    return sorted(made, key=lambda f: (-f.count(os.sep), f))


def remove_empty(folders: Iterable[PathLike]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty: a failed operation leaves no folder it made."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (a cache it filled), or gone
            os.rmdir(folder)
