"""Tile's, GNA's and VSA's calls with the kernels reading raster order through a row table, against the same
calls gathering q, k and v into tiled order and back (what the plans ran before), at Wan 2.1's grids.

The gathered forward (``dit_accel/kernels/block_sparse/gather.py``) drops four memory-bound passes (8 q-sized units
of traffic a call, BENCHMARKS section 6, MODELLED) but runs the pointer-load kernel, where sm_90's default forward
loads K and V by TMA. This probe says what that trade is worth on a GPU and that both paths agree:

    python docs/scripts/gather_probe.py --out gather.json              # on the GPU (bf16, 12 heads, d128)
    TRITON_INTERPRET=1 python docs/scripts/gather_probe.py --dry-run   # on a CPU: small grids, fp32

Each row of the JSON: the plan (Tile fitted to the grid at a density, as ``dit_accel.recommended`` fits it; GNA with
``recommended``'s (7, 16, 16) window for Wan, fitted; the amount is then the window), its true density (allowed
token pairs / N^2, what ``efficiency_gathered`` = speed-up over SDPA x density uses) and block density, the launch configuration each path ran, the largest relative row error of the gathered path against the
gathering one (and, in a dry run, both against fp32 attention over the plan's raster mask), and on a GPU the
milliseconds (``triton.testing.do_bench`` medians) of the gathering path, of the gathered one, of the kernel alone
on inputs already in tiled order (so the passes' share is ``ms_gathering - ms_kernel``), and of dense SDPA. VSA's
rows (``dit_accel/kernels/vsa/raster.py``: the pool launch and the fine branch both reading raster order) time
``vsa_attention`` with a gate, sparsity 0.9, at FastWan's (16, 28, 52) and Wan 480p's grid, ``DIT_ACCEL_GATHER=0``
(cube order) against ``=1``. ``tile-fit-train`` rows time a training call (forward and backward, the raster
backward's two-pass kernels against the gathering path's backward) and compare the gradients; ``vsa-train`` rows
time VSA's gated training call both ways (``raster_train`` against cube order) and compare the output and the
gradients where the two paths selected alike: the cube-order path's means are the PyTorch twin's sums, the raster
path's the pool launch's (another fp32 order), so a near-tie may rank apart in a few rows at hundreds of cubes
(``selection_rows_differing``; the row passes with at most 0.1 % of the rows so, and the errors are then left out).
The self-check and the timed choice are bypassed (each path forced): the rows' errors are the check.
"""

from __future__ import annotations

import sys

import torch

from lengths_probe import _row_error, probe_main

#: (name, grid, density or GNA window) of the GPU rows: Tile fitted to Wan 2.1 480p and 720p at 10 % and 5 % density,
#: GNA with its recommended window at 480p.
GPU_CASES = [("tile-fit", (21, 30, 52), 0.1), ("tile-fit", (21, 30, 52), 0.05), ("tile-fit", (21, 45, 80), 0.1),
             ("gna-fit", (21, 30, 52), (7, 16, 16)), ("vsa", (16, 28, 52), 0.9), ("vsa", (21, 30, 52), 0.9),
             ("tile-fit-train", (21, 30, 52), 0.1), ("vsa-train", (16, 28, 52), 0.9), ("vsa-train", (21, 30, 52), 0.9)]
#: The dry run's: grids the interpreter runs in seconds, one with padded tiles (and VSA's with partial cubes).
DRY_CASES = [("tile-fit", (3, 9, 14), 0.3), ("tile", (3, 7, 10), 0.4), ("gna-fit", (3, 9, 14), (3, 5, 5)),
             ("vsa", (5, 6, 7), 0.5), ("tile-fit-train", (3, 9, 14), 0.3), ("vsa-train", (5, 6, 7), 0.5)]
TOL = 2e-2  # bf16 (the two paths run different kernels on sm_90); the dry run's fp32 is held to 1e-4


def plan_of(name: str, grid, amount):
    from dit_accel.methods import GNA, Tile

    if name == "gna-fit":
        plan = GNA(kernel_size=tuple(amount), fit=True).plan(tuple(grid))
    else:
        method = Tile().at_density(tuple(grid), amount)
        plan = (method.replace(fit=True) if name.startswith("tile-fit") else method).plan(tuple(grid))
    if getattr(plan, "perm", None) is None:
        raise ValueError(f"{name} at {tuple(grid)}, {amount}: no tiled order (dense or raster) to probe")
    return plan


def plan_densities(plan) -> dict:
    """The row's ``density``: the pattern's true density (allowed real query-key pairs / N^2), which its
    ``efficiency_gathered`` multiplies the speed-up by (issue 72), and ``block_density``: the share of the layout's
    blocks it visits over the padded tiled order (a GNA window's partial blocks or a padded tile put it above the
    true one: the efficiency multiplied by it read too high)."""
    from dit_accel.kernels.geometry import block_figures

    real = plan.perm.order >= 0
    return {"density": round(block_figures(plan.layout, real, real).density, 4),
            "block_density": round(float(plan.layout.density()), 4)}


