"""Runtime backend choice on real GPUs: time the contenders once per shape class, keep the faster.

No GPU has timed the Triton kernels while they were written, so on CUDA ``backend="auto"``
does not trust a fixed order: the first call of a *shape class* runs every contender
(the Triton kernel and FlexAttention for block-sparse attention) after a warm-up, times them
with CUDA events and keeps the fastest. The choice is stored on disk
(``$DIT_ACCEL_CACHE/autotune.json``, default ``~/.cache/dit_accel``), keyed by
:class:`ShapeClass`: GPU name, torch, triton and dit_accel versions, family, dtype, head dim, a
density bucket, token-count buckets and the layout's block sizes. A contender is tried only where
what it materialises fits in free memory, and a choice is stored only after it ran on the call and
matched a reference there (:func:`choose`'s ``verify``); only variants that passed their self-check
(:mod:`.selfcheck`) contend. ``dit-accel info`` lists the choices, ``dit-accel info --clear`` forgets them. ``DIT_ACCEL_AUTOTUNE=0`` turns it off (``auto`` then takes the table order of
:mod:`dit_accel.kernels.backends`).

Entry points hand :func:`dit_accel.kernels.backends.resolve` a *tuner*
(:func:`dit_accel.kernels.block_sparse.api.block_sparse_tuner`); the decision itself
(:func:`choose`) takes the timer as an argument, so it is tested on CPU with injected timings. :func:`cached_choices` lists what
is stored and :func:`info` summarises it (``dit-accel info``).

Example::

    from dit_accel.kernels import autotune
    for row in autotune.cached_choices():
        print(row["key"], row["choice"], row["times_ms"])
"""

from __future__ import annotations

import datetime
import statistics
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

__all__ = ["ENV_AUTOTUNE", "ShapeClass", "density_bucket", "token_bucket", "enabled", "choose", "cuda_event_timer", "timer_on", "cached_choice",
           "cached_choices", "info", "clear", "cache_path", "DENSITY_BUCKETS"]

#: Environment variable: ``0`` turns the timing off.
ENV_AUTOTUNE = "DIT_ACCEL_AUTOTUNE"
#: Upper edges of the density buckets: the fraction of visited tiles decides which kernel wins.
DENSITY_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)

Timer = Callable[[Callable[[], object], int, int], float]


def enabled() -> bool:
    """Whether ``auto`` times its contenders: ``$DIT_ACCEL_AUTOTUNE`` unset or ``1`` (``true``, ``on``, ``yes``);
    ``0`` (``false``, ``off``, ``no``) turns the timing off; ValueError naming the variable on any other value."""
    from .request import env_switch

    return env_switch(ENV_AUTOTUNE, "time auto's contenders", "the cost model alone, no timing",
                      "time them, the default") is not False


def density_bucket(density: Optional[float]) -> str:
    """``"<=0.1"``-style label of the smallest bucket holding ``density``; ``"any"`` when unknown."""
    if density is None:
        return "any"
    for edge in DENSITY_BUCKETS:
        if density <= edge + 1e-12:
            return f"<={edge:g}"
    return f"<={DENSITY_BUCKETS[-1]:g}"


def token_bucket(n: int) -> str:
    """``"<=4096"``-style label: the smallest power of two (at least 1024) holding ``n`` tokens. A choice made
    at one length is not reused four times longer, where a contender may no longer fit in memory."""
    edge = 1024
    while edge < n:
        edge *= 2
    return f"<={edge}"


