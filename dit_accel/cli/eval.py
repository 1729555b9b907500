"""``dit-accel eval``: quality vs speed of sparse attention methods against dense.

Example::

    dit-accel eval --model tiny-wan --methods dense,gna,radial --method-config methods.yaml \\
        --prompts prompts.txt --seeds 0,1 --frames 9 --height 64 --width 64 --steps 2 --out eval_out/

Writes results.json, report.md, pareto.png and grid.png to --out; dense
outputs are cached under --out/cache (or --cache-dir) and reused.

On tiny-shapes (a tiny model trained on synthetic clips) every method is also
judged against its prompt (ground truth: colour, shape, motion, consistency),
and the Pareto plot's quality axis is that ground truth:

    dit-accel eval --model tiny-shapes --out eval_shapes/

Every row is paired with dense on the same prompt and seed: report.md gives the mean of the
per-pair differences with a 95% interval, a paired t-test against the best other row, and two
dense-vs-dense floor rows (another seed pairing; another dense backend, see --floor-backend).
results.json records the provenance (prompt sha256, seeds, commit, versions, device, backends).
Stacks of a method and a step cache, and the comparison of two result folders:

    dit-accel eval --model tiny-shapes --stacks "sla,sla+fbcache,tile+taylorseer,dense+fbcache" --out stacks/
    dit-accel eval --compare eval_shapes/ stacks/
"""

from __future__ import annotations

import argparse
import os
import sys

from .options import (HelpFormatter, add_cache_option, add_plan_any_grid, cache_from_args, guidance_error, plain,
                      refuse_method_flags)

__all__ = ["register", "run"]


def _int_list(text: str):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1; got {text!r}") from None


DEFAULT_METHODS = "dense,radial,tile,gna,sla"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="compare methods with dense: PSNR/SSIM/LPIPS/CLIP/FID and speed",
                              description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model",
                   help="tiny-shapes (tiny model trained on synthetic clips; ground-truth quality), tiny-wan, "
                        "tiny-flux (random weights), a local pipeline folder or a hub id")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (dense = the baseline row); default: {DEFAULT_METHODS} (those "
                        "the model can run: no radial for image models)")
    p.add_argument("--plan", action="append", metavar="FILE",
                   help="a SparsePlan (dit-accel calibrate's output) as one more row, labelled by its file name; "
                        "repeatable. Each is checked against the model and the call (class, layers, heads, token "
                        "grid, steps); a mismatch fails its row")
    add_plan_any_grid(p)
    p.add_argument("--weights", action="append", metavar="DIR",
                   help="a `dit-accel finetune` folder as one more row: the method or plan it was trained under, "
                        "with its LoRA (and SLA projections or VSA gates), labelled by the folder's name; repeatable. "
                        "The dense row stays the model without them")
    p.add_argument("--stacks", metavar="LIST",
                   help="comma-separated stacks, each METHOD, METHOD+CACHE or CACHE (dense with it), measured as rows "
                        "with the same prompts and seeds, e.g. \"sla,sla+fbcache,tile+taylorseer,dense+fbcache\"; "
                        "method and cache options after ':' separated by ';', tuples with '/' (sla:topk=0.1+fbcache:threshold=0.1, "
                        "tile:tile=1/8/8;window=3/1/1). Without --methods "
                        "only the stacks (and dense) are rows")
    add_cache_option(p)
    refuse_method_flags(p, "eval")
    p.add_argument("--method-config", metavar="FILE",
                   help="JSON/YAML: {method: options} or {method: [options, ...]} to compare several configs; "
                        "keys dense_steps/dense_last_steps/dense_layers go to dit_accel.apply")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line")
    src.add_argument("--prompt", action="append",
                     help="a prompt (repeatable; tiny-shapes default: 8 prompts covering its colours, shapes and "
                          "directions)")
    p.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--frames", type=int, help="frames per video (video models)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--out", metavar="DIR", help="where results.json, report.md, pareto.png and grid.png go "
                                                "(required unless --compare)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="print the paired comparison of two eval results folders (same prompts and seeds) and "
                        "exit; nothing is generated")
    p.add_argument("--floor-backend", default="auto",
                   choices=["auto", "sdpa-math", "dit_accel.kernels.dense", "none"],
                   help="the dense-vs-dense floor's second dense backend (auto: dit_accel's Triton dense kernel "
                        "where triton runs, else math SDPA; none: only the seed-pairing floor)")
    p.add_argument("--cache-dir", metavar="DIR", help="dense output cache (default OUT/cache)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats of the first sample (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per row (default 1)")
    p.add_argument("--real", metavar="DIR", help="folder of real images for FID vs real")
    p.add_argument("--clip-model", metavar="PATH", help="CLIP model folder or hub id (env DIT_ACCEL_CLIP_MODEL)")
    p.add_argument("--fid-weights", metavar="PATH",
                   help="TorchScript Inception file or module:factory (env DIT_ACCEL_FID_WEIGHTS)")
    p.add_argument("--no-lpips", action="store_true", help="do not try LPIPS")
    p.add_argument("--quiet", action="store_true",
                   help="no warnings on the terminal (results.json lists them), no progress bars and no progress "
                        "lines such as the dense cache's; failed rows and dropped cache entries are still said")
    p.add_argument("--capture", metavar="DIR", help="also save the dense run's q/k/v for `dit-accel bench fidelity`")
    p.set_defaults(func=run, _parser=p)
    return p


