"""``dit-accel calibrate``: a sparse plan per layer, head and step, searched on your model against a quality budget.

Runs the dense model once on the prompts, keeps a bounded sample of q/k/v per (layer, step bucket)
in memory, scores every method over a small parameter grid (Tile windows, GNA kernels, Radial decays,
SLA top-k, dense) per layer and head against the dense attention output, and searches the plan of
least modelled GPU attention time (dit_accel.kernels.cost) under the budget, dense warm-up steps
included. It then verifies the plan end to end against dense with the same seeds, and validates it on
prompts held out of the search (--validate): a plan that misses the budget there gives way to the next
denser one. Every argument and file is checked before the model loads.

Example::

    dit-accel calibrate --model tiny-shapes --prompts prompts.txt --min-psnr 30 --out plan.json
    dit-accel generate --model tiny-shapes --plan plan.json

Writes the plan (--out), and in --report-dir (default: beside the plan, PLAN_report/) report.md,
heatmap.png (method and density per layer x head, per step phase) and calibration.json, as one unit (a killed run
leaves the previous set or the new one; the next run finishes or sweeps what it left).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from .._util import existing_ancestor, format_ratio, format_time
from .options import HelpFormatter, guidance_error, int_list, int_tuple, plain

__all__ = ["register", "run", "check_args"]


def _int_list(text: str):
    """``0,1`` -> ``[0, 1]``; an empty item (``0,,1``) or an ``x`` is refused (:func:`.options.int_list`). No value
    at all (``,``) is the empty list, which the flag's own check refuses with its rule."""
    return [] if not text.replace(",", "").strip() else list(int_list(text))


def _tile(text: str):
    """``--tile`` as ``generate`` reads it (``1,8,8``, ``1x8x8``, ``"1 8 8"``), as a list of sizes; one int stays one
    size, for the check against the grid's rank (before: ``1x8x8`` was refused, as "not a list of integers")."""
    value = int_tuple(text)
    return list(value) if isinstance(value, tuple) else [value]


class _UsageError(ValueError):
    """A bad argument or input file of ``dit-accel calibrate``: one line on stderr, exit status 2."""


#: PSNR budgets outside this range are typos: 0 dB is noise, and 8-bit frames that differ at all stay below ~100 dB.
PSNR_RANGE = (0.0, 100.0)


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


def _writable_folder(path: Path, flag: str) -> None:
    """``path``'s nearest existing ancestor is a folder this process can create a file in (probed, then removed)."""
    folder = existing_ancestor(path) or path
    if not folder.is_dir():
        raise _UsageError(f"{flag} {path}: {folder} is not a folder; pass a path inside a writable folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dit_accel-probe-", dir=folder)
    except OSError as exc:
        raise _UsageError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc}); "
                          "pass a path inside a writable folder") from None
    os.close(fd)
    os.unlink(probe)


def _check_budget(args) -> None:
    """--min-psnr and/or --max-layer-error, each in its range."""
    if args.min_psnr is None and args.max_layer_error is None:
        raise _UsageError("give a budget: --min-psnr DB (final output vs dense) and/or --max-layer-error E "
                          "(relative L2 of each layer's attention)")
    lo, hi = PSNR_RANGE
    if args.min_psnr is not None and not (lo < args.min_psnr <= hi):
        raise _UsageError(f"--min-psnr must be a number of dB in ({lo:g}, {hi:g}], e.g. 30; got {args.min_psnr}")
    if args.max_layer_error is not None and not (math.isfinite(args.max_layer_error) and args.max_layer_error > 0):
        raise _UsageError(f"--max-layer-error must be a finite number > 0 (relative L2, e.g. 0.1); "
                          f"got {args.max_layer_error}")


def _check_model(args) -> None:
    """An embedded model, a folder or a hub id; --steps where the model suggests none."""
    from ..models.loading import ModelLoadError, resolve_model_kind
    from ..models.tiny import EMBEDDED_MODELS

    if args.model.startswith("tiny-") and args.model not in EMBEDDED_MODELS and not Path(args.model).exists():
        raise _UsageError(f"--model {args.model!r} is not an embedded model; choose one of "
                          f"{', '.join(EMBEDDED_MODELS)}, a pipeline folder or a hub id")
    try:
        kind = resolve_model_kind(args.model)
    except (ModelLoadError, ValueError) as exc:
        raise _UsageError(f"--model: {exc}") from None
    if kind in ("folder", "hub") and args.steps is None:
        raise _UsageError(f"--steps is needed for --model {args.model} (the denoising steps the plan is "
                          "calibrated for), e.g. --steps 30")


