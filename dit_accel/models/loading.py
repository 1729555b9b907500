"""Load a pipeline from an embedded model name, a local folder or a Hugging Face hub id.

Embedded models: ``tiny-wan`` / ``tiny-flux`` (random weights, built in code) and
``tiny-shapes`` (trained, shipped as a Diffusers folder inside the package and
loaded from it like any local folder).

Failures become one :class:`ModelLoadError` line that says what to do, instead
of a minute of network retries followed by a traceback: the local cache is
tried first (``local_files_only``), ``HF_HUB_OFFLINE=1`` is honoured, and the
hub is probed once with a short timeout before any download starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .._util import near_hub_id
from .folder_files import damaged_component, json_object, mistyped
from .tiny import EMBEDDED_MODELS, PIPELINES as TINY_PIPELINES, TINY_MODELS, as_dtype, build_tiny_pipeline
from .tiny_shapes import TRAINED_MODELS

__all__ = ["load_pipeline", "ModelLoadError", "resolve_model_kind", "model_folder", "model_fingerprint",
           "rope_reach_error", "text_length_error", "early_text_length_error", "size_error", "early_size_error",
           "index_class_name", "index_error"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PROBE_TIMEOUT_S = 5.0


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one actionable line."""


def resolve_model_kind(model: str) -> str:
    """``"tiny"`` (random weights, built in code), ``"embedded"`` (trained, shipped in the package),
    ``"folder"`` or ``"hub"`` for a ``--model`` value (no I/O beyond a stat); a ``pathlib.Path`` is a folder's."""
    model = _as_str(model)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} is invalid: pass an embedded name ({', '.join(EMBEDDED_MODELS)}), "
                         "a folder or a hub id")
    if model in TINY_MODELS:
        return "tiny"
    if model in TRAINED_MODELS:
        return "embedded"
    if Path(model).expanduser().exists():
        return "folder"
    if _REPO_ID.match(model) and not model.startswith((".", "/", "~")):
        return "hub"
    named = model.strip().lower()
    if named in EMBEDDED_MODELS:  # ("Tiny-Wan", or "tiny-wan " read from a file; before: the generic line)
        raise ModelLoadError(f"model {model!r} is no folder here; the embedded model of that name is written "
                             f"{named!r}: pass {named!r}")
    near = near_hub_id(model, _REPO_ID)
    if near is not None:  # (before: "neither ... nor a hub id like 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'", for that id)
        repo, why = near
        raise ModelLoadError(f"model {model!r} is no folder here, and not a hub id as written ({why}): pass "
                             f"{repo!r} for the hub model, or the path of an existing folder")
    raise ModelLoadError(
        f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), an existing folder, "
        "nor a hub id like 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'"
    )


def _as_str(model):
    """A ``pathlib.Path`` (any ``os.PathLike``) as the string of its path; anything else as it is. (A Path, which
    Diffusers' from_pretrained takes, was refused as "invalid: pass ... a folder" and fingerprinted as no folder.)"""
    return os.fspath(model) if isinstance(model, os.PathLike) else model


def model_folder(model) -> Optional[Path]:
    """The folder a ``--model`` value loads from: a local folder, an embedded model's folder, or a hub id's
    snapshot in the local cache; None for models built in code, objects and uncached hub ids."""
    model = _as_str(model)
    if not isinstance(model, str):
        return None
    try:
        kind = resolve_model_kind(model)
    except (ValueError, ModelLoadError):
        return None
    if kind == "folder":
        return Path(model).expanduser()
    if kind == "embedded":
        return Path(TRAINED_MODELS[model])
    if kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not cached as a snapshot
            return None
    return None


def same_model(a, b) -> bool:
    """Whether two ``--model`` values name the same model: the same string, or the same folder on this machine
    (an embedded model's name and its folder, two spellings of one path). A model recorded on another machine
    that is not here is not the same."""
    if a == b:
        return True
    fa, fb = model_folder(a), model_folder(b)
    return fa is not None and fb is not None and fa.resolve() == fb.resolve()