def _stacks(text, defaults):
    """``--stacks`` -> one MethodSpec per stack (label: the stack as written), the tiny models' grid-sized
    method defaults applied; ValueError naming the stack."""
    from ..eval.runner import MethodSpec
    from ..methods import canonical_method_name
    from ..pipelines.caches import parse_stack

    if text is not None and not text.strip(" ,"):  # (given, but empty: the default methods ran, exit 0)
        raise ValueError(f"--stacks {text!r} names no stack: give comma-separated stacks such as "
                         "sla,sla+fbcache, or leave --stacks out")
    specs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        method, cache = parse_stack(item)
        name, _, given = method.partition(":")
        # (by the canonical name: "sta" took the paper's tile (6, 8, 8), not the tiny model's grid-sized one)
        options = {**(defaults or {}).get(canonical_method_name(name.strip()), {}),
                   **_stack_options(item.strip(), given, name.strip())}
        spec = MethodSpec.parse(name.strip(), options, label=item.strip(), source=f"--stacks {item.strip()!r}")
        spec.cache = cache
        specs.append(spec)
    return specs


def _stack_options(item: str, text: str, method: str = "") -> dict:
    """A stack's method options, ``METHOD:k=v;k=v`` (tuples as ``1/8/8``), as the cache's options are written. Before,
    everything after the method's ':' was dropped: ``sla:topk=0.1+fbcache`` ran SLA's default top-k under that
    label."""
    from ..pipelines.caches import option_value

    options = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"--stacks {item!r}: method option {part.strip()!r} is not key=value (e.g. "
                             "sla:topk=0.1+fbcache, tile:tile=1/8/8;window=3/1/1)")
        if key.strip() in options:
            raise ValueError(f"--stacks {item!r}: method option {key.strip()!r} is given twice; give it once")
        options[key.strip()] = _as_flag_reads(method, key.strip(), value, option_value(value))
    return options


def _as_flag_reads(method: str, key: str, text: str, value):
    """A stack option's value as generate's flag of that field reads it: ``sink_frames=0`` (one frame) and
    ``sink_frames=none`` as ``--sink-frames 0`` / ``none``, ``tile=6x8x8`` as ``--tile 6x8x8`` (before: each was
    refused as no tuple, where the flag takes it)."""
    from ..methods import canonical_method_name, registered_methods
    from .options import int_tuple

    entry = registered_methods().get(canonical_method_name(method))
    opt = entry.cli_options().get(key) if entry is not None else None
    if opt is not None and opt.parse == "int_list" and (value is None or type(value) is int):
        return () if value is None else (value,)
    if opt is not None and opt.parse == "ints" and isinstance(value, str):
        try:
            return int_tuple(text)
        except argparse.ArgumentTypeError:
            return value
    return value


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()  # an embedded model runs on one thread; the caller gets its count back
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


class _Refused(Exception):
    """An argument or input file ``dit-accel eval`` cannot use: the one-line message it prints (exit code 2)."""


