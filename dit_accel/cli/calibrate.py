"""``dit-accel calibrate``: a sparse plan per layer, head and step, searched on your model against a quality budget.

Runs the dense model once on the prompts, keeps a bounded sample of q/k/v per (layer, step bucket)
in memory, scores every method over a small parameter grid (Tile windows, GNA kernels, Radial decays,
SLA top-k, dense) per layer and head against the dense attention output, and searches the plan of
least modelled GPU attention time (dit_accel.kernels.cost) under the budget, dense warm-up steps
included. It then verifies the plan end to end against dense with the same seeds.

Example::

    dit-accel calibrate --model tiny-shapes --prompts prompts.txt --min-psnr 30 --out plan.json
    dit-accel generate --model tiny-shapes --plan plan.json

Writes the plan (--out), and in --report-dir (default: beside the plan, PLAN_report/) report.md,
heatmap.png (method and density per layer x head, per step phase) and calibration.json.
"""

from __future__ import annotations

import argparse
import os

from .options import HelpFormatter, plain

__all__ = ["register", "run"]


def _int_list(text: str):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1; got {text!r}") from None


def register(subparsers) -> argparse.ArgumentParser:
    from ..calibrate.candidates import GRIDS, METHODS
    from ..calibrate.costs import CostModel
    from ..calibrate.run import add_quality_options

    p = subparsers.add_parser("calibrate", help="search a sparse plan per layer, head and step under a quality budget",
                              description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="tiny-shapes, tiny-wan, a local pipeline folder or a hub id")
    p.add_argument("--prompts", required=True, metavar="FILE", help="calibration prompts, one per line")
    p.add_argument("--out", required=True, metavar="PLAN.json", help="where the plan goes")
    p.add_argument("--min-psnr", type=float, metavar="DB",
                   help="budget: PSNR of the final output against dense (same seeds), in dB")
    p.add_argument("--max-layer-error", type=float, metavar="E",
                   help="budget: relative L2 error of every layer's attention output against dense")
    add_quality_options(p)
    p.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, help="denoising steps the plan is calibrated for")
    p.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float)
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--phases", type=int, default=3, help="step phases the plan may differ in (default 3)")
    p.add_argument("--warmup-candidates", type=_int_list, default=[1, 2], metavar="N,...",
                   help="dense warm-up lengths the search may choose (extra phase borders; default 1,2)")
    p.add_argument("--cooldown-candidates", type=_int_list, default=[1], metavar="N,...",
                   help="the last N steps may differ from the rest (extra phase borders; default 1: the last step, "
                        "which moves the output least)")
    p.add_argument("--candidates", choices=GRIDS, default="default", help="size of the parameter grid")
    p.add_argument("--methods", default=",".join(METHODS), help=f"methods to consider (default {','.join(METHODS)})")
    p.add_argument("--samples-per-bucket", type=int, default=2, help="sampled steps per step bucket (default 2)")
    p.add_argument("--max-sample-mb", type=float, default=512.0, help="memory for the q/k/v sample (default 512)")
    p.add_argument("--capture", metavar="DIR", help="also write the sampled q/k/v to DIR (nothing on disk otherwise)")
    p.add_argument("--arch", default="h100", help="cost-model architecture (dit_accel.kernels.cost)")
    p.add_argument("--kernel", default="current", help="cost-model kernel variant: current, host, persistent, "
                                                       "ring3, ws (all but current are modelled kernels)")
    p.add_argument("--cost-terms", choices=("auto",) + CostModel.TERMS, default="auto",
                   help="which modelled terms count: full (per call, per CTA, per tile), no-launch, tiles; auto "
                        "(default): full, or tiles where under full no sparse candidate beats dense (small grids; "
                        "said in the output)")
    p.add_argument("--costs", choices=("model", "measured"), default="model",
                   help="what prices a candidate: the kernels' cost model (default; --arch, --kernel, --cost-terms), "
                        "or its attention call timed on this device (--device, --dtype) on random inputs of the grid")
    p.add_argument("--search-iters", type=int, default=6, help="bisection steps of the PSNR search (default 6)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per pipeline call")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "flex"])
    p.add_argument("--report-dir", metavar="DIR", help="report.md, heatmap.png, calibration.json (default PLAN_report/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no warnings on the terminal")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    import torch

    from ..calibrate import CalibrationSettings, calibrate
    from ..models.loading import ModelLoadError
    from ..models.tiny import is_embedded_model

    def fail(message: str) -> int:
        print(f"dit-accel calibrate: {message}")
        return 2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        with open(args.prompts) as fh:
            prompts = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    except OSError as exc:
        return fail(f"--prompts {args.prompts}: {exc.strerror or exc}; pass a text file, one prompt per line")
    if is_embedded_model(args.model):
        from .generate import _one_thread_for_tiny

        _one_thread_for_tiny(device)
    settings = CalibrationSettings(
        model=args.model, prompts=prompts, seeds=args.seeds, min_psnr=args.min_psnr,
        max_layer_error=args.max_layer_error, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
        device=device, dtype=dtype, phases=args.phases, warmup=tuple(args.warmup_candidates),
        cooldown=tuple(args.cooldown_candidates),
        candidates=args.candidates, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        samples_per_bucket=args.samples_per_bucket, max_sample_mb=args.max_sample_mb, capture_dir=args.capture,
        arch=args.arch, kernel=args.kernel, cost_terms=args.cost_terms, costs=args.costs, search_iters=args.search_iters,
        batch_size=args.batch_size, backend=args.backend, budget_on=args.budget_on,
        groundtruth=args.groundtruth, sensitivity=args.sensitivity,
        layer_groups=args.layer_groups)
    try:
        result = calibrate(settings, args.out, report_dir=args.report_dir, progress=not args.no_progress)
    except (ModelLoadError, ValueError, OSError) as exc:
        return fail(str(exc))
    final = result["final"]
    psnr = "-" if final["psnr"] is None else f"{final['psnr']:.2f} dB (worst video {final['psnr_worst']:.2f})"
    print(f"plan: {args.out} ({result['plan_summary']['phases']} phases, dense warm-up {final['warmup_steps']} "
          f"steps); PSNR vs dense {psnr}; modelled attention {final['modelled_ms']:.3f} ms/sample vs dense "
          f"{result['dense']['modelled_ms']:.3f}; {result['seconds']['total']:.0f} s")
    print(f"wrote {args.out}, {os.path.join(result['report_dir'], 'report.md')}, heatmap.png, calibration.json")
    return 0
