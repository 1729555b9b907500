"""Transformer and self-attention time of a tiny-shapes transformer at a long-clip grid, dense vs sparse methods.

At the 31-frame grid (16, 12, 12) = 2,304 tokens, how much of the transformer's
time is self-attention (``attn1``) on CPU, and how much do the sparse methods save there and overall?
Contenders run interleaved, order shuffled each round; figures are medians over rounds, ratios are
medians of per-round ratios to the dense call (``apply(Dense())``).

    python docs/scripts/long_clip_attention_share.py --grid 16,12,12 --rounds 7 --threads 2 \
        --method-config docs/scripts/long_clip_2304.yaml [--weights DIR] [--batch 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time

import torch


def main(argv=None) -> None:
    import dit_accel
    from dit_accel.eval.runner import load_method_specs
    from dit_accel.models.tiny import tiny_transformer_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="16,12,12")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method-config", default="docs/scripts/long_clip_2304.yaml")
    p.add_argument("--weights", default=None, help="a tiny-shapes-like Diffusers folder (default: the shipped one)")
    p.add_argument("--batch", type=int, default=1, help="samples per call (2: a guided pipeline's call)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = tuple(int(x) for x in args.grid.split(","))
    if args.weights:
        from diffusers import WanTransformer3DModel
        base = WanTransformer3DModel.from_pretrained(args.weights, subfolder="transformer").eval()
    else:
        from dit_accel.models.tiny_shapes import load_tiny_shapes
        base = load_tiny_shapes().transformer.eval()
    inputs = tiny_transformer_inputs("wan", base, grid=grid, batch=args.batch)
    inputs.pop("return_dict", None)
    methods = {"dense": dit_accel.Dense(),
               **{s.label: s.method for s in load_method_specs(None, args.method_config)}}
    models, handles, attn = {}, {}, {}
    for name, method in methods.items():
        m = copy.deepcopy(base)
        handles[name] = dit_accel.apply(m, method)
        models[name] = m
        attn[name] = [0.0]

        def pre(_mod, _in, acc=attn[name]):
            acc.append(time.perf_counter())

        def post(_mod, _in, _out, acc=attn[name]):
            acc[0] += time.perf_counter() - acc.pop()

        for block in m.blocks:
            block.attn1.register_forward_pre_hook(pre)
            block.attn1.register_forward_hook(post)
    load = [os.getloadavg()]
    total = {n: [] for n in models}
    self_attn = {n: [] for n in models}
    rng = random.Random(0)
    with torch.no_grad():
        for n, m in models.items():  # warm-up (kernels, plans)
            m(**inputs, return_dict=False)
        for _ in range(args.rounds):
            order = list(models)
            rng.shuffle(order)
            for n in order:
                attn[n][0] = 0.0
                start = time.perf_counter()
                models[n](**inputs, return_dict=False)
                total[n].append(time.perf_counter() - start)
                self_attn[n].append(attn[n][0])
    load.append(os.getloadavg())
    rows = []
    for n in models:
        ratio_t = statistics.median(d / x for d, x in zip(total["dense"], total[n]))
        ratio_a = statistics.median(d / x for d, x in zip(self_attn["dense"], self_attn[n]))
        rows.append({"name": n, "density": handles[n].summary().get("mean_density"),
                     "transformer_ms": round(statistics.median(total[n]) * 1e3, 1),
                     "self_attention_ms": round(statistics.median(self_attn[n]) * 1e3, 1),
                     "self_attention_share": round(statistics.median(a / t for a, t in zip(self_attn[n], total[n])), 3),
                     "speedup_transformer": round(ratio_t, 2), "speedup_self_attention": round(ratio_a, 2),
                     "backends": handles[n].summary().get("backends_used")})
        r = rows[-1]
        dens = f"{r['density']:.3f}" if r["density"] is not None else "  -  "
        print(f"{n:<12} density {dens}  transformer {r['transformer_ms']:8.1f} ms ({r['speedup_transformer']:.2f}x)  "
              f"self-attn {r['self_attention_ms']:8.1f} ms ({r['speedup_self_attention']:.2f}x), "
              f"share {r['self_attention_share']:.2f}")
    print(json.dumps({"grid": grid, "tokens": grid[0] * grid[1] * grid[2], "batch": args.batch, "threads": args.threads,
                      "rounds": args.rounds, "loadavg_start_end": load, "rows": rows}))


if __name__ == "__main__":
    main()
