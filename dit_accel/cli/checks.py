"""Checks of the inputs several commands share, made before anything expensive (a model load, a kernel
compile): the device, the seeds, numbers that must be finite. Each returns or raises a one-line message that
names the flag, what is allowed and what to do; the commands print it their own way."""

from __future__ import annotations

import math
from typing import Optional

from .._util import device_error, file_error, file_in_the_way, seed_error  # noqa: F401  (the commands import them from here)

__all__ = ["device_error", "seed_error", "finite_error", "folder_error", "file_error"]


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
