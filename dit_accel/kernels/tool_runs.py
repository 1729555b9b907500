"""The CUDA toolchain's binaries (ptxas, nvdisasm, cuobjdump, shipped in triton's wheel) run on one input file, their
output kept on disk.

An output is a pure function of the tool binary's bytes, its flags and the input's bytes, so it is stored under a
hash of exactly those: a kernel edit, another flag or another toolchain runs the tool again, and nothing derived from
the output (the parsers) is stored. The static GPU checks re-read every shipped kernel on every run; with the outputs
kept, a run on a machine that has already seen a kernel skips ptxas and nvdisasm for it.

Where: ``$DIT_ACCEL_TOOL_CACHE``, else ``$DIT_ACCEL_CACHE/tools``, else ``~/.cache/dit_accel/tools``. A damaged or
unreadable entry is run again; an unwritable folder only costs the saving (said once, as a warning).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from ..atomic_files import atomic_write_json, cache_root, warn_unwritable_cache

__all__ = ["run_tool", "cache_dir"]


def cache_dir() -> Path:
    explicit = os.environ.get("DIT_ACCEL_TOOL_CACHE")
    return Path(explicit) if explicit else cache_root() / "tools"


def _identity(tool: str) -> str:
    """The binary's bytes, hashed: an upgraded toolchain is another tool, and the same toolchain in another virtual
    environment (a fresh clone's, at another path, installed at another time) is the same one."""
    path = os.path.realpath(tool)
    st = os.stat(path)
    return _digest(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of the file at ``path``, hashed once per process for each size and modification time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_tool(tool: str, flags: Sequence[str], data: bytes, suffix: str, *, check: bool = True):
    """``(returncode, stdout, stderr)`` of ``tool *flags FILE`` where FILE holds ``data`` (named ``*suffix``; an
    ``-o`` output, if a flag asks for one, goes to a scratch folder). Stored only when the tool succeeded.

    Raises:
        subprocess.CalledProcessError: ``check`` and the tool failed.
    """
    key = hashlib.sha256("\0".join([_identity(tool), *flags, suffix]).encode() + b"\0" + data).hexdigest()
    path = cache_dir() / key[:2] / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        return 0, stored["stdout"], stored["stderr"]
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: run it
        pass
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "input" + suffix)
        Path(src).write_bytes(data)
        args = [a.replace("{out}", os.path.join(tmp, "output")) for a in flags]
        res = subprocess.run([tool, *args, src], capture_output=True, text=True)
    if res.returncode != 0:
        if check:
            raise subprocess.CalledProcessError(res.returncode, [tool, *flags], res.stdout, res.stderr)
        return res.returncode, res.stdout, res.stderr
    try:
        atomic_write_json(path, {"stdout": res.stdout, "stderr": res.stderr}, indent=None)
    except OSError as exc:
        warn_unwritable_cache(path, exc, folder=cache_dir(), setting="DIT_ACCEL_TOOL_CACHE (or DIT_ACCEL_CACHE)",
                              kept="ptxas, nvdisasm and cuobjdump outputs are not kept and run again in the next "
                                   "process")
    return 0, res.stdout, res.stderr