def model_fingerprint(model, pipe=None, *, memo=None, warn=print) -> Optional[str]:
    """The content of a model's weights: ``"files:<sha256>"`` of the files it loads from (configs included;
    file hashes memoised in ``memo``, see :func:`dit_accel.atomic_files.folder_digest`), else ``"state:<sha256>"`` of
    the state dicts of ``pipe``'s modules (a model built in code or held in memory); None without either."""
    from ..atomic_files import folder_digest

    folder = model_folder(model)
    if folder is not None:
        return "files:" + folder_digest(folder, memo, warn)
    if pipe is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for name, module in sorted((getattr(pipe, "components", None) or {"transformer": pipe.transformer}).items()):
        if not isinstance(module, torch.nn.Module):
            continue
        for key, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:  # huggingface_hub reads the variable once at import
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _from_pretrained(source: str, dtype, **kwargs):
    import warnings

    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        # Newer Diffusers renamed torch_dtype to dtype; the old name works across all supported versions.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)
        except AttributeError as err:
            # model_index.json names a pipeline class this Diffusers lacks (saved by a newer release): Diffusers
            # raises a bare AttributeError from its lazy module, which no caller's error handling expects.
            missing = re.fullmatch(r"module '?diffusers'? has no attribute '?(\w+)'?", str(err).strip())
            if missing is None:
                raise
            import diffusers

            raise ModelLoadError(f"{source} holds a {missing.group(1)}, which the installed Diffusers "
                                 f"{diffusers.__version__} does not have: upgrade it (pip install -U diffusers)") from err


def _hint(model: str) -> str:
    return (
        f"download it where there is network (`huggingface-cli download {model}`) and set HF_HUB_OFFLINE=1, "
        "pass a local folder with --model PATH, or use --model tiny-wan for a random-weight smoke run"
    )


def load_pipeline(model: str, *, device="cpu", dtype: torch.dtype = torch.float32, offload: bool = False, seed: int = 0):
    """Load a Diffusers pipeline.

    Args:
        model: an embedded model (``"tiny-shapes"``: trained on synthetic clips,
            shipped in the package; ``"tiny-wan"``, ``"tiny-flux"``: random
            weights built offline), a local folder holding a Diffusers pipeline
            (``model_index.json``; a str or a ``pathlib.Path``), or a hub id such as
            ``"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"``.
        device: where the modules go (``"cpu"``, ``"cuda"``, ...).
        dtype: weight dtype (``torch.float32``, ``torch.bfloat16``, ...; or its name: ``"bf16"``, ``"float16"``).
        offload: ``enable_model_cpu_offload`` onto ``device`` instead of moving
            the whole pipeline there (for big models on small GPUs).
        seed: weight seed of the tiny models (ignored otherwise).

    Raises:
        ModelLoadError: with one line that says what to do (offline and not
            cached, hub unreachable, missing folder, not a pipeline folder).
        ValueError: ``dtype`` is no floating dtype or its name (``"auto"``, ``torch.int8``), or float8; ``device`` is no
            torch device, or a CUDA device that is not here (checked before anything loads); ``seed`` is no int.
        TypeError: ``offload`` is not True or False.

    Example::

        pipe = load_pipeline("tiny-wan")
        pipe = load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", device="cuda", dtype=torch.bfloat16)
    """
    model = _as_str(model)
    kind = resolve_model_kind(model)
    dtype = as_dtype(dtype)  # (a name such as "bf16" loaded fp32 weights from a folder or the hub, without a word)
    if dtype.itemsize < 2:  # (float8: a tiny model failed at its first step; a folder: "check ... config.json")
        raise ValueError(f"dtype={dtype} is a storage dtype no pipeline computes in: pass torch.bfloat16, torch.float16 "
                         "or torch.float32 (to store weights in float8, quantize the loaded pipeline's modules)")
    _check_place(device, offload, seed)
    if kind == "tiny":
        missing = [name for name in TINY_PIPELINES[model].requires if importlib.util.find_spec(name) is None]
        if missing:  # e.g. ftfy: Diffusers' SkyReels-V2 / VACE pipelines fail on the prompt without it
            raise ModelLoadError(f"{model}: its Diffusers pipeline needs {', '.join(missing)} to run (a dit_accel "
                                 f"dependency): pip install {' '.join(missing)}")
        pipe = build_tiny_pipeline(model, seed=seed, device="cpu" if offload else device, dtype=dtype)
    elif kind == "embedded":
        folder = TRAINED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"the {model} weights are missing from {folder}; reinstall dit-accel or retrain "
                                 "them with `python -m dit_accel.models.train_tiny`")
        with _quiet_loading():  # loads in a blink: no progress bars
            pipe = _from_folder(folder, dtype)
        pipe.set_progress_bar_config(leave=False)
    elif kind == "folder":
        pipe = _from_folder(Path(model).expanduser(), dtype)
    else:
        pipe = _from_hub(model, dtype)
    if kind != "tiny" or offload:
        _place(pipe, device, offload)
    return pipe