@dataclass(frozen=True)
class ShapeClass:
    """What a timing result is valid for: the calls that share these fields run alike."""

    device_name: str
    torch: str
    triton: str
    dit_accel: str
    family: str
    dtype: str
    head_dim: int
    density: str  # a density_bucket label
    tokens: str = "any"  # token_bucket labels of the query and key lengths, "<=4096x<=4096"
    blocks: str = "any"  # the layout's block sizes, "128x128"
    #: "fwd" or "fwd+bwd": whether the calls record a backward. A training step's backend is its own decision:
    #: a choice made for no-grad calls (a backend without a backward, or one refused with the lse's gradient)
    #: is not reused for it.
    grad: str = "fwd"

    @classmethod
    def of(cls, family: str, request, density: Optional[float] = None) -> "ShapeClass":
        """The class of a :class:`dit_accel.kernels.backends.Request` (on a CUDA device)."""
        import torch

        from .. import __version__

        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        dev = request.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
        tokens = (f"{token_bucket(request.q_len)}x{token_bucket(request.kv_len)}"
                  if getattr(request, "q_len", 0) else "any")
        return cls(name, torch.__version__, triton_version, __version__, family,
                   str(request.dtype).replace("torch.", ""), int(request.head_dim), density_bucket(density), tokens,
                   f"{request.block_q}x{request.block_k}", "fwd+bwd" if getattr(request, "needs_grad", False) else "fwd")

    def key(self) -> str:
        return "|".join(str(v) for v in asdict(self).values())


# ----------------------------------------------------------------------------- the on-disk cache
_LOCK = threading.Lock()
_MEMORY: Dict[str, dict] = {}
_LOADED: Dict[str, bool] = {}


def cache_path() -> Path:
    """The JSON file holding the choices (``$DIT_ACCEL_CACHE/autotune.json``)."""
    from ..atomic_files import cache_root

    return cache_root() / "autotune.json"


_EXPECTED = 'the autotune cache: {"<shape class key>": {"choice": backend, "times_ms": {backend: ms or null}, ...}}'


def _stale(key, entry) -> bool:
    """A well-formed entry an older dit_accel wrote (its keys had fewer fields): dropped without a warning."""
    return (isinstance(key, str) and 1 < len(key.split("|")) < len(ShapeClass.__dataclass_fields__)
            and _valid_structure(entry))


def _valid_structure(entry) -> bool:
    """Every field a reader of the entry reads, of its type (an entry missing one would crash the call)."""
    from .._util import is_number

    return (isinstance(entry, dict) and isinstance(entry.get("choice"), str)
            and isinstance(entry.get("times_ms"), dict)
            and all(isinstance(k, str) and (t is None or is_number(t)) for k, t in entry["times_ms"].items())
            and isinstance(entry.get("date"), str)
            and all(isinstance(entry.get(name), int) and not isinstance(entry.get(name), bool)
                    for name in ("warmup", "repeats") if name in entry)
            and (isinstance(entry.get("rejected", []), list) and all(isinstance(n, str) for n in entry.get("rejected", [])))
            and isinstance(entry.get("skipped", {}), dict))


def _valid_entry(key, entry) -> bool:
    return (isinstance(key, str) and len(key.split("|")) == len(ShapeClass.__dataclass_fields__)
            and _valid_structure(entry))


def _read(path: Path, warn: bool = True) -> Dict[str, dict]:
    """The valid entries of the file ``path``; a damaged file or entry is dropped, with one warning naming the
    file when ``warn``; a stale one (an older key format) silently."""
    from ..atomic_files import read_entries

    data = read_entries(path, expected=_EXPECTED, valid=lambda k, v: _stale(k, v) or _valid_entry(k, v),
                        again="the backends are timed again", warn=_warn if warn else None)
    return {k: v for k, v in data.items() if not _stale(k, v)}


def _entries() -> Dict[str, dict]:
    """The stored choices; a damaged file (truncated, wrong structure) or entry is dropped with a warning
    naming it, and the shapes it held are timed again."""
    path = cache_path()
    if not _LOADED.get(str(path)):
        _LOADED[str(path)] = True
        if path.exists():
            data = _read(path)
            _MEMORY.update({k: v for k, v in data.items() if k not in _MEMORY})
    return _MEMORY


def _warn(message: str) -> None:
    import warnings

    from .._util import DitAccelWarning

    warnings.warn(message, DitAccelWarning, stacklevel=3)


def _store(key: str, entry: dict) -> None:
    """Add ``entry``: the file is re-read and merged under its lock file, so processes sharing a cache folder
    keep each other's entries (:func:`dit_accel.atomic_files.update_json`)."""
    from ..atomic_files import update_json, warn_unwritable_cache

    with _LOCK:
        entries = _entries()
        entries[key] = entry
        try:
            merged = update_json(cache_path(), lambda p: _read(p, warn=False), lambda disk: {**disk, key: entry},
                                 indent=1, sort_keys=True)
        except OSError as exc:
            warn_unwritable_cache(cache_path(), exc)
            return  # a read-only home still tunes, per process
        entries.update(merged)