def _check_frames(args) -> None:
    """--frames on a model that makes images, refused before it loads where its kind is known then: an embedded
    model built in code (its own call makes one frame) or a folder (a cached hub snapshot too) whose model_index.json
    names a pipeline class whose call takes no num_frames. A hub id not in the cache is known only once it has
    loaded; CalibrationSettings.call_kwargs refuses it then, in the same words."""
    if args.frames is None or args.frames == 1:
        return
    from ..models.tiny import TINY_DEFAULTS, is_tiny_model
    from .generate_args import index_pipeline_call

    if is_tiny_model(args.model):
        images = TINY_DEFAULTS[args.model].get("num_frames") == 1
        name = args.model
    else:
        known = index_pipeline_call(args.model)
        images = known is not None and "num_frames" not in known[1]
        name = known and type(known[0]).__name__
    if images:
        raise _UsageError(f"--frames {args.frames}: {name} takes no num_frames (it makes images); drop it")


def _check_counts(args) -> list:
    """Sizes, counts and seeds; returns the seeds (default [0])."""
    from ..eval.inputs import check_generation_numbers

    seeds = [0] if args.seeds is None else args.seeds
    try:  # the rules CalibrationSettings.check applies, by flag
        check_generation_numbers({name: getattr(args, name) for name in ("frames", "height", "width", "steps",
                                                                          "max_sequence_length")},
                                 args.guidance_scale, seeds)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    from ..models.loading import early_size_error, early_text_length_error

    problem = (guidance_error(args.guidance_scale) or early_size_error(args.model, args.height, args.width)
               or early_text_length_error(args.model, args.max_sequence_length))  # (else refused once it loaded)
    if problem:
        raise _UsageError(problem)
    for name, least in (("phases", 1), ("samples_per_bucket", 1), ("search_iters", 0), ("batch_size", 1),
                        ("layer_groups", 0), ("uniform_options", 0), ("probe_videos", 1)):
        value = getattr(args, name)
        if value < least:
            raise _UsageError(f"--{name.replace('_', '-')} must be >= {least}; got {value}")
    if not (math.isfinite(args.max_sample_mb) and args.max_sample_mb > 0):
        raise _UsageError(f"--max-sample-mb must be a finite number of MiB > 0; got {args.max_sample_mb}")
    if not (math.isfinite(args.replay_mb) and args.replay_mb >= 0):
        raise _UsageError(f"--replay-mb must be a finite number of MiB >= 0 (0: off); got {args.replay_mb}")
    for name in ("warmup_candidates", "cooldown_candidates"):
        values = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if any(v < 0 for v in values):
            raise _UsageError(f"{flag} must be step counts >= 0; got {','.join(map(str, values))}")
    validate = args.validate
    if validate is not None and validate < 0:
        raise _UsageError(f"--validate must be >= 0 (0: no validation set); got {validate}")
    return seeds


def _check_methods_and_costs(args) -> None:
    """--methods from the calibration's methods; --arch and --kernel known to the cost model."""
    from ..calibrate.candidates import CALIBRATABLE
    from ..kernels.cost import CONSTANTS, KERNELS, constants
    from ..methods import canonical_method_name

    # (the names generate, eval and bench take: before, --methods sta or TILE was refused here alone)
    methods = [canonical_method_name(m) for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CALIBRATABLE]
    if not methods or unknown:
        raise _UsageError(f"--methods {args.methods!r}: choose from {','.join(CALIBRATABLE)} (comma-separated; "
                          "sta = tile)")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise _UsageError(f"--methods {args.methods!r} names {twice[0]} more than once: name each method once")
    args.methods = ",".join(methods)
    if args.tile is not None and not {"tile", "gna"} & set(methods):  # (before: dropped without a word)
        raise _UsageError(f"--tile is the tile of the Tile and GNA candidates, and --methods {args.methods} has "
                          "neither: add tile or gna to --methods, or drop --tile")
    archs = sorted({k.split("/")[0] for k in CONSTANTS})
    if args.arch not in archs:
        raise _UsageError(f"--arch {args.arch!r} has no cost-model constants; choose one of {', '.join(archs)}")
    if args.kernel not in KERNELS:
        raise _UsageError(f"--kernel {args.kernel!r}: choose one of {', '.join(KERNELS)}")
    try:
        constants(args.arch, args.kernel)
    except ValueError as exc:
        raise _UsageError(f"--arch {args.arch} --kernel {args.kernel}: {exc}") from None
    if args.tile is not None:
        from ..calibrate.candidates import check_candidate_tile
        from ..calibrate.settings import grid_dims

        try:
            check_candidate_tile(args.tile)
        except ValueError as exc:
            raise _UsageError(f"--tile: {exc}") from None
        dims = grid_dims(args.model)
        if dims is not None and len(args.tile) != dims:  # (else found only after the dense run, minutes later)
            raise _UsageError(f"--tile {','.join(map(str, args.tile))} has {len(args.tile)} sizes, but "
                              f"the token grid of {args.model} has {dims} dimensions: give {dims} sizes, "
                              f"{'T,H,W' if dims == 3 else 'H,W'}")


