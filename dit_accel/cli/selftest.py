"""``dit-accel selftest``: run every kernel variant this machine would use against its fp32 twin.

Each variant (see ``dit_accel.kernels.selfcheck``) runs its synthetic problem afresh at the dtypes and shapes
production uses on the device, and the verdicts are stored for the first-use check to reuse. On a GPU the checks
run in several worker processes at once (``--jobs``), so a cold machine compiles its kernels side by side; the
run ends with "N of M checked". Exit status 1 when any variant fails, 3 when ``--budget`` ran out before every
check ran (none failed), 2 for a bad argument. A variant name printed here is what ``DIT_ACCEL_FAULT`` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .options import HelpFormatter

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("selftest", help="check every kernel variant this machine would use against its "
                                               "fp32 twin", description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="device to check on (default: cuda if available, else cpu, where Triton runs through "
                        "its interpreter)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per row (variant, dtype, problem, error, tolerance, verdict, "
                        "seconds; n/a rows carry the reason)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME",
                   help="check only this variant (repeatable); default: every variant")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes running checks at once (default: on cuda, min(8, CPU cores), so the "
                        "kernels compile in parallel; on cpu 1)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no check after this many seconds; the rest are listed as unchecked and the exit "
                        "status is 3 (default: no limit)")
    p.set_defaults(func=run, _parser=p)
    return p


#: The keys of every ``--json`` row, as its help lists them; n/a and unchecked rows also carry their ``reason``.
_JSON_KEYS = ("variant", "dtype", "problem", "error", "tolerance", "verdict", "seconds")


def _fail(message: str) -> int:
    print(f"dit-accel selftest: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch

    from ..kernels import selfcheck
    from ..kernels.interpreter import speed_up_interpreter
    from ..kernels.request import interpreting

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available to torch here; use --device cpu (Triton's "
                     "interpreter) or run on a GPU machine.")
    names = [v.name for v in selfcheck.variants()]
    unknown = [n for n in args.variant or () if n not in names]
    if unknown:
        return _fail(f"--variant {unknown[0]}: no such variant; the variants are: {', '.join(names)}")
    if args.jobs is not None and args.jobs < 1:
        return _fail(f"--jobs {args.jobs}: give a positive number of worker processes (1 runs the checks here)")
    if args.budget is not None and not args.budget >= 0:
        return _fail(f"--budget {args.budget}: give the seconds (>= 0) after which no check starts")
    na, tasks = selfcheck.plan(device, args.variant)
    if args.variant and not tasks:  # (before: "0 of 0 checked, 0 failed", exit 0, as if it had passed)
        row = na[0]
        return _fail(f"--variant {row['variant']}: it does not run on {device} ({row['reason']}), so there is "
                     f"nothing to check here; name a variant that runs on {device} (`dit-accel selftest --device "
                     f"{device}` lists them, n/a for the others)")
    if interpreting():  # the CPU's checks run in Triton's interpreter, quicker without the costs that change nothing
        speed_up_interpreter()
    jobs = args.jobs or (min(8, os.cpu_count() or 1) if device == "cuda" else 1)
    selfcheck.cached_verdicts()  # (a damaged verdict file warns here, naming it: before, it was replaced unsaid)
    if not args.json:  # (every check runs again: a stored verdict is what the first use of a kernel reads, not this)
        print(f"checking kernel variants on {device} against their fp32 twins, {jobs} at a time; each check runs "
              f"afresh and its verdict is saved for first use in {selfcheck.cache_path()}", flush=True)

    def progress(done: int, total: int, row: dict) -> None:  # on stderr: --json keeps stdout for the JSON
        print(f"  {done} of {total} checked: {row['variant']} {row['dtype']} {row['verdict']} "
              f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    rows = selfcheck.run_all(device, names=args.variant, jobs=jobs, budget_s=args.budget, progress=progress)
    if args.json:  # every row with the keys --help lists (null where they do not apply: n/a rows have no dtype)
        json.dump([{**{key: r.get(key) for key in _JSON_KEYS}, **r} for r in rows], sys.stdout, indent=1)
        print()
    else:
        _print(rows)
        _print_status()
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    checked = [r for r in rows if r["verdict"] in ("pass", "FAIL")]
    unchecked = [r for r in rows if r["verdict"] == selfcheck.UNCHECKED]
    line = (f"{len(checked)} of {len(checked) + len(unchecked)} checked, {len(failed)} failed"
            + (f"; {len(unchecked)} not reached within --budget {args.budget:g} s" if unchecked else ""))
    print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
    crashed = [r for r in failed if r.get("crashed")]  # (not stored: before, said to be disabled as well)
    if len(failed) > len(crashed) and not args.json:
        print(f"{len(failed) - len(crashed)} check(s) FAILED: these variants are disabled (backend='auto' falls "
              "back; a forced backend raises). Report this output.", file=sys.stderr)
    if crashed and not args.json:
        print(f"{len(crashed)} check(s) did not finish: the worker process running them died, so nothing was stored "
              "for them (their first use checks them again); rerun with --jobs 1 to see the error, and report this "
              "output.", file=sys.stderr)
    return 1 if failed else 3 if unchecked else 0


def _print(rows) -> None:
    # error: ||out - ref|| / ||ref|| against the fp32 reference of the same inputs (the status's fp32 line)
    header = ("variant", "dtype", "problem", "error", "verdict", "time")
    table = []
    for r in rows:
        if r["verdict"] in ("n/a", "unchecked"):
            table.append((r["variant"], r.get("dtype", ""), r["reason"], "", r["verdict"], ""))
            continue
        error = "no finite output" if r["error"] is None else f"{r['error']:.2e} (bound {r['tolerance']:.1e})"
        table.append((r["variant"], r["dtype"], r["problem"], error, r["verdict"], f"{r['seconds']:.1f} s"))
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(len(header))]
    widths[2] = min(widths[2], 90)
    for row in [header] + table:
        cells = [str(c) if i != 2 or len(str(c)) <= 90 else str(c)[:87] + "..." for i, c in enumerate(row)]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def _print_status() -> None:
    """What the verdicts above do not show: fp32 products, warp specialization, torch.compile and CUDA graphs."""
    from .info import _kernel_status

    print("\nstatus:")
    for key, value in _kernel_status().items():
        print(f"  {key}: {value}")
