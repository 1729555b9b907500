"""``dit-accel selftest``: run every kernel variant this machine would use against its fp32 twin.

Each variant (see ``dit_accel.kernels.selfcheck``) runs its synthetic problem afresh at the dtypes and shapes
production uses on the device, and the verdicts are stored for the first-use check to reuse. Exit status 1
when any variant fails, 2 for a bad argument. A variant name printed here is what ``DIT_ACCEL_FAULT`` takes.
"""

from __future__ import annotations

import argparse
import json
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
    p.set_defaults(func=run, _parser=p)
    return p


def _fail(message: str) -> int:
    print(f"dit-accel selftest: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch

    from ..kernels import selfcheck

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available to torch here; use --device cpu (Triton's "
                     "interpreter) or run on a GPU machine.")
    names = [v.name for v in selfcheck.variants()]
    unknown = [n for n in args.variant or () if n not in names]
    if unknown:
        return _fail(f"--variant {unknown[0]}: no such variant; the variants are: {', '.join(names)}")
    if not args.json:
        print(f"checking kernel variants on {device} against their fp32 twins "
              f"(cached verdicts: {selfcheck.cache_path()})", flush=True)
    rows = selfcheck.run_all(device, names=args.variant)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        _print(rows)
        _print_status()
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    if failed and not args.json:
        print(f"{len(failed)} check(s) FAILED: these variants are disabled (backend='auto' falls back; a forced "
              "backend raises). Report this output.", file=sys.stderr)
    return 1 if failed else 0


def _print(rows) -> None:
    header = ("variant", "dtype", "problem", "error", "verdict", "time")
    table = []
    for r in rows:
        if r["verdict"] == "n/a":
            table.append((r["variant"], "", r["reason"], "", "n/a", ""))
            continue
        error = "no finite output" if r["error"] is None else f"{r['error']:.2e} (<= {r['tolerance']:.0e})"
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
