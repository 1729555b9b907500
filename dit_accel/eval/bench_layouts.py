"""Time and peak memory of the block-layout constructors at video scale (one CPU core).

Run: ``python -m dit_accel.eval.bench_layouts [T H W] [--block 128]``. Each constructor
runs in a fresh process with one torch thread; memory is the growth of the
process's peak RSS during the call (a dense N x N mask would be N^2 bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from dit_accel.patterns import gna_layout, radial_layout, tile_layout
name, grid, block = sys.argv[1], tuple(map(int, sys.argv[2].split(","))), int(sys.argv[3])
calls = {
    "tile_layout tile=(6,8,8) window=(3,3,3)": lambda g: tile_layout(g, (6, 8, 8), (3, 3, 3), block_q=block, block_k=block),
    "gna_layout kernel=(13,13,13) stride=1": lambda g: gna_layout(g, (13, 13, 13), block_q=block, block_k=block),
    "gna_layout kernel=(18,24,24) stride=(6,8,8) tile=(6,8,8)": lambda g: gna_layout(
        g, (18, 24, 24), (6, 8, 8), tile=(6, 8, 8), block_q=block, block_k=block),
    "radial_layout decay=1.0 sink=(0,)": lambda g: radial_layout(g, block),
}
fn = calls[name]
fn(tuple(min(x, 24) for x in grid))  # warm-up: imports, allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = fn(grid)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
lay = out[1] if isinstance(out, tuple) else out
print(json.dumps({"layout": name, "seconds": round(dt, 3), "peak_rss_growth_mb": round(peak / 1024, 1),
                  "density": round(lay.density(), 4), "partial": round(lay.partial_fraction(), 4)}))
"""

_NAMES = ["tile_layout tile=(6,8,8) window=(3,3,3)", "gna_layout kernel=(13,13,13) stride=1",
          "gna_layout kernel=(18,24,24) stride=(6,8,8) tile=(6,8,8)", "radial_layout decay=1.0 sink=(0,)"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="*", type=int, default=[30, 48, 80])
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args(argv)
    grid = ",".join(map(str, args.grid))
    for name in _NAMES:
        out = subprocess.run([sys.executable, "-c", _CHILD, name, grid, str(args.block)], capture_output=True,
                             text=True, check=True)
        print(json.dumps({"grid": grid, "block": args.block, **json.loads(out.stdout)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
