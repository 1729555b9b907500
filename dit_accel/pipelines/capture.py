"""Observer that saves the video q, k, v of chosen attention calls for ``dit-accel bench fidelity``.

Files are ``layer{L:03d}_step{S:03d}.pt`` dicts ``{"q", "k", "v": (B, H, N, D) tensors,
"grid", "layer", "layer_name", "step"}``, one per (layer, step): the first call of
a step (the conditional branch under classifier-free guidance). Under context
parallelism each Ulysses rank saves the whole sequence of its heads as
``layer{L:03d}_step{S:03d}_heads{H0}-{H1}.pt`` (with ``"heads": (H0, H1)``).
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import torch

from ..atomic_files import atomic_write

__all__ = ["Capture", "check_capture_dir"]


def check_capture_dir(capture) -> str:
    """The capture folder, created now: a bad path fails at ``apply``, not in the middle of a generation."""
    if not isinstance(capture, (str, os.PathLike)):
        raise TypeError(f"capture must be a folder path (str or os.PathLike); got {type(capture).__name__}")
    path = os.fspath(capture)
    if not path or "\x00" in str(path):
        raise ValueError(f"capture={path!r} is not a usable folder path (empty, or a NUL character); pass a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"capture={path!r} is a file; pass a folder for the layerLLL_stepSSS.pt captures")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"capture={path!r}: cannot create the folder ({exc.strerror or exc}); "
                         "pass a writable folder") from None
    return path


class Capture:
    """Saves the first call per (layer, step) of ``layers`` x ``steps`` (None: all) under ``folder``."""

    def __init__(self, folder: str, layers: Optional[Sequence[int]] = None, steps: Optional[Sequence[int]] = None):
        self.folder = folder
        self.layers = None if layers is None else frozenset(layers)
        self.steps = None if steps is None else frozenset(steps)
        self._done = set()
        self._lock = threading.Lock()

    def wants(self, layer: int, step: int) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        if self.steps is not None and step not in self.steps:
            return False
        return (layer, step) not in self._done

    def save(self, layer: int, name: str, grid, step: int, q, k, v, heads=None) -> None:
        with self._lock:
            if (layer, step) in self._done:
                return
            self._done.add((layer, step))
        # clone(): a slice would otherwise save the whole joint sequence's storage.
        data = {key: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                for key, t in (("q", q), ("k", k), ("v", v))}
        data.update(grid=tuple(grid), layer=layer, layer_name=name, step=step)
        tag = "" if heads is None else f"_heads{heads[0]}-{heads[1]}"
        if heads is not None:
            data["heads"] = tuple(heads)
        atomic_write(os.path.join(self.folder, f"layer{layer:03d}_step{step:03d}{tag}.pt"),
                     lambda tmp: torch.save(data, tmp))