def cached_choice(shape: ShapeClass) -> Optional[str]:
    """The stored choice for ``shape``, or None."""
    entry = _entries().get(shape.key())
    return entry["choice"] if entry else None


def cached_choices() -> List[dict]:
    """Every stored choice, for ``dit-accel info``:
    ``[{"key", "shape": {field: value}, "choice", "times_ms": {backend: ms or None}, "date", ...}]``."""
    fields = list(ShapeClass.__dataclass_fields__)
    out = []
    for key, entry in sorted(_entries().items()):
        out.append({"key": key, "shape": dict(zip(fields, key.split("|"))), **entry})
    return out


def info() -> dict:
    """The autotuner's state for ``dit-accel info``: ``{"enabled", "cache", "choices": {shape: "choice (times)"}}``."""
    choices = {}
    for row in cached_choices():
        shape = row["shape"]
        label = (f"{shape['device_name']} {shape['family']} {shape['dtype']} d{shape['head_dim']} "
                 f"density {shape['density']} tokens {shape['tokens']} blocks {shape['blocks']}")
        times = ", ".join(f"{k} {'failed' if t is None else f'{t:.3f} ms'}" for k, t in row["times_ms"].items())
        choices[label] = f"{row['choice']} ({times}; torch {shape['torch']}, triton {shape['triton']}, {row['date']})"
    return {"enabled": enabled(), "cache": str(cache_path()), "choices": choices}


def clear() -> None:
    """Forget every stored choice (in memory and on disk)."""
    with _LOCK:
        _MEMORY.clear()
        try:
            cache_path().unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------- timing and the decision
def cuda_event_timer(fn: Callable[[], object], warmup: int = 3, repeats: int = 10, device=None) -> float:
    """Median milliseconds of ``fn()`` on ``device``'s current CUDA stream (None: the current device's), timed with
    CUDA events after ``warmup`` calls."""
    from .._util import cuda_event

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = cuda_event(device)
        fn()
        end = cuda_event(device)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timer_on(device) -> Timer:
    """:func:`cuda_event_timer` on ``device``'s stream: what a decision timing a call's own inputs uses (the
    launchers run on the inputs' GPU, which need not be the current one)."""
    return lambda fn, warmup=3, repeats=10: cuda_event_timer(fn, warmup, repeats, device=device)


def choose(shape: ShapeClass, contenders: Mapping[str, Callable[[], object]], timer: Timer = cuda_event_timer,
           warmup: int = 3, repeats: int = 10, verify: Optional[Callable[[str], bool]] = None,
           skip: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The fastest contender for ``shape``: the stored choice, else time each and store the winner.

    A contender that raises is out (its time is recorded as ``None``). ``skip`` names contenders that are
    not even tried, with the reason (one that would materialise more memory than is free). ``verify(name)``
    runs a contender on the call and compares it with a reference: the fastest contender that passes is
    stored, and one that fails is out. Ties go to the earlier contender. None (and nothing stored) when no
    contender ran and passed: the caller then takes its fixed order.
    """
    names = [n for n in contenders if not skip or n not in skip]
    if not contenders:
        raise ValueError("choose() needs at least one contender")
    stored = cached_choice(shape)
    if stored in names:
        return stored
    if len(contenders) == 1 and verify is None:
        return names[0]
    times: Dict[str, Optional[float]] = {}
    for name in names:
        try:
            times[name] = float(timer(contenders[name], warmup, repeats))
        except Exception:  # a contender that cannot run these inputs is not chosen
            times[name] = None
    ranked = sorted((n for n in names if times[n] is not None), key=lambda n: (times[n], names.index(n)))
    rejected = []
    for best in ranked:
        try:
            passed = verify is None or bool(verify(best))
        except Exception:
            passed = False
        if not passed:
            rejected.append(best)
            continue
        _store(shape.key(), {"choice": best, "times_ms": times, "warmup": warmup, "repeats": repeats,
                             "rejected": rejected, "skipped": dict(skip or {}),
                             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
        return best
    return None
