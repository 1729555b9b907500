"""``dit-accel bench gpu``: the acceptance run on a GPU machine (checks, then timings), in 15 minutes.

:func:`bench_gpu` runs, in this order, within ``budget_s`` seconds (default :data:`BUDGET_S`):

1. with ``check=True`` (``--check``), the kernels' first-use self-checks: ``dit-accel selftest --device cuda
   --json`` in a subprocess (every variant this machine would use, against its fp32 twin);
2. ``pytest -m gpu`` in a subprocess (``tests/kernels/test_gpu_production.py`` and the other GPU tests);
3. the timings, at production sizes (:data:`STANDARD_SHAPES`: Wan 2.1 14B at 480p and 720p, 40 heads x
   batch 2; FLUX 1024 px, 24 x 1; Wan 2.1 1.3B 480p, 12 x 1; FLUX 4K; FastWan's 448x832, 12 x 1), bf16:

   - dense: SDPA (PyTorch's pick, and pinned to flash and to cuDNN), the in-repo Triton kernel, flash-attn
     2/3/4 where installed, and ``dense [fastest]`` (:mod:`dit_accel.kernels.dense.choice`, what ``auto``'s
     dense fallback runs), without and with the lse; forward, and forward + backward;
   - Tile (at the default 64-token STA tile, with that tile fitted to the grid, ``tile-fit``, whose density is
     the fitted setting's, and at a 128-token tile, ``tile-128``), GNA, radial (video) and
     SLA at :data:`STANDARD_DENSITIES`, and VSA (with a gate, at sparsity 1 - density, its coarse-and-select and
     fine launches also alone), through the layout production runs (``plan.kernel_layout(device)``:
     the 128-row layout of the sm_90 ws + resume forward where the plan has one, as ``tile-128`` does),
     with ``backend="auto"`` and the autotuner off and on (:data:`AUTOTUNE_MODES`; "on" at the first
     density only, to stay in the budget), and with ``backend="triton"`` forced wherever ``auto`` chose
     another backend (dense attention where the cost model has the sparse kernel lose);

   each shape gets an equal share of the time left when it starts (what a quick shape leaves goes to the next),
   so every shape, the 720p one included, is reached. Within a shape: dense SDPA (the baseline of every
   speed-up), then the sparse rows with the autotuner off, then the other dense candidates and the autotuner's
   choices; cases that no longer fit their share are rows marked ``skipped`` and counted in the summary.

Every timed row carries its correctness (``o_error``: relative error of ``o`` against the fp32 twin;
``grad_error``: the largest of dq, dk, dv's, for forward + backward rows) on the first batch entry's first
:data:`~.bench_gpu_cases.TWIN_HEADS` heads, the tolerance, and ``variant``: what actually ran (the dense candidate or SDPA
backend; for block-sparse Triton, the configurations the launcher cached for the layout, read after the
call by :func:`dit_accel.kernels.block_sparse.launches.launched_variants`: one-loop, persistent, or ws +
resume). The fp32 twins: a chunked fp32 attention with its exact backward written here (dense), the
PyTorch backend on fp32 copies (block-sparse, SLA).

The report (``DIR/gpu_report.json`` and ``DIR/gpu_report.md``) ends with ``failures``: a self-check or
``pytest -m gpu`` that failed, a row that crashed (an exception, out of memory) and a row over its
tolerance. The CLI exits 1 when there is any. The timer, the clock and the two subprocess runners are
arguments, so the CPU-side logic is tested with fakes (``tests/eval/test_bench_gpu.py``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .bench import ModelShape
from .report import percent_down
from .bench_gpu_cases import GRAD_TOLERANCE, O_TOLERANCE, _Shape, _short, _skipped, fp32_dense, relative_error

__all__ = ["STANDARD_SHAPES", "STANDARD_DENSITIES", "STANDARD_METHODS", "AUTOTUNE_MODES", "BUDGET_S",
           "O_TOLERANCE", "GRAD_TOLERANCE", "bench_gpu", "gpu_markdown", "machine_info", "failures", "targets",
           "fp32_dense", "relative_error"]

STANDARD_SHAPES = (
    ModelShape("Wan2.1 14B 480p", (21, 30, 52), 40, batch=2),   # N = 32,760
    ModelShape("Wan2.1 14B 720p", (21, 45, 80), 40, batch=2),   # N = 75,600
    ModelShape("FLUX 1024px", (64, 64), 24),                    # N = 4,096
    ModelShape("Wan2.1 1.3B 480p", (21, 30, 52), 12),
    ModelShape("FLUX 4K", (256, 256), 24),                      # N = 65,536
    ModelShape("FastWan 448x832", (16, 28, 52), 12),            # N = 23,296: VSA's own shape (61 frames)
)
STANDARD_DENSITIES = (0.05, 0.1, 0.2)
#: ``sla``: SLA with a zero projection whose linear branch is computed (as under training); ``sla-topk``: without
#: a projection (training-free top-k, what pipelines run while every projection is still zero); ``vsa``: VSA with
#: a gate at sparsity 1 - density (video grids only), its coarse-and-select and fine launches also timed alone.
STANDARD_METHODS = ("tile", "tile-fit", "tile-128", "gna", "radial", "sla", "sla-topk", "vsa")
AUTOTUNE_MODES = ("off", "on")
#: Seconds for the whole run (self-checks, pytest, timings): 15 minutes, enough on a cold cache.
BUDGET_S = 900.0
#: At most this many seconds for ``dit-accel selftest`` and for ``pytest -m gpu``; the timings get the rest. The
#: first GPU run (H100, 2026-11-25) took 147 s for the half-precision self-checks on a cold cache (about 100
#: compiles); fp32 adds a third, so 360 s fits a cold cache with room.
SELFTEST_S = 360.0
PYTEST_S = 300.0
#: Seconds before the self-checks' time limit at which ``selftest --budget`` starts no more checks: the longest
#: single check (a cold compile of the backward at d=128) stays inside it.
SELFTEST_MARGIN_S = 45.0
#: Seconds kept for the timings whatever the checks take.
TIMING_MIN_S = 120.0


def machine_info(device: torch.device) -> dict:
    """Machine, versions, commit and date for the report's header."""
    from .._util import versions

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "versions": versions(("torch", "triton", "diffusers", "flash_attn", "flash_attn_interface")),
            "commit": _git_commit(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"sm_{props.major}{props.minor}",
                    cuda=torch.version.cuda)
    return info


