"""``dit-accel bench gpu``: the one GPU report, on any machine with a GPU, in under 8 minutes.

:func:`bench_gpu` runs the standard set and writes ``DIR/gpu_report.json`` and
``DIR/gpu_report.md`` (a table ready for BENCHMARKS.md, headed by the machine, versions,
commit and date):

- shapes Wan2.1 480p and 720p, FLUX 1024 px and 4K (:data:`STANDARD_SHAPES`), bf16, batch 1;
- dense contenders: SDPA (PyTorch's choice, and pinned to flash and to cuDNN), the in-repo
  dense Triton kernel, flash-attn 2/3/4 when installed (compiled FlexAttention is in ``bench kernels``:
  compiling it takes about 30 s a shape); forward, and
  forward + backward for SDPA and the dense Triton kernel;
- Tile, GNA and SLA at target densities 0.05, 0.1, 0.2, 0.5, radial (video only; its rule fixes its
  density) once per shape, each
  forward and forward + backward, through the same entry points a pipeline calls
  (``block_sparse_attention`` on the plan's layout, ``sla_attention`` with a zero projection);
- then ``pytest -m gpu`` in a subprocess, with what time is left.

Forward calls are timed with :func:`~dit_accel.eval.timing.measure_call` (latency from an idle
GPU, back-to-back throughput, CUDA-graph replay where possible, host time per call); forward +
backward calls by back-to-back throughput. Every failure (a contender that cannot run, out of
memory, a layout that cannot be built) is a row with its error, never the end of the run; cases
that no longer fit the time budget are rows marked ``skipped``. The timer and the pytest runner
are arguments, so the CPU-side logic is tested with fakes (``tests/eval/test_bench_gpu.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .bench import ModelShape, call_timing_fields, extra_dense_contenders

__all__ = ["STANDARD_SHAPES", "STANDARD_DENSITIES", "STANDARD_METHODS", "bench_gpu", "gpu_markdown", "machine_info"]

STANDARD_SHAPES = (
    ModelShape("Wan2.1 480p", (21, 30, 52), 12),
    ModelShape("Wan2.1 720p", (21, 45, 80), 12),
    ModelShape("FLUX 1024px", (64, 64), 24),
    ModelShape("FLUX 4K", (256, 256), 24),
)
STANDARD_DENSITIES = (0.05, 0.1, 0.2, 0.5)
STANDARD_METHODS = ("tile", "gna", "radial", "sla")
#: Seconds kept for ``pytest -m gpu`` out of the budget.
PYTEST_RESERVE_S = 150.0


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


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _method(name: str, grid, density: float):
    from ..methods import GNA, SLA, Radial, Tile

    if name == "sla":
        return SLA(topk=density)
    if name == "radial":
        return Radial()  # its density is fixed by its rule
    return {"tile": Tile, "gna": GNA}[name]().at_density(tuple(grid), density)


def bench_gpu(out_dir, *, device="cuda", shapes: Sequence[ModelShape] = STANDARD_SHAPES,
              densities: Sequence[float] = STANDARD_DENSITIES, methods: Sequence[str] = STANDARD_METHODS,
              backward: bool = True, budget_s: float = 470.0, pytest_gpu: bool = True,
              dtype: Optional[torch.dtype] = None, timer=None, calls: int = 5, repeats: int = 3,
              run_pytest: Optional[Callable[[float], dict]] = None, clock: Callable[[], float] = time.monotonic,
              log=print) -> dict:
    """Run the standard GPU set (module docstring) within ``budget_s`` seconds; write the JSON and markdown
    reports into ``out_dir`` and return the JSON dict.

    ``timer``: a :class:`~dit_accel.eval.timing.CallTimer` (default: CUDA events on CUDA, perf_counter
    elsewhere); ``run_pytest(timeout_s) -> {"returncode", "summary", ...}`` replaces the ``pytest -m gpu``
    subprocess (tests pass fakes)."""
    from .timing import CpuCallTimer, CudaCallTimer

    start = clock()
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    timer = timer or (CudaCallTimer(device) if cuda else CpuCallTimer())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reserve = PYTEST_RESERVE_S if pytest_gpu else 0.0
    report = {"kind": "gpu-report", "machine": machine_info(device), "dtype": str(dtype), "budget_s": budget_s,
              "densities": list(densities), "methods": list(methods), "rows": [], "notes": []}
    rows, notes = report["rows"], report["notes"]

    def left() -> float:
        return budget_s - reserve - (clock() - start)

    # auto's timing of Triton against FlexAttention compiles Flex once per density bucket (minutes on a fresh
    # machine): off for the run, so "auto" is the table's order plus the dense-or-sparse choice.
    autotune_before = os.environ.get("DIT_ACCEL_AUTOTUNE")
    os.environ["DIT_ACCEL_AUTOTUNE"] = "0"
    notes.append("DIT_ACCEL_AUTOTUNE=0 during the run: auto = Triton, or dense where the cost model says sparse "
                 "loses (the 'backend' field)")
    try:
        _run_shapes(shapes, densities, methods, device, dtype, backward, timer, calls, repeats, left, rows, notes,
                    log, cuda)
    finally:
        if autotune_before is None:
            os.environ.pop("DIT_ACCEL_AUTOTUNE", None)
        else:
            os.environ["DIT_ACCEL_AUTOTUNE"] = autotune_before
    report["bench_seconds"] = clock() - start

    if pytest_gpu:
        timeout = max(budget_s - (clock() - start), 30.0)
        try:
            report["pytest"] = (run_pytest or _run_pytest)(timeout)
        except Exception as exc:
            report["pytest"] = {"returncode": None, "summary": f"could not run: {_short(exc)}"}
    report["total_seconds"] = clock() - start
    (out_dir / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "gpu_report.md").write_text(gpu_markdown(report))
    log(f"wrote {out_dir / 'gpu_report.json'} and {out_dir / 'gpu_report.md'} ({report['total_seconds']:.0f} s)")
    return report


def _run_shapes(shapes, densities, methods, device, dtype, backward, timer, calls, repeats, left, rows, notes, log,
                cuda) -> None:
    for shape in shapes:
        if left() <= 0:
            rows.append(_skipped(shape, "all", None, "time budget"))
            continue
        try:
            rows += _bench_shape(shape, densities, methods, device, dtype, backward, timer, calls, repeats, left, notes,
                                 log)
        except Exception as exc:  # allocation of q/k/v, a broken device: the shape fails, the run goes on
            rows.append({**_skipped(shape, "all", None, ""), "status": "failed", "error": _short(exc)})
        finally:
            if cuda:
                torch.cuda.empty_cache()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _skipped(shape: ModelShape, kernel: str, density, why: str) -> dict:
    return {"shape": shape.name, "tokens": shape.tokens, "heads": shape.heads, "kernel": kernel, "density": density,
            "pass": "-", "status": "skipped", "error": why}


def _bench_shape(shape, densities, methods, device, dtype, backward, timer, calls, repeats, left, notes, log):
    from ..kernels import block_sparse_attention, sla_attention
    from ..kernels.dense import dense_contenders
    from ..kernels.sla import sla_density
    from .timing import measure_call

    gen = torch.Generator(device=device).manual_seed(0)
    b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    flops = 4.0 * b * h * n * n * d
    rows: List[dict] = []
    base: Dict[str, float] = {}

    def measure(kernel: str, fn, density: float, work: float, pass_: str, **extra) -> dict:
        row = {"shape": shape.name, "tokens": n, "heads": h, "head_dim": d, "batch": b, "kernel": kernel,
               "density": density, "work_vs_dense": work, "pass": pass_, **extra}
        if left() <= 0:
            return {**row, "status": "skipped", "error": "time budget"}
        try:
            fn()  # warm-up: compilation, plans, autotuning
            if pass_ == "forward":
                timing = measure_call(fn, timer, calls=calls, repeats=repeats, graph=device.type == "cuda")
            else:  # forward + backward: back-to-back throughput (graphs do not capture autograd here)
                from .timing import CallTiming

                spans = []
                for _ in range(repeats):
                    timer.sync()
                    spans.append(timer.span(fn, calls))
                spans.sort()
                timing = CallTiming(throughput_s=spans[len(spans) // 2][0] / calls,
                                    host_s=spans[len(spans) // 2][1] / calls, calls=calls)
        except Exception as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {**row, "status": "failed", "error": _short(exc)}
        seconds = timing.throughput_s
        row.update(status="ok", time_ms=seconds * 1e3, **call_timing_fields(timing, flops * work * (
            1 if pass_ == "forward" else 3.5)))
        key = (pass_,)
        if kernel == "dense SDPA":
            base[key] = seconds
        if key in base:
            row["speedup"] = base[key] / seconds
            row["fraction_of_ideal"] = row["speedup"] * work
        return row

    # Dense contenders.
    dense = dense_contenders(q, k, v)
    if device.type == "cuda":
        dense.update(extra_dense_contenders(q, k, v, notes, flex=False))  # (compiling flex: ~30 s a shape)
    else:  # (tests) SDPA only: the Triton kernels would run in the interpreter
        dense = {name: fn for name, fn in dense.items() if name == "dense SDPA"}
    for name, fn in dense.items():
        rows.append(measure(name, fn, 1.0, 1.0, "forward"))
    if backward:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(q)
        import torch.nn.functional as F

        def sdpa_fb():
            F.scaled_dot_product_attention(qg, kg, vg).backward(do)

        rows.append(measure("dense SDPA", sdpa_fb, 1.0, 1.0, "forward+backward"))
        if "dense Triton (dit_accel)" in dense:
            from ..kernels.dense import dense_attention

            rows.append(measure("dense Triton (dit_accel)", lambda: dense_attention(qg, kg, vg).backward(do),
                                1.0, 1.0, "forward+backward"))

    # Sparse methods.
    for target in densities:
        for name in methods:
            label = f"{name} [auto]"
            if name == "radial" and (len(shape.grid) != 3 or target != densities[0]):
                continue  # video only; its rule fixes its density: once per shape
            try:
                method = _method(name, shape.grid, target)
                if name == "sla":
                    proj = torch.nn.Linear(d, d).to(device, dtype)
                    torch.nn.init.zeros_(proj.weight)
                    torch.nn.init.zeros_(proj.bias)
                    dens = sla_density(n, method)
                    cases = {"forward": (lambda: _no_grad(sla_attention, q, k, v, method, proj), dens, dens, {})}
                    if backward:
                        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                        do = torch.randn_like(q)
                        cases["forward+backward"] = (
                            lambda: sla_attention(qg, kg, vg, method, proj).backward(do), dens, dens, {})
                else:
                    plan = method.plan(shape.grid)
                    layout = getattr(plan, "layout", None)
                    if layout is None:
                        rows.append({**_skipped(shape, label, target, f"no layout: {plan.dense_reason}"),
                                     "status": "dense"})
                        continue
                    perm = plan.perm
                    np_ = perm.num_padded if perm is not None else n
                    lay = layout.to(device)
                    qp, kp, vp = (torch.randn(b, h, np_, d, generator=gen, device=device, dtype=dtype)
                                  for _ in range(3))
                    work = lay.density() * (np_ / n) ** 2
                    facts = {"config": method.to_dict(), "padded_tokens": np_, "layout_density": lay.density()}
                    cases = {"forward": (lambda: _no_grad(block_sparse_attention, qp, kp, vp, lay), lay.density(),
                                         work, facts)}
                    if backward:
                        qg, kg, vg = (t.clone().requires_grad_() for t in (qp, kp, vp))
                        do = torch.randn_like(qp)
                        cases["forward+backward"] = (
                            lambda: block_sparse_attention(qg, kg, vg, lay).backward(do), lay.density(), work, facts)
            except Exception as exc:
                rows.append({**_skipped(shape, label, target, ""), "status": "failed", "error": _short(exc)})
                continue
            for pass_, (fn, density, work, facts) in cases.items():
                rows.append(measure(label, fn, density, work, pass_, target_density=target, **facts))
            if device.type == "cuda":
                from ..kernels.block_sparse.api import block_sparse_backend

                if name != "sla":
                    rows[-1]["backend"] = block_sparse_backend(qp, kp, vp, lay, return_lse=False)
        log(f"{shape.name}: density {target} done ({left():.0f} s left)")
    return rows


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _run_pytest(timeout_s: float) -> dict:
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x", "-p", "no:cacheprovider", "tests"]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": time.monotonic() - started,
                "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-30:])}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "returncode": None, "seconds": timeout_s,
                "summary": f"timed out after {timeout_s:.0f} s"}


def gpu_markdown(report: dict) -> str:
    """The report as markdown: a header (machine, versions, commit, date) and one table per pass."""
    from .report import markdown_table

    m = report["machine"]
    gpu = m.get("gpu") or m["device"]
    head = [f"### `dit-accel bench gpu`: {gpu}, {m['date']}", "",
            f"Machine: {gpu}" + (f" ({m['sms']} SMs, {m['gpu_memory_gib']} GiB, {m['capability']}, CUDA {m['cuda']})"
                                 if m.get("sms") else "") + f"; CPU {m['cpu']}; Python {m['python']}; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + f". Commit {m['commit']}. "
            f"{report['dtype']}, batch 1. Forward: median of back-to-back spans (latency: one call from an idle GPU; "
            "graph: CUDA-graph replay); forward + backward: back-to-back.", ""]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for pass_ in ("forward", "forward+backward"):
        rows = [r for r in report["rows"] if r.get("pass") == pass_]
        if not rows:
            continue
        header = ["shape", "kernel", "density", "status", "time ms", "latency ms", "graph ms", "host us",
                  "vs SDPA", "% of ideal", "TFLOPS (visited)"]
        table = [[r["shape"], r["kernel"], num(r.get("density"), ".3f"),
                  r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:80],
                  num(r.get("time_ms"), ".2f"), num(r.get("latency_ms"), ".2f"), num(r.get("graph_ms"), ".2f"),
                  num(r.get("host_us"), ".0f"), num(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                  num(100 * r["fraction_of_ideal"] if r.get("fraction_of_ideal") else None, ".0f") +
                  ("%" if r.get("fraction_of_ideal") else ""), num(r.get("tflops_visited_throughput"), ".0f")]
                 for r in rows]
        head += [f"**{pass_}**", "", markdown_table(header, table), ""]
    skipped = [r for r in report["rows"] if r.get("pass") == "-"]
    if skipped:
        head += ["Not run: " + "; ".join(f"{r['shape']} {r['kernel']} {r.get('density')}: {r['status']} "
                                         f"{r.get('error', '')}" for r in skipped), ""]
    if report.get("notes"):
        head += ["Notes: " + "; ".join(dict.fromkeys(report["notes"])), ""]
    py = report.get("pytest")
    if py:
        head += [f"`pytest -m gpu`: {py.get('summary')} (exit {py.get('returncode')})", ""]
    head.append(f"Total {report.get('total_seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget.")
    return "\n".join(head) + "\n"
