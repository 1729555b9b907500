"""CPU benchmark: dit_accel's torch backend vs dense SDPA at N = 8192.

Usage::

    python -m dit_accel.eval.bench_cpu                          # N=8192, D=64, 8 heads, ~10% blocks
    python -m dit_accel.eval.bench_cpu --pattern window --repeats 7 --backward

Patterns (built at block level, no N x N mask):
- ``band``:   each query block visits the ~density*nK key blocks around its diagonal,
              all full (the perfectly block-sparse case, like aligned tile/GNA layouts).
- ``window``: 1-D token sliding window |i - j| <= w with the same visited density;
              the band's edge blocks are partial (element masks).
- ``tile``:   sliding tile attention on a (8, 32, 32) video grid, tile (2, 4, 8),
              window (1, 5, 3) tiles (dit_accel.patterns.tile_layout; 11.7% of blocks),
              in tiled token order. Key blocks are not one contiguous range, so this
              exercises the gathering path.

Prints one markdown table row per pattern for BENCHMARKS.md. Times are medians of
``--repeats`` runs after one warm-up (the warm-up also builds the cached chunk plan),
dense and sparse alternating so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ..kernels import BlockLayout, block_sparse_attention


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
    offsets = list(range(-half_blocks - 1, half_blocks + 2))
    tables, kinds = [], {}
    for d in offsets:
        m = ((d * block + a[None, :]) - a[:, None]).abs() <= w
        if m.all():
            kinds[d] = -1
        elif m.any():
            kinds[d] = len(tables)
            tables.append(m)
    qb = torch.arange(n_b)[:, None]
    kb = torch.arange(n_b)[None, :]
    diff = kb - qb
    visited = torch.zeros(n_b, n_b, dtype=torch.bool)
    ids = torch.full((n_b, n_b), -1, dtype=torch.int32)
    for d, kind in kinds.items():
        sel = diff == d
        visited |= sel
        ids[sel] = kind
    table = torch.stack(tables) if tables else None
    return BlockLayout.from_block_masks(visited, q_len=n, kv_len=n, block_q=block, block_k=block,
                                        mask_ids=ids, mask_table=table)


def make_layout(name: str, args) -> BlockLayout:
    if name == "band":
        return band_layout(args.n, args.block, args.density)
    if name == "window":
        return window_layout(args.n, args.block, args.density)
    from ..patterns import tile_layout

    if args.n != 8192 or args.block != 64:
        raise SystemExit("--pattern tile uses a fixed (8, 32, 32) grid: keep --n 8192 --block 64")
    return tile_layout((8, 32, 32), (2, 4, 8), (1, 5, 3), block_q=64, block_k=64)[1]


def timed_pair(dense, sparse, repeats: int):
    """Median ms of each, alternating the two so load changes hit both alike."""
    dense(), sparse()  # warm-up (and the sparse plan)
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((dense, times[0]), (sparse, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--pattern", choices=["band", "window", "tile", "all"], default="all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.n, args.d)
    q, k, v = (torch.randn(shape) for _ in range(3))
    cmd = "python -m dit_accel.eval.bench_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    patterns = ["band", "window", "tile"] if args.pattern == "all" else [args.pattern]

    rows = []
    for name in patterns:
        layout = make_layout(name, args)
        with torch.no_grad():
            sdpa_ms, sparse_ms = timed_pair(lambda: F.scaled_dot_product_attention(q, k, v),
                                            lambda: block_sparse_attention(q, k, v, layout, backend="torch"),
                                            args.repeats)
        density = layout.density()
        speedup = sdpa_ms / sparse_ms
        row = (f"| {machine} | torch backend fwd fp32, {name} | {args.n} | {args.d} | {args.heads} | "
               f"{density:.3f} ({layout.partial_fraction():.0%} partial) | {sdpa_ms:.1f} | {sparse_ms:.1f} | "
               f"{speedup:.2f}x | {speedup * density:.0%} | `{cmd.strip()}` |")
        rows.append(row)
        if args.backward:
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            dense_bw, sparse_bw = timed_pair(
                lambda: F.scaled_dot_product_attention(qg, kg, vg).sum().backward(),
                lambda: block_sparse_attention(qg, kg, vg, layout, backend="torch").sum().backward(),
                args.repeats)
            rows.append(f"| {machine} | torch backend fwd+bwd fp32, {name} | {args.n} | {args.d} | {args.heads} | "
                        f"{density:.3f} | {dense_bw:.1f} | {sparse_bw:.1f} | {dense_bw / sparse_bw:.2f}x | "
                        f"{dense_bw / sparse_bw * density:.0%} | `{cmd.strip()}` |")
    print("| machine | kernel | N | D | heads | visited density | SDPA ms | sparse ms | speedup | "
          "fraction of 1/density | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
