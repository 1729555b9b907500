"""The operators around the kernels on a GPU, before and after (BENCHMARKS section 6, "Traffic": MODELLED there).

``python -m dit_accel.eval.traffic`` models the bytes that the PyTorch operators around the kernels move per call
(permutations, VSA's gate, the backward's glue); this times the calls they sit in, on a GPU, at Wan 2.1 1.3B 480p's
self-attention ((1, 12, 32,760, 128) bf16, grid (21, 30, 52)):

- ``tile_train``: the recommended Tile for Wan (fitted (6, 8, 8) / (3, 3, 3)) through its plan, forward + backward;
- ``vsa`` and ``vsa_train``: ``vsa_attention`` with a gate at sparsity 0.9, forward, and forward + backward;
- ``sla_train``: ``sla_attention`` with a projection at top-k 0.05, forward + backward.

Each call is warmed up, then timed with CUDA events (median of ``--repeats``). ``--baseline DIR`` times the same
calls with the ``dit_accel`` package found in ``DIR`` (an older commit's, e.g. ``git archive a37e52e dit_accel |
tar -x -C DIR``) in a subprocess of the same session, so the two columns share the GPU and its clocks.

    python3 docs/scripts/glue_gpu.py --out glue.json [--baseline .vendor/base]
    python3 docs/scripts/glue_gpu.py --tiny --device cpu --out /tmp/glue.json    # the dry run on a CPU

``--tiny``: 2 heads of 64 on a (3, 8, 8) grid, fp32, the PyTorch backend (what the dry run checks: the script runs
both columns end to end and writes its JSON; its times are not the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("tile_train", "vsa", "vsa_train", "sla_train")


def _time(fn, device: str, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the wall clock elsewhere)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(tiny: bool, device: str, warmup: int, repeats: int) -> dict:
    """``{case: milliseconds}`` with the ``dit_accel`` that ``import dit_accel`` finds."""
    import torch

    import dit_accel
    from dit_accel.kernels.sla import sla_attention
    from dit_accel.kernels.vsa import vsa_attention

    grid, heads, d, dtype, backend = ((3, 8, 8), 2, 64, torch.float32, "torch") if tiny else \
        ((21, 30, 52), 12, 128, torch.bfloat16, "auto")
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, gate, do = (torch.randn(1, heads, n, d, generator=gen, device=device, dtype=dtype) for _ in range(5))
    qg, kg, vg, gg = (t.clone().requires_grad_() for t in (q, k, v, gate))
    plan = dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3), fit=True).plan(grid)
    proj = torch.nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
    sla = dit_accel.SLA(topk=0.05)

    def backward(out):
        for t in (qg, kg, vg, gg):
            t.grad = None
        out.backward(do)

    def vsa(grad):
        args = (qg, kg, vg, gg) if grad else (q, k, v, gate)
        return vsa_attention(*args[:3], grid, sparsity=0.9, gate=args[3], backend=backend)

    runs = {"tile_train": lambda: backward(plan.run(qg, kg, vg, backend=backend)[0]),
            "vsa": lambda: torch.no_grad()(vsa)(False),
            "vsa_train": lambda: backward(vsa(True)),
            "sla_train": lambda: backward(sla_attention(qg, kg, vg, sla, proj, backend=backend))}
    out = {}
    for name in CASES:
        try:
            out[name] = round(_time(runs[name], device, warmup, repeats), 3)
        except Exception as exc:  # a case that fails is a row that says why, not a lost run
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--baseline", default=None, help="a folder holding an older dit_accel package to time too")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only-measure", action="store_true", help=argparse.SUPPRESS)  # (the baseline's subprocess)
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("glue_gpu: no CUDA device here; run it on a GPU, or `--tiny --device cpu` for the dry run")
        return 2
    import dit_accel

    if args.only_measure:
        json.dump({"package": os.path.dirname(dit_accel.__file__),
                   "ms": measure(args.tiny, args.device, args.warmup, args.repeats)}, open(args.out, "w"))
        return 0

    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "package": os.path.dirname(dit_accel.__file__), "shape": "tiny" if args.tiny else
              "Wan 2.1 1.3B 480p self-attention, (1, 12, 32760, 128) bf16, grid (21, 30, 52)",
              "ms": measure(args.tiny, args.device, args.warmup, args.repeats)}
    if args.baseline:
        side = args.out + ".baseline.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--only-measure", "--out", side, "--device", args.device,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.baseline)}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.abspath(args.baseline))
        report["baseline"] = json.load(open(side)) if run.returncode == 0 else {"rc": run.returncode,
                                                                                "error": run.stderr[-2000:]}
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    for name in CASES:
        base = report.get("baseline", {}).get("ms")
        before = f"  (baseline {base.get(name)})" if isinstance(base, dict) else ""
        print(f"{name:10s} {report['ms'][name]} ms{before}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
