"""Which part of the warp-specialized block-sparse forward goes wrong on an sm_90 GPU.

Its first GPU runs (H100 and H200, triton 3.6.0) gave non-finite or wrong rows from row 64 on: the rows of the
second of the two 64-row consumer warp groups that a 128-row tile splits into. This probe runs the ws kernel alone
(no resume pass: every visited tile is full) in several tile shapes and pipeline depths, and, for each, where its
rows go wrong against fp32 attention over the same blocks:

- 128-row tiles at 3 and 2 stages (the shipped configuration is 128 x 64, 4 warps, 3 stages);
- 64-row tiles (no 128-row tile to split; the CTA still runs 12 warps, compiled for sm_90 with triton 3.9);
- a dense layout (the key tiles in order) and a sparse one (every other key tile), so a fault in the loaded tile
  index (a pointer load inside the warp-specialized loop) shows as a difference between the two.

    python docs/scripts/ws_probe.py --out ws_probe.json            # on the GPU
    python docs/scripts/ws_probe.py --time --out ws_probe.json     # and time the correct ones
    python docs/scripts/ws_probe.py --dry-run --out /tmp/ws.json    # on a CPU: compiles each variant for sm_90

Each row of the JSON: the variant, the layout, whether the kernel ran, the share of non-finite output rows, the
largest relative row error in the first and the second 64 rows of each 128-row tile, and the first bad row.

Then the same rows for the designs of :mod:`ws_designs` (``"design"`` in each row), at the 128-row variants: the
package's kernel up to 293ebb5 (``pipelined``: its item loop software-pipelined), one work item per program with
and without the tile indices read before the loop (``grid``, ``grid-preload``), and the pipelined kernel without
the pointer load in its loop (``pipelined-preload``); the package's rows above are the ``flat`` design. A control
row per variant, ``dense-ws``: the in-repo dense kernel's ws forward (no loop around its ws loop) on full attention.

``--time`` (GPU): each variant and design that was correct on both layouts, timed at Wan 2.1 1.3B's size
(``--time-tokens``, ``--time-heads``) on a layout of about 10% density (each query block's own key block and every tenth), beside the
one-loop kernel the launcher runs by default on the same layout and dense SDPA on the same inputs: milliseconds
(triton.testing.do_bench's median), the one-loop kernel's time over the variant's, and the efficiency (speed-up
over SDPA x the true density).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

#: (block_m, block_n, warps, stages) of the ws kernel to try; the first is the shipped one.
VARIANTS = [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2)]
#: the variants the designs run at (``flat``, the package's, is its rows above)
DESIGN_VARIANTS = [(128, 64, 4, 3), (128, 64, 4, 2)]
DESIGN_NAMES = ("pipelined", "grid", "grid-preload", "pipelined-preload")
LAYOUTS = ("dense", "sparse")
TOL = 2e-2  # a row is bad past this relative error (bf16 inputs against fp32)


def _layout(n: int, kind: str, every: int = 2):
    """Layout of 128-token blocks over ``n`` tokens, every visited block full: all of them, or every ``every``-th
    key block (each query block keeps its own diagonal one, so no row is empty)."""
    from dit_accel.kernels.layout import BlockLayout

    nb = n // 128
    visited = torch.ones(1, nb, nb, dtype=torch.bool)
    if kind == "sparse":
        cols = torch.arange(nb)
        visited &= ((cols[None, :] % every) == 0) | (cols[None, :] == torch.arange(nb)[:, None])
    return BlockLayout.from_block_masks(visited, q_len=n, kv_len=n, block_q=128, block_k=128)


def _configured(variant):
    """The ws configuration for ``variant`` (WS_TUNED's sm_90 d128 entry replaced) and the base configuration."""
    from dit_accel.kernels.block_sparse import configs

    configs.WS_TUNED[(90, "fwd", 128)] = variant
    base = configs.select_config("fwd", torch.bfloat16, 128, 128, 128, 90)
    return configs.ws_config(base, 90), base


def _row_errors(o: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-row relative error of ``o`` against ``ref`` (both ``(B, H, N, D)``), summarised by 64-row half."""
    err = ((o.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).flatten(0, 1)  # [B*H, N]
    finite = torch.isfinite(o.float()).all(-1).flatten(0, 1)
    err = torch.where(finite, err, torch.full_like(err, float("inf")))
    rows = torch.arange(err.shape[-1], device=err.device)
    first, second = err[:, rows % 128 < 64], err[:, rows % 128 >= 64]
    bad = (err > TOL).any(0).nonzero().flatten()
    return {"nonfinite_rows": round(float((~finite).float().mean()), 4),
            "max_err_rows_0_63": float(first.max()), "max_err_rows_64_127": float(second.max()),
            "first_bad_row": int(bad[0]) if bad.numel() else None}


def _inputs(kind: str, n: int, heads: int, device: str = "cuda"):
    layout = _layout(n, kind).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # (the interpreter's bf16 dot is wrong)
    q, k, v = (torch.randn(1, heads, n, 128, device=device, generator=g, dtype=dtype) for _ in range(3))
    return layout, q, k, v


def _checked(row: dict, layout, q, k, v, o) -> dict:
    """``row`` with the errors of ``o`` against fp32 attention over the layout's visited blocks."""
    mask = layout.to_dense_mask()[0].to(q.device)  # [N, N] True = visited
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           scale=128 ** -0.5)
    return {**row, **_row_errors(o, ref)}


def _run(variant, kind: str, n: int, heads: int) -> dict:
    from dit_accel.kernels import selfcheck
    from dit_accel.kernels.block_sparse import triton as bst

    ws, base = _configured(variant)
    row = {"variant": list(variant), "layout": kind, "ran": False}
    if ws is None:
        return {**row, "error": "no ws configuration"}
    layout, q, k, v = _inputs(kind, n, heads)
    o = torch.zeros_like(q)
    lse = torch.zeros(1, heads, n, device="cuda", dtype=torch.float32)
    real = selfcheck.usable_fast
    selfcheck.usable_fast = lambda *a, **kw: True  # the probe runs the variant its self-check would refuse
    try:
        t0 = time.perf_counter()
        row["ran"] = bool(bst._ws_forward(q, k, v, o, lse, layout, base, 128 ** -0.5, force=True))
        torch.cuda.synchronize()
        row["seconds"] = round(time.perf_counter() - t0, 2)
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure is a finding
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        selfcheck.usable_fast = real
    return _checked(row, layout, q, k, v, o)


def _run_design(design: str, variant, kind: str, n: int, heads: int, device: str = "cuda") -> dict:
    """A row of :func:`_run` for a design of :mod:`ws_designs` (its own kernel, not the package's launcher)."""
    from ws_designs import run_design

    row = {"design": design, "variant": list(variant), "layout": kind, "ran": False}
    layout, q, k, v = _inputs(kind, n, heads, device)
    programs = torch.cuda.get_device_properties(q.device).multi_processor_count if device == "cuda" else 3
    try:
        t0 = time.perf_counter()
        o, _ = run_design(design, q, k, v, layout, *variant, programs=programs)
        if device == "cuda":
            torch.cuda.synchronize()
        row.update(ran=True, seconds=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure is a finding
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return _checked(row, layout, q, k, v, o)


def _run_dense_ws(variant, n: int, heads: int, device: str = "cuda") -> dict:
    """The control: the in-repo dense kernel's warp-specialized forward (no loop around its ws loop, no tile
    index) in ``variant``, against fp32 attention; ``ws`` says whether its launcher took the ws configuration."""
    import os

    from dit_accel.kernels.dense import triton as dense

    _configured(variant)
    row = {"design": "dense-ws", "variant": list(variant), "layout": "dense", "ran": False}
    layout, q, k, v = _inputs("dense", n, heads, device)
    saved = os.environ.get("DIT_ACCEL_WS")
    os.environ["DIT_ACCEL_WS"] = "1"
    try:
        row["ws"] = dense._ws_config(dense._config("fwd", q, (k, v)), q) is not None
        t0 = time.perf_counter()
        o, _ = dense.dense_forward(q, k, v, 128 ** -0.5)
        if device == "cuda":
            torch.cuda.synchronize()
        row.update(ran=True, seconds=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure is a finding
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        if saved is None:
            os.environ.pop("DIT_ACCEL_WS", None)
        else:
            os.environ["DIT_ACCEL_WS"] = saved
    return _checked(row, layout, q, k, v, o)


def _time(variants, n: int, heads: int, designs=()) -> list:
    """Each variant (and each ``(design, variant)`` of ``designs``) against the default one-loop kernel and dense
    SDPA, bf16, head dim 128, ~10% density."""
    from triton.testing import do_bench

    from dit_accel.kernels import selfcheck
    from dit_accel.kernels.block_sparse import triton as bst

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    lse = torch.empty(1, heads, n, device="cuda", dtype=torch.float32)
    scale = 128 ** -0.5
    layout = _layout(n, "sparse", every=10).to("cuda")
    density = float(layout.to_dense_mask().sum()) / n ** 2  # every visited block is full
    sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
    one_loop = do_bench(lambda: bst.triton_forward(q, k, v, layout, scale))  # ws off: the launcher's default
    base_row = {"kernel": "one-loop (default)", "ms": round(one_loop, 4), "sdpa_ms": round(sdpa, 4),
                "density": round(density, 4), "efficiency": round(sdpa / one_loop * density, 3)}
    print(json.dumps(base_row), flush=True)
    rows = [base_row]
    real = selfcheck.usable_fast
    selfcheck.usable_fast = lambda *a, **kw: True
    try:
        for variant in variants:
            _, base = _configured(variant)
            try:
                ms = do_bench(lambda: bst._ws_forward(q, k, v, o, lse, layout, base, scale, force=True))
                row = {"kernel": "ws", "variant": list(variant), "ms": round(ms, 4),
                       "one_loop_over_ws": round(one_loop / ms, 3), "efficiency": round(sdpa / ms * density, 3)}
            except Exception as exc:  # noqa: BLE001
                row = {"kernel": "ws", "variant": list(variant), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        selfcheck.usable_fast = real
    if designs:
        from ws_designs import run_design

        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    for design, variant in designs:
        try:
            ms = do_bench(lambda: run_design(design, q, k, v, layout, *variant, programs=sms))
            row = {"kernel": "ws", "design": design, "variant": list(variant), "ms": round(ms, 4),
                   "one_loop_over_ws": round(one_loop / ms, 3), "efficiency": round(sdpa / ms * density, 3)}
        except Exception as exc:  # noqa: BLE001
            row = {"kernel": "ws", "design": design, "variant": list(variant),
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _dry_run_design(design: str, variant) -> dict:
    """CPU: compile the design for sm_90; whether Triton made warp-specialized partitions."""
    from ws_designs import compile_design

    row = {"design": design, "variant": list(variant)}
    try:
        return {**row, "compiled": True, **compile_design(design, *variant)}
    except Exception as exc:  # noqa: BLE001
        return {**row, "compiled": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _dry_run(variant) -> dict:
    """CPU: compile the ws variant for sm_90 (what the GPU would build first)."""
    from dit_accel.kernels.compile import compile_for_target

    ws, _ = _configured(variant)
    if ws is None:
        return {"variant": list(variant), "error": "no ws configuration"}
    try:
        ck = compile_for_target(ws, 90)
        return {"variant": list(variant), "compiled": True, "shared": int(ck.metadata.shared),
                "warps": int(ck.metadata.num_warps)}
    except Exception as exc:  # noqa: BLE001
        return {"variant": list(variant), "compiled": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens (a multiple of 128)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dry-run", action="store_true", help="CPU: compile each variant for sm_90, run nothing")
    parser.add_argument("--time", action="store_true", help="GPU: time the variants that were correct")
    parser.add_argument("--time-tokens", type=int, default=32768, help="tokens of the timing (a multiple of 128)")
    parser.add_argument("--time-heads", type=int, default=12)
    args = parser.parse_args(argv)
    for flag, value in (("--tokens", args.tokens), ("--time-tokens", args.time_tokens)):
        if value % 128 or value <= 0:
            parser.error(f"{flag} {value} must be a positive multiple of 128")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on an sm_90 GPU, or pass --dry-run on a CPU")
    rows = []
    for variant in VARIANTS:
        todo = [_dry_run(variant)] if args.dry_run else [_run(variant, kind, args.tokens, args.heads)
                                                         for kind in LAYOUTS]
        for row in todo:
            print(json.dumps(row), flush=True)
            rows.append(row)
    for design in DESIGN_NAMES:
        for variant in DESIGN_VARIANTS:
            todo = [_dry_run_design(design, variant)] if args.dry_run else [
                _run_design(design, variant, kind, args.tokens, args.heads) for kind in LAYOUTS]
            for row in todo:
                print(json.dumps(row), flush=True)
                rows.append(row)
    for variant in ([] if args.dry_run else DESIGN_VARIANTS):  # the control: the dense kernel's ws forward
        rows.append(_run_dense_ws(variant, args.tokens, args.heads))
        print(json.dumps(rows[-1]), flush=True)
    timings = []
    if args.time and not args.dry_run:
        ok = [(r.get("design"), tuple(r["variant"])) for r in rows if r.get("ran") and
              r.get("first_bad_row", 0) is None]
        good = [v for v in VARIANTS if ok.count((None, v)) == len(LAYOUTS)]  # correct on both layouts
        designs = [(d, v) for d in DESIGN_NAMES for v in DESIGN_VARIANTS if ok.count((d, v)) == len(LAYOUTS)]
        timings = _time(good, args.time_tokens, args.time_heads, designs)
    with open(args.out, "w") as fh:
        json.dump({"argv": sys.argv[1:], "triton": __import__("triton").__version__, "rows": rows,
                   "timings": timings}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