def _root() -> Path:
    return Path(__file__).resolve().parents[2]


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_root(), capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_root(),
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ----------------------------------------------------------------------------- the run
def bench_gpu(out_dir, *, device="cuda", shapes: Sequence[ModelShape] = STANDARD_SHAPES,
              densities: Sequence[float] = STANDARD_DENSITIES, methods: Sequence[str] = STANDARD_METHODS,
              backward: bool = True, budget_s: float = BUDGET_S, check: bool = False, pytest_gpu: bool = True,
              autotune: Sequence[str] = AUTOTUNE_MODES, forced: Optional[str] = "triton",
              dtype: Optional[torch.dtype] = None, timer=None,
              calls: int = 5, repeats: int = 3, run_pytest: Optional[Callable[[float], dict]] = None,
              run_selftest: Optional[Callable[[float], dict]] = None,
              clock: Callable[[], float] = time.monotonic, log=print, allow_partial: bool = False) -> dict:
    """Run the acceptance set (module docstring) within ``budget_s`` seconds; write the JSON and markdown
    reports into ``out_dir`` and return the JSON dict (its ``failures`` list is empty when all is well).

    ``forced``: the backend timed beside ``auto`` wherever ``auto`` ran another one (None: none).
    ``allow_partial``: a self-check or ``pytest -m gpu`` run cut short by its time limit is not a failure
    (by default it is: the acceptance run must cover every check).
    ``timer``: a :class:`~dit_accel.eval.timing.CallTimer` (default: CUDA events on CUDA, perf_counter
    elsewhere); ``run_selftest(timeout_s)`` and ``run_pytest(timeout_s)`` ->
    ``{"returncode", "summary", ...}`` replace the subprocesses (tests pass fakes)."""
    from .timing import CpuCallTimer, CudaCallTimer

    start = clock()
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    timer = timer or (CudaCallTimer(device) if cuda else CpuCallTimer())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"kind": "gpu-report", "machine": machine_info(device), "dtype": str(dtype), "budget_s": budget_s,
              "densities": list(densities), "methods": list(methods), "autotune": list(autotune),
              "tolerance": {"o": O_TOLERANCE, "grads": GRAD_TOLERANCE}, "rows": [], "notes": [],
              "allow_partial": allow_partial}

    def left() -> float:
        return budget_s - (clock() - start)

    if check:
        report["selftest"] = _guarded(run_selftest or _selftest_runner(device), min(SELFTEST_S, max(left(), 1.0)))
        log(f"selftest: {report['selftest'].get('summary')}")
    if pytest_gpu:
        report["pytest"] = _guarded(run_pytest or _run_pytest, min(PYTEST_S, max(left() - TIMING_MIN_S, 30.0)))
        log(f"pytest -m gpu: {report['pytest'].get('summary')}")
    timing_start = clock()
    _run_shapes(shapes, densities, methods, autotune, forced, device, dtype, backward, timer, calls, repeats, left,
                report["rows"], report["notes"], log)
    report["bench_seconds"] = clock() - timing_start
    report["total_seconds"] = clock() - start
    report["failures"] = failures(report)
    report["targets"] = targets(report["rows"])
    from .._util import to_jsonable

    # (a kernel's non-finite error is inf: JSON has none, so null there; its failure line names it)
    (out_dir / "gpu_report.json").write_text(json.dumps(to_jsonable(report), indent=1, allow_nan=False) + "\n")
    (out_dir / "gpu_report.md").write_text(gpu_markdown(report))
    log(f"wrote {out_dir / 'gpu_report.json'} and {out_dir / 'gpu_report.md'} ({report['total_seconds']:.0f} s)")
    return report


