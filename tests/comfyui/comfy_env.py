"""The real ComfyUI for the tests: the shared snapshot, imported read-only on the CPU.

Where: ``$DIT_ACCEL_COMFYUI`` (a ComfyUI checkout), else ``shared/comfyui/ComfyUI`` in the repository's parent
folder or a folder above it (CI lays ``../shared`` beside the clone). Absent: the tests skip, saying so.

How, once per process: ``--cpu`` through ``comfy.options.enable_args_parsing()`` before the first ``comfy``
import (else ComfyUI asks for CUDA); no bytecode written into the snapshot (``sys.dont_write_bytecode``);
and, where torchvision does not load (no CPU wheel of it matches this torch), a stand-in module in
``sys.modules`` for the length of ComfyUI's import only: ``comfy.model_base`` imports it through the Cosmos
model, and the models tested never call it. Test-only: dit_accel itself never imports ComfyUI or torchvision.
ComfyUI's own imports need ``einops``, ``torchsde`` and ``psutil`` (the ``test`` extra).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
ENV = "DIT_ACCEL_COMFYUI"
_MODULES = ("comfy.options", "comfy.model_management", "comfy.supported_models", "comfy.model_patcher",
            "comfy.sample", "comfy.samplers", "comfy.patcher_extension", "comfy.ldm.modules.attention")


def snapshot() -> Optional[Path]:
    """The ComfyUI folder to test against, or None."""
    if os.environ.get(ENV):
        path = Path(os.environ[ENV])
        return path if (path / "comfy").is_dir() else None
    for parent in ROOT.parents:
        path = parent / "shared" / "comfyui" / "ComfyUI"
        if (path / "comfy").is_dir():
            return path
    return None


def missing() -> str:
    """Why :func:`snapshot` found none (the skip reason)."""
    if os.environ.get(ENV):
        return f"${ENV}={os.environ[ENV]} has no comfy/ folder: point it at a ComfyUI checkout"
    return (f"no ComfyUI snapshot: ${ENV} is unset and there is no shared/comfyui/ComfyUI beside or above the "
            f"repository {ROOT} (CI lays it at ../shared/comfyui/ComfyUI)")


def _torchvision_loads() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # absent, or a CUDA build that does not load against this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def _stand_in() -> dict:
    """A torchvision with an empty ``transforms``: enough for ``from torchvision import transforms``."""
    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    tv.transforms = types.ModuleType("torchvision.transforms")
    return {"torchvision": tv, "torchvision.transforms": tv.transforms}


@contextlib.contextmanager
def torchvision_stand_in():
    """The stand-in torchvision in ``sys.modules`` for a later import of ComfyUI's (``comfy.sd``, the merge nodes),
    where torchvision does not load; nothing where it does."""
    stand_in = {} if _torchvision_loads() else _stand_in()
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)


def import_comfy(path: Path) -> types.SimpleNamespace:
    """ComfyUI's modules from ``path``, imported as the note above says (once per process)."""
    if "comfy.sample" in sys.modules:
        return types.SimpleNamespace(**{n.split(".")[-1]: sys.modules[n] for n in _MODULES})
    importlib.import_module("transformers")  # first: it records torchvision as absent, not as the stand-in
    saved_argv = sys.argv
    sys.dont_write_bytecode = True  # kept: ComfyUI imports more of itself later (samplers, model code)
    sys.path.insert(0, str(path))
    sys.argv = [saved_argv[0] if saved_argv else "pytest", "--cpu"]
    try:
        with torchvision_stand_in():
            importlib.import_module("comfy.options").enable_args_parsing()
            modules = {n.split(".")[-1]: importlib.import_module(n) for n in _MODULES}
    finally:
        sys.argv = saved_argv
    return types.SimpleNamespace(**modules)
