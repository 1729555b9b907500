"""First-use self-check of every GPU kernel variant: run once, against the fp32 twin, before it is trusted.

A kernel *variant* (``"block_sparse.triton.fwd"``, ``"block_sparse.triton.fwd_ws"``, ``"sla.triton.classify"``,
...) is a code path a call can take. Before a call of ``backend="auto"`` or a forced backend runs a variant
for the first time on a (device arch, dtype, head dim, block sizes) with these torch, triton and dit_accel
versions and this kernel source, :func:`usable` runs the variant's own synthetic problem (more work items
than the GPU holds at once, ragged tiles, per-head layouts, an empty row) against the fp32 PyTorch twin and
keeps the verdict, in memory and in ``$DIT_ACCEL_CACHE/selfcheck.json``:

- a passing variant runs from then on with no further cost (a dictionary lookup per call signature);
- a failing variant is disabled with one warning naming it and its measured error: ``auto`` falls back to
  the next verified variant (the one-loop kernel for ws, the PyTorch twin for Triton), and a forced
  backend raises :class:`VariantFailed` (a :class:`~dit_accel.kernels.backends.BackendUnavailable`)
  instead of returning wrong numbers.

``$DIT_ACCEL_FAULT=<variant>[,<variant>...]`` corrupts the named variants' outputs where the launchers
write them (:func:`corrupt`): it proves that the check catches a broken kernel, on any device.
``DIT_ACCEL_SELFCHECK=0`` trusts every variant without checking (for measurements that stub kernels).
``dit-accel selftest`` runs every variant this machine would use and prints the verdicts.

Backends register their variants at import (:func:`register`); the check functions are theirs.

Example::

    from dit_accel.kernels import selfcheck
    for row in selfcheck.run_all("cuda"):
        print(row["variant"], row["verdict"], row["error"])
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import request as _request
from .request import BackendUnavailable, env_get, interpreting

__all__ = ["ENV_FAULT", "ENV_SELFCHECK", "Variant", "Result", "VariantFailed", "register", "variants", "variant",
           "usable", "usable_fast", "require", "gate", "gate_unverified", "corrupt", "faulted", "faults", "relative_error", "plan", "run_all",
           "UNCHECKED", "cached_verdicts", "clear", "cache_path", "enabled"]

#: Environment variable naming the variants whose output is corrupted (comma-separated), for proving the check.
ENV_FAULT = "DIT_ACCEL_FAULT"
#: Environment variable: ``0`` trusts every variant without running its check.
ENV_SELFCHECK = "DIT_ACCEL_SELFCHECK"


class VariantFailed(BackendUnavailable):
    """A kernel variant failed its self-check on this machine (the message names it and the error)."""


@dataclass(frozen=True)
class Result:
    """One check: the relative error against the fp32 twin, the bound it must stay within, the problem run."""

    error: float
    tolerance: float
    problem: str
    #: What ``error`` measures (the messages say it).
    measure: str = "relative error ||out - ref|| / ||ref|| against the fp32 reference"

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclass(frozen=True)
class Variant:
    """A kernel code path: its name, and how to tell whether it applies here and whether it is right.

    ``applies(device)``: None when this machine would run it, else why not. ``dtypes(device)``: the dtypes
    ``dit-accel selftest`` checks on that device. ``check(device, dtype, shape)``: runs the synthetic problem
    for ``shape`` (``{"head_dim", "block_q", "block_k"}``) and returns a :class:`Result`.
    ``shapes(device)``: the shapes ``selftest`` checks (the production ones of that device).
    """

    name: str
    family: str
    backend: str
    applies: Callable[[torch.device], Optional[str]]
    check: Callable[[torch.device, torch.dtype, dict], Result]
    dtypes: Callable[[torch.device], Tuple[torch.dtype, ...]] = field(default=lambda device: _default_dtypes(device))
    shapes: Callable[[torch.device], Tuple[dict, ...]] = field(default=lambda device: _default_shapes(device))
    #: The version of the package behind it ("" for the in-repo kernels, whose source hash is in every key): a
    #: vendor variant's verdict holds for that release only, so an upgrade is checked again.
    package_version: Callable[[], str] = field(default=lambda: "")


def _default_dtypes(device: torch.device) -> Tuple[torch.dtype, ...]:
    # The interpreter's bf16 dot is wrong (the launchers refuse bf16 there): fp32 and fp16 on the CPU. On a GPU
    # fp32 too: the block-sparse and dense kernels multiply it in tf32 (its own bound, kernels/_selfchecks.py).
    return (torch.bfloat16, torch.float16, torch.float32) if device.type == "cuda" else (torch.float32, torch.float16)


def _default_shapes(device: torch.device) -> Tuple[dict, ...]:
    if device.type == "cuda":
        return tuple({"head_dim": d, "block_q": b, "block_k": b} for d in (64, 128) for b in (64, 128))
    return ({"head_dim": 64, "block_q": 64, "block_k": 64},)


_REGISTRY: Dict[str, Variant] = {}
_LOCK = threading.RLock()


def register(v: Variant) -> Variant:
    """Add ``v`` (once per name; registering a name again replaces it). Returns ``v``."""
    with _LOCK:
        _REGISTRY[v.name] = v
    return v


def variants() -> List[Variant]:
    """Every registered variant, in name order (the in-repo ones register when :mod:`dit_accel.kernels` is
    imported, the vendor ones with :mod:`~dit_accel.kernels.block_sparse.backends`)."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def variant(name: str) -> Variant:
    """The registered variant ``name``; ValueError listing the names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"no kernel variant named {name!r}; the variants are: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- the fault switch
def _env(name: str) -> Optional[str]:
    return env_get(name)


def faults() -> Tuple[str, ...]:
    """The variant names ``$DIT_ACCEL_FAULT`` lists (empty when unset)."""
    raw = _env(ENV_FAULT)
    if not raw:
        return ()
    return tuple(s.strip() for s in raw.split(",") if s.strip())


def faulted(name: str) -> bool:
    """Whether ``$DIT_ACCEL_FAULT`` names ``name`` (one environment lookup when unset)."""
    return bool(_env(ENV_FAULT)) and name in faults()


def corrupt(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or, when ``$DIT_ACCEL_FAULT`` names ``name``, ``t`` corrupted in place (every value
    shifted by one and a quarter of them negated): what a broken kernel might return. Launchers call this on
    the output they hand back; unset, it costs one environment lookup."""
    if faulted(name):
        with torch.no_grad():
            t.add_(1.0)
            t[..., ::4].neg_()
    return t


