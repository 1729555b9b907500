"""The arguments of ``dit-accel generate``: the checks that need no model, the ``--image`` files and the check of
the loaded pipeline against them, and the one-line error they raise (the parser is
:func:`dit_accel.cli.generate.register`)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_PROMPT = "a red panda climbing a bamboo stalk, soft morning light"
DEFAULT_MODEL = "tiny-shapes-63"


class _UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def _check_flags(args) -> None:
    """Everything about the flags that needs no model: fail before a (possibly long) load."""
    from ..videos import VIDEO_SUFFIXES
    from .checks import seed_error
    from .options import guidance_error

    for flag in ("frames", "height", "width", "steps", "max_sequence_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise _UsageError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    layers = getattr(args, "dense_layers", None)
    if isinstance(layers, int) and layers < 0 or isinstance(layers, list) and any(n < 0 for n in layers):
        shown = layers if isinstance(layers, int) else ",".join(map(str, layers))  # (apply refused it once loaded)
        raise _UsageError(f"--dense-layers {shown}: layer counts and indices are >= 0 (0 is the first layer); give N "
                          "(the first N layers dense) or L,L,... (those layers)")
    if guidance_error(args.guidance):  # (a NaN would silently turn guidance off; 1e308 made NaN frames)
        raise _UsageError(guidance_error(args.guidance))
    if args.out is not None and not args.out.strip():
        raise _UsageError("--out is empty: give a file (.mp4, .gif, .png) or folder path, or leave --out out for "
                          "the default outputs/<model>-<method>.mp4")
    if args.out is not None and args.out.startswith("~"):  # (--out=~/x.mp4, which the shell leaves: a ./~ folder)
        try:
            args.out = str(Path(args.out).expanduser())
        except RuntimeError:  # ~name of no user
            raise _UsageError(f"--out {args.out}: {args.out.split('/')[0]} names no user's home folder; give the "
                              "path in full") from None
    if args.out and args.out.endswith(("/", os.sep)) and Path(args.out).suffix.lower() in VIDEO_SUFFIXES:  # (x.mp4)
        raise _UsageError(f"--out {args.out} ends with a slash, which names a folder, but {Path(args.out).name!r} has "
                          f"the suffix {Path(args.out).suffix!r} of a file; drop the slash to write that file, or "
                          "give a folder name without a suffix for PNG frames")
    if args.out and Path(args.out).suffix and Path(args.out).suffix.lower() not in VIDEO_SUFFIXES \
            and Path(args.out).is_dir():  # (told to give "a folder path", which it is)
        raise _UsageError(f"--out {args.out}: a folder whose name ends with {Path(args.out).suffix!r}, which is read "
                          f"as a file suffix; for PNG frames give a folder without a dot in its name, such as "
                          f"{Path(args.out) / 'frames'}")
    if args.out and Path(args.out).suffix and Path(args.out).suffix.lower() not in VIDEO_SUFFIXES:
        raise _UsageError(f"--out {args.out}: unknown suffix {Path(args.out).suffix!r}; use .mp4, .gif, .png "
                          "or a folder path (PNG frames)")
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        _check_utf8(flag, text)
    if args.prompt is not None and not args.prompt.lstrip("\ufeff").strip():  # (ran unconditioned, "" recorded)
        raise _UsageError(f"--prompt {args.prompt!r} is empty: give the text to generate from, e.g. --prompt 'a cat "
                          "on a skateboard' (or leave --prompt out for the model's default prompt)")
    # A byte-order mark (``--prompt "$(cat prompt.txt)"`` of a file Notepad saved) is no text: it reached the
    # tokenizer as a character of the prompt, and the sidecar recorded it so.
    for dest in ("prompt", "negative_prompt"):
        if isinstance(getattr(args, dest), str) and getattr(args, dest).startswith("\ufeff"):
            setattr(args, dest, getattr(args, dest).lstrip("\ufeff"))
    from ..videos import MAX_FPS  # (save_video's bound)

    if not 1 <= args.fps <= MAX_FPS:  # (ffmpeg refuses a rate past 2**31: a raw traceback once the video was made)
        raise _UsageError(f"--fps must be an integer from 1 to {MAX_FPS}; got {args.fps}")
    if seed_error(args.seed):
        raise _UsageError(seed_error(args.seed))
    _check_writable(Path(args.out) if args.out else Path("outputs") / "out.mp4", "--out" if args.out else
                    "the default output folder outputs/ (pass --out PATH)")
    args._images = [_read_image(path) for path in getattr(args, "image", None) or ()]
    if args.out:  # (the default's name is known once the method is: checked then)
        check_sidecar(Path(args.out), args=args)


def _check_utf8(flag: str, text) -> None:
    """A prompt is UTF-8 text: bytes of another encoding (``--prompt "$(cat latin1.txt)"``) reach Python as lone
    surrogates, which failed with a raw traceback once the model had loaded (UnicodeEncodeError, or the
    tokenizer's TypeError)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        shown = f"byte {char.encode('utf-8', 'surrogateescape')!r}" if "\udc80" <= char <= "\udcff" else \
            f"character {char!r}"
        raise _UsageError(f"{flag}: {shown} at position {err.start} is not UTF-8 text; save the prompt as UTF-8 "
                          "(e.g. iconv -f latin1 -t utf-8)") from None


def _check_writable(out: Path, what: str) -> None:
    """The folder ``out`` (and its sidecar) will be written to exists or can be made, and takes a file: checked
    before a long generation, not after it."""
    import tempfile

    folder = out if not out.suffix else out.parent
    if out.suffix and out.is_dir():
        raise _UsageError(f"{what}: {out} is a folder; give a file path such as {out / 'video.mp4'}")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise _UsageError(f"{what}: {existing} is a file, so the folder {folder} cannot be made; choose another path")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dit-accel-write-check-"):
            pass
    except OSError as err:
        raise _UsageError(f"{what}: cannot write to {folder} ({err.strerror or err}); choose a writable path") \
            from None
    finally:  # made again when the output is written: a run refused later leaves no folders behind
        for made in created:
            with contextlib.suppress(OSError):
                made.rmdir()


def check_sidecar(out: Path, what: str = "--out", args=None) -> None:
    """The sidecar ``OUT.json`` is not a folder: checked before the generation (its removal and writing raised an
    IsADirectoryError traceback once the video was written). With ``args``: no file the run writes (or removes as an
    earlier run's stale frame) at ``out`` or its side-by-side path is an ``--image`` it reads (the input was
    overwritten by the output before)."""
    sidecar = Path(str(out) + ".json")
    if sidecar.is_dir():
        raise _UsageError(f"{what}: the sidecar {sidecar} this run writes beside {out} is a folder; move it away or "
                          "choose another --out")
    outs = [out, *([_side_by_side_path(out)] if getattr(args, "side_by_side", False) else [])]
    for image, target in ((i, o) for i in getattr(args, "_images", None) or () for o in outs):
        if _writes_over(target, Path(image.path).expanduser()):
            raise _UsageError(f"{what}: the output {target} would overwrite --image {image.path}, the input this run "
                              "reads; choose another --out (or keep the image elsewhere)")


def _writes_over(out: Path, file: Path) -> bool:
    """Whether writing an output at ``out`` (a video, a PNG or PNG sequence, a frame folder: ``videos.output_files``
    for any frame count, stale frames included) writes or removes ``file``."""
    out, file = out.resolve(), file.resolve()
    if file in (out, Path(f"{out}.json")):
        return True
    if out.suffix.lower() == ".png":
        return file.parent == out.parent and re.fullmatch(re.escape(out.stem) + r"_\d{5}\.png", file.name) is not None
    return not out.suffix and file.parent == out and re.fullmatch(r"frame_\d{5}\.png", file.name) is not None


def _side_by_side_path(out: Path) -> Path:
    """``outputs/x.mp4`` -> ``outputs/x-vs-dense.mp4`` (a folder of frames: ``x-vs-dense``)."""
    return out.with_name(f"{out.stem}-vs-dense{out.suffix}") if out.suffix else Path(f"{out}-vs-dense")


def _slug(model: str) -> str:
    """The model's name in the default output's file name."""
    name = Path(model.rstrip("/\\")).name if os.sep in model or "/" in model else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _pick_dtype(name: str, device: str, tiny: bool):
    import torch

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") and not tiny else "float32"
    return getattr(torch, name), name


def _check_plan_with_weights(args, plan, saved) -> None:
    """``--plan`` beside ``--weights``: the weights fit only what they were trained under, so the plan may only
    repeat the folder's own plan. Refused before loading (apply() refused it once the model had loaded, pointing
    to its Python API)."""
    from ..plans.sparse_plan import SparsePlan

    if plan is None or saved is None:
        return
    if isinstance(saved, SparsePlan):
        if plan.content_hash() == saved.content_hash():
            return
        trained = f"under the calibrated plan {saved.content_hash()[:12]}, not this plan ({plan.content_hash()[:12]})"
    else:
        trained = f"for {saved}"
    raise _UsageError(f"--plan {args.plan} disagrees with --weights {args.weights}, which was trained {trained}: its "
                      "weights fit only that; drop --plan (the folder's method runs), or pass weights fine-tuned under "
                      "this plan (dit-accel finetune --plan)")


# Caches whose hook compares a block's output with its input: under --cp Diffusers splits the sequence between the
# two, and the first step failed with a raw "size of tensor a (288) must match ... b (576)" traceback. cache-dit's
# DBCache compares the first blocks' residuals the same way and is not tested under --cp: refused too, by name,
# before cache-dit is imported (a run without it failed on every rank only after the model had loaded).
_CACHES_NOT_UNDER_CP = {"fbcache": "Diffusers' FirstBlockCache compares the first block's output",
                        "magcache": "Diffusers' MagCache compares the blocks' output",
                        "dbcache": "cache-dit's DBCache compares the first blocks' output",
                        "cachedit-taylorseer": "cache-dit's DBCache (with TaylorSeer) compares the first blocks' "
                                               "output"}


def _check_cache(args) -> None:
    """``--cache`` refused before loading: with ``--cp`` for the caches that fail (or are untested) under context
    parallelism (said first, without importing cache-dit), and a cache-dit cache where cache-dit is not installed
    (before: refused by enable_cache, once the model had loaded and the prompt was encoded)."""
    from ..pipelines.caches import missing_package_error

    spec = getattr(args, "_cache_spec", None)
    if spec is None:
        return
    if args.cp is None or spec.name not in _CACHES_NOT_UNDER_CP:
        problem = missing_package_error(spec)
        if problem:
            raise _UsageError(problem)
        return
    raise _UsageError(f"--cache {spec.name} does not run under --cp: {_CACHES_NOT_UNDER_CP[spec.name]} "
                      "with its input, which context parallelism splits between the ranks; use --cache taylorseer "
                      "or pab (which run under --cp), or drop --cp")


def unused_flag_error(pipe, accepts, wanted: dict):
    """Why a value given on the command line (``wanted``: call parameter -> value, None when not given) would not
    reach ``pipe``, whose ``__call__`` takes the parameters ``accepts``; None when each does. Left out in silence
    before, while the sidecar recorded them as given."""
    import inspect

    name = type(pipe).__name__
    dropped = [key for key, value in wanted.items() if value is not None and key not in accepts
               and (key, value) != ("num_frames", 1)]  # (an image pipeline makes the one frame asked for)
    if dropped:
        flags = {"num_inference_steps": "--steps", "guidance_scale": "--guidance-scale"}
        named = ", ".join(flags.get(k, "--" + k.replace("_", "-")) for k in dropped)
        return f"{named}: {name} takes no {', '.join(dropped)}; drop {'it' if len(dropped) == 1 else 'them'}"
    true_cfg = inspect.signature(pipe.__call__).parameters.get("true_cfg_scale")
    if wanted.get("negative_prompt") is not None and true_cfg is not None and (true_cfg.default or 0) <= 1:
        return (f"--negative-prompt: {name} uses a negative prompt only with true_cfg_scale > 1, and its default is "
                f"{true_cfg.default} (no flag sets it): the prompt would be ignored; drop --negative-prompt")
    return _guidance_off_error(pipe, wanted)


def _guidance_off_error(pipe, wanted: dict):
    """Why ``--negative-prompt`` would not reach ``pipe``: the call's guidance scale turns its classifier-free
    guidance off (Wan, CogVideoX, SD3 run it only at ``guidance_scale > 1``), and with it the negative prompt; None
    when it does reach it, or when the pipeline does not say (its ``do_classifier_free_guidance`` read from the scale
    alone). A run at ``--guidance-scale 1`` made the same frames with and without the negative prompt, which its
    sidecar recorded as given."""
    import inspect
    import types

    if wanted.get("negative_prompt") is None:
        return None
    prop = inspect.getattr_static(type(pipe), "do_classifier_free_guidance", None)
    scale = wanted.get("guidance_scale")
    if scale is None:  # the pipeline's default
        scale = getattr(inspect.signature(pipe.__call__).parameters.get("guidance_scale"), "default", None)
    if not isinstance(prop, property) or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return None

    def guided(value):
        try:
            return bool(prop.fget(types.SimpleNamespace(_guidance_scale=float(value))))
        except Exception:  # (it reads more than the scale: the pipeline decides at the call)
            return None

    if guided(scale) is not False or guided(max(scale, 1.0) + 1.0) is not True:
        return None
    name = type(pipe).__name__
    above = " above 1" if guided(1.0 + 1e-6) else ""
    scale_is = (f"--guidance-scale {scale:g}" if wanted.get("guidance_scale") is not None
                else f"its default guidance_scale {scale:g}")
    return (f"--negative-prompt: {name} uses a negative prompt only with classifier-free guidance, which "
            f"{scale_is} turns off: the prompt would be ignored; give a --guidance-scale{above} or drop "
            "--negative-prompt")


def flag_call_error(args, pipe, accepts) -> Optional[str]:
    """Why the flags' call values (``--frames``, sizes, steps, guidance, text length, ``--image``) do not fit
    ``pipe``, whose ``__call__`` takes ``accepts``; None when they do. Run once the model is loaded, and before
    where its folder names its pipeline class (:func:`early_call_error`)."""
    if "num_frames" not in accepts and args.frames not in (None, 1):
        return f"--frames {args.frames}: {type(pipe).__name__} generates images; drop --frames"
    wanted = {"negative_prompt": args.negative_prompt, "num_frames": args.frames, "height": args.height,
              "width": args.width, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
              "max_sequence_length": args.max_sequence_length}
    images = getattr(args, "_images", None) or ()
    return unused_flag_error(pipe, accepts, wanted) or image_call_error(pipe, accepts, len(images)) \
        or _image_check_error(pipe, images)


def _image_check_error(pipe, images) -> Optional[str]:
    """The pipeline's own check of an input image (FLUX.2's ``image_processor.check_image_input``: at least 64
    pixels a side, an aspect ratio up to 8:1), run on each ``--image`` before the denoising, the message naming the
    file; None when each passes or the pipeline has no such check. Before: its bare "Image too small: 16×16" came
    once the dense comparison had run, naming no flag."""
    check = getattr(getattr(pipe, "image_processor", None), "check_image_input", None)
    for image in images if callable(check) else ():
        try:
            check(image.image)
        except ValueError as err:
            return (f"--image {image.path}: {type(pipe).__name__} refuses it: {err}; give an image that meets this "
                    "(e.g. resized)")
    return None


def early_call_error(args) -> Optional[str]:
    """:func:`flag_call_error` before the model loads, where its folder's model_index.json names a Diffusers
    pipeline class: its call's parameters are known from the class (a FLUX folder given --frames, a Wan folder
    given --image, were refused only once the model had loaded)."""
    known = index_pipeline_call(args.model)
    return None if known is None else flag_call_error(args, *known)


def index_pipeline_call(model):
    """``(stand-in pipeline, its call's parameter names)`` of the Diffusers class ``model``'s folder (a local or
    embedded one, or a cached hub snapshot) names in its model_index.json, without loading anything; None where
    there is no such folder or class (a model built in code, a hub id not in the cache)."""
    import inspect

    from ..models.loading import index_class_name

    name = index_class_name(model)
    if name is None:
        return None
    try:
        import diffusers

        cls = getattr(diffusers, name, None)
    except Exception:  # (a broken optional dependency: the load that follows names it)
        return None
    if not isinstance(cls, type):
        return None
    try:
        stand_in = cls.__new__(cls)  # (no weights: only its class name and call signature are read)
        accepts = set(inspect.signature(stand_in.__call__).parameters)
    except (TypeError, ValueError):  # a class that cannot stand in so: the check after loading covers it
        return None
    return stand_in, accepts


def _folder_class(model):
    """``(transformer class name, family, preset)`` that ``model``'s folder (a local one or a cached hub snapshot)
    names in its model_index.json, read without loading anything; None where it names no class with a preset."""
    from ..models.loading import model_folder

    folder = model_folder(model)
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    from ..pipelines.presets import PRESETS, resolve_model_family

    try:
        class_name, family = resolve_model_family(str(folder))
    except ValueError:  # (not a class with a preset: the load that follows says what it is)
        return None
    preset = PRESETS.get(class_name)
    return None if preset is None or preset.refused else (class_name, family, preset)


def early_method_error(args) -> Optional[str]:
    """Why ``--method`` (and its per-dimension flags) cannot run on the model, where its folder names its
    transformer class (:func:`_folder_class`): a method the class refuses, Radial or VSA on an image model,
    ``--tile 6,8,8`` on a 2-D token grid. None when they fit or the class is not known before loading. Before:
    refused by ``apply`` only once the model had loaded (minutes, for a FLUX or a Wan 14B)."""
    from .options import method_flags, method_options_given

    known = _folder_class(args.model) if args.method else None
    if known is None:
        return None
    class_name, _, preset = known
    problem = _refusal(class_name, preset, args.method)
    if problem:
        fits = [n for n in ("tile", "gna", "sla", "radial", "vsa") if not _refusal(class_name, preset, n)]
        others = " or ".join(filter(None, (", ".join(fits[:-1]), fits[-1]))) if fits else None
        return (f"--method {args.method}: {problem.removeprefix('dit_accel: ')} "
                + (f"Pass --method {others}, or leave" if others else "Leave")
                + " --method out for the model's recommended setting")
    dims = preset.grid_dims
    flags = method_flags()
    for flag, value in method_options_given(args).items():
        if dims is not None and flags[flag][0].metavar == "T,H,W" and isinstance(value, tuple) and len(value) != dims:
            axes = "T,H,W" if dims == 3 else "H,W" if dims == 2 else "one per dimension"
            return (f"{flag} {','.join(map(str, value))} has {len(value)} values, but the sparse calls of "
                    f"{class_name} see a {dims}-D token grid: give {flag} {dims} values ({axes}) or one int")
    return None


def early_plan_error(args, plan) -> Optional[str]:
    """Why ``--plan`` cannot run on the model, where the plan names the transformer class it was calibrated for and
    the model's folder names its own (:func:`_folder_class`); None otherwise. Before: ``apply`` refused it (the same
    words) once the model had loaded."""
    made_for = None if plan is None else plan.provenance.get("model_class")
    known = _folder_class(args.model) if isinstance(made_for, str) else None
    if known is None or known[0] == made_for:
        return None
    model_id = plan.provenance.get("model_id")
    return (f"--plan {args.plan} was calibrated for {made_for}{f' ({model_id})' if model_id else ''}; the "
            f"transformer of {args.model} is {known[0]}: calibrate a plan for this model (dit-accel calibrate)")


def early_method_defaults(args) -> Optional[dict]:
    """The method field defaults the run will layer under the flags (``generate._model_defaults``), where they are
    known before loading: none with ``--no-model-defaults``, the preset's ``recommended`` setting where the model's
    folder names its class; None where they are not known. With them the flags' values are checked before a long
    load (``--topk 2`` on a Wan folder was refused once the model had loaded)."""
    if args.no_model_defaults:
        return {}
    known = _folder_class(args.model)
    if known is None:
        return None
    from ..pipelines.presets import recommended

    class_name, family, _ = known
    try:
        method, _ = recommended(class_name, args.method, family=family)
    except (ValueError, TypeError):  # no preset setting for it: the config's own defaults (as after loading)
        return {}
    return {k: v for k, v in method.to_dict().items() if k != "method"}


def _refusal(class_name, preset, method) -> Optional[str]:
    """:func:`~dit_accel.pipelines.presets.check_method_for`'s refusal as a message, or None."""
    from ..pipelines.presets import check_method_for

    try:
        check_method_for(class_name, preset, method, host="comfyui-file")
    except ValueError as err:
        return str(err)
    return None


def _in_flags(message: str) -> str:
    """A refusal raised in the run, its advice in the command line's words: the pattern's ``GNA(..., fit=True)`` is
    ``--fit-grid`` here."""
    return message.replace("GNA(..., fit=True)", "--fit-grid")


def _check_dense_schedule(args) -> None:
    """The schedule flags with ``--method dense`` (given, or the model's default): they say which steps and layers
    of a sparse method run dense, and a dense run has none to spare. Ignored before, while the sidecar recorded them
    as the schedule that ran."""
    from .options import _SCHEDULE_FLAGS, _dest

    given = [flag for flag in _SCHEDULE_FLAGS if getattr(args, _dest(flag), None) is not None]
    if args.method != "dense" or not given:
        return
    whose = "--method dense" if args.method_choice == "--method" else f"dense attention ({args.method_choice})"
    raise _UsageError(f"{', '.join(given)}: {whose} runs every step and layer dense already; drop "
                      f"{'it' if len(given) == 1 else 'them'}, or pick a sparse method with --method (e.g. tile)")


def _check_side_by_side(args) -> None:
    """``--side-by-side`` needs a dense run and a method to put beside it (checked before loading)."""
    if args.side_by_side and args.compare_dense is False:
        raise _UsageError("--side-by-side needs the dense run; drop --no-compare-dense")
    if args.side_by_side and args.method == "dense":
        raise _UsageError("--side-by-side puts dense next to a sparse method; pick one with --method (e.g. tile)")
    if args.compare_dense and args.method == "dense":  # (dropped before, with no comparison in the sidecar)
        whose = "--method dense" if args.method_choice == "--method" else f"dense attention ({args.method_choice})"
        raise _UsageError(f"--compare-dense compares a sparse method with dense, and {whose} is dense already; "
                          "drop --compare-dense, or pick a sparse method with --method (e.g. tile)")


# ----------------------------------------------------------------------------- --image
# Pipelines whose ``image`` takes a list of reference images (not a batch): several --image go in as one list.
IMAGE_LIST_PIPELINES = ("QwenImageEditPlusPipeline", "QwenImage21Pipeline", "Flux2Pipeline", "Flux2KleinPipeline",
                        "Flux2KleinKVPipeline", "ZImageOmniPipeline", "BriaFiboEditPipeline", "BriaFibo2Pipeline")
# A text-to-X pipeline -> a model of its family whose pipeline takes an input image.
IMAGE_MODELS = {"WanPipeline": ("an image-to-video", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
                "HunyuanVideoPipeline": ("an image-to-video", "hunyuanvideo-community/HunyuanVideo-I2V"),
                "CogVideoXPipeline": ("an image-to-video", "THUDM/CogVideoX-5b-I2V"),
                "FluxPipeline": ("an edit", "black-forest-labs/FLUX.1-Kontext-dev"),
                "QwenImagePipeline": ("an edit", "Qwen/Qwen-Image-Edit")}
IMAGE_PIPELINES = ("WanImageToVideoPipeline, HunyuanVideoImageToVideoPipeline, LTXImageToVideoPipeline, "
                   "CogVideoXImageToVideoPipeline, FluxKontextPipeline, QwenImageEditPipeline")


class InputImage(NamedTuple):
    """One ``--image``: the path as given, the RGB image read from it and the sha256 of the bytes read."""

    path: str
    image: object
    sha256: str


def add_image_option(group) -> None:
    group.add_argument("--image", metavar="FILE", action="append", default=None,
                       help="input image of an image-to-video or edit pipeline (" + IMAGE_PIPELINES + ", ...), "
                            "read as RGB and passed as is as the call's image=: the pipeline resizes it as it "
                            "documents (most to --height/--width, edit pipelines to their own resolution); repeat it "
                            "for pipelines that take several (" + ", ".join(IMAGE_LIST_PIPELINES[:3]) + ", ...). "
                            "The sidecar records each path and its sha256")


def _read_image(path: str) -> InputImage:
    """The file read once (its sha256 is that of the bytes the image came from), decoded by PIL as RGB."""
    import hashlib
    import io

    from PIL import Image, UnidentifiedImageError

    if not path.strip():  # (Path("") is the current folder: "cannot read it (Is a directory)" before)
        raise _UsageError(f"--image {path!r}: an empty path; give an image file (PNG, JPEG or WebP)")
    try:
        data = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise _UsageError(f"--image {path}: no such file") from None
    except OSError as err:
        raise _UsageError(f"--image {path}: cannot read it ({err.strerror or err})") from None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = _upright(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        what = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        raise _UsageError(f"--image {path}: {what}; give a PNG, JPEG or WebP file") from None
    return InputImage(path, image, hashlib.sha256(data).hexdigest())


def _upright(image):
    """``image`` turned as its EXIF orientation says, as a viewer shows it and Diffusers' ``load_image`` reads it: a
    phone's portrait photo is stored sideways with such a turn (it reached the pipeline sideways before). A damaged
    EXIF block leaves the image as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # (Pillow raises several types for malformed EXIF data)
        return image


def image_call_error(pipe, accepts, count: int):
    """Why ``pipe`` (whose ``__call__`` takes the parameters ``accepts``) cannot take ``count`` input images;
    None when it can. An image is never dropped in silence, and one the call requires is asked for by name."""
    import inspect

    name = type(pipe).__name__
    if not count:  # (an image-to-video pipeline's required image: the call's TypeError traceback before)
        image = inspect.signature(pipe.__call__).parameters.get("image")
        needed = image is not None and image.default is inspect.Parameter.empty
        return f"{name} needs an input image: pass --image FILE (a PNG, JPEG or WebP file)" if needed else None
    if image_parameter(accepts) is None:
        kind, model = IMAGE_MODELS.get(name, (None, None))
        use = (f"use {kind} pipeline such as {model}" if model else
               f"--image needs a pipeline whose call takes an image ({IMAGE_PIPELINES}, ...)")
        return f"{name} takes no input image: {use}, or drop --image"
    if count > 1 and name not in IMAGE_LIST_PIPELINES and image_parameter(accepts) == "image":
        return (f"{name} takes one input image; got {count} --image (several reference images go to "
                f"{', '.join(IMAGE_LIST_PIPELINES)})")
    return None


def image_parameter(accepts):
    """The call parameter the ``--image`` files go to: ``image``, else ``images`` (a list of references, one sample:
    JoyImageEditPlusPipeline), else None."""
    return next((name for name in ("image", "images") if name in accepts), None)


def _method_for_weights(args, saved, parser):
    """The saved method; method flags may repeat it but must not change it (the weights fit only it)."""
    from ..plans.sparse_plan import SparsePlan
    from .options import method_from_args, method_options_given

    given = method_options_given(args)
    if args.plan_any_grid and not isinstance(saved, SparsePlan) and not args.plan:
        raise _UsageError(f"--plan-any-grid applies to a plan, and --weights {args.weights} was trained for {saved}, "
                          "not under a plan: drop --plan-any-grid")
    if isinstance(saved, SparsePlan):  # trained under a calibrated plan (finetune --plan): the plan runs
        flags = (["--method"] if args.method != "plan" else []) + list(given)
        if flags:
            raise _UsageError(f"{', '.join(flags)} disagree{'s' if len(flags) == 1 else ''} with --weights "
                              f"{args.weights}, which was trained under a calibrated plan; drop "
                              f"{'it' if len(flags) == 1 else 'them'} (the plan is read from the folder).")
        return saved
    if args.method != saved.name:
        raise _UsageError(f"--method {args.method} disagrees with --weights {args.weights}, which was trained for "
                          f"{saved.name} ({saved}); drop --method (it is read from the folder) or pass --method "
                          f"{saved.name}.")
    if not given:
        return saved
    wanted = method_from_args(args, defaults={k: v for k, v in saved.to_dict().items() if k != "method"},
                              parser=parser)
    if getattr(saved, "fit", False) and not getattr(wanted, "fit", True):  # (--tile repeating the folder's dropped
        wanted = wanted.replace(fit=True)  # its fit, as it drops a preset's: the folder's tile re-fits as trained)
    return _same_as_saved(args, saved, wanted)


def _same_as_saved(args, saved, wanted):
    """``saved`` where the flags' method ``wanted`` runs alike (compared as ``apply`` compares a folder's method:
    ``--window 3,3,3`` repeats a folder trained with ``--window 3``), else the usage error naming the flags."""
    from ..checkpoints.finetuned import differing_settings
    from .options import _fields_of

    fields = differing_settings(saved, wanted)
    if not fields:
        return saved
    flags = {field: flag for flag, field in _fields_of(saved.name).items()}
    diff = sorted(flags.get(k, "--" + k.replace("_", "-")) for k in fields)
    raise _UsageError(f"method options {', '.join(diff)} disagree with --weights {args.weights}, which was trained "
                      f"for {saved}; drop them (the method is read from the folder).")
