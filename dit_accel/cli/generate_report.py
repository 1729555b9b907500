"""What ``dit-accel generate`` writes and prints beside the video: the side-by-side video, the comparison with
dense, the ground-truth quality, the sidecar record and the summary lines."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

from .._util import format_ratio, format_time, versions
from .generate_args import _side_by_side_path


def _check_side_by_side_path(out: Path, num_frames: int) -> None:
    """``OUT-vs-dense`` can be written: checked before the denoising, because it is written after the video (a
    folder in its place raised a traceback once the earlier video was replaced and its sidecar removed)."""
    from .._util import file_in_the_way
    from ..videos import output_files
    from .generate_args import _UsageError

    path = _side_by_side_path(out)
    parent = file_in_the_way(path.parent if path.suffix else path)
    if parent is not None:
        what = f"{parent} is a file"
    elif path.suffix and path.is_dir() and output_files(path, num_frames) == [path]:
        what = f"{path} is a folder"
    else:
        return
    raise _UsageError(f"--side-by-side writes the comparison to {path}, but {what}: move it away or choose "
                      "another --out")


def _commit_with_comparison(out: Path, frames, side_by_side: Path, both, record: dict, fps: float,
                            started: float, t_total: float) -> Path:
    """The video, its side-by-side comparison and the sidecar written as one set (``commit_files``), whatever the
    output's form (a file, a PNG sequence, a frame folder): an interrupted or failed write leaves the earlier run's
    files as they were, and a kill after the commit point is finished by the next writer (or a reader of the set).
    Frames of an earlier output that the new ones do not overwrite go in the same commit. Returns the sidecar's
    path."""
    import time

    from ..atomic_files import commit_files, commit_journal, json_text
    from ..videos import video_files

    sidecar = Path(f"{out}.json")
    files, remove = video_files(frames, out, fps=fps)
    comparison, stale = video_files(both, side_by_side, fps=fps)
    files.update(comparison)

    def write_sidecar(tmp: Path) -> None:  # last: its timing counts both videos
        record["timing"].update(save_s=time.perf_counter() - started, total_s=time.perf_counter() - t_total)
        tmp.write_text(json_text(record))

    files[sidecar] = write_sidecar
    commit_files(files, commit_journal(out), remove=remove + stale)
    return sidecar


def _remove_earlier_side_by_side(earlier, out: Path) -> None:
    """An earlier run at this ``--out`` wrote ``OUT-vs-dense`` and this one writes none: remove those files, so no
    comparison of another run stays beside this run's video. Only what that run's sidecar
    (``earlier``: its bytes, or None) records as its side-by-side output at exactly this path is removed, and not
    when a sidecar beside that path says a later run wrote its own video there (``--out OUT-vs-dense.mp4``)."""
    from ..videos import output_files

    try:
        earlier = json.loads(earlier)
        recorded = Path((earlier.get("compare_dense") or {}).get("side_by_side") or "")
        frames = int(earlier["output_shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return  # no readable record of an earlier run: nothing is known to be ours
    path = _side_by_side_path(out)
    if recorded.resolve() != path.resolve() or Path(f"{path}.json").exists():
        return
    for file in output_files(path, frames):
        Path(file).unlink(missing_ok=True)


def _side_by_side(left, right, labels=("dense", "sparse"), gap: int = 2):
    """Two uint8 videos ``[F, H, W, 3]`` next to each other with a white ``gap`` between them, each under a
    black strip that names it in white (``labels``: left, right)."""
    import numpy as np

    n = min(len(left), len(right))
    white = np.full((n, left.shape[1], gap, 3), 255, dtype=np.uint8)
    body = np.concatenate([left[:n], white, right[:n]], axis=2)
    width = left.shape[2]
    strip = np.concatenate([_label_strip(labels[0], width), np.full((_strip_height(width), gap, 3), 255, np.uint8),
                            _label_strip(labels[1], right.shape[2])], axis=1)
    return np.concatenate([np.broadcast_to(strip, (n, *strip.shape)), body], axis=1)


def _strip_height(width: int) -> int:
    """Height of the label strip: readable on a 48-pixel video, a small share of a large one; even (yuv420p)."""
    return max(12, min(32, width // 12)) // 2 * 2


def _label_strip(text: str, width: int):
    """A black ``[h, width, 3]`` uint8 strip with ``text`` in white, centred; shortened with '..' to fit."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    height = _strip_height(width)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=height - 3)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    shown = text
    while len(shown) > 1 and draw.textlength(shown, font=font) > width - 2:
        shown = shown[:-1]
    if shown != text and len(shown) > 2:
        shown = shown[:-2] + ".."
    left, top, right, bottom = draw.textbbox((0, 0), shown, font=font)
    draw.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), shown, fill=(255, 255, 255),
              font=font)
    return np.asarray(image, dtype=np.uint8)


