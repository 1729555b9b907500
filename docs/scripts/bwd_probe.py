"""The block-sparse backward at Wan's head dim on 64-token blocks: the two-pass kernels (7 tensor-core products per
tile, what ships there) against the one-pass kernel (5 products, dQ by atomic adds) in the two tiles worth timing.

No one-pass configuration ships for sm_90 at head dim 128 with 64-token blocks (the shipped one needs 128-token key
blocks). Compiled for sm_90 (STATIC, triton 3.9, bf16), warp instructions per 64 x 64 block of full-tile pairs: the
two-pass kernels 4424 (dK/dV 32x64 at 4 warps, dQ 64x32 at 4 warps, no spill); one-pass 32x64 at 4 warps, 1 stage
3680 (0.83x) but 255 registers and 96 B spilled; 32x64 at 8 warps, 2 stages 7904 (1.79x), 236 registers, no spill;
64x64 tiles spill 172-684 B. Which is faster is a GPU timing; this probe measures it and checks that the one-pass
gradients equal the two-pass ones:

    python docs/scripts/bwd_probe.py --out bwd_probe.json              # on the GPU (bf16, 12 heads, d128)
    TRITON_INTERPRET=1 python docs/scripts/bwd_probe.py --dry-run      # on a CPU: small grids, fp32, untimed

Each row of the JSON: the layout, its density, the one-pass tile, the largest relative row error of its gradients
against the two-pass ones (and, in a dry run, both against fp32 attention over the layout's mask), and on a GPU the
milliseconds of each backward (``triton.testing.do_bench`` medians, the forward run once before) and the two-pass
time over the one-pass time. The self-check is bypassed (``one_pass`` forced): the rows' errors are the check.
"""

from __future__ import annotations

import sys

import torch

#: The one-pass tiles timed (BLOCK_M query rows streamed, BLOCK_N key rows owned, warps, stages).
CANDIDATES = [(32, 64, 4, 1), (32, 64, 8, 2)]
#: (name, grid, density or sparsity): Tile fitted to Wan 2.1 480p at 10% and at Tile's recommended density, and VSA's
#: fine branch at FastWan's own grid (16, 28, 52), sparsity 0.9.
GPU_CASES = [("tile-fit", (21, 30, 52), 0.1), ("tile-fit", (21, 30, 52), 0.35), ("vsa", (16, 28, 52), 0.9)]
#: The dry run's: grids a CPU runs through the interpreter in seconds.
DRY_CASES = [("tile-fit", (3, 9, 14), 0.3), ("vsa", (5, 6, 7), 0.7)]
TOL = 2e-2  # bf16 one-pass against two-pass; the dry run's fp32 is held to 1e-4 against fp32 attention


def _row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    return float(err.max()) if torch.isfinite(out).all() else float("inf")


def run_case(name, grid, amount, candidate, *, heads, head_dim, dtype, device, timed):
    from dit_accel.kernels import BlockLayout
    from dit_accel.kernels.block_sparse import configs
    from dit_accel.kernels.block_sparse import triton as bst
    from lengths_probe import layout_of  # (docs/scripts: the same layouts as the length-tile probe)

    found = layout_of(name, grid, amount, heads, device)  # a fresh copy: launches are derived once per layout
    layout = BlockLayout(found.q_len, found.kv_len, found.block_q, found.block_k,
                         *(getattr(found, t).clone() for t in BlockLayout.TENSORS))
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (torch.randn(1, heads, n, head_dim, generator=g, device=device).to(dtype)
                   for n in (layout.q_len, layout.kv_len, layout.kv_len, layout.q_len))
    scale = head_dim ** -0.5
    row = {"layout": name, "grid": list(grid), "amount": amount, "tokens": layout.q_len, "heads": heads,
           "density": round(float(layout.density()), 4), "one_pass_tile": list(candidate)}
    # The candidate in place before the first backward: a launch is derived once per (layout, signature).
    key = (bst._arch(q.device), configs.block_d_for(head_dim))
    saved = configs.FUSED_TUNED.get(key)
    configs.FUSED_TUNED[key] = candidate
    try:
        o, lse = bst.triton_forward(q, k, v, layout, scale)
        two = bst.triton_backward(do, q, k, v, o, lse, layout, scale, one_pass=False)
        one = bst.triton_backward(do, q, k, v, o, lse, layout, scale, one_pass=True)
        launched = [x.fused.kw for x in bst._PLANS.values(layout).values()
                    if isinstance(x, bst._BackwardLaunch) and x.fused is not None]
        row["ran"] = [f"m{kw['BLOCK_M']}n{kw['BLOCK_N']}-w{kw['num_warps']}s{kw['num_stages']}" for kw in launched]
        row["one_vs_two"] = max(_row_error(a, b) for a, b in zip(one, two))
        want = "m{}n{}-w{}s{}".format(*candidate)
        ok = row["one_vs_two"] <= (TOL if dtype != torch.float32 else 1e-4) and row["ran"] == [want]
        if not timed:  # a small case: both against fp32 attention over the layout's own mask
            from dit_accel.kernels.reference import dense_attention_reference

            qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
            ref, _ = dense_attention_reference(qr, kr, vr, layout.to_dense_mask(), scale)
            ref.backward(do.float())
            row["one_vs_fp32"] = max(_row_error(a, b.grad) for a, b in zip(one, (qr, kr, vr)))
            row["two_vs_fp32"] = max(_row_error(a, b.grad) for a, b in zip(two, (qr, kr, vr)))
            ok = ok and max(row["one_vs_fp32"], row["two_vs_fp32"]) <= 1e-4
        else:
            import triton

            row["ms_one_pass"] = triton.testing.do_bench(
                lambda: bst.triton_backward(do, q, k, v, o, lse, layout, scale, one_pass=True))
            row["ms_two_pass"] = triton.testing.do_bench(
                lambda: bst.triton_backward(do, q, k, v, o, lse, layout, scale, one_pass=False))
            row["two_over_one"] = round(row["ms_two_pass"] / row["ms_one_pass"], 3)
    finally:
        if saved is None:
            configs.FUSED_TUNED.pop(key, None)
        else:
            configs.FUSED_TUNED[key] = saved
    row["pass"] = bool(ok)
    return row


def main(argv=None) -> int:
    from lengths_probe import probe_main

    expand = lambda cases: [(*case, tile) for case in cases for tile in CANDIDATES]  # noqa: E731
    return probe_main(argv, __doc__.splitlines()[0], expand(GPU_CASES), expand(DRY_CASES), run_case)


if __name__ == "__main__":
    sys.exit(main())
