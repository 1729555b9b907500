"""Checks of the inputs several commands share, made before anything expensive (a model load, a kernel
compile): the device, the seeds, numbers that must be finite. Each returns or raises a one-line message that
names the flag, what is allowed and what to do; the commands print it their own way."""

from __future__ import annotations

import math
from typing import Optional

from .._util import device_error, file_in_the_way, seed_error  # noqa: F401  (the commands import them from here)

__all__ = ["device_error", "seed_error", "finite_error", "folder_error", "file_error", "model_family"]


def finite_error(value, flag: str, *, minimum: Optional[float] = None) -> Optional[str]:
    """Why the number ``value`` of ``flag`` cannot be used (None when it can): NaN and infinity are refused
    (a comparison with NaN is always false, so a NaN would silently switch a setting off)."""
    if value is None:
        return None
    if not math.isfinite(value):
        return f"{flag} must be a finite number; got {value}"
    if minimum is not None and value < minimum:
        return f"{flag} must be >= {minimum:g}; got {value:g}"
    return None


def folder_error(path, flag: str) -> Optional[str]:
    """Why the output folder ``path`` of ``flag`` cannot be written (None when it can): an empty path, a file
    where the folder (or one above it) should be. Nothing is created: a refused command leaves no folder behind."""
    from pathlib import Path

    if not str(path).strip():
        return f"{flag} is empty: give a folder path"
    file = file_in_the_way(path)
    if file is not None:
        what = "is a file" if file == Path(path) else f"lies under {file}, which is a file"
        return f"{flag} {path} {what}; pass a folder path"
    return None


def file_error(path, flag: str, example: str) -> Optional[str]:
    """Why the output file ``path`` of ``flag`` cannot be written (None when it can): an empty path, an existing
    folder, or a file where a folder above it should be; checked before a run whose result would go there."""
    from pathlib import Path

    if not str(path).strip():
        return f"{flag} is empty: give a file path, e.g. {example}"
    if Path(path).is_dir():
        return f"{flag} {path} is a folder; give a file path, e.g. {Path(path) / example}"
    file = file_in_the_way(Path(path).parent)
    if file is not None:
        return f"{flag} {path} lies under {file}, which is a file; choose another path"
    return None


def model_family(model: str):
    """``(transformer class name, family)`` of a ``--model`` value, before it loads: as
    :func:`~dit_accel.pipelines.presets.resolve_model_family`, but a hub id whose snapshot is in the local cache is
    read from the snapshot's model_index.json, as a folder is. By its name alone, a hub id that names no family
    (an ERNIE-Image, PixArt or any renamed model: most classes have no hub word) was refused by ``info`` with the
    list of every class, and ``finetune`` sized an image model's samples as a video's (81 frames, then a late
    ``--frames 81 is invalid`` the user never gave). ValueError (one line) when it cannot be told."""
    from ..models.loading import ModelLoadError, model_folder, resolve_model_kind
    from ..pipelines.presets import PRESETS, resolve_model_family

    try:
        hub = resolve_model_kind(model) == "hub"
    except (ValueError, ModelLoadError):
        hub = False
    snapshot = model_folder(model) if hub else None
    if snapshot is not None and (snapshot / "model_index.json").is_file():
        return resolve_model_family(str(snapshot))
    try:
        return resolve_model_family(model)
    except ValueError:
        if not hub:
            raise
    raise ValueError(f"the hub id {model!r} names no model family dit_accel knows, and no snapshot of it is in the "
                     "local Hugging Face cache to read its transformer from: download it (`huggingface-cli download "
                     f"{model}`) or pass its transformer class instead ({len(PRESETS)} are supported; `dit-accel "
                     "info` lists them)") from None