def _comparison(times: dict, dense, frames, side_by_side, cache=None):
    """Times of the dense run beside the method's, their ratios and the PSNR of the method against dense.
    ``cache``: the ``--cache`` the method's run stacked, which the dense run runs without."""
    if dense is None:
        return None
    from ..eval.metrics import psnr_per_frame

    d = dense["times"]

    def ratio(stage):
        return d[stage] / times[stage] if times.get(stage) and d.get(stage) else None

    return {"dense_attention_s": d.get("attention"), "dense_transformer_s": d["transformer"],
            "dense_end_to_end_s": d["total"], "attention_speedup": ratio("attention"),
            "transformer_speedup": ratio("transformer"), "end_to_end_speedup": ratio("total"),
            "psnr_db": float(psnr_per_frame(frames, dense["frames"]).mean()),
            "side_by_side": None if side_by_side is None else str(side_by_side),
            "note": "same call, seed and pipeline with dit_accel.Dense(), run first; each timed run follows an "
                    "untimed step per phase of its method under the same handle (plans and choices built)"
                    + ("" if cache is None else f"; the dense run has no cache, the method's run --cache "
                       f"{cache.label}: the speedups and PSNR are those of the method and the cache together")}


def _quality(model: str, prompt: str, frames, dense):
    """Ground-truth quality (``dit_accel.eval.groundtruth``) of the method's and the dense frames (shapes models)."""
    from ..models.tiny_shapes import shapes_model

    if shapes_model(model) is None:
        return None
    from ..eval.groundtruth import parse_prompt, score_video

    try:
        parse_prompt(prompt)
    except ValueError as err:
        return {"prompt": prompt, "skipped": str(err)}
    return {"prompt": prompt, "method": score_video(frames, prompt),
            "dense": None if dense is None else score_video(dense["frames"], prompt)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _offload_record(args, pipe) -> dict:
    """``offload``: whether the pipeline ran with Diffusers' model CPU offload (its hooks are there), not whether
    --offload was given: on the CPU the loader leaves the weights where they are (Diffusers would only hook them
    onto the same device), and the sidecar said ``offload: true`` of a run that offloaded nothing. A note says so."""
    offloaded = bool(getattr(pipe, "_all_hooks", None))
    if not args.offload or offloaded:
        return {"offload": offloaded}
    return {"offload": False, "offload_note": f"--offload was given, but the pipeline ran on {args.device}, where the "
                                             "weights are already: nothing was offloaded"}


def _record(args, pipe, method, schedule, source, call, frames, written, times, calls, stats, summary, elapsed):
    """The JSON sidecar: settings, versions, timings and per-layer density."""
    import datetime

    from ..models.loading import resolve_model_kind
    from ..models.tiny import model_label

    return {
        "output": str(written[0]) if len(written) == 1 else [str(f) for f in written],
        "label": model_label(args.model),
        "model": args.model,
        "model_kind": resolve_model_kind(args.model),
        "pipeline": type(pipe).__name__,
        "transformer": type(getattr(pipe, "transformer", None)).__name__,
        "method": method.ran_dict(),  # what ran (VSA's default sparsity resolved)
        # as it ran on each token grid ("21x30x52"): a fit=True Tile's fitted tile and window, the method elsewhere
        "ran_on_grid": summary.get("ran_on_grid") or {},
        "schedule": schedule,
        "backends_used": summary.get("backends_used", []),  # what "backend" (auto: the best available) ran
        "defaults_source": source,
        "method_choice": args.method_choice,
        "settings": {"prompt": call["prompt"], "negative_prompt": args.negative_prompt, "frames": call.get("num_frames"),
                     "height": call.get("height"), "width": call.get("width"),
                     "steps": call.get("num_inference_steps"), "guidance": call.get("guidance_scale"),
                     "max_sequence_length": call.get("max_sequence_length"), "seed": args.seed,
                     "device": args.device, "dtype": args.dtype, "threads": _threads(), **_offload_record(args, pipe),
                     "fps": args.fps, "vae_temporal_compression": getattr(pipe, "vae_scale_factor_temporal", None),
                     "cp": None if args.cp is None else {"ulysses": args.cp[0], "ring": args.cp[1]},
                     "images": _images_record(args),
                     "pipeline_call": {**{k: v for k, v in call.items() if k not in ("generator", "prompt")},
                                       **_image_argument(args, call)},
                     "pipeline_defaults": _pipeline_defaults(pipe, call)},
        "output_shape": list(frames.shape),
        "timing": {**elapsed, "transformer_s": times["transformer"], "transformer_calls": calls,
                   "attention_s": times.get("attention"),
                   "end_to_end_s": times["total"], "vae_decode_s": times["vae_decode"],
                   "note": "transformer_s: wall time inside transformer forward calls (CUDA-synchronised); "
                           "attention_s: inside the self-attention modules the method wraps (projections, "
                           "attention, output projection); end_to_end_s: the whole pipeline call (text encoders, "
                           "denoising, VAE decode)"},
        "density": {"mean": summary.get("mean_density"), "per_layer": stats,
                    "note": "density: visited block fraction of video-video attention per layer, mean over its sparse "
                            "calls (its dense calls, e.g. dense steps, are not in it; None for a layer whose every "
                            "call ran dense); token_density: the fraction of token pairs its pattern attends over "
                            "the same calls (None where a pattern does not know it)"},
        "summary": summary,
        "warnings": summary.get("warnings", []),
        "versions": versions(("torch", "triton", "diffusers", "transformers")),
        "command": ["dit-accel", *getattr(args, "_argv", ["generate"])],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


_CALL_SETTINGS = ("num_frames", "height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")


def _pipeline_defaults(pipe, call: dict) -> dict:
    """The values the pipeline's call ran with for the settings the call left out, as its signature declares them
    (the settings above say None for them); a default of None (the pipeline picks, e.g. from its config) is left
    out."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    return {k: params[k].default for k in _CALL_SETTINGS if k in params and k not in call
            and params[k].default not in (None, inspect.Parameter.empty)}


def _output_notes(record: dict) -> list:
    """What the pipeline made where it differs from what was asked: a frame count the VAE rounds, a height or
    width it rounds (Flux: to its multiple, with only a log line, which --quiet hides). Printed as notes and kept
    in the sidecar's ``output_notes``."""
    settings, shape, pipeline = record["settings"], record["output_shape"], record["pipeline"]
    notes = []
    asked, made = settings["frames"], shape[0]
    if asked is not None and settings["pipeline_call"].get("num_frames") is not None and made != asked:
        factor = settings.get("vae_temporal_compression")  # Wan 4, tiny-shapes 2: frames = factor*k+1
        takes = f"{factor}k+1 frames" if isinstance(factor, int) and factor > 1 else "another frame count"
        notes.append(f"{pipeline} made {made} frames for --frames {asked} (its VAE takes {takes})")
    asked_size = [(flag, settings[key]) for flag, key, size in (("--height", "height", shape[1]),
                                                                ("--width", "width", shape[2]))
                  if settings["pipeline_call"].get(key) is not None and settings[key] != size]
    if asked_size:
        notes.append(f"{pipeline} made {shape[1]}x{shape[2]} (height x width) for "
                     + " ".join(f"{flag} {value}" for flag, value in asked_size)
                     + ": it rounds sizes to a multiple its VAE and patches take; pass a size it takes to get it")
    output, fps = record["output"], settings["fps"]
    if isinstance(output, str) and output.lower().endswith(".gif") and made > 1:  # (one frame: no rate to play)
        from ..videos import _gif_frame_ms

        played = 1000.0 / _gif_frame_ms(fps)
        if abs(played - fps) > 0.01 * fps:  # (the sidecar's fps alone said --fps)
            notes.append(f"{Path(output).name} plays at {played:.3g} frames per second for --fps {fps}: a GIF's "
                         "frame delays are whole hundredths of a second, at least 0.02 s; write .mp4 for this fps")
    return notes


def _audio_of(output):
    """The audio an audio-video pipeline returned beside the frames (``output.audio``: LTX-2, Kandinsky 6,
    MiniMax-H3), else None."""
    audio = getattr(output, "audio", None)
    return audio if audio is not None and hasattr(audio, "shape") else None


def _prompt_notes(pipe, call: dict) -> list:
    """A note for a prompt (or negative prompt) longer than the text the pipeline encodes: its tokenizer cuts the
    prompt at ``max_sequence_length`` tokens without a word (Wan's T5), so the sidecar recorded words the model never
    saw. Counted with the tokenizer that length applies to (the last of ``tokenizer_3``, ``tokenizer_2``,
    ``tokenizer``: FLUX's and SD3's T5); nothing where the call takes no such length or the count fails."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    length = call.get("max_sequence_length", getattr(params.get("max_sequence_length"), "default", None))
    tokenizer = next((t for t in (getattr(pipe, n, None) for n in ("tokenizer_3", "tokenizer_2", "tokenizer"))
                      if t is not None), None)
    if "max_sequence_length" not in params or not isinstance(length, int) or isinstance(length, bool) \
            or not callable(tokenizer):
        return []
    limit = getattr(tokenizer, "model_max_length", None)
    room = f" (its tokenizer takes up to {limit})" if isinstance(limit, int) and length < limit < 1_000_000 else ""
    notes = []
    for flag, key in (("--prompt", "prompt"), ("--negative-prompt", "negative_prompt")):
        text = call.get(key)
        try:
            count = len(tokenizer(text, add_special_tokens=False).input_ids)
            special = int(tokenizer.num_special_tokens_to_add())
        except Exception:  # (no text, or a tokenizer of another kind: nothing known)
            continue
        if count + special > length:
            notes.append(f"{flag} is {count} tokens and {type(pipe).__name__} encodes {length - special} of them "
                         f"(max_sequence_length {length}): the words past them did not reach the model; shorten it"
                         + (f" or raise --max-sequence-length{room}" if room else ""))
    return notes


def _images_record(args):
    """``--image`` as the run read it: each path as given and the sha256 of its bytes (None without --image)."""
    images = getattr(args, "_images", None)
    return [{"path": i.path, "sha256": i.sha256, "size": list(i.image.size)} for i in images] if images else None


def _image_argument(args, call) -> dict:
    """The call's ``image=`` (or ``images=``) as the path(s) it was read from: one path, or a list when a list was
    passed."""
    key = next((k for k in ("image", "images") if k in call), None)
    if key is None or not getattr(args, "_images", None):
        return {}
    paths = [i.path for i in args._images]
    return {key: paths if isinstance(call[key], list) else paths[0]}


def cp_ranks(record: dict) -> int:
    """The context-parallel ranks of a run's record (1 without ``--cp``): ``handle.summary(all_ranks=True)`` sums
    every rank's share of each call."""
    cp = (record.get("settings") or {}).get("cp") or {}
    return (cp.get("ulysses") or 1) * (cp.get("ring") or 1)


def _cache_record(spec, calls, summary, ranks: int = 1):
    """What a step cache skipped: the self-attention calls the method's layers would have made in ``calls``
    transformer calls, and those that ran (a block or attention module the cache skips calls no processor, so it
    is not counted). ``ranks``: the context-parallel ranks whose calls ``summary`` sums (``calls`` is one rank's:
    every rank runs each call on its share). None without a cache."""
    if spec is None:
        return None
    layers = int(summary.get("layers") or 0)
    ran = (int(summary.get("sparse_calls") or 0) + int(summary.get("dense_calls") or 0)) // max(ranks, 1)
    expected = summary.get("attention_calls_expected")  # each transformer's layers x its calls (Wan 2.2: two)
    expected = layers * int(calls or 0) if expected is None else int(expected)
    record = {**spec.describe(), "label": spec.label, "attention_calls_expected": expected,
              "attention_calls_ran": ran, "attention_calls_skipped": max(expected - ran, 0),
              "note": "self-attention calls of the layers the method wraps: layers x transformer calls expected, "
                      "those that ran counted by the attention processors"}
    if summary.get("cache_filled_in"):  # set for the run where no option was given (pab's skip range 2)
        record["filled_in"] = summary["cache_filled_in"]
    if summary.get("mag_ratios_measured"):  # magcache:calibrate=true: what it measured, one list per branch
        record["mag_ratios_measured"] = summary["mag_ratios_measured"]
    return record


# Diffusers' MagCache prints its calibration (magcache:calibrate=true) at the last step of each cache context:
# a line saying so, then the ratios as a Python list, then a blank line.
_MAGCACHE_PRINT = re.compile(r"\n?\[MagCache\] Calibration Complete\.[^\n]*\n(\[[^\n]*\])\n\n?")


@contextlib.contextmanager
def magcache_ratios(spec, found: list):
    """While open, take the ratios Diffusers' MagCache prints when it calibrates (``magcache:calibrate=true``) off
    stdout into ``found``, one list per guidance branch (its cache context), in the order printed; anything else
    printed meanwhile is passed on. They came through under ``--quiet`` as a Python list no flag takes, and no
    record kept them: the sidecar's ``cache.mag_ratios_measured`` and one summary line now do."""
    if spec is None or spec.name != "magcache" or not spec.options.get("calibrate"):
        yield found
        return
    import ast
    import io
    import sys

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield found
    finally:
        text = buffer.getvalue()
        for match in _MAGCACHE_PRINT.finditer(text):
            with contextlib.suppress(ValueError, SyntaxError, TypeError):
                found.append([float(v) for v in ast.literal_eval(match.group(1))])
        rest = _MAGCACHE_PRINT.sub("", text)
        if rest:
            sys.stdout.write(rest)


@contextlib.contextmanager
def _calls_per_transformer(handle):
    """Counts each wrapped transformer's calls while open; yields a function giving the self-attention calls its
    layers would make without a cache (each call runs its own transformer's layers: Wan 2.2's two experts
    counted as one model's made twice the calls, and the cache report skips that never happened)."""
    counts = {}

    def count(module, args):
        counts[id(module)] = counts.get(id(module), 0) + 1

    handles = [t.register_forward_pre_hook(count) for t in {id(t): t for t in handle.transformers}.values()]
    try:
        yield lambda: sum(len(hook.layers) * counts.get(id(hook.transformer), 0) for hook in handle._hooks)
    finally:
        for h in handles:
            h.remove()


def _cache_line(cache) -> list:
    """One line: what the cache skipped (none without a cache)."""
    if not cache:
        return []
    expected, skipped = cache["attention_calls_expected"], cache["attention_calls_skipped"]
    share = f" ({100 * skipped / expected:.0f}%)" if expected else ""
    lines = [f"cache {cache['label']}: skipped {skipped} of {expected} self-attention calls{share}, reusing or "
             "predicting their blocks' outputs from earlier steps"]
    measured = cache.get("mag_ratios_measured")
    if measured:
        shown = ["/".join(f"{v:.4g}" for v in ratios) for ratios in measured]
        lines.append(f"magcache calibration: mag_ratios measured {'; '.join(shown)}"
                     + (" (one list per guidance branch)" if len(shown) > 1 else "")
                     + f"; run with --cache magcache:mag_ratios={shown[0]} to skip by them (the sidecar's "
                       "cache.mag_ratios_measured holds them in full)")
    return lines


def _provenance(args, call, record, summary, stats) -> dict:
    """What exactly ran (dit_accel.eval.provenance): prompt sha256 and seed (and the input images' sha256),
    versions, commit, device, the backends the calls used, and the full method or plan."""
    from ..eval.provenance import backends_used, provenance

    cache = getattr(args, "_cache_spec", None)
    run = {"method": record["method"], "ran_on_grid": record.get("ran_on_grid"), "schedule": record["schedule"],
           "plan": getattr(args, "plan", None),
           "cache": None if cache is None else {**cache.describe(), **summary.get("cache_filled_in", {})}}
    out = provenance([call["prompt"]], [args.seed], args.device, run=run)
    if getattr(args, "_images", None):  # the input images decide the sample as much as the prompt does
        out["images_sha256"] = [i.sha256 for i in args._images]
    out["backends"] = backends_used(summary, stats)
    return out


_CRITERIA = (("colour", "colour_ok", "colour"), ("shape", "shape_ok", "shape"), ("motion", "motion_ok", "direction"),
             ("consistency", "consistent", None))


def _verdict(score: dict) -> str:
    """``colour ok, shape ok, motion FAIL (saw static), consistency ok``"""
    parts = []
    for name, key, seen in _CRITERIA:
        if score[key]:
            parts.append(f"{name} ok")
        elif seen is not None:
            parts.append(f"{name} FAIL (saw {score[seen] or 'no object'})")
        else:
            counts = score["objects_per_frame"]
            why = (f"up to {max(counts)} objects in a frame" if max(counts) > 1 else "no object in a frame"
                   if min(counts) == 0 else f"size varies {score['area_ratio']:.1f}x")
            parts.append(f"{name} FAIL ({why})")
    return ", ".join(parts)


def _passed(score: dict) -> str:
    return f"{sum(bool(score[key]) for _, key, _ in _CRITERIA)}/{len(_CRITERIA)}"


def _summary_lines(record: dict) -> list:
    """The method, its density, its attention time against dense and the ground-truth quality, in a few lines."""
    lines = []
    cmp, method = record.get("compare_dense"), record["method"]
    if record.get("method_choice") not in (None, "--method") and not record.get("plan_summary"):
        lines.append(f"method {method['method']}: {record['method_choice']}; settings: {record['defaults_source']}")
    density = record["density"]["mean"]
    grids = record["summary"].get("token_grids") or []
    media = "image" if grids and all(len(g) == 2 for g in grids) else "video"  # (an image model's grid is (H, W))
    if grids:
        lines.append("token grid " + ", ".join(f"{tuple(g)} = {math.prod(g):,} {media} tokens" for g in grids))
    if record.get("default_note"):
        lines.append(f"note: {record['default_note']}")
    if record.get("plan_summary"):
        lines.append(f"{record['method_choice']}: {record['plan_summary']}")
        lines.append("plan: " + (f"its sparse calls visit {density:.3f} of the {media} attention blocks"
                                 + _with_dense_calls(record) if density is not None else "every call ran dense"))
        lines += _plan_quality_lines(record.get("plan_quality"))
    elif method["method"] != "dense":
        options = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in method.items() if k != "method")
        lines.append(f"method {method['method']} ({options}): visited density "  # (of its sparse calls: said)
                     + (f"{density:.3f}" if density is not None else "1.000 (ran dense)")
                     + f" of the {media} attention blocks" + (" in its sparse calls" + _with_dense_calls(record)
                                                           if _with_dense_calls(record) else ""))
        lines += _ran_lines(record)
    from ..kernels.block_sparse.api import DENSE

    ran = record.get("backends_used") or []
    if DENSE in ran:
        some = "some of its" if len(set(ran) - {DENSE, "dense"}) else "its"
        lines.append(f"note: backend auto ran {some} sparse calls as dense attention: dense measured faster at this "
                     "size on this GPU (the cost model says so where the autotuner is off; --backend triton runs "
                     "the kernels)")
    if "torch" in ran and str(record["settings"].get("device", "")).startswith("cuda"):
        some = "some of its" if len(set(ran) - {"torch"}) else "its"
        lines.append(f"note: backend auto ran {some} sparse calls on the GPU with the PyTorch twin, not the Triton "
                     "kernels: their layout is not one the kernels take (--backend triton says why)")
    lines += _cache_line(record.get("cache"))
    t = record["timing"]
    if cmp:
        attention = (f"self-attention {format_time(t['attention_s'])} vs dense "
                     f"{format_time(cmp['dense_attention_s'])} ({format_ratio(cmp['attention_speedup'])})"
                     if cmp.get("attention_speedup") else "")
        lines.append((attention + "; " if attention else "") + f"transformer {format_time(t['transformer_s'])} vs "
                     f"dense {format_time(cmp['dense_transformer_s'])} ({format_ratio(cmp['transformer_speedup'])}); "
                     f"PSNR vs dense {cmp['psnr_db']:.1f} dB")
        if cmp.get("side_by_side"):  # (a PNG sequence: its frames, not the name they are numbered from)
            from ..videos import output_files

            files = output_files(cmp["side_by_side"], record["output_shape"][0])
            shown = files[0] if len(files) == 1 else f"{len(files)} frames {files[0]} .. {files[-1].name}"
            cache = f"+{record['cache']['cache']}" if record.get("cache") else ""
            lines.append(f"side by side (left dense, right {method['method']}{cache}): {shown}")
    quality = record.get("quality")
    if quality and quality.get("skipped"):
        lines.append(f"ground-truth quality: skipped ({quality['skipped']})")
    elif quality:
        lines.append(f"ground truth for \"{quality['prompt']}\": {_verdict(quality['method'])} "
                     f"[{_passed(quality['method'])}" + (f"; dense {_passed(quality['dense'])}]"
                                                        if quality.get("dense") else "]"))
    return lines


def _ran_lines(record: dict) -> list:
    """One line per token grid on which the method ran other settings than it was given (a ``fit=True`` Tile
    re-tiles to the grid): the line above says the settings as given."""
    method, lines = record["method"], []
    for grid, ran in (record.get("ran_on_grid") or {}).items():
        if ran != method:
            options = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in ran.items()
                                if k != "method")
            lines.append(f"on token grid ({', '.join(grid.split('x'))}) it ran {ran['method']} ({options})")
    return lines