def enabled() -> bool:
    """Whether variants are checked before use: ``$DIT_ACCEL_SELFCHECK`` unset or ``1`` (``true``, ``on``,
    ``yes``); ``0`` (``false``, ``off``, ``no``) trusts them; ValueError naming the variable on any other value
    (``disable`` left the checks on, silently)."""
    return _request.env_switch(ENV_SELFCHECK, "check each kernel variant on first use", "trust every variant "
                               "unchecked, for measurements that stub kernels", "check them, the default") is not False


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32 (over finite reference entries; ``inf`` where ``out`` is not finite
    there). Entries where both are ``-inf`` (an lse of a row that sees no key) count as equal."""
    out, ref = out.detach().float(), ref.detach().float()
    both_inf = torch.isinf(ref) & (out == ref)
    keep = torch.isfinite(ref)
    if not bool(torch.isfinite(out[keep]).all()) or bool((~keep & ~both_inf).any()):
        return float("inf")
    diff = (out[keep] - ref[keep]).norm()
    return float(diff / ref[keep].norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------- verdicts and their cache
def cache_path() -> Path:
    """The JSON file holding the verdicts (``$DIT_ACCEL_CACHE/selfcheck.json``)."""
    from ..atomic_files import cache_root

    return cache_root() / "selfcheck.json"


_SOURCE: List[str] = []


def _source_hash() -> str:
    """A digest of the kernel sources: any change to a kernel or launcher invalidates its verdicts."""
    if not _SOURCE:
        h = hashlib.sha256()
        root = Path(__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _SOURCE.append(h.hexdigest()[:16])
    return _SOURCE[0]


def _arch(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor} {torch.cuda.get_device_name(device)}"
    return "cpu (triton interpreter)" if interpreting() else "cpu"


def _key(name: str, device: torch.device, dtype: torch.dtype, shape: dict) -> str:
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    dims = f"d{shape['head_dim']} {shape['block_q']}x{shape['block_k']}"
    parts = (name, _arch(device), str(dtype).replace("torch.", ""), dims, f"torch {torch.__version__}",
             f"triton {triton_version}", f"dit_accel {__version__}", _source_hash())
    package = _REGISTRY[name].package_version() if name in _REGISTRY else ""
    return "|".join(parts + ((f"package {package}",) if package else ()))


_MEMORY: Dict[str, dict] = {}
_LOADED: List[str] = []
_WARNED: set = set()
_RUNNING: set = set()


_EXPECTED = ('the self-check verdicts: {"<key>": {"ok": bool, "error": number or null, "tolerance": number, '
             '"problem": text, "seconds": number, ...}}')


def _valid_verdict(entry) -> bool:
    """Every field a reader of the verdict reads, of its type (an entry missing one would crash the call)."""
    from .._util import is_number

    texts = ("variant", "dtype", "arch", "date")
    return (isinstance(entry, dict) and isinstance(entry.get("ok"), bool) and "error" in entry
            and (entry["error"] is None or is_number(entry["error"])) and is_number(entry.get("tolerance"))
            and isinstance(entry.get("problem"), str) and is_number(entry.get("seconds"))
            and all(isinstance(entry[name], str) for name in texts if name in entry)
            and isinstance(entry.get("shape", {}), dict) and isinstance(entry.get("faulted", False), bool))


def _read(path: Path, warn: bool = True) -> Dict[str, dict]:
    """The valid verdicts of the file ``path``; a damaged file or entry is dropped (checked again), with one
    warning naming the file when ``warn``."""
    from ..atomic_files import read_entries

    return read_entries(path, expected=_EXPECTED, valid=lambda key, entry: _valid_verdict(entry),
                        again="the variants are checked again", warn=_warn_store if warn else None)


def _warn_store(message: str) -> None:
    import warnings

    from .._util import DitAccelWarning

    warnings.warn(message, DitAccelWarning, stacklevel=4)


def _entries() -> Dict[str, dict]:
    path = cache_path()
    if str(path) not in _LOADED:
        _LOADED.append(str(path))
        if path.exists():
            _MEMORY.update({k: v for k, v in _read(path).items() if k not in _MEMORY})
    return _MEMORY


def _store(key: str, entry: dict) -> None:
    """Add ``entry``: the file is re-read and merged under its lock file, so processes sharing a cache folder
    keep each other's verdicts (:func:`dit_accel.atomic_files.update_json`)."""
    from ..atomic_files import update_json, warn_unwritable_cache

    _MEMORY[key] = entry
    _FAST.clear()
    if faults():  # a verdict under a simulated fault is for this process only
        return
    mine = {k: v for k, v in _MEMORY.items() if not v.get("faulted")}
    try:
        merged = update_json(cache_path(), lambda p: _read(p, warn=False), lambda disk: {**mine, **disk, key: entry},
                             indent=1, sort_keys=True)
    except OSError as exc:
        warn_unwritable_cache(cache_path(), exc)
        return  # a read-only home still checks, per process
    for k, v in merged.items():
        _MEMORY.setdefault(k, v)


