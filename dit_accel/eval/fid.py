"""FID between frame sets with a pluggable feature extractor.

The distance is torchmetrics' :class:`FrechetInceptionDistance` fed by any
``nn.Module`` mapping float images ``[N, 3, H, W]`` in ``[0, 1]`` to features
``[N, C]``. Where the Inception weights come from (no network needed):

- ``feature=<nn.Module>``: anything you like (tests use a tiny random conv net);
- ``--fid-weights PATH`` / env ``DIT_ACCEL_FID_WEIGHTS``:
  a TorchScript Inception file (``inception-2015-12-05.pt`` as used by
  StyleGAN/clean-fid: takes ``[0, 255]`` images, resizes internally, returns
  2048-d pool features with ``return_features=True``), or a torch-fidelity
  ``pt_inception-2015-12-05`` state dict when ``torch-fidelity`` is installed
  (then torchmetrics builds its own Inception around it);
- ``PATH`` may also be ``package.module:factory``: a callable returning the module.

Without any of these, :func:`create_fid_feature` returns a one-line reason to
print and FID is skipped. :func:`fid_inputs_error` checks ``--fid-weights`` and
``--real`` before anything is loaded: a path that is not there is the user's
typo, refused at once rather than skipped after the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from .metrics import as_rgb, to_frames

__all__ = ["FID_ENV", "REAL_SUFFIXES", "create_fid_feature", "fid_inputs_error", "frechet_distance",
           "TorchScriptInception"]

FID_ENV = "DIT_ACCEL_FID_WEIGHTS"
REAL_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_WHAT = "a TorchScript Inception file (inception-2015-12-05.pt) or a 'module:factory' returning an nn.Module"
_HOW = f"pass --fid-weights PATH or set {FID_ENV} to {_WHAT}"
_REAL_HOW = "pass a folder of .png/.jpg/.jpeg/.webp images"
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _factory(spec: str) -> bool:
    """``package.module:factory`` (not a path that happens to hold a colon)."""
    return _FACTORY.fullmatch(spec) is not None and not os.path.exists(spec)


def _weights_error(spec: str, name: str, how: str) -> Optional[str]:
    if not spec.strip():
        return f"{name} is empty; {how}"
    if _factory(spec):
        module = spec.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except Exception:  # a parent package that is not there, or fails on import
            found = False
        return None if found else f"{name} {spec}: no module {module!r} to import; {how}"
    if not os.path.exists(spec):
        return f"{name} {spec}: no such file; {how}"
    if os.path.isdir(spec):
        return f"{name} {spec}: is a folder; {how}"
    return None


def _real_images(folder: str):
    for root, _, names in os.walk(folder):
        for name in names:
            if name.lower().endswith(REAL_SUFFIXES):
                yield os.path.join(root, name)


def fid_inputs_error(fid_weights: Optional[str], real_dir: Optional[str], *, weights: bool = True) -> Optional[str]:
    """The one-line refusal of a ``--fid-weights`` (or ``$DIT_ACCEL_FID_WEIGHTS``) or ``--real`` that cannot be
    what the user meant (no such file or folder, a folder without images, an empty value), or None.

    Cheap: nothing is loaded or imported (a ``module:factory``'s module is only looked up; of ``real_dir``'s
    images only the headers are read, so a file that is not an image is refused too), so callers run it before
    the model. What can only fail later (a file that is not an Inception network, a missing optional
    dependency) stays a skip line. ``weights=False``: only ``real_dir`` (the caller brings its own extractor).
    """
    if not weights:
        problem = None
    elif fid_weights is not None:
        problem = _weights_error(fid_weights, "--fid-weights", f"pass {_WHAT}")
    elif os.environ.get(FID_ENV):
        problem = _weights_error(os.environ[FID_ENV], FID_ENV, f"set it to {_WHAT}, or unset it")
    else:
        problem = None
    if problem or real_dir is None:
        return problem
    if not real_dir.strip():
        return f"--real is empty; {_REAL_HOW}"
    if not os.path.exists(real_dir):
        return f"--real {real_dir}: no such folder; {_REAL_HOW}"
    if not os.path.isdir(real_dir):
        return f"--real {real_dir}: is a file, not a folder; {_REAL_HOW}"
    if next(_real_images(real_dir), None) is None:
        return f"--real {real_dir}: no .png/.jpg/.jpeg/.webp images in it (subfolders included); {_REAL_HOW}"
    return _unreadable_image(real_dir)


def _unreadable_image(folder: str) -> Optional[str]:
    """The refusal naming the first image of ``folder`` whose header PIL cannot read (an empty or non-image file
    with an image's suffix), or None. Else it surfaced only after every row had run, as 'FID vs --real skipped'."""
    from PIL import Image

    for path in sorted(_real_images(folder)):
        try:
            with Image.open(path):  # (the header is parsed on open; the pixels are not read)
                pass
        except Exception as err:  # UnidentifiedImageError (an OSError), a decompression bomb, ...
            return (f"--real {folder}: {path} is not a readable image ({type(err).__name__}); remove it or replace "
                    "it with the image it should be")
    return None


class TorchScriptInception(nn.Module):
    """Wraps a TorchScript Inception detector: ``[0, 1]`` images in, pool features out."""

    def __init__(self, scripted: torch.nn.Module):
        super().__init__()
        self.net = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * 255.0
        try:
            feats = self.net(x, return_features=True)
        except (RuntimeError, TypeError):  # a detector without that keyword
            feats = self.net(x)
        return feats.reshape(feats.shape[0], -1)


def create_fid_feature(spec: Optional[str] = None, device="cpu") -> Tuple[Optional[object], Optional[str]]:
    """Resolve the FID feature extractor from ``spec`` or ``$DIT_ACCEL_FID_WEIGHTS``.

    Returns ``(feature, None)`` where ``feature`` is an ``nn.Module`` or the
    string ``"torchmetrics:<path>"`` (torch-fidelity state dict), or
    ``(None, skip_line)`` when nothing usable is configured.
    """
    spec = spec or os.environ.get(FID_ENV)
    if not spec:
        return None, f"FID skipped: no Inception weights configured; {_HOW}"
    if _factory(spec):
        mod_name, _, attr = spec.partition(":")
        try:
            module = getattr(importlib.import_module(mod_name), attr)()
        except Exception as exc:
            return None, f"FID skipped: could not build feature extractor {spec!r} ({type(exc).__name__}: {exc})"
        if not isinstance(module, nn.Module):
            return None, f"FID skipped: {spec!r} returned {type(module).__name__}, expected an nn.Module"
        return module.eval().to(device), None
    if not os.path.isfile(spec):
        return None, f"FID skipped: weights file {spec!r} does not exist; {_HOW}"
    try:
        scripted = torch.jit.load(spec, map_location=device)
        return TorchScriptInception(scripted).eval(), None
    except Exception:
        pass  # not TorchScript: maybe a torch-fidelity state dict
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, (f"FID skipped: {spec!r} is not a TorchScript module and torch-fidelity is not installed "
                      "to read a state dict; use a TorchScript Inception (inception-2015-12-05.pt)")
    return f"torchmetrics:{spec}", None


def _batches(frames: torch.Tensor, size: int) -> Iterable[torch.Tensor]:
    for i in range(0, frames.shape[0], size):
        yield frames[i:i + size]


@torch.no_grad()
def frechet_distance(set_a, set_b, feature, *, device="cpu", batch_size: int = 32) -> float:
    """FID between two frame sets (``[N, 3, H, W]`` in [0, 1], grey ``[N, 1, H, W]`` read as RGB, or lists of
    videos).

    ``set_b`` is the reference ("real") set. ``feature`` is an ``nn.Module``
    (features ``[N, C]`` from ``[0, 1]`` images) or a value returned by
    :func:`create_fid_feature`. Each set needs at least 2 images; with fewer
    images than feature dimensions the covariance is rank deficient and the
    number is only comparable between runs of the same size.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .._util import is_int

    if not (is_int(batch_size) and batch_size >= 1):  # (0: range()'s error; < 0: "more than one sample is required")
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1 (images per forward pass)")
    a, b = _stack(set_a), _stack(set_b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {a.shape[0]} and {b.shape[0]}")
    if isinstance(feature, str) and feature.startswith("torchmetrics:"):
        metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                          feature_extractor_weights_path=feature.split(":", 1)[1])
    else:
        metric = FrechetInceptionDistance(feature=feature, normalize=True,
                                          input_img_size=tuple(a.shape[1:]))
    metric = metric.to(device)
    for chunk in _batches(b, batch_size):
        metric.update(chunk.to(device), real=True)
    for chunk in _batches(a, batch_size):
        metric.update(chunk.to(device), real=False)
    return max(float(metric.compute()), 0.0)  # tiny negative values are round-off


def _stack(frames) -> torch.Tensor:
    if isinstance(frames, (list, tuple)):
        videos = [as_rgb(to_frames(f)) for f in frames]
        if not videos:
            raise ValueError("FID needs at least 2 images per set; got an empty list of videos")
        sizes = [tuple(v.shape[1:]) for v in videos]
        other = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
        if other is not None:  # (torch.cat's "Sizes of tensors must match" named no video)
            raise ValueError(f"FID takes frames of one size per set: video 0 has {sizes[0][1]}x{sizes[0][2]} frames "
                             f"({sizes[0][0]} channels), video {other} {sizes[other][1]}x{sizes[other][2]} "
                             f"({sizes[other][0]} channels); resize them to one size first")
        return torch.cat(videos)
    return as_rgb(to_frames(frames))
