"""Small utilities shared across the package: versions, JSON conversion, timing, environment probes.

Import-light on purpose (torch is imported only inside the functions that need it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

__all__ = ["portable_path", "cdiv", "versions", "to_jsonable", "cuda_event", "Timer", "time_median", "load_average", "has_cuda_driver", "DitAccelWarning",
           "WarningLog", "run_each",
           "use_interpreter_without_cuda", "is_int", "is_number", "is_bool", "format_time", "format_ratio", "positive_int",
           "int_at_least", "env_set", "existing_ancestor", "file_in_the_way", "file_error", "seed_error",
           "repeated_error"]


def portable_path(path, base) -> str:
    """How a record written into the folder ``base`` names ``path``: inside the installed dit_accel package as
    ``dit_accel/...`` (the same on every machine it is installed on), elsewhere relative to ``base`` (a folder moved
    together with its inputs still finds them). Never an absolute path of the machine that wrote it: records
    travel, shipped ones inside the package."""
    package = Path(__file__).resolve().parent
    full = Path(os.path.abspath(path)).resolve()
    if full == package or package in full.parents:
        return (Path(package.name) / full.relative_to(package)).as_posix()
    try:
        return Path(os.path.relpath(full, Path(os.path.abspath(base)).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return full.name


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def existing_ancestor(path) -> Optional[Path]:
    """The nearest of ``path`` and its parents that exists (None when none does): where a new output would go."""
    here = Path(path)
    while not here.exists():
        if here == here.parent:
            return None
        here = here.parent
    return here


def file_in_the_way(path) -> Optional[Path]:
    """The file standing at or above ``path``, where a folder would have to be to write there (None if none)."""
    here = existing_ancestor(path)
    return here if here is not None and not here.is_dir() else None


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    import numbers

    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_number(value) -> bool:
    """A finite-or-not real number (Python or numpy scalar), not a bool."""
    import numbers

    return isinstance(value, numbers.Real) and not is_bool(value)


def check_registration(name, summary, finetunable, aliases) -> None:
    """:func:`dit_accel.register_method`'s arguments: a lower-case identifier not taken by an alias, a one-line
    str summary (``dit-accel info`` prints it) and a bool ``finetunable``; ValueError/TypeError naming the bad one."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"name={name!r} is invalid: a lower-case identifier such as 'tile' (it becomes a CLI "
                         "--method value)")
    if name in aliases:
        raise ValueError(f"name={name!r} is taken: it is an alias of {aliases[name]!r}; pick another name")
    if not isinstance(summary, str) or not summary.strip():
        raise TypeError(f"summary={summary!r} is invalid: expected a non-empty one-line str (dit-accel info and "
                        "--help print it)")
    if not is_bool(finetunable):
        raise TypeError(f"finetunable={finetunable!r} is invalid: expected True or False (whether dit-accel "
                        "finetune can train the method)")


def _is_numpy_bool(value) -> bool:
    # numpy 1 names the type bool_, numpy 2 bool
    return type(value).__name__ in ("bool_", "bool") and type(value).__module__ == "numpy"


def is_bool(value) -> bool:
    """A Python or numpy bool."""
    return isinstance(value, bool) or _is_numpy_bool(value)


def _significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures, without an exponent (3932.6003 -> 3930, 0.012345 -> 0.0123)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = math.floor(math.log10(abs(value)))
    rounded = round(value, digits - 1 - magnitude)
    if rounded and math.floor(math.log10(abs(rounded))) > magnitude:  # 9.996 -> 10.0: one digit fewer after the point
        magnitude += 1
    return f"{rounded:.{max(0, digits - 1 - magnitude)}f}"


def format_time(seconds: Optional[float], per: str = "") -> str:
    """A measured or modelled time as printed everywhere: 3 significant figures, in s from a second up, else in
    ms (``3.93 s``, ``11.3 s``, ``526 ms``, ``0.0412 ms``); ``per`` is appended to the unit (``/sample``).
    None prints as ``n/a``."""
    if seconds is None:
        return "n/a"
    ms = _significant(seconds * 1e3)
    if abs(float(ms)) >= 1000 or seconds == 0:  # 0.9996 s rounds to 1.00 s, not 1000 ms
        return f"{_significant(seconds)} s{per}"
    return f"{ms} ms{per}"


def format_ratio(value: Optional[float], suffix: str = "x") -> str:
    """A ratio (speedup, share) to 2 decimals with ``suffix`` (``2.88x``); None prints as ``n/a``."""
    return "n/a" if value is None else f"{value:.2f}{suffix}"


_PACKAGES = ("torch", "triton", "diffusers", "transformers", "accelerate", "peft", "torchmetrics")