def run_vsa_case(grid, sparsity, *, heads, head_dim, dtype, device, timed):
    """VSA with a gate at ``sparsity``: cube order against raster order (``DIT_ACCEL_GATHER``)."""
    from dit_accel._util import env_set
    from dit_accel.kernels.vsa import vsa_attention

    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, gate = (torch.randn(1, n, heads, head_dim, generator=g, device=device).to(dtype).transpose(1, 2)
                     for _ in range(4))
    row = {"layout": "vsa", "grid": list(grid), "amount": sparsity, "tokens": n, "heads": heads}

    def path(gather: bool, backend="triton"):
        with env_set("DIT_ACCEL_GATHER", str(int(gather))):
            return vsa_attention(q, k, v, tuple(grid), sparsity=sparsity, gate=gate, backend=backend)

    o_cube, o_raster = path(False), path(True)
    row["gathered_vs_gathering"] = _row_error(o_raster, o_cube)
    ok = row["gathered_vs_gathering"] <= (TOL if dtype != torch.float32 else 1e-4)
    if not timed:  # small: both against the PyTorch twin in fp32
        ref = path(False, backend="torch")
        row["gathered_vs_fp32"], row["gathering_vs_fp32"] = _row_error(o_raster, ref), _row_error(o_cube, ref)
        ok = ok and max(row["gathered_vs_fp32"], row["gathering_vs_fp32"]) <= 1e-4
    else:
        import triton

        row["ms_gathering"] = triton.testing.do_bench(lambda: path(False))
        row["ms_gathered"] = triton.testing.do_bench(lambda: path(True))
        row["ms_sdpa"] = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        row["gathering_over_gathered"] = round(row["ms_gathering"] / row["ms_gathered"], 3)
    row["pass"] = bool(ok)
    return row


def _time_training(row: dict, step, q, k, v, do) -> None:
    """A training row's milliseconds (``triton.testing.do_bench`` medians): ``step(gather)`` both ways, and SDPA's
    forward and backward on the same q, k, v and output gradient."""
    import triton

    def sdpa():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*leaves)
        torch.autograd.grad(o, leaves, do)

    row["ms_gathering"] = triton.testing.do_bench(lambda: step(False))
    row["ms_gathered"] = triton.testing.do_bench(lambda: step(True))
    row["ms_sdpa"] = triton.testing.do_bench(sdpa)
    row["gathering_over_gathered"] = round(row["ms_gathering"] / row["ms_gathered"], 3)


def run_vsa_train_case(grid, sparsity, *, heads, head_dim, dtype, device, timed):
    """VSA's gated training call at ``sparsity``: forward and backward in cube order against both reading raster
    order (``DIT_ACCEL_GATHER``): the selections, and where they agree the output's and the gradients' largest
    relative row error; the raster path with the gated term's backward in PyTorch operators against its launch;
    on a GPU the milliseconds of each, and of SDPA's forward and backward."""
    from dit_accel._util import env_set
    from dit_accel.kernels.vsa import vsa_attention

    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, gate, do = (torch.randn(1, n, heads, head_dim, generator=g, device=device).to(dtype).transpose(1, 2)
                         for _ in range(5))
    row = {"layout": "vsa-train", "grid": list(grid), "amount": sparsity, "tokens": n, "heads": heads}

    def step(gather: bool):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, gate)]
        with env_set("DIT_ACCEL_GATHER", str(int(gather))):
            o, selection = vsa_attention(*leaves[:3], tuple(grid), sparsity=sparsity, gate=leaves[3],
                                         backend="triton", return_selection=True)
            return [o] + list(torch.autograd.grad(o, leaves, do)), selection

    def operators_step():  # raster order, the gated term's backward in PyTorch operators (not kernels/vsa/gated.py)
        from dit_accel.kernels.vsa import gated

        saved, gated.gated_kernel_runs = gated.gated_kernel_runs, lambda gate: False
        try:
            return step(True)
        finally:
            gated.gated_kernel_runs = saved

    tol = TOL if dtype != torch.float32 else 1e-4
    (raster, sel_raster), (cube, sel_cube) = step(True), step(False)
    differing = int((sel_raster != sel_cube).any(-1).sum())
    row["selection_rows_differing"] = differing
    if differing == 0:
        row["gathered_vs_gathering"] = max(_row_error(a, b) for a, b in zip(raster, cube))
        ok = row["gathered_vs_gathering"] <= tol
    else:
        ok = differing <= 1e-3 * sel_cube[..., 0].numel()
    operators = operators_step()[0]
    row["gate_launch_vs_operators"] = max(_row_error(a, b) for a, b in zip(raster, operators))
    ok = ok and row["gate_launch_vs_operators"] <= tol
    if timed:
        _time_training(row, step, q, k, v, do)
        import triton

        row["ms_gathered_gate_operators"] = triton.testing.do_bench(operators_step)
        row["gate_operators_over_launch"] = round(row["ms_gathered_gate_operators"] / row["ms_gathered"], 3)
    row["pass"] = bool(ok)
    return row


