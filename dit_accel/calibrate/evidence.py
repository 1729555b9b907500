"""Evidence for ``dit-accel calibrate`` on tiny-shapes: the calibrated plan against the best uniform method at the
same modelled attention cost, on held-out prompts and seeds.

``python -m dit_accel.calibrate.evidence --out DIR [--frames 13 --height 64 --width 64]``

1. calibrates a plan on calibration prompts and seeds (``dit_accel.calibrate.calibrate``);
2. on held-out prompts and seeds, runs dense, the plan and, for every candidate method of the search,
   that method uniformly (every layer and head) with the longest dense warm-up whose modelled cost
   stays within the plan's (the same cost model and terms as the search); and each SLA candidate with the
   warm-up nearest the plan's cost from above (the plan at equal or lower cost than uniform SLA);
3. writes ``evidence.json`` and ``evidence.md``: PSNR/SSIM against dense and the ground-truth checks
   (colour, shape, motion, consistency) of each.

The best uniform row (among those within the plan's cost) is chosen on the held-out set itself, which favours
it, not the plan.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .._util import format_time

__all__ = ["main"]


def _uniform_cost(space, cand, warmup: int, steps: int, calls: int) -> float:
    costs = space.costs
    kind = cand.kind
    step = space.layers * (costs.launch(kind) + space.heads * costs.head(cand)) * calls
    return warmup * space.dense_layer_cost * space.layers * calls + (steps - warmup) * step


#: The settings ``calibrate`` fills in from the model's defaults where they were left unset.
_RESOLVED = ("frames", "height", "width", "steps", "guidance_scale", "max_sequence_length")


def _as_calibrated(settings, result: dict):
    """``settings`` with the size, steps and text settings the calibration ran with (``result["settings"]``):
    ``calibrate`` fills the model's defaults into a copy of its settings, so the held-out runs read them here
    (before: unset ``--steps`` priced the uniform rows over ``None`` steps, a TypeError after the calibration, and
    the held-out videos were made at the pipeline's own size and steps, not the plan's)."""
    import dataclasses

    ran = result["settings"]
    return dataclasses.replace(settings, **{k: ran[k] for k in _RESOLVED if k in ran})


def _parser() -> argparse.ArgumentParser:
    from .run import add_quality_options

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--min-psnr", type=float, default=25.0)
    add_quality_options(p)
    p.add_argument("--calibration-prompts", type=int, default=8)
    p.add_argument("--calibration-seeds", default="0")
    p.add_argument("--heldout-prompts", type=int, default=8)
    p.add_argument("--heldout-seeds", default="100,101,102")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--candidates", default="default")
    p.add_argument("--cost-terms", default="tiles")
    p.add_argument("--search-iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    return p


def _uniform_rows(pipe, space, uniform_cands, jobs, call, row, plan_ms: float, dense_ms: float,
                  steps: int, calls: int) -> list:
    """The held-out rows of uniform methods: each candidate with the longest dense warm-up within the plan's
    cost, then each SLA candidate given at least the plan's cost."""
    import dit_accel
    from .run import generate_videos

    rows = []
    for cand in uniform_cands:
        fits = [w for w in range(steps + 1) if _uniform_cost(space, cand, w, steps, calls) * 1e3 <= plan_ms * (1 + 1e-9)]
        if not fits:
            rows.append({"label": f"uniform {cand.label}", "config": "no dense warm-up fits the plan's cost",
                         "modelled_ms": _uniform_cost(space, cand, 0, steps, calls) * 1e3})
            continue
        w = max(fits)  # the longest warm-up within the plan's cost: equal cost, not a cheaper row
        with dit_accel.apply(pipe, cand.method, dense_steps=w):
            videos = generate_videos(pipe, jobs, call, 8)
        rows.append(row(f"uniform {cand.label}", f"{cand.method!r}, dense_steps={w}", videos,
                        _uniform_cost(space, cand, w, steps, calls) * 1e3))
    # Uniform SLA given at least the plan's cost: each SLA candidate's warm-up nearest the plan's cost from above
    # (the plan must beat it at equal or lower cost), where that stays within dense's cost.
    for cand in [c for c in uniform_cands if c.kind == "sla"]:
        above = [(_uniform_cost(space, cand, w, steps, calls) * 1e3, w) for w in range(steps)]
        above = [(ms, w) for ms, w in above if plan_ms * (1 - 1e-9) <= ms <= dense_ms * (1 + 1e-9)]
        if not above:
            continue
        ms, w = min(above)
        with dit_accel.apply(pipe, cand.method, dense_steps=w):
            videos = generate_videos(pipe, jobs, call, 8)
        rows.append(row(f"uniform {cand.label}, at least the plan's cost", f"{cand.method!r}, dense_steps={w}",
                        videos, ms))
    return rows


def _write_evidence(out: Path, evidence: dict, rows: list, grid, calibrate_s: float, heldout_s: float) -> str:
    """``evidence.json`` and ``evidence.md`` (the table of the rows); returns the markdown."""
    from ..eval.report import markdown_table
    from ..plans.sparse_plan import write_atomic

    write_atomic(out / "evidence.json", json.dumps(evidence, indent=1, default=str) + "\n")
    keys = ("colour", "shape", "motion", "consistency", "all")
    table = markdown_table(["run", "config", "modelled attention per sample", "PSNR dB vs dense", "worst video dB",
                            "SSIM"] +
                           [f"GT {k}" for k in keys],
                           [[r["label"], r["config"], format_time(r['modelled_ms'] / 1e3),
                             f"{r['psnr']:.2f}" if "psnr" in r else "-",
                             f"{r['psnr_worst']:.2f}" if "psnr_worst" in r and r["label"] != "dense" else "-",
                             f"{r['ssim']:.3f}" if "ssim" in r else "-"] +
                            [f"{r['groundtruth'][k]:.3f}" if "groundtruth" in r else "-" for k in keys] for r in rows])
    text = (f"# Calibrated plan vs uniform methods, tiny-shapes grid {grid}, held-out\n\n"
            f"{evidence['date']}; calibration {calibrate_s:.0f} s, held-out runs {heldout_s:.0f} s; "
            f"load average {evidence['load_average']}.\n\n{table}\n")
    write_atomic(out / "evidence.md", text)
    return text