def _check_place(device, offload, seed) -> None:
    """ValueError or TypeError naming ``device``, ``offload`` or ``seed`` of :func:`load_pipeline` before anything
    loads. Before: ``device="cuda"`` on a machine without one (or ``"cuda:1"`` with one GPU, or ``"gpu"``) failed
    with a raw "Torch not compiled with CUDA enabled" only after the model had loaded (minutes for a real one),
    ``offload="no"`` turned offloading on, and ``seed="x"`` was a raw "invalid literal for int()"."""
    from .._util import device_error
    from ..kernels.checks import check_flag
    from .tiny import _check_seed

    check_flag("offload", offload)
    _check_seed(seed)
    try:
        dev = torch.device(device) if isinstance(device, (torch.device, int)) and not isinstance(device, bool) \
            else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError) as err:
        if isinstance(device, int) and not isinstance(device, bool) and device >= 0:  # an accelerator's index
            raise ValueError(f"device={device!r}: no accelerator is visible here ({_first_line(err)}); pass "
                             "device='cpu'") from None
        raise ValueError(f"device={device!r} is invalid: a torch device such as 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type == "cuda":
        error = device_error(str(dev), flag="device", advice="pass device='cpu'")
        if error is not None:
            raise ValueError(error)
    elif dev.type not in ("cpu", "meta"):
        try:  # (mps, xpu, ...: "PyTorch is not linked with support for mps devices" once the model had loaded)
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            reason = _first_line(err).split(". ")[0].rstrip(".")
            raise ValueError(f"device={device!r} cannot be used here ({reason}); pass device='cpu'") from None


class _quiet_loading:
    """Diffusers' and Transformers' loading progress bars off inside the block, restored after."""

    def __enter__(self):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._restore = [dlog.enable_progress_bar if dlog.is_progress_bar_enabled() else None,
                         tlog.enable_progress_bar if tlog.is_progress_bar_enabled() else None]
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for enable in self._restore:
            if enable is not None:
                enable()
        return False


def rope_reach_error(pipe, call: dict) -> Optional[str]:
    """Why the pipeline call ``call`` (``num_frames``, ``height``, ``width``) goes past the rotary table of a
    transformer that holds ``rope_max_seq_len`` positions per axis (Wan and the models built on it), naming the
    flag and the largest value that fits; None where it fits or the model has no such table. Past it, the first
    step fails deep in the model (``shape '[1, 1, 25000, -1]' is invalid``), so generate, eval and calibrate ask
    before they run."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    reach, patch = getattr(config, "rope_max_seq_len", None), getattr(config, "patch_size", None)
    if not isinstance(reach, int) or not isinstance(patch, (tuple, list)) or len(patch) != 3:
        return None
    spatial, temporal = getattr(pipe, "vae_scale_factor_spatial", None), getattr(pipe, "vae_scale_factor_temporal", None)
    return _reach_message(type(pipe.transformer).__name__, reach, patch, spatial, temporal, call)


def _reach_message(owner: str, reach: int, patch, spatial, temporal, call: dict) -> Optional[str]:
    """:func:`rope_reach_error`'s rule, on the transformer's ``rope_max_seq_len`` and ``patch_size`` and the VAE's
    scale factors (None where not known: that axis is not checked)."""
    for flag, key, scale, step in (("--frames", "num_frames", temporal, patch[0]),
                                   ("--height", "height", spatial, patch[1]), ("--width", "width", spatial, patch[2])):
        value = call.get(key)
        if not isinstance(value, int) or not isinstance(scale, int) or scale < 1:
            continue
        # Frames: the Wan-lineage pipelines round num_frames - 1 off a multiple of the VAE's stride to
        # num_frames // scale * scale + 1 before they encode ((256 - 1) // 4 + 1 = 64 latent frames were checked
        # where the call made 65 and failed deep in the model).
        latent = value // scale + 1 if key == "num_frames" else value // scale
        if -(-latent // step) > reach:
            most = (reach * step - 1) * scale + 1 if key == "num_frames" else reach * step * scale
            return (f"{flag} {value} is past what {owner}'s rotary embedding covers "
                    f"({reach} positions per axis, rope_max_seq_len): give {flag} {most} or less")
    return None


def text_length_error(pipe, length) -> Optional[str]:
    """Why ``--max-sequence-length length`` is more than ``pipe``'s tokenizers take (their ``model_max_length``,
    the longest where there are two); None when it is not, or not known. Padded to that length, a typo such as
    100000 failed inside the text encoder with a raw out-of-memory traceback (generate, eval, calibrate and
    finetune ask before they run)."""
    limits = [getattr(getattr(pipe, name, None), "model_max_length", None) for name in _TOKENIZERS]
    return _text_length_message(type(pipe).__name__, limits, length)


_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def _text_length_message(owner: str, limits, length) -> Optional[str]:
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # (1e30: "no limit" in transformers)
    if length is None or not limits or length <= max(limits):
        return None
    return (f"--max-sequence-length {length}: the tokenizer of {owner} takes at most {max(limits)} "
            f"tokens; give a length of at most {max(limits)} (or leave the flag out for the pipeline's default)")


def early_text_length_error(model, length) -> Optional[str]:
    """:func:`text_length_error` before ``model`` loads, from the ``model_max_length`` of its folder's tokenizers
    (``tokenizer*/tokenizer_config.json``, as transformers reads it), with the same words; None where the folder
    does not say (a model built in code, an uncached hub id): it is asked once the model has loaded."""
    name = index_class_name(model) if length is not None else None
    folder = model_folder(model) if name is not None else None
    if folder is None:
        return None
    limits = [component_config(folder, tokenizer, "tokenizer_config.json").get("model_max_length")
              for tokenizer in _TOKENIZERS]
    return _text_length_message(name, limits, length)


# Pipelines whose check_inputs refuse (raise, not round) a height or width off a fixed multiple: Diffusers writes
# the number out (Wan's VAE 8x by its 2x2 patches is 16; LTX's and Sana's VAEs are 32). Pipelines that round a size
# themselves (FLUX, Chroma, Qwen-Image, FLUX.2) warn and take the size below: they are not here, nor refused.
_FIXED_SIZE_MULTIPLES = {
    **dict.fromkeys(("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanAnimatePipeline",
                     "SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2DiffusionForcingPipeline",
                     "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
                     "CogView4Pipeline", "CogView4ControlPipeline", "EasyAnimatePipeline", "LucyEditPipeline",
                     "TinyMiniMaxH3Pipeline"), 16),
    **dict.fromkeys(("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline", "LTX2Pipeline",
                     "LTX2ImageToVideoPipeline", "SanaPipeline", "SanaSprintPipeline", "SanaVideoPipeline",
                     "SanaImageToVideoPipeline"), 32),
    **dict.fromkeys(("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                     "HunyuanDiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "CogView3PlusPipeline"), 8),
}
# Of those, the pipelines whose check is the VAE's 8 alone while their transformer also patches the latent
# (``patch_size``, 2 in every checkpoint): a size off 8 x patch passed their check, the transformer dropped the odd
# latent row (or refused it) and the first scheduler step failed on the shape, so the multiple is 8 x patch.
_PATCHED_AFTER_VAE = frozenset(("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                                "HunyuanDiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline",
                                "CogView3PlusPipeline"))


def _times_patch(name: str, multiple: int, patch) -> int:
    """``multiple`` times the transformer's spatial ``patch`` for the pipelines of :data:`_PATCHED_AFTER_VAE`."""
    if name in _PATCHED_AFTER_VAE and isinstance(patch, int) and not isinstance(patch, bool) and patch > 1:
        return multiple * patch
    return multiple