def _no_functorch():
    """A scope where torch.func transforms active around it do not apply (torch's own switch; absent: none)."""
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _no_autocast():
    """A scope where the caller's ``torch.autocast`` regions (any device type) do not apply: a check asked inside one
    computed its fp32 reference in the region's half precision, failed a sound kernel (under CPU bf16 autocast, against
    a bound of 1e-4: 0.0096 for the fp32 block-sparse forward, 0.0032 for VSA's coarse kernel, 0.0026 for SLA's
    forward) and stored the failure, which disabled the variant on this machine for every later run."""
    stack = contextlib.ExitStack()
    for kind in ("cuda", "cpu", "xpu", "mps", "hpu"):
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def _run_check(v: Variant, device: torch.device, dtype: torch.dtype, shape: dict) -> dict:
    start = time.perf_counter()
    try:
        # (whatever the caller's mode: a backward's check may be asked for inside a backward, where grad is off;
        # and outside the caller's torch.func transforms: inside vmap, grad or jvp every check crashed, and the
        # failed verdict, stored, disabled a sound variant on this machine)
        # (and outside the caller's autocast)
        with torch.inference_mode(False), torch.enable_grad(), _no_functorch(), _no_autocast():
            res = v.check(device, dtype, dict(shape))
        error, tol, problem, measure = float(res.error), float(res.tolerance), res.problem, res.measure
        ok = res.ok
    except Exception as err:  # a crash is a failed check, with its message
        error, tol, problem, ok = float("inf"), 0.0, f"raised {type(err).__name__}: {str(err)[:300]}", False
        measure = Result.measure
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"variant": v.name, "ok": ok, "error": error if math.isfinite(error) else None, "tolerance": tol,
            "problem": problem, "measure": measure, "seconds": round(time.perf_counter() - start, 3), "dtype": str(dtype).replace("torch.", ""),
            "shape": dict(shape), "arch": _arch(device), "faulted": bool(faults()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fault_tag() -> str:
    f = faults()
    return "|fault=" + ",".join(sorted(f)) if f else ""


def verdict(name: str, device, dtype: torch.dtype, shape: dict, *, fresh: bool = False) -> dict:
    """The verdict of variant ``name`` for (``device``'s arch, ``dtype``, ``shape``), checking it now if it
    was not checked yet (or ``fresh``): a dict with ``ok``, ``error``, ``tolerance``, ``problem``, ``seconds``."""
    device = torch.device(device)
    v = variant(name)
    key = _key(name, device, dtype, shape) + _fault_tag()
    with _LOCK:
        entry = None if fresh else _entries().get(key)
        if entry is None:
            _RUNNING.add(name)
            try:
                entry = _run_check(v, device, dtype, shape)
            finally:
                _RUNNING.discard(name)
            _store(key, entry)
    return entry


def stored(name: str, device, dtype: torch.dtype, shape: dict) -> Optional[bool]:
    """Variant ``name``'s stored verdict for ``device``/``dtype``/``shape`` (True: passed), None where it has not
    been checked; runs nothing (a question a trace or a graph capture may ask)."""
    entry = _entries().get(_key(name, torch.device(device), dtype, shape) + _fault_tag())
    return None if entry is None else bool(entry["ok"])


def usable(name: str, device, dtype: torch.dtype, shape: Optional[dict] = None) -> bool:
    """Whether variant ``name`` passed its self-check for ``device``/``dtype``/``shape`` (checked now on first
    use). A failure warns once per variant, naming it and its error. True while the variant's own check runs
    (the check calls the launchers that ask), while tracing or capturing a graph (no work may run then; a
    stored failure still counts), and when ``DIT_ACCEL_SELFCHECK=0``. False where the variant does not apply
    on this device (``selftest``'s "n/a": the warp-specialized forward off sm_90, say)."""
    if not enabled() or name in _RUNNING:
        return True
    device = torch.device(device)
    if name in _REGISTRY and _REGISTRY[name].applies(device) is not None:
        return False  # does not apply here (selftest says n/a): never run it unchecked
    shape = shape or _default_shapes(device)[0]
    if _request.in_graph():
        entry = _entries().get(_key(name, device, dtype, shape) + _fault_tag())
        return entry is None or entry["ok"]
    entry = verdict(name, device, dtype, shape)
    if not entry["ok"] and name not in _WARNED:
        _WARNED.add(name)
        import warnings

        from .._util import DitAccelWarning

        warnings.warn(f"dit_accel: kernel variant {name} failed its self-check on {_arch(device)} "
                      f"({_describe(entry)}); it is disabled: backend='auto' runs the next verified variant. "
                      f"`dit-accel selftest` shows every verdict.", DitAccelWarning, stacklevel=3)
    return entry["ok"]


_FAST: Dict[tuple, bool] = {}


def usable_fast(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, block_q: int,
                block_k: int) -> bool:
    """:func:`usable` for a launcher's per-call question, memoised per (variant, device, dtype, shape, faults):
    one dictionary lookup after the first call. Answers given while the variant's own check runs, or inside a
    traced or captured graph (where an unchecked variant is trusted for now), are not memoised: the next eager
    call still checks it."""
    key = (name, device, dtype, head_dim, block_q, block_k, _env(ENV_FAULT), _env(ENV_SELFCHECK))
    hit = _FAST.get(key)
    if hit is None:
        hit = usable(name, device, dtype, {"head_dim": head_dim, "block_q": block_q, "block_k": block_k})
        if name not in _RUNNING and not _request.in_graph():
            _FAST[key] = hit
    return hit


def _describe(entry: dict) -> str:
    if entry["error"] is None:
        return f"no finite output on {entry['problem']}"
    measure = entry.get("measure") or Result.measure
    return f"{measure}: {entry['error']:.3g} > its bound {entry['tolerance']:.1e} on {entry['problem']}"


#: What a forced backend's caller can do where a variant failed (:func:`require`).
FORCED_ADVICE = "use backend='auto' (it takes the next verified variant) or backend='torch'"


def require(name: str, device, dtype: torch.dtype, shape: Optional[dict] = None, *,
            advice: str = FORCED_ADVICE) -> None:
    """Raise :class:`VariantFailed` when variant ``name`` fails its self-check (for forced backends); ``advice``
    says what the caller can do instead (an entry point without a ``backend`` argument says its own)."""
    if not usable(name, device, dtype, shape):
        entry = _entries().get(_key(name, torch.device(device), dtype, shape or _default_shapes(torch.device(device))[0])
                               + _fault_tag()) or {}
        raise VariantFailed(f"kernel variant {name} failed its self-check on {_arch(torch.device(device))} "
                            f"({_describe(entry) if entry else 'see dit-accel selftest'}), so it does not run: "
                            f"{advice}, and report the selftest output (`dit-accel selftest --json`).")


def gate(names, device, dtype: torch.dtype, shape: dict, forced: bool) -> bool:
    """Whether every variant of ``names`` may run this call: a forced backend raises where one failed
    (:func:`require`), ``auto`` gets False and falls back."""
    for name in names:
        if usable_fast(name, device, dtype, shape["head_dim"], shape["block_q"], shape["block_k"]):
            continue  # (one dictionary lookup once checked: resolve may ask on every call)
        if forced:
            require(name, device, dtype, shape)
        return False
    return True


def gate_unverified(name: str, device, dtype: torch.dtype, shape: dict, forced: Optional[bool]) -> bool:
    """:func:`gate` for a variant that has never run on a GPU, asked with its switch's value ``forced`` (True,
    False, None unset): inside a trace or a CUDA graph capture, which may run no check, an unforced call takes it
    only where a stored verdict says it passed (:func:`usable` trusts an unchecked variant there)."""
    if forced is None and _request.in_graph():
        return stored(name, device, dtype, shape) is True
    return gate([name], device, dtype, shape, forced=bool(forced))


# ----------------------------------------------------------------------------- selftest and info
#: ``verdict`` of a row that ``run_all`` did not reach before its time ran out (not a failure: not checked).
UNCHECKED = "unchecked"


def plan(device="cpu", names: Optional[List[str]] = None) -> Tuple[List[dict], List[tuple]]:
    """What :func:`run_all` would check on ``device``: the "n/a" rows of the variants that do not apply, and
    one ``(variant name, dtype, shape)`` task per check (the "M" of "N of M checked")."""
    device = torch.device(device)
    na, tasks = [], []
    for v in variants():
        if names and v.name not in names:
            continue
        reason = v.applies(device)
        if reason is not None:
            na.append({"variant": v.name, "problem": "", "error": None, "verdict": "n/a", "reason": reason,
                       "seconds": 0.0})
            continue
        tasks.extend((v.name, dtype, dict(shape)) for dtype in v.dtypes(device) for shape in v.shapes(device))
    return na, tasks


def _row(entry: dict) -> dict:
    return {"variant": entry["variant"], "dtype": entry["dtype"], "problem": entry["problem"],
            "error": entry["error"], "tolerance": entry["tolerance"],
            "verdict": "pass" if entry["ok"] else "FAIL", "seconds": entry["seconds"],
            **({"crashed": True} if entry.get("crashed") else {})}


def _pool_check(device: str, name: str, dtype: torch.dtype, shape: dict) -> Tuple[str, dict]:
    """One check in a worker process (its kernels compile there, beside the other workers'): the stored key
    and the verdict, which the worker has also merged into the shared verdict file."""
    dev = torch.device(device)
    entry = verdict(name, dev, dtype, shape, fresh=True)
    return _key(name, dev, dtype, shape) + _fault_tag(), entry


def run_all(device="cpu", names: Optional[List[str]] = None, *, jobs: int = 1, budget_s: Optional[float] = None,
            progress: Optional[Callable[[int, int, dict], None]] = None,
            clock: Callable[[], float] = time.monotonic, grace_s: float = 10.0) -> List[dict]:
    """Check every variant that applies on ``device`` (or those in ``names``) afresh, at every dtype and
    shape it runs in production there. One row per (variant, dtype, shape), plus one row per variant that
    does not apply here (``verdict`` ``"n/a"`` and the reason).

    ``jobs`` > 1 runs the checks in that many worker processes at once: a cold GPU machine spends most of
    the run compiling (about a hundred Triton kernels, one CPU core each), and the workers compile side by
    side. ``budget_s``: no check starts after that many seconds, and with workers the checks still running
    ``grace_s`` later are abandoned (their workers stopped), so the run ends near its budget (on an H100 the
    in-flight compiles ran it 30 s past a 140 s budget, into the caller's own limit); the rows not reached say
    ``"unchecked"`` (:data:`UNCHECKED`), so a caller can tell "N of M checked" from a full pass.
    ``progress(done, total, row)`` is called after each check."""
    device = torch.device(device)
    na, tasks = plan(device, names)
    start = clock()

    def out_of_time(extra: float = 0.0) -> bool:
        return budget_s is not None and clock() - start >= budget_s + extra

    rows: List[Optional[dict]] = [None] * len(tasks)

    def finish(i: int, entry: dict) -> None:
        rows[i] = _row(entry)
        if progress is not None:
            progress(sum(r is not None for r in rows), len(tasks), rows[i])

    if jobs <= 1 or len(tasks) <= 1:
        for i, (name, dtype, shape) in enumerate(tasks):
            if out_of_time():
                break
            finish(i, verdict(name, device, dtype, shape, fresh=True))
    else:
        _run_pool(device, tasks, jobs, out_of_time, finish, grace_s)
    for i, (name, dtype, shape) in enumerate(tasks):
        if rows[i] is None:
            rows[i] = {"variant": name, "dtype": str(dtype).replace("torch.", ""), "problem": "", "error": None,
                       "verdict": UNCHECKED, "reason": "the time budget ran out before this check ended", "seconds": 0.0,
                       "shape": shape}
    return _in_name_order(na, rows)


def _in_name_order(na: List[dict], rows: List[dict]) -> List[dict]:
    order = {v.name: i for i, v in enumerate(variants())}
    return sorted(na + rows, key=lambda r: order.get(r["variant"], len(order)))  # (stable: tasks keep theirs)


#: Seconds a check took on a fresh H200 machine (2e62cde, 2026-11-28, 8 workers: its compiles included), per
#: (variant, dtype) and per variant (any other dtype); other checks took about a second. The SLA fp32 checks ran last
#: in variant order and the run took 160 s for 551 s of checks; started first, the longest (64 s) fits a run of
#: about 551 / 8 s.
_EXPECTED_S = {("sla.triton.bwd", "float32"): 64.0, ("sla.triton.fwd", "float32"): 58.0, "sla.triton.bwd": 15.0,
               "block_sparse.triton.bwd": 7.0, "dense.triton.bwd": 3.0, "sla.triton.classify": 3.0,
               "block_sparse.triton.bwd_dkdv_dq": 3.0, "sla.triton.bwd_glue": 15.0}  # (glue: bwd's, not yet run)


def expected_seconds(device: torch.device, name: str, dtype: torch.dtype, shape: dict) -> float:
    """How long a check of ``name`` at ``dtype`` and ``shape`` should take: its last run's seconds where this
    machine's verdict cache holds one, else :data:`_EXPECTED_S`'s figure, else 1. The worker pool starts the longest
    checks first, so none is left to run alone at the end of a run."""
    entry = _entries().get(_key(name, device, dtype, shape))
    if entry is not None and entry.get("seconds"):
        return float(entry["seconds"])
    dt = str(dtype).replace("torch.", "")
    return _EXPECTED_S.get((name, dt), _EXPECTED_S.get(name, 1.0))


def _run_pool(device: torch.device, tasks: List[tuple], jobs: int, out_of_time: Callable[..., bool],
              finish: Callable[[int, dict], None], grace_s: float) -> None:
    """The tasks in ``jobs`` spawned worker processes (spawned, not forked: CUDA does not survive a fork), the
    longest first (:func:`expected_seconds`), each task submitted while time is left; a worker that dies is that
    task's failed check. Checks still running ``grace_s`` past the budget are abandoned: their workers are stopped
    and their rows stay unset."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = sorted(enumerate(tasks), key=lambda it: -expected_seconds(device, *it[1]))  # the longest first
    running = {}
    ex = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        while pending or running:
            while pending and len(running) < 2 * jobs and not out_of_time():
                i, (name, dtype, shape) = pending.pop(0)
                try:
                    running[ex.submit(_pool_check, str(device), name, dtype, shape)] = i
                except RuntimeError as err:  # the pool broke (a worker died): the rest fail with the reason
                    for j, _ in [(i, None)] + pending:
                        finish(j, _crash_entry(err, device, tasks[j]))
                    pending = []
            if not running or out_of_time(grace_s):
                break
            done, _ = wait(running, timeout=5.0, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                try:
                    key, entry = fut.result()
                except Exception as err:  # the worker crashed (a fault that killed the process, say)
                    key, entry = None, _crash_entry(err, device, tasks[i])
                if key is not None:
                    with _LOCK:
                        _MEMORY[key] = entry
                        _FAST.clear()
                finish(i, entry)
    finally:
        if running:  # abandoned past the budget: stop the workers rather than wait for their compiles
            for proc in list(getattr(ex, "_processes", {}).values()):
                proc.terminate()
            ex.shutdown(wait=False, cancel_futures=True)
        else:
            ex.shutdown(wait=True)


def _crash_entry(err: BaseException, device: torch.device, task: tuple) -> dict:
    """The failed verdict of a check whose worker process died (it is not stored: the next use checks again)."""
    name, dtype, shape = task

    def check(device, dtype, shape):
        raise RuntimeError(f"the worker process running this check died: {type(err).__name__}: {err}")

    return {**_run_check(Variant(name, "", "", lambda device: None, check), device, dtype, shape), "variant": name,
            "crashed": True}


def cached_verdicts() -> List[dict]:
    """Every stored verdict, for ``dit-accel info``."""
    return [{"key": k, **v} for k, v in sorted(_entries().items())]


def clear() -> None:
    """Forget every verdict (in memory and on disk); the variants are checked again on next use."""
    with _LOCK:
        _MEMORY.clear()
        _WARNED.clear()
        _FAST.clear()
        try:
            cache_path().unlink()
        except OSError:
            pass