def _device_and_dtype(args):
    """The device (cuda when visible, else cpu, unless given) and the dtype (bfloat16 on cuda, else float32)."""
    import torch

    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        from .checks import device_error

        error = device_error(device)
        if error is not None:
            raise _UsageError(error)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def _check_files(args) -> list:
    """The prompts file read, the output folders writable; returns the prompts."""
    from ..atomic_files import BadFileError, read_text

    try:
        text = read_text(args.prompts, what="--prompts: a UTF-8 text file, one prompt per line")
    except BadFileError as exc:
        raise _UsageError(f"--prompts {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise _UsageError(f"--prompts {args.prompts}: {'is empty' if not text.strip() else 'holds no prompts'}; "
                          "expected one prompt per line (lines starting with # are comments)")
    from ..plans.sparse_plan import file_to_write

    try:  # (the check SparsePlan.save makes when the plan is written, here before the run)
        out = file_to_write(args.out, "the plan's", "plan.json")
    except ValueError as exc:
        raise _UsageError(f"--out: {exc}") from None
    if out.exists() and os.path.samefile(out, args.prompts):  # the plan would replace the prompts it was made from
        raise _UsageError(f"--out {args.out} is the --prompts file: writing the plan there would overwrite the "
                          "prompts; pass another path, e.g. plan.json")
    _check_prompts_not_a_report_file(args, out)
    _writable_folder(out.parent if str(out.parent) else Path("."), "--out")
    if args.report_dir is not None:
        rd = Path(args.report_dir)
        if rd.exists() and not rd.is_dir():
            raise _UsageError(f"--report-dir {rd} is a file; pass a folder")
        _writable_folder(rd, "--report-dir")
    if args.capture is not None:
        cd = Path(args.capture)
        if cd.exists() and not cd.is_dir():
            raise _UsageError(f"--capture {cd} is a file; pass a folder")
        if not args.capture.strip() or cd.is_dir():  # an existing folder of another run's captures, or no path
            from ..pipelines.capture import check_capture_dir  # (it creates the folder: only one that exists)

            try:
                check_capture_dir(args.capture)
            except ValueError as exc:
                raise _UsageError(f"--capture: {exc}") from None
        _writable_folder(cd, "--capture")
    from ..calibrate.run import GROUNDTRUTH_MODELS

    if args.groundtruth == "require" and args.model not in GROUNDTRUTH_MODELS:
        raise _UsageError(f"--groundtruth require: {args.model!r} has no ground-truth checker (only "
                          f"{', '.join(GROUNDTRUTH_MODELS)} have); use --groundtruth report")
    return prompts


def _check_prompts_not_a_report_file(args, out: Path) -> None:
    """--prompts at a file the report writes (``--report-dir . --prompts report.md``) is refused: the run ended by
    replacing the prompts with the report, and the plan's prompts hash named a file that no longer held them."""
    from ..calibrate.report import OUTPUT_FILES

    folder = Path(args.report_dir) if args.report_dir is not None else out.with_name(out.stem + "_report")
    for name in OUTPUT_FILES:
        path = folder / name
        if path.exists() and os.path.samefile(path, args.prompts):
            flag = f"--report-dir {args.report_dir}" if args.report_dir is not None else \
                f"the report folder beside the plan ({folder})"
            raise _UsageError(f"--prompts {args.prompts} is the {name} that {flag} writes: the report would "
                              "overwrite the prompts; keep the prompts elsewhere or pass another --report-dir")


# The argparse names of the flags of calibration settings named otherwise
_DESTS = {"warmup": "warmup_candidates", "cooldown": "cooldown_candidates"}


def _check_search(args) -> None:
    """--search warmup with options only the allocation search reads (or, without --capture, only its q/k/v
    sample), set to other values than their defaults: refused by name, as its help says they do not apply (they
    would change nothing; before, --phases, --warmup-candidates and the sample's sizes were dropped silently)."""
    parser = getattr(args, "_parser", None)
    if getattr(args, "search", None) != "warmup" or parser is None:
        return
    from ..calibrate.settings import unread_by_warmup, warmup_refusal

    dests = {name: _DESTS.get(name, name) for name in unread_by_warmup(getattr(args, "capture", None) is not None)}
    message = warmup_refusal({name: getattr(args, dest) for name, dest in dests.items()
                              if hasattr(args, dest) and getattr(args, dest) != parser.get_default(dest)})
    if message is not None:
        raise _UsageError(message)