def versions(packages: Iterable[str] = _PACKAGES) -> Dict[str, Optional[str]]:
    """Versions of dit_accel, Python and ``packages`` (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out: Dict[str, Optional[str]] = {"dit_accel": __version__, "python": platform.python_version()}
    for name in packages:
        if name == "torch":  # the build that ran, with its tag (+cpu, +cu130), which the package metadata may lack
            import torch

            out[name] = torch.__version__
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def to_jsonable(value):
    """Dicts, sequences, numbers, tensors, dtypes, paths and numpy scalars -> plain JSON values.

    Non-finite floats become None (JSON has no inf/NaN); anything else unknown becomes ``str(value)``.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).replace("torch.", "")
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, numpy arrays and scalars
        try:
            return to_jsonable(value.tolist())
        except Exception:
            pass
    return str(value)


def cuda_event(device=None):
    """A timing CUDA event recorded now on ``device``'s current stream (None: the current device's). The kernel
    launchers run with their inputs' GPU current, so a model on a second GPU runs its work on that GPU's stream: an
    event on the current device's would time nothing of it."""
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class Timer:
    """Accumulated wall time of ``with`` blocks: CUDA events on a CUDA device (read lazily), else perf_counter.

    ``seconds`` synchronises once when CUDA events are pending; ``calls`` counts the blocks.
    """

    def __init__(self, device=None):
        self.cuda = device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"
        self.device = device if self.cuda else None
        self.calls = 0
        self._seconds = 0.0
        self._events: List = []
        self._start = None

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start = cuda_event(self.device)
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            self._events.append((self._start, cuda_event(self.device)))
        else:
            self._seconds += time.perf_counter() - self._start
        self.calls += 1
        return False

    @property
    def seconds(self) -> float:
        if self._events:
            for _, end in self._events:
                end.synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events.clear()
        return self._seconds


def time_median(fn: Callable[[], object], device=None, *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        timer = Timer(device)
        with timer:
            fn()
        times.append(timer.seconds)
    return statistics.median(times)


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load averages: CPU timings mean little when these exceed the core count."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def has_cuda_driver() -> bool:
    """Whether the CUDA driver library loads, checked without importing torch or triton."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def env_set(name: str, value: Optional[str] = None) -> Iterator[None]:
    """``$name`` set to ``value`` while inside (None: left as it is, for code inside that sets it), and on the way
    out back to what it was, or unset where it was unset."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def use_interpreter_without_cuda() -> None:
    """Select Triton's interpreter on a machine without CUDA; must run before anything imports triton."""
    if "TRITON_INTERPRET" not in os.environ and not has_cuda_driver():
        os.environ["TRITON_INTERPRET"] = "1"


class DitAccelWarning(UserWarning):
    """A warning from dit_accel (the CLI prints these as one clean line, or hides them with --quiet)."""


class WarningLog:
    """Warn once per message, and keep every message (for ``handle.warnings`` and the JSON sidecars). ``emit``:
    where a message goes instead of Python's warnings (ComfyUI's log)."""

    def __init__(self, emit: Optional[Callable[[str], None]] = None) -> None:
        self.messages: List[str] = []
        self._keys = set()
        self._emit = emit

    def first(self, key) -> bool:
        """Whether ``key`` is new (and from now on seen)."""
        if key in self._keys:
            return False
        self._keys.add(key)
        return True

    def warn(self, message: str, stacklevel: int = 3, key=None) -> None:
        """Warn unless this message (or ``key``, for messages that differ in detail) was warned before."""
        if not self.first(message if key is None else key):
            return
        self.messages.append(message)
        if self._emit is not None:
            self._emit(message)
            return
        import warnings

        warnings.warn(message, DitAccelWarning, stacklevel=stacklevel)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``, else the usage error naming the value."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


#: An argparse type for counts and sizes: an int >= 1.
positive_int = int_at_least(1)


def seed_error(seeds, flag: str = "--seed") -> Optional[str]:
    """Why ``seeds`` (one int or several) cannot seed a run (None when they can): torch generators take seeds in
    [0, 2**63) as given, where a negative one would wrap to another seed than the one recorded."""
    values = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds]
    bad = [s for s in values if not 0 <= s < 2**63]
    if bad:
        return f"{flag} must be {'an integer' if flag == '--seed' else 'integers'} >= 0 (and < 2**63); got " \
               f"{', '.join(map(str, bad))}"
    return None


def repeated_error(flag: str, values) -> Optional[str]:
    """Why ``values`` of a comma-separated ``flag`` cannot run (None when they can): one given twice, which ran twice
    (two rows of one setting, or a budget spent twice)."""
    values = list(values)
    twice = next((value for i, value in enumerate(values) if value in values[:i]), None)
    if twice is None:
        return None
    return f"{flag} names {f'{twice:g}' if isinstance(twice, float) else twice} more than once; name each once"