def _size_multiple(pipe) -> Optional[int]:
    """The multiple ``pipe`` refuses a height or width off, or None where it rounds or it is not known. Beside the
    fixed ones, SD3 (VAE factor x patch size) and Wan VACE (spatial VAE factor x spatial patch) read their config."""
    name = type(pipe).__name__
    if name in _FIXED_SIZE_MULTIPLES:
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
        return _times_patch(name, _FIXED_SIZE_MULTIPLES[name], patch)
    try:
        if name.startswith("StableDiffusion3"):
            multiple = pipe.vae_scale_factor * pipe.patch_size
        elif name == "WanVACEPipeline":
            multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        else:
            return None
    except (AttributeError, TypeError, IndexError):
        return None
    return multiple if isinstance(multiple, int) and multiple > 1 else None


def _size_message(what: str, multiple: int, sizes) -> Optional[str]:
    off = [(flag, value) for flag, value in sizes if isinstance(value, int) and value % multiple]
    if not off:
        return None
    near = ", ".join(f"{flag} " + " or ".join(str(v) for v in sorted({max(multiple, value // multiple * multiple),
                                                                         (value // multiple + 1) * multiple}))
                     for flag, value in off)
    given = " ".join(f"{flag} {value}" for flag, value in off)
    return (f"{given}: {what} takes only heights and widths that are multiples of {multiple} (its VAE and patches); "
            f"give {near}")


def size_error(pipe, call: dict) -> Optional[str]:
    """Why the pipeline call ``call`` (``height``, ``width``) has a size ``pipe`` refuses, naming --height/--width
    and the nearest sizes it takes; None where it takes them or rounds them itself. The pipeline's own message
    ("`height` and `width` have to be divisible by 16") names no flag."""
    multiple = _size_multiple(pipe)
    if multiple is None:
        return None
    return _size_message(type(pipe).__name__, multiple, (("--height", call.get("height")),
                                                          ("--width", call.get("width"))))


def early_size_error(model, height, width) -> Optional[str]:
    """:func:`size_error` before ``model`` loads (minutes for a real model), where its folder's model_index.json
    names a pipeline with a fixed multiple; None otherwise (the check after loading covers the rest)."""
    if height is None and width is None:
        return None
    name = index_class_name(model)
    multiple = _FIXED_SIZE_MULTIPLES.get(name) if name is not None else None
    if multiple is None:
        return None
    multiple = _times_patch(name, multiple, component_config(model_folder(model), "transformer").get("patch_size"))
    return (_early_reach_error(model_folder(model), height, width)
            or _size_message(name, multiple, (("--height", height), ("--width", width))))


def _early_reach_error(folder: Optional[Path], height, width) -> Optional[str]:
    """:func:`rope_reach_error` for the height and width, read from ``folder``'s transformer and VAE configs (a
    Wan-style ``rope_max_seq_len``, ``patch_size`` and ``scale_factor_spatial``); None where they fit or are not
    there. Checked first, as after loading: a size past the reach and off the multiple was told "give 4096 or
    4112", and 4112 was then refused, after the load, as past the reach."""
    import json

    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8-sig"))
        scale = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8-sig")).get("scale_factor_spatial")
        reach, patch = config.get("rope_max_seq_len"), config.get("patch_size")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if not (isinstance(reach, int) and isinstance(patch, list) and len(patch) == 3
            and all(isinstance(p, int) and p >= 1 for p in patch)):
        return None
    return _reach_message(config.get("_class_name") or "the transformer", reach, patch, scale, None,
                          {"height": height, "width": width})


def component_config(folder: Optional[Path], component: str, file: str = "config.json") -> dict:
    """A pipeline folder's ``component/file`` (``transformer/config.json``, ``tokenizer/tokenizer_config.json``) as
    a dict, read without loading anything; {} where there is none or it is no JSON object."""
    import json

    try:
        config = json.loads((Path(folder) / component / file).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def index_class_name(model) -> Optional[str]:
    """The pipeline class ``model``'s folder (a local or embedded model's, or a cached hub snapshot's) names in its
    model_index.json, read without loading anything; None where there is none."""
    folder = model_folder(model)
    if folder is None:
        return None
    import json

    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8-sig")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name.isidentifier() else None


def index_error(model) -> Optional[str]:
    """The line :func:`load_pipeline` refuses ``model``'s model_index.json with (no JSON object, no pipeline class,
    no transformer), read without loading anything, for ``dit-accel info``; None where it is fine or there is none."""
    folder = model_folder(model)
    try:
        return _check_index(folder, named=False) if folder is not None and (folder / "model_index.json").is_file() \
            else None  # (info reads the transformer alone: an index naming no pipeline class is its to explain)
    except ModelLoadError as err:
        return str(err)


def _place(pipe, device, offload: bool) -> None:
    if offload:
        dev = torch.device(device)
        if dev.type == "cpu":
            return  # offloading to the CPU is where the weights already are
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(device)


def _from_folder(folder: Path, dtype):
    if folder.is_file():  # a single-file checkpoint (.safetensors, .ckpt) or a component's file
        # (model_index.json itself, or a component's weights or config, was called a single-file checkpoint to
        # convert: the pipeline folder is right above it)
        above = next((p for p in folder.resolve().parents[:2] if (p / "model_index.json").is_file()), None)
        if above is not None:
            raise ModelLoadError(f"{folder} is a file of the Diffusers pipeline folder {above}, not the folder: "
                                 f"pass {above}")
        raise ModelLoadError(
            f"{folder} is a file, not a Diffusers pipeline folder (with model_index.json): pass the folder that "
            "`pipe.save_pretrained()` or `huggingface-cli download` produced (a single-file checkpoint: load it with "
            "the pipeline class's from_single_file and save_pretrained it to a folder first)"
        )
    if not (folder / "model_index.json").is_file():
        parent = folder.resolve().parent
        if (parent / "model_index.json").is_file():  # the transformer's (or another component's) own folder
            raise ModelLoadError(f"{folder} is a component of the pipeline folder {parent}, not a pipeline folder "
                                 f"(no model_index.json): pass {parent}")
        alone = component_config(folder, ".").get("_class_name")
        if isinstance(alone, str) and alone:  # (before: "not a pipeline folder", as for any other folder)
            raise ModelLoadError(
                f"{folder} holds a {alone} alone (its config.json and weights), not a Diffusers pipeline (no "
                "model_index.json): pass the pipeline folder or hub id it belongs to; to run these weights in that "
                f"pipeline, load it in Python with {alone}.from_pretrained({str(folder)!r}) as its component and "
                "pass the pipeline to dit_accel.apply")
        inside = _pipelines_in(folder)
        if inside:  # a folder of models (before: "not a pipeline folder", naming none of them)
            many = len(inside) > 1
            raise ModelLoadError(f"{folder} is not a Diffusers pipeline folder (no model_index.json); the pipeline "
                                 f"folder{'s' if many else ''} in it: {', '.join(str(p) for p in inside[:3])}"
                                 f"{', ...' if len(inside) > 3 else ''}: pass {'one of them' if many else 'it'}")
        raise ModelLoadError(
            f"{folder} is not a Diffusers pipeline folder (no model_index.json); pass the folder that "
            "`pipe.save_pretrained()` or `huggingface-cli download` produced"
        )
    _check_index(folder)
    try:
        pipe = _from_pretrained(str(folder), dtype, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:  # (TypeError: a config value of the wrong type, e.g. "4")
        _check_components(folder)  # (what is missing, where Diffusers' message names the wrong folder or file)
        raise ModelLoadError(_load_failure(err, folder)) from err
    _check_weights_fit(pipe, folder)
    return pipe


def _load_failure(err: BaseException, folder: Path) -> str:
    """The line for a pipeline folder Diffusers could not load: the component it was loading (read from its
    ``load_sub_model`` frame) and, where that component's config.json is the cause, the file and the value. Before:
    "'str' object cannot be interpreted as an integer" as a raw TypeError, or, for a config.json holding a JSON
    list, "We couldn't connect to 'https://huggingface.co'", naming neither the component nor the file."""
    import traceback

    name = next((frame.f_locals.get("name") for frame, _ in traceback.walk_tb(err.__traceback__)
                 if frame.f_code.co_name == "load_sub_model"), None)
    if not isinstance(name, str) or not (folder / name).is_dir():
        return f"could not load the pipeline in {folder}: {_first_line(err)}"
    config_file, damaged = folder / name / "config.json", damaged_component(folder, name)
    if damaged is not None:  # (any of its JSON files: an empty tokenizer_config.json was "Expecting value: ...")
        return damaged
    typed = mistyped(component_config(folder, name)) if isinstance(err, TypeError) else []
    hint = (f"; in {config_file}, {', '.join(typed)} (numbers are written without quotes)" if typed else
            f"; check the values in {config_file}" if isinstance(err, TypeError) and config_file.is_file() else "")
    return f"could not load the {name} of the pipeline in {folder}: {_first_line(err)}{hint}"


def _check_weights_fit(pipe, folder: Optional[Path]) -> None:
    """ModelLoadError when a loaded Diffusers model of ``pipe`` (from ``folder``) does not match its weight files: a
    tensor its config.json makes that the weights do not hold (left on the meta device: ``pipe.to`` then failed
    with a raw "Cannot copy out of meta tensor"), or whole layers in the weights that the config makes no place for
    (Diffusers dropped them with a log line, and the pipeline ran a model missing those layers, silently)."""
    from diffusers import ModelMixin

    for name, module in sorted((getattr(pipe, "components", None) or {}).items()):
        if not isinstance(module, torch.nn.Module):
            continue
        where = folder / name if folder is not None else name
        missing = [key for key, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if missing:
            raise ModelLoadError(
                f"{where}: its weights lack {len(missing)} tensor{'s' if len(missing) > 1 else ''} that its "
                f"config.json makes ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the config and "
                f"the weights are of different models (a config edited by hand, or files of two downloads): copy or "
                f"download {where} again")
        extra = _layers_past(module, folder / name) if isinstance(module, ModelMixin) and folder is not None else None
        if extra is not None:
            prefix, have, given = extra
            raise ModelLoadError(
                f"{where}: its weights hold {given} layers of {prefix}, and its config.json makes {have} "
                f"({prefix}.{have} and up would be dropped, and the model would run without them): the config and "
                f"the weights are of different models (a config edited by hand, or files of two downloads): copy or "
                f"download {where} again")


def _layers_past(module: torch.nn.Module, component: Path) -> Optional[tuple]:
    """``(list name, layers the model has, layers the weights hold)`` for a layer list (``blocks``) of ``module``
    whose plain safetensors weights in ``component`` hold more layers than the module; None otherwise."""
    try:
        files = sorted(f for f in component.iterdir() if f.suffix == ".safetensors"
                       and (lambda m: m is not None and m.group(1) is None)(_WEIGHTS.match(f.name)))
    except OSError:
        return None
    if not files:
        return None
    from safetensors import safe_open

    keys = set()
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                keys.update(handle.keys())
    except Exception:  # noqa: BLE001 - a file safetensors cannot read was loaded by Diffusers: not this check's
        return None
    own = set(module.state_dict())
    for key in sorted(keys - own):  # (by the module's lists: a num_layers of 0 or -1 made none, and was not seen)
        match = _LAYER.match(key)
        try:
            layers = module.get_submodule(match.group(1)) if match is not None else None
        except AttributeError:
            continue
        if isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)) and int(match.group(2)) >= len(layers):
            prefix = match.group(1)
            given = {int(m.group(2)) for m in map(_LAYER.match, keys) if m is not None and m.group(1) == prefix}
            return prefix, len(layers), len(given)
    return None


_LAYER = re.compile(r"^((?:[A-Za-z_]\w*\.)*?[A-Za-z_]\w*)\.(\d+)\.")  # "blocks.3.attn1..." -> ("blocks", "3")


def _pipelines_in(folder: Path) -> list:
    """The subfolders of ``folder`` that are Diffusers pipeline folders (hold a model_index.json), sorted."""
    try:
        return sorted(p for p in folder.iterdir() if (p / "model_index.json").is_file())
    except OSError:
        return []


def _check_index(folder: Path, named: bool = True) -> None:
    """ModelLoadError when ``folder``'s model_index.json is no JSON object naming the pipeline class
    (``_class_name``, where ``named``: Diffusers failed on one with a bare KeyError, or for a number "attribute name
    must be string"), or that names no transformer while its pipeline class takes one."""
    import json

    index, problem = json_object(folder / "model_index.json")  # (before, for no JSON: Diffusers' line, not what to do)
    if index is None:  # (read once: a damaged one is {} here; one too large to explain, or unreadable, as it reads)
        index = {} if problem else json.loads((folder / "model_index.json").read_text(encoding="utf-8-sig"))
    name = index.get("_class_name")
    if problem or named and (not isinstance(name, str) or not name):
        found = problem or ("holds no _class_name" if not name
                            else f"holds _class_name {json.dumps(name)} (not the name of a pipeline class)")
        raise ModelLoadError(f"{folder / 'model_index.json'} {found}, not a Diffusers pipeline index (a JSON "
                             "object naming the pipeline class in _class_name and its components): pass the folder "
                             "that `pipe.save_pretrained()` or `huggingface-cli download` produced")
    for part in _component_names(name):  # (before: "too many values to unpack (expected 2)")
        entry = index.get(part)
        if part in index and not (isinstance(entry, list) and len(entry) == 2
                                  and all(e is None or isinstance(e, str) for e in entry)):
            raise ModelLoadError(f"{folder / 'model_index.json'}: {part} is {json.dumps(entry)}; a component is "
                                 "named by [library, class], such as [\"diffusers\", \"WanTransformer3DModel\"] "
                                 "([null, null] for none): write the entry so, or download the folder again")
    if "transformer" in _component_names(name) and not (index.get("transformer") or [None])[-1]:
        entry = json.dumps(index["transformer"]) if "transformer" in index else "no entry"  # (before: a late TypeError
        known = component_config(folder, "transformer").get("_class_name")  # from apply(), naming no file)
        raise ModelLoadError(f"{folder / 'model_index.json'} names no transformer ({entry}), the component dit_accel "
                             f"makes sparse: write \"transformer\": [\"diffusers\", \"{known or 'ClassName'}\"] there "
                             "(the class its transformer/config.json names), or download the folder again")


def _component_names(pipeline_class) -> tuple:
    """The component names the Diffusers pipeline class called ``pipeline_class`` takes; () where it is unknown."""
    import diffusers

    try:
        cls = getattr(diffusers, pipeline_class) if isinstance(pipeline_class, str) else None
        return tuple(cls._get_signature_keys(cls)[0]) if cls is not None else ()
    except Exception:  # noqa: BLE001 - a class this Diffusers lacks, or another signature: Diffusers says so later
        return ()


def _check_components(folder: Path) -> None:
    """ModelLoadError naming the component folders that ``folder``'s model_index.json lists (a ``[library, class]``
    entry) and that are not there: Diffusers said "no file named config.json found in directory <the pipeline
    folder>", which names neither the component nor its folder (a partial download or copy). Then the components
    the pipeline class takes that the index leaves out (where these checks find nothing, Diffusers' line stands)."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return
    missing = [f"{name} ({entry[1]})" for name, entry in index.items()
               if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
               and isinstance(entry[1], str) and entry[0] is not None and not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} lacks the component folder{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)} that its model_index.json names: copy or download the whole "
                             "pipeline folder again")
    for name in sorted(n for n in index if not n.startswith("_") and (folder / n).is_dir()):
        variant = _variant_only(folder / name)
        if variant is not None:
            raise ModelLoadError(
                f"{folder / name} holds only {variant!r}-variant weights (such as *.{variant}.safetensors), and "
                f"dit_accel loads the plain ones: save the pipeline without the variant once (DiffusionPipeline."
                f"from_pretrained(folder, variant={variant!r}).save_pretrained(new_folder)) and pass that folder")
    import diffusers  # (before, for an entry left out: "<class ...> expected [...], but only {...} were passed")

    name = index.get("_class_name")
    optional = getattr(getattr(diffusers, str(name), None), "_optional_components", None) or ()
    absent = [n for n in _component_names(name) if n not in index and n not in optional]
    if absent:
        raise ModelLoadError(f"{folder / 'model_index.json'} names no {', '.join(absent)}, which a {name} takes (an "
                             "index cut short or edited): download the folder again, or add each entry as [library, "
                             "class], the class its folder's config names")


_WEIGHTS = re.compile(r"^(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?(?:\.(\w+))?\.(?:safetensors|bin)$")


def _variant_only(component: Path) -> Optional[str]:
    """The variant (``"fp16"``) of a component folder whose weight files all carry one (a download of a variant's
    files only), else None. Diffusers, asked for the plain weights, said "no file named diffusion_pytorch_model.bin
    found", while the folder plainly holds diffusion_pytorch_model.fp16.safetensors."""
    try:
        names = [f.name for f in component.iterdir()]
    except OSError:
        return None
    variants = {m.group(1) for m in map(_WEIGHTS.match, names) if m is not None}
    return next(iter(variants)) if len(variants) == 1 and None not in variants else None


def _from_hub(model: str, dtype):
    # 1. The cache, without touching the network (fast, and works offline).
    cached = model_folder(model)
    if cached is not None and (cached / "model_index.json").is_file():
        _check_index(cached)  # (an index naming no pipeline class: Diffusers' bare KeyError)
    try:
        pipe = _from_pretrained(model, dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        cache_error = err
    except TypeError as err:  # a config value of the wrong type in the cached snapshot (before: the raw TypeError)
        if cached is None:
            raise
        raise ModelLoadError(f"{model!r} (in the local Hugging Face cache): {_load_failure(err, cached)}") from err
    else:
        _check_weights_fit(pipe, model_folder(model))
        return pipe
    if _offline():
        if cached is not None:  # a snapshot is there: say what is wrong with it, not that it is missing
            what = ("holds no model_index.json (not a Diffusers pipeline: pass a pipeline's hub id or folder)"
                    if not (cached / "model_index.json").is_file() else
                    f"could not be loaded from it ({_first_line(cache_error)}); download it again where there is "
                    "network")
            raise ModelLoadError(f"{model!r} is in the local Hugging Face cache ({cached}) but {what}") from cache_error
        raise ModelLoadError(
            f"{model!r} is neither a folder here nor in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            "downloading; "
            + _hint(model)
        ) from cache_error
    # 2. One short probe before a download, so no connection means one line, not minutes of retries.
    _probe_hub(model)
    try:
        pipe = _from_pretrained(model, dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not download {model!r}: {_first_line(err)}; " + _hint(model)) from err
    _check_weights_fit(pipe, model_folder(model))
    return pipe


def _probe_hub(model: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=_PROBE_TIMEOUT_S)
    except GatedRepoError as err:
        raise ModelLoadError(
            f"{model!r} is gated: accept its license on huggingface.co and run `huggingface-cli login`"
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelLoadError(
            f"{model!r} was not found on the Hugging Face hub (typo? private repo needs `huggingface-cli login`)"
        ) from err
    except Exception as err:  # connection refused, DNS, timeout, proxy: all mean "no hub here"
        raise ModelLoadError(f"cannot reach the Hugging Face hub to fetch {model!r} ({type(err).__name__}); " + _hint(model)) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