def run_train_case(grid, density, *, heads, head_dim, dtype, device, timed):
    """A fitted Tile training call: forward and backward through the gathering path against both reading raster
    order (the gradients' largest relative row error; on a GPU the milliseconds of each, and of SDPA's)."""
    plan = plan_of("tile-fit-train", grid, density)
    layout = plan.layout_on(device)
    n = plan.perm.num_tokens
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (torch.randn(1, n, heads, head_dim, generator=g, device=device).to(dtype).transpose(1, 2)
                   for _ in range(4))
    scale = head_dim ** -0.5
    row = {"layout": "tile-fit-train", "grid": list(grid), "amount": density, "tokens": n,
           "tiled": plan.perm.num_padded, "heads": heads, **plan_densities(plan)}

    def step(gather: bool):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        o = plan._sparse(*leaves, layout, scale, "triton", False, gather=gather)[0]
        return [o] + list(torch.autograd.grad(o, leaves, do))

    raster, gathering = step(True), step(False)
    row["gathered_vs_gathering"] = max(_row_error(a, b) for a, b in zip(raster, gathering))
    ok = row["gathered_vs_gathering"] <= (TOL if dtype != torch.float32 else 1e-4)
    if timed:
        _time_training(row, step, q, k, v, do)
        row["efficiency_gathered"] = round(row["ms_sdpa"] / row["ms_gathered"] * row["density"], 3)
    row["pass"] = bool(ok)
    return row


def run_case(name, grid, amount, *, heads, head_dim, dtype, device, timed):
    from dit_accel.kernels.block_sparse import triton as bst

    if name == "vsa":
        return run_vsa_case(grid, amount, heads=heads, head_dim=head_dim, dtype=dtype, device=device, timed=timed)
    if name == "vsa-train":
        return run_vsa_train_case(grid, amount, heads=heads, head_dim=head_dim, dtype=dtype, device=device,
                                  timed=timed)
    if name == "tile-fit-train":
        return run_train_case(grid, amount, heads=heads, head_dim=head_dim, dtype=dtype, device=device, timed=timed)
    plan = plan_of(name, grid, amount)
    layout = plan.layout_on(device)
    n = plan.perm.num_tokens
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, n, heads, head_dim, generator=g, device=device).to(dtype).transpose(1, 2)
               for _ in range(3))  # (B, N, H, D) in memory, as a Diffusers processor hands them over
    scale = head_dim ** -0.5
    row = {"layout": name, "grid": list(grid), "amount": amount, "tokens": n, "tiled": plan.perm.num_padded,
           "heads": heads, **plan_densities(plan)}

    def path(gather: bool):
        return plan._sparse(q, k, v, layout, scale, "triton", True, gather=gather)

    o_gathering, _ = path(False)
    o_gathered, _ = path(True)
    row["ran"] = sorted({x.cfg.name for x in bst._PLANS.values(layout).values() if isinstance(x, bst._Launch)})
    row["gathered_vs_gathering"] = _row_error(o_gathered, o_gathering)
    ok = row["gathered_vs_gathering"] <= (TOL if dtype != torch.float32 else 1e-4) and \
        any(c.endswith("-gather") for c in row["ran"])
    if not timed:  # small: both against fp32 attention over the plan's mask carried back to raster order
        from dit_accel.kernels.reference import dense_attention_reference

        raster = plan.perm.inverse.to(device)
        mask = layout.to_dense_mask()[:, raster][:, :, raster]
        ref, _ = dense_attention_reference(q.float(), k.float(), v.float(), mask, scale)
        row["gathered_vs_fp32"], row["gathering_vs_fp32"] = _row_error(o_gathered, ref), _row_error(o_gathering, ref)
        ok = ok and max(row["gathered_vs_fp32"], row["gathering_vs_fp32"]) <= 1e-4
    else:
        import triton

        from dit_accel.kernels.block_sparse.triton import triton_forward

        qt, kt, vt = (plan.perm.permute(x) for x in (q, k, v))
        row["ms_gathering"] = triton.testing.do_bench(lambda: path(False))
        row["ms_gathered"] = triton.testing.do_bench(lambda: path(True))
        row["ms_kernel"] = triton.testing.do_bench(lambda: triton_forward(qt, kt, vt, layout, scale))
        row["ms_sdpa"] = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        row["gathering_over_gathered"] = round(row["ms_gathering"] / row["ms_gathered"], 3)
        row["efficiency_gathered"] = round(row["ms_sdpa"] / row["ms_gathered"] * row["density"], 3)
    row["pass"] = bool(ok)
    return row


def main(argv=None) -> int:
    return probe_main(argv, __doc__.splitlines()[0], GPU_CASES, DRY_CASES, run_case)


if __name__ == "__main__":
    sys.exit(main())
