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

__all__ = ["FID_ENV", "REAL_SUFFIXES", "FidReference", "FrameFolder", "create_fid_feature", "fid_inputs_error",
           "frechet_distance", "TorchScriptInception"]

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


class FrameFolder:
    """The images of ``folder`` (.png/.jpg/.jpeg/.webp, subfolders included, in sorted order) resized to ``size``
    (height, width), read a batch at a time: a reference set of 50k frames is never held in memory at once (as
    float32 frames at 480x832 it would take about 240 GB)."""

    def __init__(self, folder: str, size):
        self.folder, self.files = folder, sorted(_real_images(folder))
        if not self.files:
            raise ValueError(f"--real {folder}: no .png/.jpg/.jpeg/.webp images found")
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, size: int) -> Iterable[torch.Tensor]:
        """``[n, 3, H, W]`` frames in ``[0, 1]``, ``size`` images at a time."""
        import numpy as np
        from PIL import Image

        h, w = self.size
        for i in range(0, len(self.files), size):
            images = [np.asarray(_rgb8(Image.open(path)).resize((w, h), Image.BICUBIC))
                      for path in self.files[i:i + size]]
            yield to_frames(np.stack(images))


def _rgb8(image):
    """``image`` as 8-bit RGB. A 16-bit grey PNG (mode I;16, or I) is scaled from 0-65535: PIL's own conversion
    clips it at 255, so every pixel above 255 of 65535 read as white and FID vs --real compared white frames."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image, dtype=np.float64) / 65535.0 * 255.0
        image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))  # (2-D uint8: mode L)
    return image.convert("RGB")


class FidReference:
    """The reference side of FID, its features computed once and compared with any number of sets.

    ``reference``: frames or videos as :func:`frechet_distance` takes them, or a :class:`FrameFolder` (read a
    batch at a time). torchmetrics keeps the reference's feature sums across :meth:`distance` calls
    (``reset_real_features=False``), so eval scores each row against ``--real`` and the dense row without
    running the reference through the network again. ``feature`` as in :func:`frechet_distance`."""

    @torch.no_grad()
    def __init__(self, reference, feature, *, device="cpu", batch_size: int = 32):
        from torchmetrics.image.fid import FrechetInceptionDistance

        from .._util import is_int

        if not (is_int(batch_size) and batch_size >= 1):  # (0: range()'s error; < 0: "more than one sample is required")
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1 (images per forward pass)")
        self.device, self.batch_size = device, batch_size
        if isinstance(reference, FrameFolder):
            self.count, batches = len(reference), reference.batches(batch_size)
            shape = (3, *reference.size)
        else:
            frames = _stack(reference)
            self.count, batches, shape = frames.shape[0], _batches(frames, batch_size), tuple(frames.shape[1:])
        if isinstance(feature, str) and feature.startswith("torchmetrics:"):
            metric = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                              feature_extractor_weights_path=feature.split(":", 1)[1])
        else:
            metric = FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False,
                                              input_img_size=shape)
        self.metric = metric.to(device)
        if self.count >= 2:  # (fewer: refused by distance(), naming both counts)
            for chunk in batches:
                self.metric.update(chunk.to(device), real=True)

    @torch.no_grad()
    def distance(self, frames) -> float:
        """FID of ``frames`` (``set_a`` of :func:`frechet_distance`) against the reference."""
        a = _stack(frames)
        if a.shape[0] < 2 or self.count < 2:
            raise ValueError(f"FID needs at least 2 images per set; got {a.shape[0]} and {self.count}")
        self.metric.reset()  # the generated side only
        for chunk in _batches(a, self.batch_size):
            self.metric.update(chunk.to(self.device), real=False)
        return max(float(self.metric.compute()), 0.0)  # tiny negative values are round-off


def frechet_distance(set_a, set_b, feature, *, device="cpu", batch_size: int = 32) -> float:
    """FID between two frame sets (``[N, 3, H, W]`` in [0, 1], grey ``[N, 1, H, W]`` read as RGB, or lists of
    videos).

    ``set_b`` is the reference ("real") set, also a :class:`FrameFolder`. ``feature`` is an ``nn.Module``
    (features ``[N, C]`` from ``[0, 1]`` images) or a value returned by
    :func:`create_fid_feature`. Each set needs at least 2 images; with fewer
    images than feature dimensions the covariance is rank deficient and the
    number is only comparable between runs of the same size. To compare many sets with one reference, keep a
    :class:`FidReference`.
    """
    return FidReference(set_b, feature, device=device, batch_size=batch_size).distance(set_a)


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
