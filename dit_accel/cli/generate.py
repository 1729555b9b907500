"""``dit-accel generate``: one video (or image) with a sparse-attention method.

Loads the model (an embedded tiny model, a local folder or a hub id), applies
the method with :func:`dit_accel.apply`, runs the pipeline with a progress bar
over the denoising steps, writes the video and a JSON sidecar (``OUT.json``)
with the full settings, versions, timings and per-layer density.

With no arguments it runs ``tiny-shapes`` (a tiny model trained on synthetic
clips, shipped with the package, offline, seconds on a CPU) with the calibrated
plan shipped for it (``dit-accel calibrate`` with validation; at other steps or
sizes SLA at its grid-sized setting), and a dense run of the same call beside
it: it prints what the plan bought in calibration (modelled GPU attention time
against dense, and quality on held-out prompts against uniform SLA at no less
cost), the visited density, the attention time against dense and the ground-truth quality
of the sample (colour, shape, motion and consistency of the moving shape, judged
from the frames by :mod:`dit_accel.eval.groundtruth`). ``--side-by-side`` also
writes dense and sparse next to each other in one video. ``--image FILE`` gives image-to-video and edit pipelines
their input image (as read; the pipeline resizes it), the dense run too.

Defaults are layered: explicit flags > the model's defaults (paper presets for
real models, grid-sized settings for tiny models) > the method config's own
defaults. The sidecar records what was actually used.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
from pathlib import Path

from .._util import format_time, to_jsonable
from . import parallel
from .options import (HelpFormatter, add_cache_option, add_method_options, add_plan_any_grid, cache_from_args,
                      check_method_flags, check_plan_flags, method_from_args, schedule_from_args)
from .generate_args import (_DTYPES, DEFAULT_MODEL, DEFAULT_PROMPT, _check_flags, _UsageError, add_image_option,
                            _check_cache, _method_for_weights, _check_plan_with_weights, check_sidecar,
                            early_call_error, early_method_defaults, early_method_error, early_plan_error,
                            flag_call_error, image_parameter, _check_dense_schedule, _check_side_by_side, _in_flags,
                            _pick_dtype, _slug)
from .generate_report import (_audio_of, _cache_record, _calls_per_transformer,  # noqa: F401
                              _check_side_by_side_path, _commit_with_comparison, _comparison, magcache_ratios,
                              _output_notes, _prompt_notes, _provenance, _quality, _record,
                              _remove_earlier_side_by_side, _side_by_side, _side_by_side_path, _strip_height,
                              _summary_lines, _offload_record, cp_ranks)
from .parallel import add_cp_option
from ..methods import METHOD_ALIASES
from ..models.tiny_shapes import SHAPES_MODELS, TINY_SHAPES_PROMPT, shapes_model

__all__ = ["register", "run", "generate"]


def register(subparsers) -> argparse.ArgumentParser:
    from ..models.tiny import TINY_DEFAULTS, TINY_MODELS

    default = shapes_model(DEFAULT_MODEL)
    shapes = ", ".join(f"{name} ({m.size()})" for name, m in SHAPES_MODELS.items())
    p = subparsers.add_parser(
        "generate",
        help=f"generate a video/image with a sparse-attention method (default: {DEFAULT_MODEL}, its calibrated plan "
             "vs dense)",
        description="Generate one video (or image) with a sparse-attention method and write it with a JSON\n"
                    f"sidecar (OUT.json). With no arguments: {DEFAULT_MODEL} (tiny model trained on synthetic "
                    f"clips, {default.size()})\n"
                    "with the calibrated plan shipped for it (dit-accel calibrate, validated on held-out prompts;\n"
                    f"{default.fallback()} when the call's steps or size differ from the plan's), compared with a dense run of "
                    "the same call\n(time and ground-truth quality). On any other supported model without "
                    "--method: the family's\nrecommended setting (published by the method's authors where they "
                    "did); --method dense runs\ndense attention.",
        formatter_class=HelpFormatter,
    )
    text_lengths = ", ".join(f"{name}: {d['max_sequence_length']}" for name, d in TINY_DEFAULTS.items()
                             if d.get("max_sequence_length"))
    m = p.add_argument_group("model and output")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), a local pipeline folder, or an embedded "
                        f"model: {shapes} (default {DEFAULT_MODEL}; tiny models trained on synthetic clips, prompts "
                        "'a {red|green|blue|yellow} {square|circle} moving {left|right|up|down}'), or one of "
                        + ", ".join(TINY_MODELS) + " (RANDOM WEIGHTS, offline, for smoke runs only; "
                        "`dit-accel info` describes them)")
    m.add_argument("--out", default=None,
                   help="output path: .mp4, .gif, .png (image, or frames NAME_00000.png...) or a folder of PNG "
                        "frames; a JSON sidecar goes to OUT.json (default: outputs/<model>-<method>.mp4, .png for "
                        "image models)")
    m.add_argument("--fps", type=int, default=16, help="frames per second of the written video (1 to 1000)")
    g = p.add_argument_group("generation (unset = the model's default; tiny models: small sizes)")
    g.add_argument("--prompt", default=None,
                   help=f"text prompt (default: '{TINY_SHAPES_PROMPT}' for the tiny-shapes models, else "
                        f"'{DEFAULT_PROMPT}')")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--frames", type=int, default=None, help="number of frames (video models: a count the VAE takes, Wan 4k+1, the tiny-shapes models 2k+1)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--seed", type=int, default=0, help="noise seed, >= 0 (and weight seed of tiny models)")
    g.add_argument("--guidance-scale", "--guidance", dest="guidance", type=float, default=None,
                   help="classifier-free guidance scale")
    g.add_argument("--max-sequence-length", type=int, default=None,
                   help=f"text tokens for the text encoder (default: the pipeline's; {text_lengths})")
    add_image_option(g)
    d = p.add_argument_group("device")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    d.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="weight dtype; auto = bfloat16 on CUDA, float32 on CPU and for tiny models")
    d.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (big models on small GPUs)")
    add_cp_option(d)
    c = p.add_argument_group("comparison with dense")
    c.add_argument("--compare-dense", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the same call with dense attention and report attention time, quality and PSNR "
                        "against it (default: on for the tiny-shapes models, where it costs seconds; off otherwise)")
    c.add_argument("--side-by-side", action="store_true",
                   help="also write OUT-vs-dense.SUFFIX: dense (left) and the method (right) in one video "
                        "(runs the dense call)")
    add_method_options(p, default_method="dense")
    for action in p._actions:  # unset --method: dense, or the method a --weights folder was trained with
        if action.dest == "method":
            action.default = argparse.SUPPRESS
            action.help = ("attention method (default: the shipped calibrated plan for the tiny-shapes models, "
                           "their uniform default at other steps or sizes; dense for the random-"
                           "weight tiny-* models; on other models the family's recommended setting, "
                           "printed with its source; with --weights DIR, the method DIR was trained with); "
                           "--method dense runs dense attention; aliases: "
                           + ", ".join(f"{a} = {n}" for a, n in METHOD_ALIASES.items()) + ")")
    p.add_argument("--plan", metavar="FILE", default=None,
                   help="run a SparsePlan (dit-accel calibrate's output, or a FastVideo STA strategy file) instead of "
                        "one method: a method per step phase, layer and head. Checked against the model (class, "
                        "layers, heads) and the call (token grid, steps); excludes --method, method options and "
                        "--dense-*; `dit-accel info --plan FILE` shows it")
    add_plan_any_grid(p)
    add_cache_option(p)
    p.add_argument("--no-model-defaults", action="store_true",
                   help="ignore the model's preset method/schedule defaults; use only flags and config defaults")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no warnings on the terminal (the JSON sidecar lists them)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    p.set_defaults(func=run, _parser=p)
    return p


def _pick_device(device):
    import torch

    from .checks import device_error

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    error = device_error(device)
    if error is not None:
        raise _UsageError(error)
    return device


def _one_thread_for_tiny(device: str, model: str) -> None:
    """One torch thread for an embedded model on the CPU unless OMP_NUM_THREADS says otherwise or the model asks
    for more (:attr:`~dit_accel.models.tiny_shapes.ShapesModel.threads`): its operations (hundreds of tokens, width
    128) are too small to split, and on a busy CPU the threads' synchronisation costs more than the work (measured
    on a loaded 2-core machine: a tiny-shapes call took 2 s on one thread, 13-53 s on two)."""
    import torch

    shapes = shapes_model(model)
    threads = shapes.threads if shapes is not None else 1
    if torch.device(device).type == "cpu" and not os.environ.get("OMP_NUM_THREADS") and threads is not None:
        torch.set_num_threads(threads)


def _accepts(pipe) -> set:
    return set(inspect.signature(pipe.__call__).parameters)


def _model_defaults(model: str, pipe, method_name: str, use: bool):
    """(method field defaults, schedule defaults, source) for this model."""
    from ..models.tiny import TINY_METHOD_DEFAULTS, is_embedded_model

    if not use:
        return {}, {}, "none (--no-model-defaults)"
    if is_embedded_model(model):
        shapes = shapes_model(model)
        return (dict(TINY_METHOD_DEFAULTS.get(model, {}).get(method_name, {})),
                dict(shapes.schedule) if shapes is not None and method_name != "dense" else {},
                f"{model} grid-sized defaults")
    transformer = getattr(pipe, "transformer", None)
    from ..pipelines.presets import family_of, published_settings, recommended

    family = family_of(pipe)  # a pipeline with transformer_2 is Wan 2.2 A14B, which its transformer alone is not
    try:
        method, schedule = recommended(transformer, method_name, family=family)
    except (ValueError, TypeError):  # no preset for this model/method: the config's own defaults apply
        return {}, {}, "method config defaults"
    fields = {k: v for k, v in method.to_dict().items() if k != "method"}
    published = published_settings(transformer, method_name, family)
    if published:
        return fields, dict(schedule), f"published for {published[0].family}: {published[0].source}"
    return fields, dict(schedule), f"{type(transformer).__name__} preset (dit_accel default)"


def _frames_from_output(output, is_video: bool):
    """The first sample of a pipeline output: video frames or one image."""
    frames = getattr(output, "frames", None) if is_video else None
    if frames is None:
        frames = getattr(output, "images", None)
    if frames is None:  # return_dict=False tuples
        frames = output[0]
    return frames[0]


# ----------------------------------------------------------------------------- main work
def _saved_dense_layers(folder):
    """``dense_layers`` a fine-tuned folder was trained with (its SLA projections exist only for the others)."""
    from ..checkpoints.finetuned import read_weights_info

    return read_weights_info(folder).get("dense_layers")


def _saved_method(args):
    """The method a ``--weights`` folder was trained with, or None without ``--weights``."""
    if not getattr(args, "weights", None):
        return None
    from ..checkpoints.finetuned import load_method

    from ..models.loading import same_model
    from ..checkpoints.finetuned import METHOD_FILE, read_weights_info

    try:
        method = load_method(args.weights)
        trained_on = read_weights_info(args.weights).get("model")
    except ValueError as err:
        raise _UsageError(f"--weights: {err}") from None
    if isinstance(trained_on, str) and not same_model(trained_on, args.model):
        raise _UsageError(f"--weights {args.weights} was trained on {trained_on} (its {METHOD_FILE}), not on --model "
                          f"{args.model}: its weights fit only that model; pass --model {trained_on}, or weights "
                          f"fine-tuned from {args.model}")
    return method


def _default_plan(args) -> None:
    """A shipped shapes model with nothing that picks a method (no --method, --plan, --plan-any-grid, --weights,
    method or schedule flags): its calibrated plan (:attr:`~dit_accel.models.tiny_shapes.ShapesModel.plan`) becomes
    ``args.plan`` when the call is the one it was calibrated for (steps and size); another call runs the model's uniform default
    (:attr:`~dit_accel.models.tiny_shapes.ShapesModel.uniform`) and says why in ``args._default_note``."""
    from ..models.tiny_shapes import shapes_model
    from .options import _SCHEDULE_FLAGS, _dest, method_options_given

    args._default_plan, args._default_note = False, None
    shapes = shapes_model(args.model)
    if (shapes is None or shapes.plan is None or args.no_model_defaults or getattr(args, "method", None)
            or args.plan or getattr(args, "plan_any_grid", False) or getattr(args, "weights", None)
            or method_options_given(args)
            or any(getattr(args, _dest(flag), None) is not None for flag in _SCHEDULE_FLAGS)):
        return
    call = {"num_inference_steps": args.steps, "num_frames": args.frames, "height": args.height, "width": args.width}
    defaults = shapes.defaults
    differs = [f"{key} {value}" for key, value in call.items() if value is not None and value != defaults[key]]
    if differs:
        args._default_note = (f"{shapes.owner()} calibrated plan is for its default call ({defaults['num_frames']}"
                              f"x{defaults['height']}x{defaults['width']}, {defaults['num_inference_steps']} steps) "
                              f"and this call sets {', '.join(differs)}: the uniform default "
                              f"{shapes.fallback()} runs instead")
        return
    args.plan, args._default_plan = str(shapes.plan), True


def _default_plan_source(args) -> str:
    """What a default plan is, for the summary and the sidecar."""
    shapes = shapes_model(args.model)
    lora = " and its sparse-aware LoRA (finetune --plan)" if shapes.plan_weights is not None else ""
    return f"{shapes.owner()} default: the calibrated plan shipped with dit_accel{lora}"


def _early_plan(args):
    """The ``--plan`` file, read and validated before the model loads (None without ``--plan``); the flags
    it replaces are refused (:func:`~.options.check_plan_flags`)."""
    try:
        check_plan_flags(args)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    if not args.plan:
        return None
    from ..plans.sparse_plan import SparsePlan

    try:
        return SparsePlan.load(args.plan)
    except ValueError as err:
        raise _UsageError(f"--plan: {err}") from None


def _plan_model_note(args, plan):
    """The warning for a plan calibrated on another model than ``--model`` (its provenance's ``model_id``), printed
    now (unless --quiet) and kept in ``args._plan_model_note`` for the sidecar, which then reports no plan quality:
    the recorded quality is the other model's. None when the plan names no model or names this one."""
    from ..models.loading import same_model

    args._plan_model_note = None
    model_id = None if plan is None else plan.provenance.get("model_id")
    if not isinstance(model_id, str) or same_model(model_id, args.model):
        return None
    args._plan_model_note = (f"--plan {args.plan} was calibrated on {model_id}, not on {args.model}: it runs, but "
                             f"its recorded quality is {model_id}'s, not this run's (calibrate a plan for "
                             f"{args.model} to know it)")
    if not args.quiet:
        print(f"dit-accel generate: warning: {args._plan_model_note}", file=sys.stderr)
    return args._plan_model_note


def _early_method(args, parser, tiny: bool):
    """The method of a --weights folder, or the flags checked against the method (values too for tiny models,
    whose defaults are known before loading). Sets ``args.method``. Returns the saved method or None."""
    from ..models.tiny import TINY_METHOD_DEFAULTS

    saved = _saved_method(args)
    shapes = shapes_model(args.model)
    if shapes is not None and not args.no_model_defaults:
        default, choice = shapes.uniform, f"{shapes.owner()} default"
    elif tiny or args.no_model_defaults:
        default, choice = "dense", "the default for this model"
    else:  # the family's recommended method, chosen once the model is loaded
        default, choice = None, None
    if getattr(args, "method", None):
        choice = "--method"
    elif saved is not None:
        choice = f"--weights {args.weights}"
    saved_name = "plan" if saved is not None and not hasattr(saved, "name") else getattr(saved, "name", None)
    args.method = getattr(args, "method", None) or (saved_name if saved is not None else default)
    args.method_choice = choice
    if saved is not None:
        return _method_for_weights(args, saved, parser)
    _check_dense_schedule(args)
    if args.method is None:
        from .options import method_options_given

        given = method_options_given(args)
        if given:
            raise _UsageError(f"{', '.join(given)}: name the method {'it belongs' if len(given) == 1 else 'they belong'}"
                              " to with --method (without --method the model's recommended setting runs)")
        return None
    if tiny and not args.no_model_defaults:
        method_from_args(args, defaults=TINY_METHOD_DEFAULTS.get(args.model, {}).get(args.method, {}), parser=parser)
    else:
        check_method_flags(args, parser)
        problem = early_method_error(args)  # (the model's class, read from its folder: before loading it)
        if problem:
            raise _UsageError(problem)
        defaults = early_method_defaults(args)
        if defaults is not None:  # the values too, over the defaults the run will have
            method_from_args(args, defaults=defaults, parser=parser)
    return None


def _recommended_method(pipe):
    """``(method name, why)`` for a model run without ``--method``: the first setting the methods' authors
    published for its family, else the first method its preset has a default for, else dense."""
    from ..pipelines.presets import PRESETS, family_of, published_settings

    transformer = getattr(pipe, "transformer", None)
    family = family_of(pipe)
    known = transformer is not None and type(transformer).__name__ in PRESETS  # (else no preset: dense below)
    published = published_settings(transformer, None, family) if known else ()
    if published:
        return published[0].method, f"the recommended setting for {family}"
    preset = PRESETS.get(type(transformer).__name__)
    if preset is not None and preset.defaults:
        return next(iter(preset.defaults)), f"the recommended setting for {preset.class_name}"
    return "dense", "no recommended sparse setting for this model"


def _method_and_schedule(args, pipe, saved, parser):
    """``(method, apply kwargs, defaults source)``: flags > the model's defaults > the config's defaults."""
    if args.method is None:
        args.method, why = _recommended_method(pipe)
        args.method_choice = f"{why} (no --method; --method dense runs dense attention)"
    fields, schedule_defaults, source = _model_defaults(args.model, pipe, args.method,
                                                        not args.no_model_defaults and saved is None)
    if saved is None:
        method = method_from_args(args, defaults=fields, parser=parser)
    elif not hasattr(saved, "name"):  # a SparsePlan (finetune --plan): its phases hold the dense steps and layers
        schedule = schedule_from_args(args)
        schedule = {k: schedule[k] for k in ("backend", "weights") if k in schedule}
        if args.plan_any_grid:  # (it was refused as "applies to --plan", while the refusal at another size named it)
            schedule["allow_other_grid"] = True
        return saved.as_method(), schedule, f"--weights {args.weights}"
    else:
        method, source = saved, f"--weights {args.weights}"
        trained_dense = _saved_dense_layers(args.weights)
        if args.dense_layers is None and trained_dense is not None:
            schedule_defaults = dict(schedule_defaults, dense_layers=trained_dense)
    return method, schedule_from_args(args, defaults=schedule_defaults), source


def _pipeline_call(args, pipe, tiny: bool) -> dict:
    """Keyword arguments of the pipeline call: the flags, else the tiny model's sizes, else the pipeline's."""
    import torch

    from ..models.tiny import TINY_DEFAULTS

    accepts = _accepts(pipe)
    suggested = dict(TINY_DEFAULTS.get(args.model, {})) if tiny else {}
    wanted = {"negative_prompt": args.negative_prompt, "num_frames": args.frames, "height": args.height,
              "width": args.width, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
              "max_sequence_length": args.max_sequence_length}
    from ..models.loading import text_length_error

    problem = flag_call_error(args, pipe, accepts) or text_length_error(pipe, args.max_sequence_length)
    if problem:
        raise _UsageError(problem)
    shapes = shapes_model(args.model)
    call = {"prompt": args.prompt if args.prompt is not None else shapes.prompt if shapes is not None else DEFAULT_PROMPT}
    for key, value in wanted.items():
        value = value if value is not None else suggested.get(key)
        if value is not None and key in accepts:
            call[key] = value
    from ..models.loading import rope_reach_error, size_error

    images = [i.image for i in getattr(args, "_images", None) or ()]
    problem = rope_reach_error(pipe, call) or size_error(pipe, call)
    if problem:
        raise _UsageError(problem)
    if images:  # as read: the pipeline resizes it as it documents
        key = image_parameter(accepts)  # (``images`` takes a list, also of one: JoyImageEditPlusPipeline)
        call[key] = images[0] if len(images) == 1 and key == "image" else images
    call["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
    call["output_type"] = "np"
    return call



def _cache_context(pipe, cache, steps):
    import contextlib

    if cache is None:
        return contextlib.nullcontext()
    from ..pipelines.caches import enable_cache

    return enable_cache(pipe, cache, steps)


def _run_pipeline(pipe, call: dict, method, schedule: dict, device: str, cache=None, warm: bool = False):
    """Apply the method (and enable ``cache``, a :class:`~dit_accel.pipelines.caches.CacheSpec`), run the
    pipeline timed per stage (``attention``: the self-attention modules the method wraps), and take both off
    again. ``warm``: first an untimed warm-up under the same handle (:func:`_warm_up`). Returns ``(output, times,
    transformer calls, stats, summary)``."""
    import dit_accel

    from ..eval.timing import StageTimer

    try:
        handle = dit_accel.apply(pipe, method, **schedule)
    except (ValueError, TypeError) as err:
        raise _UsageError(str(err)) from None
    names = set(handle.layers)
    attention = [m for t in handle.transformers for n, m in t.named_modules() if n in names]
    try:
        handle.fuse_lora()  # a weights= LoRA folded into the weights for the run (remove() restores them exactly)
        if warm:
            _warm_up(pipe, handle, call, method)
        measured = []  # magcache:calibrate=true: the ratios it printed, per guidance branch
        with StageTimer(pipe, device, attention_modules=attention) as timer, _calls_per_transformer(handle) as \
                per_transformer:
            try:
                with _cache_context(pipe, cache, call.get("num_inference_steps")) as ran_cache, \
                        magcache_ratios(cache, measured):
                    timer.start()
                    output = pipe(**call)
            except ValueError as err:  # e.g. a window larger than this grid: raised before attention runs
                raise _UsageError(_in_flags(str(err))) from err
            times = timer.stop()
            calls = timer.calls("transformer")
        # Under --cp every rank counts its own share: gather the rows of all ranks (a collective).
        summary = handle.summary(all_ranks=True)
        summary["attention_calls_expected"] = per_transformer()
        summary["token_grids"] = sorted({tuple(grid) for _, grid in handle.plans})  # video token grids planned
        if measured:
            summary["mag_ratios_measured"] = measured
        if ran_cache is not None and ran_cache.filled:  # what the cache ran with beyond the options given
            summary["cache_filled_in"] = ran_cache.filled
        return output, times, calls, handle.stats(all_ranks=True), summary
    finally:
        handle.remove()


def _wants_dense_run(args, method) -> bool:
    """``--compare-dense`` given, or unset and the model is tiny-shapes (seconds); ``--side-by-side`` needs it."""
    if method.name == "dense":
        return False
    wanted = args.compare_dense if args.compare_dense is not None else shapes_model(args.model) is not None
    return bool(wanted or args.side_by_side)


def _warm_up(pipe, handle, call: dict, method) -> None:
    """One untimed denoising step per phase of the method under the ``handle`` the timed run then uses, so that
    run pays no first-call costs (its plans, their kernel layouts and device copies, ``auto``'s timed choices, the
    kernels' loading) that the run it is compared with skips. Under a handle of its own a warm-up warmed only what
    outlives it: the timed run built its plans again (BENCHMARKS, the main job on a GPU). The warm-up's calls
    are then dropped from the handle's statistics."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    one_step = {**call, "num_inference_steps": 1}
    plan = getattr(method, "sparse_plan", None)
    try:
        # A plan's phases name steps of a longer run: one step at the start of each phase, its step pinned (with
        # no total, which a one-step call would contradict).
        for step in [p.start for p in plan.phases] if plan is not None and plan.phases else [None]:
            if step is not None:
                handle.set_step(step, None)
            pipe(**{**one_step, "generator": torch.Generator(device="cpu").manual_seed(0)})
    except ValueError as err:  # e.g. a plan for another token grid: refused before attention runs
        raise _UsageError(_in_flags(str(err))) from None
    finally:
        handle.set_step(None)
    handle.reset_stats()


def _prepare(args, tiny: bool):
    """Every check that needs no model, in order; returns ``(cp_config, dtype, plan, saved)``: the context-parallel
    config, the torch dtype, a calibrated plan (``--plan`` or tiny-shapes' default) and the method a weights
    folder was trained for."""
    from ..models.loading import ModelLoadError, early_size_error, early_text_length_error, resolve_model_kind

    parser = getattr(args, "_parser", None)
    _check_flags(args)
    try:
        args._cache_spec = cache_from_args(args)
    except ValueError as err:
        raise _UsageError(str(err)) from None
    try:
        resolve_model_kind(args.model)
    except (ModelLoadError, ValueError) as err:
        raise _UsageError(str(err)) from None
    # (the pipeline's own refusals come after loading)
    problem = (early_size_error(args.model, args.height, args.width) or early_call_error(args)
               or early_text_length_error(args.model, args.max_sequence_length))
    if problem:
        raise _UsageError(problem)
    _check_cache(args)
    cp_config, problem = None, parallel.early_heads_error(args.model, args.cp)
    if problem:  # (before: every rank loaded the model first)
        raise _UsageError(problem)
    if args.cp is not None:
        try:
            cp_config, args.device = parallel.start(args.cp, args.device)
        except ValueError as err:
            raise _UsageError(str(err)) from None
    args.device = _pick_device(args.device)
    dtype, args.dtype = _pick_dtype(args.dtype, args.device, tiny)
    if tiny:
        _one_thread_for_tiny(args.device, args.model)
    _default_plan(args)
    plan = _early_plan(args)
    problem = early_plan_error(args, plan)
    if problem:
        raise _UsageError(problem)
    saved = _early_method(args, parser, tiny)
    _check_plan_with_weights(args, plan, saved)
    _check_side_by_side(args)
    return cp_config, dtype, plan, saved


def _load(args, dtype, cp_config):
    """The pipeline (context-parallel when asked) and the seconds it took to load."""
    from ..models.loading import ModelLoadError, load_pipeline

    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(args.model, device=args.device, dtype=dtype, offload=args.offload, seed=args.seed)
    except ModelLoadError as err:
        raise _UsageError(str(err)) from None
    load_s = time.perf_counter() - t0
    if note := _offload_record(args, pipe).get("offload_note"):  # (the run record had it; the terminal did not)
        print(f"dit-accel generate: note: {note}", file=sys.stderr)
    if cp_config is not None:
        try:
            parallel.enable(pipe, cp_config)
        except ValueError as err:
            raise _UsageError(str(err)) from None
    return pipe, load_s


def _plan_in_place_of_method(args, plan, schedule: dict):
    """A calibrated plan replaces the method; its phases hold the dense steps and layers. Returns
    ``(method, schedule, source)``."""
    method = plan.as_method()
    schedule = {k: schedule[k] for k in ("backend", "weights") if k in schedule}  # weights: finetune --plan's
    if args.plan_any_grid:
        schedule["allow_other_grid"] = True
    source, args.method = f"--plan {args.plan}", "plan"
    args.method_choice = f"--plan {args.plan}"
    if getattr(args, "_default_plan", False):
        source = args.method_choice = _default_plan_source(args)
        weights = shapes_model(args.model).plan_weights
        if weights is not None:  # trained under the plan's content: apply() checks the hash before loading
            schedule["weights"] = str(weights)
    return method, schedule, source


def _progress(pipe, quiet: bool, desc: str) -> None:
    pipe.set_progress_bar_config(disable=True) if quiet else pipe.set_progress_bar_config(desc=desc, leave=True)


def _dense_for_comparison(args, pipe, call: dict, method, schedule: dict, quiet: bool, is_video: bool) -> dict:
    """The same call run dense (same seed), after warming both up: its frames and times."""
    import torch

    from ..methods import Dense
    from ..videos import to_uint8_frames

    _progress(pipe, quiet, "denoising (dense, for comparison)")
    dense_call = {**call, "generator": torch.Generator(device="cpu").manual_seed(args.seed)}
    dense_output, dense_times, _, _, _ = _run_pipeline(pipe, dense_call, Dense(),
                                                      {"backend": schedule.get("backend", "auto")}, args.device,
                                                      warm=True)
    dense = {"frames": to_uint8_frames(_frames_from_output(dense_output, is_video)), "times": dense_times}
    _progress(pipe, quiet, f"denoising ({args.method})")
    return dense


def generate(args) -> dict:
    """Run ``generate`` for parsed ``args``; returns the sidecar dict (also written to OUT.json)."""
    from ..atomic_files import locked
    from ..models.tiny import is_embedded_model

    t_total = time.perf_counter()
    parser = getattr(args, "_parser", None)
    tiny = is_embedded_model(args.model)  # grid-sized call settings and method options
    cp_config, dtype, plan, saved = _prepare(args, tiny)
    _plan_model_note(args, plan)
    pipe, load_s = _load(args, dtype, cp_config)
    quiet = args.quiet or not parallel.is_main()
    method, schedule, source = _method_and_schedule(args, pipe, saved, parser)
    if plan is not None:
        method, schedule, source = _plan_in_place_of_method(args, plan, schedule)
    _check_side_by_side(args)  # again: without --method the method is known only now
    _progress(pipe, quiet, f"denoising ({args.method})")
    call = _pipeline_call(args, pipe, tiny)
    is_video = "num_frames" in call
    out = Path(args.out) if args.out else Path("outputs") / f"{_slug(args.model)}-{args.method}" \
        f"{'.mp4' if is_video else '.png'}"
    check_sidecar(out, "--out" if args.out else "the default output (pass --out PATH)", args)  # (known only now)
    if args.side_by_side:
        _check_side_by_side_path(out, call.get("num_frames") or 1)
    if not parallel.is_main():  # every rank holds the same frames; rank 0 writes them
        return _denoise_and_write(args, pipe, call, method, schedule, source, quiet, is_video, out, t_total, load_s)
    frame_folders = [] if out.suffix else [out, _side_by_side_path(out)][:2 if args.side_by_side else 1]
    created = [p for p in (*frame_folders, *out.parents) if not p.exists()]  # (the frame folders first)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # One writer per output, held from before the denoising: a second run into the same --out is refused at
        # once (atomic_files.BusyError), never left to mix its video with this run's sidecar.
        with locked(out, wait=False):
            return _denoise_and_write(args, pipe, call, method, schedule, source, quiet, is_video, out, t_total,
                                      load_s)
    except BaseException:
        for folder in created:  # a failed run leaves no folders it made (only while they are empty)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _denoise_and_write(args, pipe, call, method, schedule, source, quiet, is_video, out: Path, t_total: float,
                       load_s: float) -> dict:
    """The denoising (and the dense run it is compared with), then the video and its sidecar."""
    from ..atomic_files import atomic_write, atomic_write_json, commit_journal, finish_commit
    from ..videos import output_files, save_video, to_uint8_frames

    dense = None
    if _wants_dense_run(args, method):
        dense = _dense_for_comparison(args, pipe, call, method, schedule, quiet, is_video)
    output, times, calls, stats, summary = _run_pipeline(pipe, call, method, schedule, args.device,
                                                         cache=getattr(args, "_cache_spec", None),
                                                         warm=dense is not None)

    frames = to_uint8_frames(_frames_from_output(output, is_video))
    if not parallel.is_main():
        return {"output": None, "rank": None}
    # The whole record first (its scores, notes and provenance), then the files: a record that fails leaves the
    # earlier run's video and sidecar as they were, not this run's video beside no sidecar.
    side_by_side = _side_by_side_path(out) if args.side_by_side else None
    cache = getattr(args, "_cache_spec", None)  # (it ran on the right side only: named there)
    both = None if side_by_side is None else _side_by_side(dense["frames"], frames, ("dense", method.name + (
        "" if cache is None else f"+{cache.name}")))
    record = _sidecar_record(args, pipe, method, schedule, source, call, frames, output_files(out, len(frames)),
                             (times, calls, stats, summary), dense, side_by_side, load_s, audio=_audio_of(output))
    t0 = time.perf_counter()
    finish_commit(commit_journal(out))  # a set an earlier run committed before it was killed: in place first
    if side_by_side is not None:
        record["sidecar"] = str(_commit_with_comparison(out, frames, side_by_side, both, record, args.fps, t0,
                                                        t_total))
        return record
    sidecar = Path(str(out) + ".json")
    earlier = sidecar.read_bytes() if sidecar.is_file() else None
    sidecar.unlink(missing_ok=True)  # an earlier run's record must not stay beside this run's video
    try:
        save_video(frames, out, fps=args.fps)
    except BaseException:  # (a full disk) the earlier video is still there, so its record goes back beside it
        if earlier is not None and not sidecar.exists():
            with contextlib.suppress(OSError):  # (the error that stopped the video is the one to report)
                atomic_write(sidecar, lambda tmp: tmp.write_bytes(earlier))
        raise
    # an earlier --side-by-side run's comparison must not stay beside this run's video (this run writes none)
    _remove_earlier_side_by_side(earlier, out)
    record["timing"].update(save_s=time.perf_counter() - t0, total_s=time.perf_counter() - t_total)
    atomic_write_json(sidecar, record)  # written last: a sidecar names a complete output
    record["sidecar"] = str(sidecar)
    return record


def _sidecar_record(args, pipe, method, schedule, source, call, frames, written, ran, dense, side_by_side,
                    load_s: float, audio=None) -> dict:
    """The sidecar's record of this run (``ran``: its times, calls, stats and summary); the save time and the
    total are filled in once the files are written. ``audio``: the pipeline's audio output (LTX-2, Kandinsky 6,
    MiniMax-H3), which is not written: said in a note and recorded."""
    times, calls, stats, summary = ran
    elapsed = {"load_s": load_s, "save_s": None, "total_s": None}
    record = to_jsonable(_record(args, pipe, method, schedule, source, call, frames, written, times, calls, stats,
                                 summary, elapsed))
    if hasattr(method, "summary_line"):  # a plan: its one-line summary, not its whole JSON
        record["plan_summary"] = method.summary_line()
        record["plan_quality"] = method.sparse_plan.provenance.get("quality")  # calibrate's validation record
        if getattr(args, "_plan_model_note", None):  # calibrated on another model: its quality is not this run's
            record["plan_quality"], record["plan_model_note"] = None, args._plan_model_note
            record["warnings"] = [*record.get("warnings", []), args._plan_model_note]
    if getattr(args, "_default_note", None):
        record["default_note"] = args._default_note
    record["output_notes"] = _output_notes(record) + _prompt_notes(pipe, call)
    if audio is not None:
        record["audio"] = {"shape": [int(n) for n in audio.shape], "written": False}
        record["output_notes"].append(f"{record['pipeline']} also made audio (shape {tuple(audio.shape)}), which "
                                      "dit-accel generate does not write: the output holds the video only; call the "
                                      "pipeline from Python to keep its audio (output.audio)")
    record["cache"] = to_jsonable(_cache_record(getattr(args, "_cache_spec", None), calls, summary,
                                                cp_ranks(record)))
    record["compare_dense"] = to_jsonable(_comparison(times, dense, frames, side_by_side,
                                                      getattr(args, "_cache_spec", None)))
    record["quality"] = to_jsonable(_quality(args.model, call["prompt"], frames, dense))
    record["provenance"] = to_jsonable(_provenance(args, call, record, summary, stats))
    return record


def run(args) -> int:
    import warnings
    import torch
    from ..videos import GifRateWarning

    threads = torch.get_num_threads()  # an embedded model runs on one thread; the caller gets its count back
    try:
        with warnings.catch_warnings():  # (a gif's played rate: its output note says it, once)
            warnings.simplefilter("ignore", GifRateWarning)
            record = generate(args)
    except _UsageError as err:
        if getattr(args, "debug", False):
            raise
        print(f"dit-accel generate: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if record["output"] is None:  # a context-parallel rank other than 0
        return 0
    t = record["timing"]
    shape = "x".join(str(s) for s in record["output_shape"][:3])
    density = record["density"]["mean"]
    files = record["output"]
    what = files if isinstance(files, str) else f"{len(files)} frames {files[0]} .. {Path(files[-1]).name}"
    print(f"wrote {what} ({shape}, {record['method']['method']}) and {record['sidecar']}")
    for note in record.get("output_notes", []):
        print(f"note: {note}")
    print(f"pipeline {format_time(t['end_to_end_s'])}, transformer {format_time(t['transformer_s'])} over "
          f"{t['transformer_calls']} calls" + (f", mean density of the sparse attention calls {density:.3f}"
                                               if density is not None else ""))
    for line in _summary_lines(record):
        print(line)
    if record["label"]:
        name = record["model"]
        print(f"note: {name} has {record['label']}" if record["model_kind"] == "tiny" else f"note: {name} is a "
              f"{record['label']}")
    return 0


def main(argv=None) -> int:
    """Standalone entry point: ``python -m dit_accel.cli.generate`` (e.g. under ``torchrun`` with ``--cp``)."""
    from .main import main as dit_accel_main

    return dit_accel_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
