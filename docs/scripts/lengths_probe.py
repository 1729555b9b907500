"""The block-sparse forward with its length tiles run by count (the bias product) against the same tiles run by
their bit masks, on the layouts that have them: Tile fitted to Wan 2.1 480p's grid and VSA's fine branch on the
same grid.

A length tile (a visited tile that allows its first ``c`` keys in every row: a fitted tile's ragged last block, a
partial cube) costs 1.03-1.05x a full tile in instructions with the count, 1.28-1.33x with its bit mask
(BENCHMARKS section 7, STATIC). This probe times what that is worth on a GPU and checks that the two paths agree:

    python docs/scripts/lengths_probe.py --out lengths.json              # on the GPU (bf16, 12 heads, d128)
    TRITON_INTERPRET=1 python docs/scripts/lengths_probe.py --dry-run    # on a CPU: small grids, fp32

Each row of the JSON: the layout, its density, the share of its masked tiles that are column counts, the launch
configurations that ran length tiles (none where the length variant spills), the largest relative row error of the length path against the bit-mask path (and, in a dry run, both against fp32 attention
over the layout's mask), and on a GPU the milliseconds of each path (``triton.testing.do_bench`` medians) and the
bit-mask path's time over the length path's. The self-check is bypassed (``lengths=True`` / ``False`` forced):
the rows' errors are the check.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

#: (name, grid, density or sparsity) of the GPU rows, all on Wan 2.1 480p's latent grid: Tile fitted at the issue's
#: 10% and at Tile's recommended density; VSA at sparsities 0.8 and 0.9, whose (4, 4, 4) cubes leave partial cubes
#: there (FastWan's own (16, 28, 52) has none, so no length tiles).
GPU_CASES = [("tile-fit", (21, 30, 52), 0.1), ("tile-fit", (21, 30, 52), 0.35),
             ("vsa", (21, 30, 52), 0.8), ("vsa", (21, 30, 52), 0.9)]
#: The dry run's: grids a CPU runs through the interpreter in seconds, with ragged tiles and partial cubes.
DRY_CASES = [("tile-fit", (3, 9, 14), 0.3), ("vsa", (5, 6, 7), 0.7)]
TOL = 2e-2  # bf16 against fp32 / the other path; the dry run's fp32 is held to 1e-4


def layout_of(name: str, grid, amount: float, heads: int, device):
    """The block layout the kernel runs for the case, on ``device``."""
    if name == "tile-fit":
        from dit_accel.methods import Tile

        plan = Tile().at_density(tuple(grid), amount).replace(fit=True).plan(tuple(grid))
        if not hasattr(plan, "layout"):
            raise ValueError(f"Tile fitted to {tuple(grid)} at density {amount} is dense here: no layout to run")
        return plan.layout.to(device)
    from dit_accel.kernels.vsa.api import vsa_layout
    from dit_accel.kernels.vsa.naive import cubes_of

    cubes = cubes_of(tuple(grid), (4, 4, 4))
    keep = max(1, round(cubes.count * (1 - amount)))
    g = torch.Generator().manual_seed(0)
    selection = torch.rand(1, heads, cubes.count, cubes.count, generator=g).argsort(-1)[..., :keep].sort(-1).values
    return vsa_layout(cubes, selection.to(device))


def _row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    return float(err.max()) if torch.isfinite(out).all() else float("inf")


def run_case(name, grid, amount, *, heads, head_dim, dtype, device, timed):
    from dit_accel.kernels.block_sparse import triton as bst
    from dit_accel.kernels.block_sparse.triton import triton_forward
    from dit_accel.kernels.geometry import kernel_length_tiles

    layout = layout_of(name, grid, amount, heads, device)
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, device=device).to(dtype)
               for n in (layout.q_len, layout.kv_len, layout.kv_len))
    scale = head_dim ** -0.5
    row = {"layout": name, "grid": list(grid), "amount": amount, "tokens": layout.q_len, "heads": heads,
           "density": round(float(layout.density()), 4), "length_share": kernel_length_tiles(layout)}
    o_len, _ = triton_forward(q, k, v, layout, scale, lengths=True)
    o_bit, _ = triton_forward(q, k, v, layout, scale, lengths=False)
    launches = [x.cfg for x in bst._PLANS.values(layout).values() if isinstance(x, bst._Launch)]
    row["ran_lengths"] = [c.name for c in launches if c.lengths]  # empty where the length variant spills
    row["len_vs_bits"] = _row_error(o_len, o_bit)
    ok = row["len_vs_bits"] <= (TOL if dtype != torch.float32 else 1e-4) and bool(row["ran_lengths"])
    if not timed:  # a small case: both against fp32 attention over the layout's own mask
        from dit_accel.kernels.reference import dense_attention_reference

        ref, _ = dense_attention_reference(q.float(), k.float(), v.float(), layout.to_dense_mask(), scale)
        row["len_vs_fp32"], row["bits_vs_fp32"] = _row_error(o_len, ref), _row_error(o_bit, ref)
        ok = ok and max(row["len_vs_fp32"], row["bits_vs_fp32"]) <= 1e-4
    else:
        import triton

        row["ms_len"] = triton.testing.do_bench(lambda: triton_forward(q, k, v, layout, scale, lengths=True))
        row["ms_bits"] = triton.testing.do_bench(lambda: triton_forward(q, k, v, layout, scale, lengths=False))
        row["bits_over_len"] = round(row["ms_bits"] / row["ms_len"], 3)
    row["pass"] = bool(ok)
    return row


def probe_main(argv, description: str, gpu_cases, dry_cases, run_case) -> int:
    """The probes' command line (this one's and ``bwd_probe.py``'s): each case ``(layout, grid, amount, *more)``
    through ``run_case(*case, device=, timed=, heads=, head_dim=, dtype=)`` on the GPU, or its dry-run cases through
    the interpreter; one JSON line per row, the rows in ``--out``; exit 0 when every row passed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    parser.add_argument("--dry-run", action="store_true", help="small grids through the interpreter, fp32, untimed")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no GPU: run with --dry-run (and TRITON_INTERPRET=1) to check the probe on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    from dit_accel.kernels.interpreter import speed_up_interpreter
    from dit_accel.kernels.request import interpreting

    if not cuda and interpreting():  # (what the test suite does: the interpreter without the costs that change nothing)
        speed_up_interpreter()
    cases, kw = (gpu_cases, dict(heads=12, head_dim=128, dtype=torch.bfloat16)) if cuda else \
        (dry_cases, dict(heads=2, head_dim=32, dtype=torch.float32))
    rows = []
    for case in cases:
        try:
            row = run_case(*case, device=device, timed=cuda, **kw)
        except Exception as exc:  # reported, not raised: the other cases still run
            row = {"layout": case[0], "grid": list(case[1]), "amount": case[2], "more": [list(x) for x in case[3:]],
                   "pass": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["pass"] for r in rows) else 1


def main(argv=None) -> int:
    return probe_main(argv, __doc__.splitlines()[0], GPU_CASES, DRY_CASES, run_case)


if __name__ == "__main__":
    sys.exit(main())