def main(argv=None) -> int:
    import torch

    import dit_accel
    from ..eval.groundtruth import score_many
    from ..models.clips import PROMPTS
    from ..models.tiny_shapes import balanced_prompts
    from .candidates import candidate_grid
    from .costs import CostModel
    from .run import CalibrationSettings, _psnr_ssim, calibrate, generate_videos
    from .search import SearchSpace

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib_prompts = balanced_prompts(8)[:args.calibration_prompts]
    heldout = [x for x in PROMPTS if x not in calib_prompts]
    heldout = heldout[::max(1, len(heldout) // args.heldout_prompts)][:args.heldout_prompts]
    settings = CalibrationSettings("tiny-shapes", calib_prompts, seeds=[int(s) for s in args.calibration_seeds.split(",")],
                                   min_psnr=args.min_psnr, frames=args.frames, height=args.height, width=args.width,
                                   steps=args.steps, candidates=args.candidates, cost_terms=args.cost_terms,
                                   search_iters=args.search_iters, budget_on=args.budget_on,
                                   groundtruth=args.groundtruth, sensitivity=args.sensitivity,
                                   layer_groups=args.layer_groups)
    t0 = time.perf_counter()
    result = calibrate(settings, out / "plan.json", report_dir=out / "report", progress=False)
    calibrate_s = time.perf_counter() - t0
    settings = _as_calibrated(settings, result)
    plan = dit_accel.SparsePlan.load(out / "plan.json")
    # The search space again, to price the uniform rows exactly as the search priced the plan.
    grid = tuple(result["settings"]["grid"])
    heads, layers, steps = result["settings"]["heads"], result["settings"]["layers"], settings.steps
    head_dim = None
    from ..models.loading import load_pipeline

    pipe = load_pipeline("tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    head_dim = pipe.transformer.config.attention_head_dim
    cands = candidate_grid(grid, size=settings.candidates, methods=settings.methods)
    costs = CostModel(grid, head_dim, arch=settings.arch, kernel=settings.kernel,
                      terms=result["cost_model"]["terms"])  # the terms the search used (auto resolved)
    space = SearchSpace(cands, {}, costs, layers, [(0, steps)], heads, costs.dense_head())
    calls = result["settings"]["passes_per_step"]  # (the transformer passes per step the search priced)
    plan_ms = result["final"]["modelled_ms"]
    call = settings.call_kwargs()
    jobs = [(prompt, int(s)) for s in args.heldout_seeds.split(",") for prompt in heldout]
    t1 = time.perf_counter()
    with dit_accel.apply(pipe, dit_accel.Dense(), timing=True):
        dense = generate_videos(pipe, jobs, call, 8)
    prompts = [x for x, _ in jobs]

    def row(label, config, videos, modelled_ms):
        psnr, ssim, per_video = _psnr_ssim(videos, dense, per_video=True)
        gt = score_many(videos, prompts)
        return {"label": label, "config": config, "modelled_ms": modelled_ms, "psnr": psnr, "ssim": ssim,
                "psnr_worst": min(per_video),
                "groundtruth": {k: gt[k] for k in ("colour", "shape", "motion", "consistency", "all")}}

    dense_ms = space.dense_layer_cost * layers * steps * calls * 1e3
    rows = [row("dense", "-", dense, dense_ms)]
    with dit_accel.apply(pipe, plan):
        rows.append(row("calibrated plan", str(out / "plan.json"), generate_videos(pipe, jobs, call, 8), plan_ms))
    # Uniform rows: the small grid's candidates and every SLA top-k of the search (one held-out run each).
    uniform_cands = candidate_grid(grid, size="small", methods=settings.methods)[1:]
    uniform_cands += [c for c in cands if c.kind == "sla" and c.method not in {u.method for u in uniform_cands}]
    rows += _uniform_rows(pipe, space, uniform_cands, jobs, call, row, plan_ms, dense_ms, steps, calls)
    heldout_s = time.perf_counter() - t1
    uniform = [r for r in rows[2:] if "psnr" in r and r["modelled_ms"] <= plan_ms * (1 + 1e-9)]
    best = max(uniform, key=lambda r: r["psnr"]) if uniform else None
    from .._util import load_average, versions

    evidence = {"calibration": {"prompts": calib_prompts, "seeds": result["search_seeds"], "min_psnr": args.min_psnr,
                                "budget_on": args.budget_on, "groundtruth": args.groundtruth,
                                "sensitivity": args.sensitivity, "layer_groups": args.layer_groups,
                                "seconds": calibrate_s, "final": result["final"], "grid": list(grid),
                                "call": call, "cost_model": result["cost_model"]},
                "heldout": {"prompts": heldout, "seeds": args.heldout_seeds, "seconds": heldout_s}, "rows": rows,
                "best_uniform": best["label"] if best else None, "versions": versions(),
                "load_average": load_average(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(_write_evidence(out, evidence, rows, grid, calibrate_s, heldout_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