def _guarded(runner: Callable[[float], dict], timeout: float) -> dict:
    try:
        return runner(timeout)
    except Exception as exc:
        return {"returncode": None, "summary": f"could not run: {_short(exc)}"}


def failures(report: dict) -> List[str]:
    """Every check that failed, one sentence each: the self-checks, ``pytest -m gpu``, rows that crashed
    and rows over their tolerance; and a self-check or ``pytest -m gpu`` run that did not cover everything (out
    of time) unless ``report["allow_partial"]``. Rows skipped for the time budget are not failures (the summary
    counts them)."""
    out = []
    partial_ok = bool(report.get("allow_partial"))
    self_test = report.get("selftest")
    if self_test is not None:
        bad = [f"{r.get('variant')} {r.get('dtype', '')}".strip() + f" (error {r.get('error')})"
               for r in self_test.get("rows", [])
               if str(r.get("verdict", "")).lower() not in _PASSED + (_UNCHECKED,)]
        if bad or (self_test.get("returncode") != 0 and not self_test.get("incomplete")):
            out.append(f"selftest: {self_test.get('summary')}" + (f": {', '.join(bad)}" if bad else ""))
        elif self_test.get("incomplete") and not partial_ok:
            out.append(f"selftest: coverage incomplete: {self_test.get('summary')} (a kernel not checked is not "
                       "known to be right; give the run more time, or pass --allow-partial to accept it)")
    py = report.get("pytest")
    if py is not None and py.get("returncode") != 0 and not py.get("incomplete"):
        out.append(f"pytest -m gpu: {py.get('summary')} (exit {py.get('returncode')})")
    elif py is not None and py.get("incomplete") and not partial_ok:
        out.append(f"pytest -m gpu: coverage incomplete: {py.get('summary')} (pass --allow-partial to accept it)")
    for r in report.get("rows", []):
        where = f"{r['shape']} {r['kernel']} {r.get('pass', '')} density {r.get('density')}"
        if r.get("status") == "failed":
            out.append(f"{where}: crashed: {r.get('error')}")
        for field, tol in (("o_error", O_TOLERANCE), ("grad_error", GRAD_TOLERANCE)):
            value = r.get(field)
            if value is not None and not (value <= tol):  # NaN fails too
                out.append(f"{where}: {field} {value:.3g} > {tol:g} against the fp32 twin")
    return out


#: Timing noise allowed where a target compares two measured times ("at least as fast as SDPA").
TIMING_NOISE = 0.02