def check_args(args) -> dict:
    """Every argument and input file checked before any model loads; returns what was read (prompts, device, dtype).
    Raises :class:`_UsageError` (one line naming the argument or file and what is allowed)."""
    from ..calibrate.report import under_home

    for name in ("prompts", "out", "report_dir", "capture"):  # --out=~/plan.json: as the shell would (and save does)
        if hasattr(args, name):
            setattr(args, name, under_home(getattr(args, name)))
    _check_budget(args)
    _check_search(args)
    _check_model(args)
    seeds = _check_counts(args)
    _check_frames(args)
    _check_methods_and_costs(args)
    device, dtype = _device_and_dtype(args)
    prompts = _check_files(args)
    return {"prompts": prompts, "device": device, "dtype": dtype, "seeds": seeds}


def register(subparsers) -> argparse.ArgumentParser:
    from ..calibrate.candidates import GRIDS, METHODS
    from ..calibrate.costs import CostModel
    from ..calibrate.run import add_quality_options
    from ..calibrate.settings import SEARCHES

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
    p.add_argument("--seeds", type=_int_list, default=None,
                   help="comma-separated seeds (default 0, and more when the search set has fewer than 8 videos)")
    p.add_argument("--validate", type=int, default=None, metavar="N",
                   help="prompts held out of the search to validate the chosen plan on (default: a third, at least "
                        "2; with fewer prompts, every prompt on new seeds; 0: none). The plan is written only if it "
                        "meets the budget there too, else the next denser plan that does")
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
    p.add_argument("--methods", default=",".join(METHODS), help=f"methods to consider (default {','.join(METHODS)}; "
                                                                "also vsa)")
    p.add_argument("--tile", type=_tile, default=None, metavar="T,H,W",
                   help="token tile of the Tile and GNA candidates (default: a 64-token tile picked for the grid); "
                        "1,8,8 on a grid of 8x8-token frames makes Tile windows count frames")
    p.add_argument("--samples-per-bucket", type=int, default=2, help="sampled steps per step bucket (default 2)")
    p.add_argument("--max-sample-mb", type=float, default=512.0, help="memory for the q/k/v sample (default 512)")
    p.add_argument("--replay-mb", type=float, default=1024.0, metavar="MB",
                   help="memory for the dense run's transformer outputs, which a plan's leading dense steps read "
                        "instead of computing them again (default 1024; 0: compute every step)")
    p.add_argument("--capture", metavar="DIR", help="also write the sampled q/k/v to DIR (nothing on disk otherwise)")
    p.add_argument("--arch", default="h100", help="cost-model architecture (dit_accel.kernels.cost): h100 (the fit "
                   "the shipped plans were made with) or h200 (the fit of the kernels that ship)")
    p.add_argument("--kernel", default="current", help="cost-model kernel variant: current, host, persistent, "
                                                       "ring3, ws (all but current are modelled kernels)")
    p.add_argument("--cost-terms", choices=("auto",) + CostModel.TERMS, default="auto",
                   help="which modelled terms count: full (per call, per CTA, per tile), no-launch, tiles; auto "
                        "(default): full, or tiles where under full no sparse candidate beats dense (small grids; "
                        "said in the output)")
    p.add_argument("--costs", choices=("model", "measured"), default="model",
                   help="what prices a candidate: the kernels' cost model (default; --arch, --kernel, --cost-terms), "
                        "or its attention call timed on this device (--device, --dtype) on random inputs of the grid")
    p.add_argument("--search", choices=SEARCHES, default="allocation",
                   help="allocation (default): a candidate per step phase, layer and head, from every candidate's "
                        "attention error scored on the dense run, weighed by sensitivity probes; warmup: a dense "
                        "warm-up, then one candidate on every head, each candidate's warm-up bisected on verified "
                        "runs, the last dense step bridged by a wider candidate of the method where one passes (no "
                        "scoring, no probes: a fraction of the time; needs --min-psnr; --search-iters, "
                        "--uniform-options, --probe-videos, --sensitivity and --layer-groups do not apply, nor, "
                        "without --capture, --phases, --warmup-candidates, --cooldown-candidates, "
                        "--samples-per-bucket and --max-sample-mb)")
    p.add_argument("--search-iters", type=int, default=6, help="bisection steps of the PSNR search (default 6)")
    p.add_argument("--uniform-options", type=int, default=3, metavar="N",
                   help="also verify the N most promising step-structured plans (dense warm-up, then one method "
                        "everywhere) at no more modelled cost than the allocated plan, and keep the passing plan "
                        "whose worst video has the widest margin (default 3; 0: the allocation only)")
    p.add_argument("--probe-videos", type=int, default=4, metavar="N",
                   help="videos each sensitivity probe generates (default 4, one per prompt first)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the uniform SLA run at the plan's modelled cost on the validation videos (the "
                        "report's and the plan's comparison with the simplest alternative)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per pipeline call")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "flex"])
    p.add_argument("--report-dir", metavar="DIR", help="report.md, heatmap.png, calibration.json (default PLAN_report/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no warnings on the terminal")
    p.set_defaults(func=run, _parser=p)
    return p


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from ..calibrate import CalibrationSettings, calibrate
    from ..models.loading import ModelLoadError
    from ..models.tiny import is_embedded_model

    def fail(message: str) -> int:
        print(f"dit-accel calibrate: {message}", file=sys.stderr)
        return 2

    try:
        checked = check_args(args)
    except _UsageError as exc:
        return fail(str(exc))
    device, dtype, prompts = checked["device"], checked["dtype"], checked["prompts"]
    if is_embedded_model(args.model):
        from .generate import _one_thread_for_tiny

        _one_thread_for_tiny(device, args.model)
    settings = CalibrationSettings(
        model=args.model, prompts=prompts, seeds=checked["seeds"], validate=args.validate,
        extend_seeds=args.seeds is None, min_psnr=args.min_psnr,
        max_layer_error=args.max_layer_error, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
        device=device, dtype=dtype, phases=args.phases, warmup=tuple(args.warmup_candidates),
        cooldown=tuple(args.cooldown_candidates),
        candidates=args.candidates, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        tile=None if args.tile is None else tuple(args.tile), samples_per_bucket=args.samples_per_bucket,
        max_sample_mb=args.max_sample_mb, capture_dir=args.capture,
        arch=args.arch, kernel=args.kernel, cost_terms=args.cost_terms, costs=args.costs, search_iters=args.search_iters,
        batch_size=args.batch_size, backend=args.backend, budget_on=args.budget_on,
        groundtruth=args.groundtruth, sensitivity=args.sensitivity,
        layer_groups=args.layer_groups, uniform_options=args.uniform_options, probe_videos=args.probe_videos,
        baseline=args.baseline, replay_mb=args.replay_mb, search=args.search)
    try:
        result = calibrate(settings, args.out, report_dir=args.report_dir, progress=not args.no_progress)
    except (ModelLoadError, ValueError, OSError) as exc:
        return fail(str(exc))
    final, cost = result["final"], result.get("cost_vs_dense")
    psnr = "-" if final["psnr"] is None else f"{final['psnr']:.2f} dB (worst video {final['psnr_worst']:.2f})"
    val = (result.get("validation") or {}).get("final")
    if val is not None:
        psnr += f"; on the validation videos {val['psnr']:.2f} dB (worst {val['psnr_worst']:.2f})"
    # --costs measured prices candidates by timing them here: those times are measured, not modelled
    priced = f"timed on {args.device or checked['device']}" if args.costs == "measured" else "modelled"
    plan_ms, dense_ms = final["modelled_ms"], result["dense"]["modelled_ms"]
    phases, warmup = result['plan_summary']['phases'], final['warmup_steps']
    print(f"plan: {args.out} ({phases} phase{'s' * (phases != 1)}, dense warm-up {warmup} step{'s' * (warmup != 1)}"
          f"); PSNR vs dense {psnr}; attention {priced} {format_time(plan_ms / 1e3, '/sample')} vs dense "
          f"{format_time(dense_ms / 1e3)}" + (f" ({format_ratio(dense_ms / plan_ms)})" if plan_ms else "")
          + f"; {format_time(result['seconds']['total'])}" +
          (f" ({format_ratio(cost['ratio'])} the dense generation of the same {cost['videos']} videos, "
           f"{format_ratio(cost['per_video_ratio'])} one dense video)" if cost else ""))
    if result.get("chosen"):
        print(f"chosen: {result['chosen']}")
    base = (result.get("validation") or {}).get("baseline")
    if base is not None:
        print(f"baseline on the validation videos: {base['label']} ({format_time(base['modelled_ms'] / 1e3, '/sample')} "
              f"{priced}) {base['psnr']:.2f} dB (worst {base['psnr_worst']:.2f})")
    print(f"wrote {args.out}, {os.path.join(result['report_dir'], 'report.md')}, heatmap.png, calibration.json")
    return 0
