"""Where the host time of a launch-bound call goes, on a GPU (issue 72: the main job must not be slower than dense).

On an H200 (2e62cde, BENCHMARKS 10.3) the README's main job ran its self-attention at 0.74x dense although `auto`'s
own timing of each sparse call chose sparse, and VSA's fine branch spent 3.2 ms of host time per call against 1.0 ms
replayed from a CUDA graph. Neither can be located from a CPU: the host path on a GPU has CUDA-only branches. This
profiles both where they run:

- ``main_job``: tiny-shapes-63's pipeline (fp32) under its calibrated plan and LoRA (fused, as ``dit-accel generate``
  runs it) and under ``Dense()``: one untimed run each, then one profiled run, with every self-attention module call
  timed on the host (no synchronisation) and profiled (cProfile, those calls only);
- ``vsa_fine``: VSA's fine branch at FastWan's shape ((16, 28, 52), 12 heads, sparsity 0.9, bf16, ``auto``) on a fixed
  selection: host microseconds per call back to back, then the same calls profiled.

Each row holds the microseconds per call, the profiled self time per call grouped by package (dit_accel, diffusers,
peft, torch's Python, C builtins: operators and launches), and the 25 functions with the most self time.

    python3 docs/scripts/host_profile.py --out host_profile.json
    python3 docs/scripts/host_profile.py --dry-run --out /tmp/host_profile.json    # CPU: tiny-wan, a small VSA grid
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

import torch


def _group(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<built-in"):
        return "builtin"
    for name in ("dit_accel", "diffusers", "peft", "torch", "triton"):
        if f"/{name}/" in filename:
            return name
    return "other"


def _summary(prof: cProfile.Profile, calls: int) -> dict:
    stats = pstats.Stats(prof).stats
    groups: dict = {}
    for (filename, _, _), row in stats.items():
        groups[_group(filename)] = groups.get(_group(filename), 0.0) + row[2]
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:25]
    return {"self_us_per_call": {k: round(v / calls * 1e6, 1) for k, v in sorted(groups.items())},
            "top": [{"function": f"{f.split('site-packages/')[-1]}:{line}:{name}",
                     "self_us": round(row[2] / calls * 1e6, 1), "cum_us": round(row[3] / calls * 1e6, 1),
                     "calls": round(row[1] / calls, 2)} for (f, line, name), row in top]}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main_job(device: str, dry_run: bool) -> list:
    import dit_accel
    from dit_accel.models.loading import load_pipeline
    from dit_accel.models.tiny_shapes import shapes_model

    if dry_run:  # the script's path at a size a CPU runs in seconds
        pipe = load_pipeline("tiny-wan", device=device)
        call = dict(prompt="a cat", num_frames=17, height=128, width=128, num_inference_steps=2, guidance_scale=1.0,
                    max_sequence_length=16)
        methods = {"dense": (dit_accel.Dense(), {}), "tile": (dit_accel.Tile(tile=(1, 4, 4), window=(3, 1, 1)), {})}
    else:
        pipe = load_pipeline("tiny-shapes-63", device=device)
        shapes = shapes_model("tiny-shapes-63")
        plan = dit_accel.SparsePlan.load(str(shapes.plan)).as_method()
        weights = {"weights": str(shapes.plan_weights)} if shapes.plan_weights is not None else {}
        call = {**shapes.defaults, "prompt": "a red circle moving right", "guidance_scale": 2.0,
                "max_sequence_length": 16}
        methods = {"dense": (dit_accel.Dense(), {}), "plan": (plan, weights)}
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for name, (method, kwargs) in methods.items():
        with dit_accel.apply(pipe, method, **kwargs) as handle:
            handle.fuse_lora()
            modules = [m for t in handle.transformers for n, m in t.named_modules() if n in set(handle.layers)]
            with torch.no_grad():
                pipe(**call, output_type="latent", generator=torch.Generator("cpu").manual_seed(0))  # warm
                _sync(device)
                prof, spans, start = cProfile.Profile(), [], {}

                def pre(module, args):
                    start["t"] = time.perf_counter()
                    prof.enable()

                def post(module, args, out):
                    prof.disable()
                    spans.append(time.perf_counter() - start["t"])

                hooks = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
                try:
                    pipe(**call, output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
                finally:
                    for h in hooks:
                        h.remove()
                _sync(device)
        rows.append({"part": "main_job", "method": name, "attention_calls": len(spans),
                     "host_us_per_call": round(statistics.median(spans) * 1e6, 1), **_summary(prof, len(spans))})
        print(f"main job, {name}: {rows[-1]['host_us_per_call']} us of host time per self-attention call; "
              f"profiled self time {rows[-1]['self_us_per_call']}", flush=True)
    return rows


def vsa_fine(device: str, dry_run: bool) -> list:
    from dit_accel.kernels.vsa import api
    from dit_accel.kernels.vsa.naive import cubes_of, selected_count

    grid, heads, d, dtype = ((4, 8, 8), 2, 32, torch.float32) if dry_run else ((16, 28, 52), 12, 128, torch.bfloat16)
    cubes = cubes_of(grid, (4, 4, 4))
    g = torch.Generator().manual_seed(0)
    count = selected_count(cubes.count, None, 0.9)
    selection = torch.rand(1, heads, cubes.count, cubes.count, generator=g).topk(count, -1).indices.sort(-1).values
    selection = selection.to(device)
    q, k, v = (torch.randn(1, heads, cubes.perm.num_padded, d, generator=g).to(device, dtype) for _ in range(3))

    def call():
        return api._fine_branch(q, k, v, cubes, cubes.perm, None, selection, d ** -0.5, "auto")

    calls = 5 if dry_run else 50
    with torch.no_grad():
        for _ in range(3):
            call()
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            call()
        host = (time.perf_counter() - t) / calls
        _sync(device)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            call()
        prof.disable()
        _sync(device)
    row = {"part": "vsa_fine", "grid": list(grid), "heads": heads, "dtype": str(dtype).replace("torch.", ""),
           "host_us_per_call": round(host * 1e6, 1), **_summary(prof, calls)}
    print(f"VSA fine branch at {grid}: {row['host_us_per_call']} us of host time per call; profiled self time "
          f"{row['self_us_per_call']}", flush=True)
    return [row]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes (checks the script)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("host_profile.py: no CUDA device here; --dry-run runs it on the CPU", file=sys.stderr)
        return 2
    rows = []
    for part in (main_job, vsa_fine):
        try:
            rows += part(device, args.dry_run)
        except Exception as exc:  # one part failing still writes the other's rows
            rows.append({"part": part.__name__, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"{part.__name__}: {rows[-1]['error']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
