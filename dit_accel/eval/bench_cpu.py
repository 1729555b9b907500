"""CPU benchmark: dit_accel's PyTorch backend vs dense SDPA and compiled FlexAttention, interleaved.

Usage::

    python -m dit_accel.eval.bench_cpu                              # the issue-14 table, 1 and 2 threads
    python -m dit_accel.eval.bench_cpu --patterns radial-0.109,sla-0.2 --threads 1 --rounds 9
    python -m dit_accel.eval.bench_cpu --no-flex --backward          # also forward+backward (vs SDPA)

Patterns at ``N = 8192`` (the default sizes; names carry the visited density they give):

- ``tile-0.117``: sliding tile attention, grid (8, 32, 32), tile (2, 4, 8), window (1, 5, 3).
- ``gna-strided-0.094``: GNA kernel (2, 12, 16), stride (2, 4, 8), grid (8, 32, 32).
- ``gna-0.105`` / ``gna-0.282``: GNA stride 1, kernels (2, 9, 9) / (3, 11, 11), grid (8, 32, 32).
- ``radial-0.109`` / ``radial-0.296``: radial attention, grids (128, 8, 8) / (64, 8, 16), block 64.
- ``sla-0.2``: the SLA twin, topk 0.2, with the linear branch and a trained (non-zero)
  projection, so the linear branch runs (a zero one is skipped), vs SDPA only.
- ``band`` / ``window``: a block band / 1-D token window at ``--density`` (synthetic).

Every round runs each contender once, in an order that rotates between rounds, so
load from other processes hits all of them alike; the speedups reported are medians
of per-round ratios, the times medians of rounds. Compiled flex is
``torch.compile(flex_attention)`` with a ``BlockMask`` of the same visited blocks and
element masks (what a PyTorch user would write); it is compiled before the rounds.
The load average is printed before and after: on a shared machine, quote it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .._util import repeated_error
from ..kernels import BlockLayout, block_sparse_attention
from ..kernels.geometry import block_figures
from .report import percent_down

TABLE_PATTERNS = ("tile-0.117", "gna-strided-0.094", "gna-0.105", "gna-0.282", "radial-0.109", "radial-0.296",
                  "sla-0.2")


def band_layout(n: int, block: int, density: float) -> BlockLayout:
    n_b = -(-n // block)
    width = max(1, round(density * n_b))
    q = torch.arange(n_b)[:, None]
    start = (q - width // 2).clamp(0, n_b - width)
    k = torch.arange(n_b)[None, :]
    visited = (k >= start) & (k < start + width)
    return BlockLayout.from_block_masks(visited, q_len=n, kv_len=n, block_q=block, block_k=block)


def window_layout(n: int, block: int, density: float) -> BlockLayout:
    """|i - j| <= w on tokens; block offset d = kb - qb decides full / partial / skipped."""
    n_b = -(-n // block)
    half_blocks = max(0, round(density * n_b) // 2)
    w = half_blocks * block  # visited offsets: |d| <= half_blocks (edge blocks partial)
    a = torch.arange(block)
    tables, kinds = [], {}
    for d in range(-half_blocks - 1, half_blocks + 2):
        m = ((d * block + a[None, :]) - a[:, None]).abs() <= w
        if m.all():
            kinds[d] = -1
        elif m.any():
            kinds[d] = len(tables)
            tables.append(m)
    diff = torch.arange(n_b)[None, :] - torch.arange(n_b)[:, None]
    visited = torch.zeros(n_b, n_b, dtype=torch.bool)
    ids = torch.full((n_b, n_b), -1, dtype=torch.int32)
    for d, kind in kinds.items():
        visited |= diff == d
        ids[diff == d] = kind
    table = torch.stack(tables) if tables else None
    return BlockLayout.from_block_masks(visited, q_len=n, kv_len=n, block_q=block, block_k=block,
                                        mask_ids=ids, mask_table=table)


def make_layout(name: str, args) -> BlockLayout:
    """The block layout of pattern ``name`` (all but ``sla-*``)."""
    from ..patterns import gna_layout, radial_layout, tile_layout

    if name == "band":
        return band_layout(args.n, args.block, args.density)
    if name == "window":
        return window_layout(args.n, args.block, args.density)
    if name not in TABLE_PATTERNS:
        raise SystemExit(f"unknown pattern {name!r}")
    if args.n != 8192 or args.block != 64:
        raise SystemExit(f"--patterns {name} uses fixed grids: keep --n 8192 --block 64")
    grid = (8, 32, 32)
    if name == "tile-0.117":
        return tile_layout(grid, (2, 4, 8), (1, 5, 3))[1]
    if name == "gna-strided-0.094":
        return gna_layout(grid, (2, 12, 16), stride=(2, 4, 8))[1]
    if name == "gna-0.105":
        return gna_layout(grid, (2, 9, 9))[1]
    if name == "gna-0.282":
        return gna_layout(grid, (3, 11, 11))[1]
    if name == "radial-0.109":
        return radial_layout((128, 8, 8), 64)
    if name == "radial-0.296":
        return radial_layout((64, 8, 16), 64)
    raise SystemExit(f"pattern {name!r} has no layout (sla-* patterns run the SLA twin)")


def contenders(name: str, q, k, v, args):
    """``({contender: call}, true density)`` for one pattern; SDPA first."""
    calls: Dict[str, Callable[[], object]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    if name.startswith("sla-"):
        from ..kernels.sla import sla_attention, sla_visited
        from ..kernels.sla.common import SLAParams

        params = SLAParams(topk=float(name[len("sla-"):]), block_q=args.block, block_k=args.block)
        # A trained (non-zero) projection, so the linear branch runs (a zero one is skipped: is_inert).
        proj = torch.nn.Linear(args.d, args.d)
        calls["dit"] = lambda: sla_attention(q, k, v, params, proj, backend="torch")
        # The pairs its sparse branch visits on these inputs / N^2 (its own top-k; the linear branch is not counted,
        # as in bench kernels and bench gpu): not the top-k, which a ragged last key block makes neither.
        return calls, sla_visited(q.detach(), k.detach(), params)["true_density"]
    layout = make_layout(name, args)
    calls["dit"] = lambda: block_sparse_attention(q, k, v, layout, backend="torch")
    if args.flex:
        from torch.nn.attention.flex_attention import flex_attention

        from ..kernels.block_sparse.flex import layout_to_block_mask

        block_mask = layout_to_block_mask(layout)
        compiled = torch.compile(flex_attention, dynamic=False)
        calls["flex"] = lambda: compiled(q, k, v, block_mask=block_mask)
    # The true density (allowed pairs / N^2), not the visited blocks': the efficiency is speedup x this (issue 72).
    return calls, block_figures(layout).density


def run_rounds(calls: Dict[str, Callable[[], object]], rounds: int, *, device=None,
               warmup: int = 1, shuffle: bool = False) -> Dict[str, List[float]]:
    """Seconds per round per contender, after ``warmup`` calls of each (plans, block masks, compilation);
    the contender order rotates every round, or with ``shuffle`` is a fresh permutation every round
    (seeded: the same on every run), so no contender always follows the same one. ``device``: a CUDA
    device times with CUDA events."""
    from .._util import Timer

    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    order = random.Random(0)
    for r in range(rounds):
        if shuffle:
            this_round = order.sample(names, len(names))
        else:
            this_round = names[r % len(names):] + names[:r % len(names)]
        for name in this_round:
            timer = Timer(device)
            with timer:
                calls[name]()
            times[name].append(timer.seconds)
    return times


def median_ratio(times: Dict[str, List[float]], base: str, other: str) -> float:
    """Median over rounds of ``base``'s time over ``other``'s (the speedup of ``other``)."""
    return statistics.median(b / o for b, o in zip(times[base], times[other]))


def _argument_error(args) -> str:
    """Why ``--threads``, ``--density`` or ``--patterns`` cannot run (empty when they can)."""
    import math

    threads = [t.strip() for t in args.threads.split(",")]
    if not all(t.isdigit() and int(t) >= 1 for t in threads):
        return f"--threads must be comma-separated counts >= 1 such as 1,2; got {args.threads!r}"
    twice = repeated_error("--threads", map(int, threads)) or repeated_error("--patterns", args.patterns.split(","))
    if twice:  # (before: timed twice, as two rows of one setting)
        return twice
    if not (math.isfinite(args.density) and 0 < args.density <= 1):
        return f"--density must be a fraction in (0, 1] such as 0.1; got {args.density}"
    for name in args.patterns.split(","):
        if name.startswith("sla-"):
            try:
                topk = float(name[len("sla-"):])
            except ValueError:
                topk = math.nan
            if not 0 < topk <= 1:
                return f"--patterns {name}: sla-TOPK takes a fraction in (0, 1], e.g. sla-0.2"
        elif name not in TABLE_PATTERNS + ("band", "window"):
            return f"--patterns {name!r} is not a pattern; choose from {', '.join(TABLE_PATTERNS + ('band', 'window'))}"
        elif name not in ("band", "window") and (args.n != 8192 or args.block != 64):
            return f"--patterns {name} uses fixed grids: keep --n 8192 --block 64 (or time band / window)"
    return ""


def main(argv=None) -> int:
    from .._util import positive_int

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=8192)
    p.add_argument("--d", type=positive_int, default=64)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--block", type=positive_int, default=64)
    p.add_argument("--density", type=float, default=0.10, help="for the synthetic band / window patterns")
    p.add_argument("--patterns", default=",".join(TABLE_PATTERNS),
                   help=f"comma-separated, from {TABLE_PATTERNS + ('band', 'window')}")
    p.add_argument("--rounds", "--repeats", type=positive_int, default=7,
                   help="interleaved rounds (--repeats: older name)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip compiled FlexAttention")
    p.add_argument("--backward", action="store_true", help="also time forward+backward (dit vs SDPA)")
    args = p.parse_args(argv)
    problem = _argument_error(args)
    if problem:  # before any work: else a bad --threads or pattern ended the run in a traceback minutes in
        p.error(problem)
    cmd = "python -m dit_accel.eval.bench_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    load0 = os.getloadavg()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.n, args.d)
    q, k, v = (torch.randn(shape) for _ in range(3))

    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.patterns.split(","):
            calls, density = contenders(name, q, k, v, args)
            with torch.no_grad():
                times = run_rounds(calls, args.rounds)
            ms = {c: statistics.median(t) * 1e3 for c, t in times.items()}
            vs_sdpa = median_ratio(times, "sdpa", "dit")
            ideal = percent_down(vs_sdpa * density)  # speed-up x true density (issue 72)
            vs_flex = f"{median_ratio(times, 'flex', 'dit'):.2f}x" if "flex" in times else ""
            flex_ms = f"{ms['flex']:.1f}" if "flex" in ms else ""
            dens = f"{density:.3f}"  # (the true density: an sla-TOPK row printed its top-k here)
            rows.append(f"| {name} | {dens} | {threads} | {ms['sdpa']:.1f} | {ms['dit']:.1f} | {flex_ms} | "
                        f"{vs_sdpa:.2f}x | {ideal} | {vs_flex} |")
            if args.backward:  # (sla-* too: before, its fwd+bwd row was left out without a word)
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                dit = contenders(name, qg, kg, vg, argparse.Namespace(**{**vars(args), "flex": False}))[0]["dit"]
                times = run_rounds({"sdpa": lambda: F.scaled_dot_product_attention(qg, kg, vg).sum().backward(),
                                    "dit": lambda: dit().sum().backward()}, args.rounds)
                ms = {c: statistics.median(t) * 1e3 for c, t in times.items()}
                speedup = median_ratio(times, "sdpa", "dit")  # (the same pattern: the same true density)
                rows.append(f"| {name} fwd+bwd | {dens} | {threads} | {ms['sdpa']:.1f} | {ms['dit']:.1f} | | "
                            f"{speedup:.2f}x | {percent_down(speedup * density)} | |")
            print(rows[-1], flush=True)
    load1 = os.getloadavg()
    print()
    print(f"{started}, {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"B={args.batch} H={args.heads} N={args.n} D={args.d} fp32 forward, {args.rounds} rounds; "
          f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"command: `{cmd.strip()}`")
    print()
    print("| pattern | true density | threads | SDPA ms | dit ms | compiled flex ms | dit vs SDPA | "
          "% of 1/density ideal | dit vs compiled flex |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