def _compare(args) -> int:
    """--compare A B: two results folders side by side."""
    from ..eval.compare import compare_results, format_comparison, load_results, unpaired_rows

    parser = getattr(args, "_parser", None)
    given = [] if parser is None else [
        (action.option_strings or [action.dest])[0] for action in parser._actions
        if action.dest not in ("help", "compare", "quiet") and getattr(args, action.dest, None) != action.default]
    if given:  # (else dropped without a word: `--compare A B --methods sla` compared every row)
        raise _Refused(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --compare (it pairs the "
                       "rows of two results folders and generates nothing): drop "
                       + ("it" if len(given) == 1 else "them") + ", or run the eval without --compare")
    first, second = (os.path.dirname(path) if os.path.basename(path) == "results.json" and os.path.isfile(path)
                     else path for path in map(os.path.realpath, args.compare))  # (a folder or its results.json)
    if first == second:
        raise _Refused(f"--compare {args.compare[0]} {args.compare[1]}: both name the same folder, so every "
                       "difference would be zero; give two eval results folders (e.g. before and after a change)")
    try:
        a, b = (load_results(folder) for folder in args.compare)
        comparison = compare_results(a, b)
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    print(format_comparison(*args.compare, comparison))
    unpaired = unpaired_rows(a, b)
    for line in unpaired:
        print(f"note: not compared: {line}")
    if comparison and not unpaired and all(row["a"] == row["b"] for row in comparison):
        print("note: A and B hold the same mean for every row and metric: the folders may be copies of one run")
    return 0


def _device_and_dtype(args):
    """The device (cuda when visible, else cpu, unless given) and the dtype (bfloat16 on cuda, else float32)."""
    import torch

    from .checks import device_error

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    error = device_error(device)
    if error is not None:
        raise _Refused(error)
    return device, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def _check_counts(args) -> None:
    from ..eval.inputs import check_generation_numbers
    from .checks import folder_error

    try:  # the rules EvalSettings.check applies, by flag
        check_generation_numbers({name: getattr(args, name) for name in ("frames", "height", "width", "steps",
                                                                          "max_sequence_length")},
                                 args.guidance_scale, args.seeds)
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    from ..models.loading import early_size_error, early_text_length_error

    problem = (guidance_error(args.guidance_scale) or early_size_error(args.model, args.height, args.width)
               or early_text_length_error(args.model, args.max_sequence_length))  # (else refused once it loaded)
    if problem:
        raise _Refused(problem)
    if args.repeats < 1:
        raise _Refused(f"--repeats must be >= 1 (timed generations per row); got {args.repeats}")
    if args.warmup < 0:
        raise _Refused(f"--warmup must be >= 0; got {args.warmup}")
    for flag, folder in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        problem = folder_error(folder, flag) if folder is not None else None
        if problem:
            raise _Refused(problem)
    calibration = os.path.join(args.out, "calibration.json")
    if os.path.isfile(calibration):  # (before: its report.md was replaced by this eval's, silently)
        raise _Refused(f"--out {args.out} holds a calibration's report ({calibration}, report.md of dit-accel "
                       "calibrate): this eval's report.md would replace it; pass another --out folder, e.g. "
                       f"{os.path.join(os.path.dirname(os.path.normpath(args.out)) or '.', 'eval_out')}")
    default_cache = os.path.join(args.out, "cache")
    if args.cache_dir is None and folder_error(default_cache, "--cache-dir"):  # (else "[Errno 17] File exists")
        raise _Refused(f"--out {args.out}: {default_cache} is a file, where the dense cache goes (--cache-dir's "
                       "default, OUT/cache); move the file, or pass --cache-dir DIR")
    if args.methods is not None and not args.methods.strip(" ,"):
        raise _Refused(f"--methods {args.methods!r} names no method: give comma-separated methods such as "
                       f"{DEFAULT_METHODS}, or leave --methods out for that default")


def _prompts(args) -> list:
    """--prompts (a file, one a line), else --prompt, else the model's default prompts."""
    from ..models.tiny_shapes import balanced_prompts, shapes_model

    if not args.prompts:
        return args.prompt or (balanced_prompts(8) if shapes_model(args.model) is not None else
                               ["a red panda walking through a bamboo forest, cinematic lighting"])
    from ..atomic_files import BadFileError, read_text

    try:
        text = read_text(args.prompts, what="--prompts: a UTF-8 text file, one prompt per line")
    except BadFileError as exc:
        raise _Refused(str(exc)) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise _Refused(f"{args.prompts}: {'is empty' if not text.strip() else 'holds no prompts (only blank lines or # comments)'}; "
                       "expected --prompts: one prompt per line")
    return prompts


def _method_specs(args, tiny: bool) -> list:
    """The rows to run: --methods (with the tiny model's method defaults), --plan files, --stacks, each stacked
    with --cache."""
    from ..eval.runner import load_method_specs
    from ..models.tiny import TINY_METHOD_DEFAULTS
    from ..models.tiny_shapes import shapes_model

    defaults = TINY_METHOD_DEFAULTS.get(args.model) if tiny else None
    shapes = shapes_model(args.model)
    if defaults and shapes is not None and shapes.schedule:  # e.g. the dense steps tiny-shapes-long's methods need
        defaults = {name: {**options, **shapes.schedule} for name, options in defaults.items()}
    try:
        cache = cache_from_args(args)
        stacks = _stacks(args.stacks, defaults)
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    try:
        methods = args.methods or ("dense" if stacks else DEFAULT_METHODS)
        specs = load_method_specs(methods.split(","), args.method_config, defaults=defaults,
                                  explicit=args.methods is not None)
    except (ValueError, OSError) as exc:
        raise _Refused(str(exc)) from None
    if args.plan:
        from pathlib import Path

        from ..eval.runner import MethodSpec
        from ..plans.sparse_plan import SparsePlan

        extra = {"allow_other_grid": True} if args.plan_any_grid else {}
        try:
            specs += [MethodSpec(Path(f).stem, SparsePlan.load(f).as_method(), dict(extra)) for f in args.plan]
        except ValueError as exc:
            raise _Refused(f"--plan: {exc}") from None
    for spec in specs:
        _check_config_weights(spec, args.model)
    weights = [_weights_spec(folder, args.model, args.plan_any_grid) for folder in args.weights or ()]
    if args.plan_any_grid and not args.plan and not any("allow_other_grid" in w.apply_kwargs for w in weights):
        raise _Refused("--plan-any-grid applies to --plan or a --weights folder trained under a plan (finetune "
                       "--plan): drop it, or give the plan it is for")
    specs += weights
    specs += stacks
    if cache is not None:  # --cache: every row's method stacked with it (the dense baseline stays uncached)
        for spec in specs:
            if spec.cache is None:
                spec.cache = cache
                spec.label += "+" + cache.name
        if not any(spec.cache is cache for spec in specs):  # (it ran no row with it, exit 0, nothing said)
            raise _Refused(f"--cache {cache.label} stacks with the method rows, and there is none to take it (the "
                           "dense baseline stays uncached; --stacks rows keep their own cache): add a method "
                           "(--methods dense,sla), or give the stack as a row (--stacks dense+"
                           f"{cache.label.replace(',', ';')})")
    from ..pipelines.caches import missing_package_error

    # (before: that row failed so, after the dense rows had run; a --stacks row's named --cache)
    missing = next(filter(None, (missing_package_error(spec.cache, f"--stacks {spec.label!r}" if any(
        spec is s for s in stacks) else None) for spec in specs)), None)
    if missing:
        raise _Refused(missing)
    _unique_labels(specs)
    return specs


def _unique_labels(specs) -> None:
    """Every row's label made unique, as --method-config's are (a ' added): two --plan files of one name in two
    folders, or a plan or --weights folder named like a method row, else share a label, and --compare pairs rows
    by label (the second one's samples against the first's)."""
    from ..eval.runner_checks import RESERVED_LABELS  # (the baseline's and the floor rows', which no row may take)

    seen = set(RESERVED_LABELS)
    for spec in specs:
        while spec.label in seen:
            spec.label += "'"
        seen.add(spec.label)


def _check_config_weights(spec, model: str) -> None:
    """A --method-config entry with ``weights`` (apply()'s keyword) must run the method the folder was trained for,
    and on its model: refused before loading. Else its row failed after the dense rows had run, with apply()'s
    advice in Python (``dit_accel.apply(pipe, dit_accel.load_method(DIR), weights=...)``)."""
    from pathlib import Path

    from ..checkpoints import finetuned
    from ..models.loading import same_model

    folder = spec.apply_kwargs.get("weights")
    if folder is None:
        return
    try:
        info, saved = finetuned.read_weights_info(folder), finetuned.load_method(folder)
    except (ValueError, TypeError, OSError) as exc:
        raise _Refused(f"--method-config: row {spec.label}: weights: {exc}") from None
    try:
        recorded = info.get("method") if hasattr(saved, "content_hash") else finetuned._json_roundtrip(saved.ran_dict())
        # (as apply reads it: through the config, so fields added since and VSA's open sparsity compare as they run)
        finetuned._check_method(Path(folder), recorded, spec.method, lambda message: None)
    except (ValueError, TypeError):
        trained = f"the calibrated plan {saved.content_hash()[:12]}" if hasattr(saved, "content_hash") else saved
        raise _Refused(f"--method-config: row {spec.label} runs {spec.method} with weights {folder}, which were "
                       f"trained for {trained}: give that row the settings they were trained with, or pass the "
                       f"folder as --weights {folder} instead (a row that runs its own method)") from None
    trained_on = info.get("model")
    if isinstance(trained_on, str) and not same_model(trained_on, model):
        raise _Refused(f"--method-config: row {spec.label}: weights {folder} were trained on {trained_on}, not on "
                       f"--model {model}: its weights fit only that model")


def _weights_spec(folder: str, model: str, any_grid: bool = False):
    """The row of a fine-tuned folder: its saved method (a plan runs as one, at any grid with ``any_grid``: the
    --plan-any-grid that a refusal at another size names) applied with ``weights=folder``; refused when the folder
    was trained on another ``model`` (as ``generate --weights`` refuses it)."""
    from pathlib import Path

    from ..eval.runner import MethodSpec
    from ..models.loading import same_model
    from ..plans.sparse_plan import SparsePlan
    from ..checkpoints.finetuned import METHOD_FILE, load_method, read_weights_info

    try:
        method = load_method(folder)
        trained_on = read_weights_info(folder).get("model")
    except (ValueError, OSError) as exc:
        raise _Refused(f"--weights {folder}: {exc}") from None
    if isinstance(trained_on, str) and not same_model(trained_on, model):
        raise _Refused(f"--weights {folder} was trained on {trained_on} (its {METHOD_FILE}), not on --model {model}: "
                       f"its weights fit only that model; pass --model {trained_on}, or weights fine-tuned from "
                       f"{model}")
    extra = {}
    if isinstance(method, SparsePlan):
        method = method.as_method()
        extra = {"allow_other_grid": True} if any_grid else {}
    return MethodSpec(Path(folder).name, method, {"weights": str(folder), **extra})


def _log(quiet: bool):
    """How the eval's lines reach the terminal: all of them and its progress bars, or with ``--quiet`` its warnings
    and failures only."""
    from ..eval.report import QuietLog

    return QuietLog() if quiet else print


def _run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    try:
        return _evaluate(args)
    except _Refused as exc:
        print(f"dit-accel eval: {exc}", file=sys.stderr)
        return 2


def _evaluate(args) -> int:
    from ..eval.runner import EvalSettings, run_eval
    from ..models.tiny import is_embedded_model

    if args.compare:
        return _compare(args)
    for flag in ("model", "out"):
        if not getattr(args, flag):
            raise _Refused(f"--{flag} is required (unless --compare A B)")
    device, dtype = _device_and_dtype(args)
    _check_counts(args)
    from ..eval.clip import clip_inputs_error
    from ..eval.fid import fid_inputs_error

    # a typo: refused now, not skipped after the run
    problem = fid_inputs_error(args.fid_weights, args.real) or clip_inputs_error(args.clip_model)
    if problem:
        raise _Refused(problem)
    if args.capture is not None:  # (a folder of another run's captures: refused now, not after the dense row)
        from ..pipelines.capture import check_capture_dir

        try:
            check_capture_dir(args.capture)
        except ValueError as exc:
            raise _Refused(f"--capture: {exc}") from None
    prompts = _prompts(args)
    # Tiny models: unset sizes and method options take the grid-sized smoke-run defaults that
    # `dit-accel generate` uses; the pipeline defaults (e.g. Wan 81x480x832, 50 steps) would run for
    # hours on a CPU, and paper-sized windows are invalid on a (5, 8, 8) grid.
    tiny = is_embedded_model(args.model)
    if tiny:
        from .generate import _one_thread_for_tiny

        _one_thread_for_tiny(device, args.model)
    specs = _method_specs(args, tiny)
    settings = EvalSettings(model=args.model, prompts=prompts, seeds=args.seeds, frames=args.frames,
                            height=args.height, width=args.width, steps=args.steps, guidance_scale=args.guidance_scale,
                            max_sequence_length=args.max_sequence_length, device=device, dtype=dtype,
                            repeats=args.repeats, warmup=args.warmup).with_tiny_defaults()
    from ..models.loading import ModelLoadError

    from ..atomic_files import folders_to_make, remove_empty

    created = folders_to_make(args.out, args.cache_dir or os.path.join(args.out, "cache"))
    try:
        results = run_eval(settings, specs, args.out, cache_dir=args.cache_dir, clip_model=args.clip_model,
                           fid_weights=args.fid_weights, real_dir=args.real, lpips=not args.no_lpips,
                           capture=args.capture, floor_backend=args.floor_backend, prompt_file=args.prompts,
                           log=_log(args.quiet))
    except BaseException as exc:
        remove_empty(created)  # a failed eval leaves no empty folders it made (a cache it filled stays)
        if not isinstance(exc, (ModelLoadError, ValueError, OSError)):
            raise
        print(f"dit-accel eval: {exc}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "report.md"), encoding="utf-8") as fh:
        print(fh.read().split("\n## Settings")[0])
    print(f"wrote {os.path.join(args.out, 'results.json')}, report.md, pareto.png, grid.png")
    return 1 if any(r.get("error") for r in results["rows"]) else 0