def _with_dense_calls(record: dict) -> str:
    """The run's density with its dense calls counted as 1 (every block visited): the figure the plan's summary
    line gives as its mean over every step, layer and head, measured here."""
    summary = record.get("summary") or {}
    sparse, dense = summary.get("sparse_calls") or 0, summary.get("dense_calls") or 0
    density = record["density"]["mean"]
    if not dense or not sparse or density is None:
        return ""
    return (f"; {(sparse * density + dense) / (sparse + dense):.3f} with its {dense // cp_ranks(record)} dense calls "
            "counted as 1")


def _plan_quality_lines(quality) -> list:
    """What a calibrated plan bought, from its provenance (``dit-accel calibrate``'s record): its attention time
    (modelled for a GPU, or timed on the calibration device with ``--costs measured``) against dense and against
    uniform SLA at no less cost, and the quality of both on the validation videos, which the search never saw."""
    if not isinstance(quality, dict) or not isinstance(quality.get("modelled_ms"), (int, float)):
        return []
    lines = []
    plan_ms, dense_ms = quality["modelled_ms"], quality.get("dense_modelled_ms")
    priced = quality.get("priced", "modelled")
    plan_time = format_time(plan_ms / 1e3, "/sample")
    cost = (f"modelled GPU attention {plan_time}" if priced == "modelled" else f"attention {priced} {plan_time}")
    if isinstance(dense_ms, (int, float)) and plan_ms > 0:
        cost += f" vs dense {format_time(dense_ms / 1e3)} ({format_ratio(dense_ms / plan_ms)})"
    lines.append(f"calibrated: {quality.get('plan') or 'plan'}; {cost}")
    val, base = quality.get("validation"), quality.get("baseline")
    if isinstance(val, dict):
        text = (f"on {val['videos']} validation videos (prompts the search never saw): {val['psnr']:.1f} dB vs dense "
                f"(worst {val['psnr_worst']:.1f})")
        if isinstance(base, dict):
            text += (f"; uniform SLA at no less cost ({base['label'].removeprefix('uniform ')}, "
                     f"{format_time(base['modelled_ms'] / 1e3, '/sample')}): "
                     f"{base['psnr']:.1f} dB (worst {base['psnr_worst']:.1f})")
        lines.append(text)
    return lines