def targets(rows: Sequence[dict]) -> List[dict]:
    """Issue 35's speed targets, each ``{"target", "shape", "value", "met"}`` from the timed rows (``met`` is None
    where a row it needs did not run):

    - Tile / GNA at 5% on Wan 2.1 14B 480p and 720p: >= 85% of the 1/density ideal (forward, ``auto``);
    - dense steps (``dense [fastest]``) at least as fast as SDPA, forward and forward + backward (within
      :data:`TIMING_NOISE`);
    - SLA with its (zero) projection >= 4x SDPA at Wan 480p, 5% (forward);
    - ``auto`` never slower than dense by more than 3% (each ``auto`` row against the faster of SDPA and
      ``dense [fastest]`` in the same pass);
    - ``auto`` never slower than the sparse kernel forced beside it by more than 3% (where ``auto`` chose
      another backend, dense attention say, the Triton kernel's row at the same density and pass; and each vendor
      kernel's forced row, one target per forced row).

    ``gpu_markdown`` prints each value rounded away from its bound, so a printed value never contradicts ``met``."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("time_ms") is not None]
    out: List[dict] = []

    def add(target, shape, value, met):
        out.append({"target": target, "shape": shape, "value": value, "met": met})

    for r in ok:
        auto = r.get("backend") == "auto"
        if (auto and r.get("autotune") == "off" and r["pass"] == "forward" and r.get("target_density") == 0.05
                and "14B" in r["shape"] and r["kernel"].split(" ")[0] in ("tile", "tile-fit", "tile-128", "gna")):
            frac = r.get("fraction_of_ideal")
            add(f"{r['kernel']} at 5%: >= 85% of the 1/density ideal", r["shape"], frac,
                None if frac is None else frac >= 0.85)
        if (auto and r["kernel"].startswith("sla ") and r["pass"] == "forward" and r.get("target_density") == 0.05
                and "480p" in r["shape"] and r.get("autotune") == "off"):
            add("SLA with projection at 5%: >= 4x SDPA", r["shape"], r.get("speedup"),
                None if r.get("speedup") is None else r["speedup"] >= 4.0)
    dense = {}
    for r in ok:
        if r["kernel"] in ("dense SDPA", "dense [fastest]"):
            dense.setdefault((r["shape"], r["pass"]), {})[r["kernel"]] = r["time_ms"]
    for (shape, pass_), times in dense.items():
        if "dense SDPA" in times and "dense [fastest]" in times:
            ratio = times["dense SDPA"] / times["dense [fastest]"]
            add(f"dense steps at least as fast as SDPA ({pass_})", shape, ratio, ratio >= 1.0 - TIMING_NOISE)
    for r in ok:
        times = dense.get((r["shape"], r["pass"]), {})
        if r.get("backend") == "auto" and times:
            ratio = r["time_ms"] / min(times.values())
            add(f"{r['kernel']} ({r['pass']}, density {r.get('target_density')}): auto <= 1.03 x dense",
                r["shape"], ratio, ratio <= 1.03)

    def case(r):
        return r["shape"], r["pass"], r["kernel"].split(" [")[0], r.get("target_density")

    # Every row forced beside an auto row: the Triton kernel's and each vendor kernel's (one case held only the last
    # of them, so the vendors' comparisons went missing wherever the Triton row was forced after them).
    forced: dict = {}
    for r in ok:
        if r.get("backend") not in (None, "auto"):
            forced.setdefault(case(r), []).append(r)
    for r in ok:
        for other in forced.get(case(r), ()) if r.get("backend") == "auto" else ():
            if r.get("autotune") == other.get("autotune"):
                ratio = r["time_ms"] / other["time_ms"]
                add(f"{r['kernel']} ({r['pass']}, density {r.get('target_density')}): auto <= 1.03 x "
                    f"[{other['backend']} forced]", r["shape"], ratio, ratio <= 1.03)
    return out


def _run_shapes(shapes, densities, methods, autotune, forced, device, dtype, backward, timer, calls, repeats, left,
                rows, notes, log) -> None:
    from .._util import env_set
    from ..kernels import autotune as tuner

    with env_set(tuner.ENV_AUTOTUNE):  # (each autotune mode sets it: bench_gpu_cases._set_autotune)
        for i, shape in enumerate(shapes):
            if left() <= 0:
                rows.append(_skipped(shape, "all", None, "time budget"))
                continue
            # Each shape gets an equal share of what is left (a quick one leaves its rest to the next): the
            # first shape's many rows may not use up the budget before the 720p shape is reached.
            share = left() / (len(shapes) - i)
            until = left() - share

            def shape_left(until=until) -> float:
                return left() - until

            try:
                _Shape(shape, device, dtype, backward, timer, calls, repeats, shape_left, rows, notes, log).run(
                    densities, methods, autotune, forced)
            except Exception as exc:  # allocation of q/k/v, a broken device: the shape fails, the run goes on
                rows.append({**_skipped(shape, "all", None, ""), "status": "failed", "error": _short(exc)})
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- subprocesses
def _env() -> dict:
    env = dict(os.environ)
    root = str(_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _selftest_runner(device: torch.device, variants: Sequence[str] = ()) -> Callable[[float], dict]:
    """``dit-accel selftest --device DEVICE --json`` (every variant, or ``variants``) in a subprocess."""
    def run(timeout_s: float) -> dict:
        # Its own budget ends it (with its JSON: "N of M checked") before the hard timeout would.
        cmd = [sys.executable, "-m", "dit_accel.cli.main", "selftest", "--device", device.type, "--json",
               "--budget", f"{max(timeout_s - SELFTEST_MARGIN_S, 0.0):.0f}"]
        for name in variants:
            cmd += ["--variant", name]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=_root(), capture_output=True, text=True, timeout=timeout_s, env=_env())
        except subprocess.TimeoutExpired:  # not a kernel failure: every verdict made so far is stored
            return {"command": " ".join(cmd[1:]), "returncode": None, "seconds": timeout_s, "incomplete": True,
                    "summary": f"incomplete: out of time after {timeout_s:.0f} s; the verdicts made so far are saved "
                               "(`dit-accel info` lists them), `dit-accel selftest --device cuda` finishes the rest"}
        return parse_selftest(proc.returncode, proc.stdout, proc.stderr,
                              command=" ".join(cmd[1:]), seconds=time.monotonic() - started)
    return run


def parse_selftest(returncode: int, stdout: str, stderr: str, **extra) -> dict:
    """``dit-accel selftest --json``'s output as a report entry: its rows (``variant``, ``error``, ``verdict``,
    ...), the exit code and a one-line summary."""
    rows = None
    text = stdout.strip()
    for candidate in (text, text[text.find("["):] if "[" in text else ""):
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        rows = parsed.get("rows", parsed.get("variants")) if isinstance(parsed, dict) else parsed
        break
    if not isinstance(rows, list):
        tail = (stderr or stdout).strip().splitlines()
        return {**extra, "returncode": returncode if returncode else 1, "rows": [],
                "summary": "no JSON from dit-accel selftest: " + (tail[-1][:200] if tail else "no output")}
    verdicts = [str(r.get("verdict", "")).lower() if isinstance(r, dict) else "" for r in rows]
    unchecked = sum(v == _UNCHECKED for v in verdicts)
    checked = sum(v not in ("n/a", _UNCHECKED) for v in verdicts)
    bad = [r for r, v in zip(rows, verdicts) if v not in _PASSED + (_UNCHECKED,)]
    names = ", ".join(f"{r.get('variant')} {r.get('dtype', '')}".strip() for r in bad)
    summary = (f"{checked} of {checked + unchecked} checked, {len(bad)} failed" + (f" ({names})" if bad else "")
               + (f"; {unchecked} not reached in time" if unchecked else ""))
    if returncode == 3 and not bad:  # selftest's "out of time, nothing failed"
        returncode = 0
    entry = {**extra, "returncode": returncode if returncode or not bad else 1, "rows": rows, "summary": summary,
             "checked": checked, "total": checked + unchecked}
    return {**entry, "incomplete": True} if unchecked else entry


#: Verdicts that count as passed (``n/a``: the variant does not apply on this machine); ``unchecked``: not reached.
_PASSED = ("ok", "pass", "passed", "skip", "skipped", "n/a")
_UNCHECKED = "unchecked"


def _run_pytest(timeout_s: float) -> dict:
    # One process (no xdist): the production-size tests need the GPU's memory to themselves.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider",
           "tests"]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=_root(), capture_output=True, text=True, timeout=timeout_s, env=_env())
    except subprocess.TimeoutExpired as exc:  # what it printed so far says how far it got
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"command": " ".join(cmd[1:]), "returncode": None, "seconds": timeout_s, "incomplete": True,
                "summary": f"incomplete: out of time after {timeout_s:.0f} s (not a test failure; the tail says how "
                           "far it got)", "tail": "\n".join(partial.splitlines()[-40:])}
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": time.monotonic() - started,
            "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-40:])}


# ----------------------------------------------------------------------------- the markdown
def _target_value(target: dict) -> str:
    """A :func:`targets` value to 3 decimals, rounded away from its bound (down for an "at least" target, up for an
    "auto <= 1.03 x" one), so the printed value never contradicts its verdict (0.8496 of the 85% ideal was printed
    0.850 beside "no", a ratio of 1.0304 printed 1.030)."""
    from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

    value = target.get("value")
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    rounding = ROUND_CEILING if "auto <= " in target["target"] else ROUND_FLOOR
    return str(Decimal(repr(float(value))).quantize(Decimal("0.001"), rounding=rounding))


def gpu_markdown(report: dict) -> str:
    """The report as markdown: a header (machine, versions, commit, date), the checks, one table per pass,
    what did not run and the failures."""
    from .report import markdown_table

    m = report["machine"]
    gpu = m.get("gpu") or m["device"]
    head = [f"### `dit-accel bench gpu`: {gpu}, {m['date']}", "",
            f"Machine: {gpu}" + (f" ({m['sms']} SMs, {m['gpu_memory_gib']} GiB, {m['capability']}, CUDA {m['cuda']})"
                                 if m.get("sms") else "") + f"; CPU {m['cpu']}; Python {m['python']}; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + f". Commit {m['commit']}. "
            f"{report['dtype']}. Forward: median of back-to-back spans (latency: one call from an idle GPU; "
            "graph: CUDA-graph replay); forward + backward: back-to-back. error: relative error of o against "
            f"the fp32 twin (tolerance {O_TOLERANCE:g}), grads: the largest of dq, dk, dv's ({GRAD_TOLERANCE:g}), "
            "on the first batch entry's first head.", ""]
    st, py = report.get("selftest"), report.get("pytest")
    if st is not None:
        head += [f"Self-checks (`dit-accel selftest`): {st.get('summary')} (exit {st.get('returncode')})", ""]
    if py is not None:
        head += [f"`pytest -m gpu`: {py.get('summary')} (exit {py.get('returncode')})", ""]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    def ms(value):  # times to 3 significant figures, in ms or s
        from .._util import format_time

        return "-" if value is None else format_time(value / 1e3)

    for pass_ in ("forward", "forward+backward"):
        rows = [r for r in report["rows"] if r.get("pass") == pass_]
        if not rows:
            continue
        header = ["shape", "B x H", "kernel", "ran", "true density", "status", "error", "grads", "time", "latency",
                  "graph", "host us", "vs SDPA", "% of ideal", "padded work", "TFLOPS (visited)"]
        table = [[r["shape"], f"{r.get('batch', 1)} x {r['heads']}", r["kernel"], str(r.get("variant") or "-")[:70],
                  num(r.get("density"), ".3f"),
                  r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:80],
                  num(r.get("o_error"), ".1e"), num(r.get("grad_error"), ".1e"),
                  ms(r.get("time_ms")), ms(r.get("latency_ms")), ms(r.get("graph_ms")),
                  num(r.get("host_us"), ".0f"), num(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                  percent_down(r["fraction_of_ideal"]) if r.get("fraction_of_ideal") else "-",
                  num(r.get("padded_work"), ".2f"),
                  num(r.get("tflops_visited_throughput"), ".0f")]
                 for r in rows]
        head += [f"**{pass_}**", "", markdown_table(header, table), ""]
    not_run = [r for r in report["rows"] if r.get("pass") == "-"]
    budget = [r for r in report["rows"] if r.get("status") == "skipped" and r.get("error") == "time budget"]
    if budget:
        head += [f"**{len(budget)} case(s) skipped: the {report['budget_s']:.0f} s budget ran out** (run again with "
                 "--shapes / --densities / --methods to cover them).", ""]
    if not_run:
        head += ["Not run: " + "; ".join(f"{r['shape']} {r['kernel']} {r.get('density')}: {r['status']} "
                                         f"{r.get('error', '')}" for r in not_run), ""]
    if report.get("notes"):
        head += ["Notes: " + "; ".join(dict.fromkeys(report["notes"])), ""]
    tg = report.get("targets", [])
    if tg:
        missed = [t for t in tg if t["met"] is False]
        head += [f"**Speed targets** ({len(tg) - len(missed)} of {len(tg)} met; a missed target is reported, "
                 "not a failure):", "",
                 markdown_table(["target", "shape", "value", "met"],
                                [[t["target"], t["shape"], _target_value(t),
                                  {True: "yes", False: "**no**", None: "-"}[t["met"]]] for t in tg]), ""]
    fails = report.get("failures", [])
    head += [f"**Failures ({len(fails)})**: " + ("; ".join(fails) if fails else "none"), ""]
    head.append(f"Total {report.get('total_seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget.")
    return "\n".join(head) + "\n"
