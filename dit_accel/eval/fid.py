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
print and FID is skipped.
"""

from __future__ import annotations

import importlib
import os
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from .metrics import to_frames

__all__ = ["FID_ENV", "create_fid_feature", "frechet_distance", "TorchScriptInception"]

FID_ENV = "DIT_ACCEL_FID_WEIGHTS"
_HOW = (f"pass --fid-weights PATH or set {FID_ENV} to a TorchScript Inception file "
        "(inception-2015-12-05.pt) or a 'module:factory' returning an nn.Module")


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
    if ":" in spec and not os.path.exists(spec):
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
    """FID between two frame sets (``[N, 3, H, W]`` in [0, 1], or lists of videos).

    ``set_b`` is the reference ("real") set. ``feature`` is an ``nn.Module``
    (features ``[N, C]`` from ``[0, 1]`` images) or a value returned by
    :func:`create_fid_feature`. Each set needs at least 2 images; with fewer
    images than feature dimensions the covariance is rank deficient and the
    number is only comparable between runs of the same size.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

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
        return torch.cat([to_frames(f) for f in frames])
    return to_frames(frames)
