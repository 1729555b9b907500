"""Observer that saves the video q, k, v of chosen attention calls for ``dit-accel bench fidelity``.

Files are ``{prefix}layer{L:03d}_step{S:03d}.pt`` dicts ``{"q", "k", "v": (B, H, N, D) tensors,
"grid", "layer", "layer_name", "step"}``, one per (transformer, layer, step): the first call of
a step (the conditional branch under classifier-free guidance). ``prefix`` names the transformer of the
handle: empty for ``pipe.transformer`` (or a bare transformer), so a one-transformer run's names are the
plain ``layer000_step000.pt``; the attribute and a dot for the others, as in their layer names
(``transformer_2.layer000_step000.pt`` for Wan 2.2's second expert, ``unconditional_transformer.`` for
Ideogram 4, ``transformer_ref.`` for MiniMax-H3). ``L`` is the layer index within that transformer, so two
transformers that run in one step keep their own files. Under context
parallelism each Ulysses rank saves the whole sequence of its heads as
``{prefix}layer{L:03d}_step{S:03d}_heads{H0}-{H1}.pt`` (with ``"heads": (H0, H1)``). Everything saved is a
tensor or a plain type, so readers load it with ``torch.load(..., weights_only=True)``.

A folder holds the captures of one run: :func:`check_capture_dir` refuses one that already holds
capture files of any transformer (another run's grid or steps would be mixed in silently).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..atomic_files import atomic_write, is_temp_name

__all__ = ["Capture", "check_capture_dir", "capture_files", "CAPTURE_NAME"]

_PREFIX = r"(?:[A-Za-z_]\w*\.)?"  # a transformer's prefix: "" or a pipeline attribute and a dot

#: A capture file's name, in named groups: ``prefix`` (the transformer: "" for ``pipe.transformer``, else e.g.
#: ``"transformer_2."``), ``layer``, ``step`` and, under context parallelism, the head range ``h0``-``h1`` of one rank.
CAPTURE_NAME = re.compile(rf"^(?P<prefix>{_PREFIX})layer(?P<layer>\d+)_step(?P<step>\d+)"
                          r"(?:_heads(?P<h0>\d+)-(?P<h1>\d+))?\.pt$", re.ASCII)


def capture_files(folder) -> List[Path]:
    """The capture files in ``folder`` (finished ones: not an unfinished atomic write), of every transformer (their
    ``CAPTURE_NAME`` ``prefix`` tells which), sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if CAPTURE_NAME.match(p.name) and not is_temp_name(p) and p.is_file())


def check_capture_dir(capture) -> str:
    """The capture folder, created now: a bad path fails at ``apply``, not in the middle of a generation."""
    if not isinstance(capture, (str, os.PathLike)):
        raise TypeError(f"capture must be a folder path (str or os.PathLike); got {type(capture).__name__}")
    path = os.fspath(capture)
    if not path or "\x00" in str(path):
        raise ValueError(f"capture={path!r} is not a usable folder path (empty, or a NUL character); pass a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"capture={path!r} is a file; pass a folder for the layerLLL_stepSSS.pt captures")
    if os.path.isdir(path):  # a folder of one run: another run's grid or steps would be mixed in silently
        try:
            held = capture_files(path)  # any transformer's: a run of a pipeline writes all of theirs
        except OSError as exc:
            raise ValueError(f"capture={path!r}: cannot list the folder ({exc.strerror or exc}); "
                             "pass a readable, writable folder") from None
        if held:
            shown = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
            raise ValueError(f"capture={path!r} already holds {len(held)} capture file{'s' * (len(held) != 1)} "
                             f"({shown}); pass an empty folder or remove them")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"capture={path!r}: cannot create the folder ({exc.strerror or exc}); "
                         "pass a writable folder") from None
    return path


class Capture:
    """Saves the first call per (layer, step) of ``layers`` x ``steps`` (None: all) under ``folder``, as the files
    of the transformer ``prefix`` (see the module docstring).

    ``apply`` hands each transformer of a handle its own :meth:`for_transformer` view: its layer indices restart
    at 0, so one observer keyed by (layer, step) would keep only the first transformer's call of a shared step.
    """

    def __init__(self, folder: str, layers: Optional[Sequence[int]] = None, steps: Optional[Sequence[int]] = None,
                 prefix: str = ""):
        if not isinstance(prefix, str) or not re.fullmatch(_PREFIX, prefix, re.ASCII):
            raise ValueError(f"prefix={prefix!r}: pass '' (pipe.transformer) or a pipeline attribute and a dot, "
                             "such as 'transformer_2.'")
        self.folder = folder
        self.layers = None if layers is None else frozenset(layers)
        self.steps = None if steps is None else frozenset(steps)
        self.prefix = prefix
        self._done = set()
        self._lock = threading.Lock()

    def for_transformer(self, prefix: str) -> "Capture":
        """The observer of the transformer wrapped under ``prefix``: this folder, layers and steps, its own files."""
        return self if prefix == self.prefix else Capture(self.folder, self.layers, self.steps, prefix)

    def wants(self, layer: int, step: int) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        if self.steps is not None and step not in self.steps:
            return False
        return (layer, step) not in self._done

    def skip(self, layer: int, step: int) -> None:
        """Record ``(layer, step)`` as saved without writing it: a ring rank whose call the first ring rank of its
        head group saves (every rank's :meth:`wants` must answer alike: a capture gathers q across the ring)."""
        with self._lock:
            self._done.add((layer, step))

    def save(self, layer: int, name: str, grid, step: int, q, k, v, heads=None) -> None:
        with self._lock:
            if (layer, step) in self._done:
                return
            self._done.add((layer, step))
        # clone(): a slice would otherwise save the whole joint sequence's storage.
        data = {key: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                for key, t in (("q", q), ("k", k), ("v", v))}
        # Plain ints and str only (no numpy or tensor scalars): readers load with weights_only=True.
        data.update(grid=tuple(int(g) for g in grid), layer=int(layer), layer_name=str(name), step=int(step))
        tag = "" if heads is None else f"_heads{int(heads[0])}-{int(heads[1])}"
        if heads is not None:
            data["heads"] = (int(heads[0]), int(heads[1]))
        atomic_write(os.path.join(self.folder, f"{self.prefix}layer{layer:03d}_step{step:03d}{tag}.pt"),
                     lambda tmp: torch.save(data, tmp))