def device_error(device, *, allowed: Iterable[str] = ("cpu", "cuda"), flag: str = "--device",
                 advice: str = "use --device cpu") -> Optional[str]:
    """Why ``device`` cannot run a command here (None when it can); ``advice`` ends the message (a command that
    runs only on a GPU gives its own).

    dit_accel runs on the CPU and on CUDA GPUs: any other device torch knows (``mps``, ``meta``, ``xpu``) is
    refused by name here rather than failing later inside a model or a kernel with a traceback.
    """
    import torch

    allowed = tuple(allowed)
    spelled = " or ".join("cuda (cuda:N)" if a == "cuda" else a for a in allowed)
    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"{flag} {device} is not a torch device; use {spelled}"
    if dev.type not in allowed:
        return f"{flag} {device}: dit-accel runs this on {spelled}, not {dev.type}; {advice}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{flag} {device} but no CUDA device is visible here; {advice}"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 .. " \
                   f"cuda:{torch.cuda.device_count() - 1})"
    return None


def run_each(steps) -> None:
    """Call every one of ``steps`` even when one raises (an undo cut short half way is worse than one that
    finishes), then raise the first error."""
    error = None
    for step in steps:
        try:
            step()
        except BaseException as err:
            if error is None:
                error = err
    if error is not None:
        raise error


def file_error(path, flag: str, example: str) -> Optional[str]:
    """Why the output file ``path`` of ``flag`` cannot be written (None when it can): an empty path, an existing
    folder or a path ending with a slash (a folder's name), or a file where a folder above it should be; checked
    before a run whose result would go there."""
    if not str(path).strip():
        return f"{flag} is empty: give a file path, e.g. {example}"
    if Path(path).is_dir():
        return f"{flag} {path} is a folder; give a file path, e.g. {Path(path) / example}"
    if str(path).endswith(("/", os.sep)):  # (pathlib drops the slash: a file named like the folder was written)
        return f"{flag} {path} ends with a slash, a folder's name; give a file path, e.g. {Path(path) / example}"
    file = file_in_the_way(Path(path).parent)
    if file is not None:
        return f"{flag} {path} lies under {file}, which is a file; choose another path"
    return None


class NonFiniteConstant(str):
    """A NaN, Infinity or -Infinity that Python's JSON parser took (JSON has none of them): the ``parse_constant`` of
    :func:`dit_accel.atomic_files.read_json`, found again by :func:`non_finite_at`."""


def non_finite_at(value, where: str = "") -> Optional[tuple]:
    """``(constant, where)`` of the first :class:`NonFiniteConstant` in the JSON value ``value`` (where:
    ``method.topk``, ``loss[3]``), or None."""
    if isinstance(value, NonFiniteConstant):
        return str(value), where or "the top level"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:  # (keys as a plan's messages write them: steps[0], layers["0"], method.topk)
        step = (f"[{key}]" if isinstance(key, int) else f".{key}" if where and key.isidentifier()
                else key if key.isidentifier() else f"[{json.dumps(key)}]")
        found = non_finite_at(item, where + step)
        if found is not None:
            return found
    return None


def is_lfs_pointer(path) -> bool:
    """Whether ``path`` is a Git LFS pointer file (what a clone without git-lfs holds in place of a large file)."""
    try:
        with open(path, "rb") as f:
            return f.read(64).startswith(b"version https://git-lfs.github.com/spec/")
    except OSError:
        return False


_HUB_URL = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?:models/)?", re.IGNORECASE)


def near_hub_id(model: str, repo_id) -> Optional[tuple]:
    """``(hub id, what differs)`` when ``model`` is a hub id (matching the pattern ``repo_id``) written otherwise:
    with spaces around it, a trailing "/", as its web address, or with a subfolder after it; None when it is no such
    thing, or its first part is a folder here (a mistyped local path). Said without the network."""
    text, why = model.strip(), []
    if text != model:
        why.append("it has spaces around it")
    if _HUB_URL.match(text):
        text = _HUB_URL.sub("", text)
        text = re.split(r"/(?:tree|blob|resolve)/", text, maxsplit=1)[0]
        why.append("a hub id is owner/name, not its web address")
    if text.endswith("/"):
        text = text.rstrip("/")
        why.append("a hub id has no trailing '/'")
    parts = text.split("/")
    if len(parts) > 2 and not text.startswith((".", "/", "~")):
        text = "/".join(parts[:2])
        why.append(f"{'/'.join(parts[2:])!r} is a folder inside the hub model: dit_accel loads the whole pipeline")
    if not why or not repo_id.match(text) or text.startswith((".", "/", "~")) or Path(parts[0]).exists():
        return None
    return text, "; ".join(why)
