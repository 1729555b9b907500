"""Paired fidelity metrics of a method's frames against the dense frames.

Frames everywhere in :mod:`dit_accel.eval` are float tensors ``[F, 3, H, W]``
in ``[0, 1]`` (see :func:`to_frames` for conversions from ``uint8`` arrays).

PSNR is capped at :data:`PSNR_CAP` dB: identical frames have an infinite PSNR,
which would poison means and JSON, so every per-frame value is clamped to the
cap (an MSE floor of ``1e-10`` at ``data_range=1``).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["PSNR_CAP", "to_frames", "as_rgb", "psnr_per_frame", "ssim_per_frame", "paired_metrics", "LPIPSScorer"]

PSNR_CAP = 100.0  # dB, = -10 log10(1e-10): what identical frames report
_RANGE_SLACK = 1e-2  # float frames may overshoot [0, 1] by rounding, not by a different convention
_SSIM_FRAMES = 8  # frames per SSIM call


_LAYOUTS = {"FHWC": True, "HWC": True, "FCHW": False, "CHW": False}  # layout -> channels last


def to_frames(video, *, layout: Optional[str] = None) -> torch.Tensor:
    """Video ``[F, H, W, 3]`` (uint8, or float in [0, 1]) or ``[F, 3, H, W]`` -> float ``[F, 3, H, W]`` in [0, 1].

    A 3-D input is one image (``[H, W, 3]`` or ``[3, H, W]``); grey frames have 1 channel. A list holds one frame
    per item (PIL images, read as :func:`dit_accel.videos.load_video` reads them; arrays; grey ``[H, W]`` ones).
    The channel axis is the one of 3 (or 1) channels; ``layout`` (``"FHWC"`` or ``"FCHW"``; ``"HWC"``/``"CHW"`` for
    an image) says which where both the second and the last axis could be it (frames 1 or 3 pixels high or wide).
    Without it such a shape is read as ``[F, 3, H, W]`` when ``video`` is a torch tensor (the layout this returns),
    and refused as an array (whose readers, imageio and Diffusers, give ``[F, H, W, 3]``; it was read as
    ``[F, 3, H, W]``)."""
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: pass 'FHWC' or 'FCHW' ('HWC' or 'CHW' for one image), or "
                         "None to read it from the shape")
    tensor = isinstance(video, torch.Tensor)
    _check_kind(video)
    # a list of frames (images, arrays, tensors: one per frame), not nested lists of numbers
    listed = isinstance(video, (list, tuple)) and len(video) > 0 and all(
        _is_pil(frame) or isinstance(frame, (np.ndarray, torch.Tensor)) for frame in video)
    if listed and all(_is_pil(frame) for frame in video):  # (as save_video reads them: alpha dropped, 16-bit scaled)
        from ..videos import pil_rgb

        video = [pil_rgb(frame) for frame in video]
        _check_frame_shapes(video)
        video, layout = np.stack(video), layout or "FHWC"
    elif listed:
        _check_frame_shapes(video)
    x = torch.as_tensor(np.asarray(video) if not tensor else video)
    shape, image = tuple(x.shape), x.dim() == 3 and not listed
    if image:  # a single image
        x = x[None]
    elif x.dim() == 3:  # a list of grey frames [H, W] (before: three of them were read as one RGB image)
        x, layout = x[:, None], layout or "FCHW"
    if x.dim() != 4:
        batch = " (a batch of videos, such as a pipeline's .frames: pass one of them, video[0])" if x.dim() == 5 else ""
        raise ValueError(f"video must be [F, H, W, 3] or [F, 3, H, W]; got shape {tuple(x.shape)}{batch}")
    first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
    if layout is None and first and last and not tensor and x.shape[1:] != (1, 1, 1):
        form = "[H, W, C] or [C, H, W]" if image else "[F, H, W, C] or [F, C, H, W]"
        ask = "'HWC' or 'CHW'" if image else "'FHWC' or 'FCHW'"
        raise ValueError(f"video of shape {shape} reads both as "
                         f"{form} (its frames are 1 or 3 pixels high or wide): pass layout={ask} to to_frames to "
                         "say which, and score the tensor it returns")
    if (_LAYOUTS[layout] if layout is not None else last and not first):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):  # RGBA [F, H, W, 4] was read as H channels of W x 4 images: SSIM silently wrong
        # (the cut for where the 4 is: video[..., :3], advised for a [F, 4, H, W] video, cut its width to 3, and
        # the result was then read as [F, H, W, 3]: scored transposed, without a word)
        first4 = x.shape[1] == 4 and x.shape[-1] != 4
        cut = (("video[:3]" if image else "video[:, :3]") + " (video[..., :3] is for frames with the colours last)"
               if first4 else "video[..., :3]")
        hint = [f"drop an alpha channel with {cut}"] if not image or 4 in shape else []
        hint += ["grey frames [F, H, W] need their channel axis: video[..., None]"] if image else []
        hint = "; ".join(hint)
        hint = hint[:1].upper() + hint[1:]
        raise ValueError(f"video must be [F, H, W, 3] or [F, 3, H, W] (RGB); got shape {shape}, which has no axis of 3 "
                         f"(or 1) colour channels. {hint}")
    if 0 in x.shape:  # (else every mean over it was NaN, dropped from the row's means without a word)
        raise ValueError(f"video of shape {tuple(x.shape)} [F, C, H, W] has no pixels to score: it needs at least "
                         "one frame of at least 1x1; check the generation that made it")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise TypeError(f"video must be uint8 (0-255) or float in [0, 1]; got {x.dtype}")
    elif x.numel():
        # Clamping a [0, 255] or [-1, 1] float video would silently wreck every metric.
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise ValueError(f"video holds NaN or inf values in {bad} of its {x.shape[0]} frames: no metric of them "
                             "means anything; check the generation that made them (its dtype, a diverged run)")
        if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
            raise ValueError(f"float video values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g}. "
                             "Divide 0-255 frames by 255 (or pass uint8), map [-1, 1] frames with (x + 1) / 2")
    return x.float().clamp(0.0, 1.0).contiguous()


def _check_kind(video) -> None:
    """A video given as an array, a tensor or a list of frames; else a TypeError saying what to pass (before: numpy's
    "can't convert np.ndarray of type numpy.str_" for a video file's path, or numpy.object_ for None)."""
    if isinstance(video, (str, os.PathLike)):
        raise TypeError(f"video={os.fspath(video)!r} is a path: the metrics score frames, not files; read it first "
                        "with dit_accel.videos.load_video(path) and pass the array it returns")
    if not isinstance(video, (np.ndarray, torch.Tensor, list, tuple)) and not _is_pil(video):
        raise TypeError(f"video must be frames: an array or tensor [F, H, W, 3] or [F, 3, H, W], or a list of frames "
                        f"(images or arrays); got {type(video).__name__}")


def _check_frame_shapes(frames) -> None:
    """The frames of a list all of one shape (before: numpy's "inhomogeneous shape after 1 dimensions")."""
    shapes = [tuple(np.shape(frame)) for frame in frames]
    other = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
    if other is not None:
        raise ValueError(f"video's frames differ in shape: frame 0 is {shapes[0]}, frame {other} is {shapes[other]}; "
                         "every frame of a video must have one size and layout (resize or crop them to one, as the "
                         "generation made them)")


def _is_pil(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def as_rgb(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``[F, C, H, W]`` of :func:`to_frames` with grey ones (one channel) as RGB, as FID's and LPIPS's
    references read a grey image: their networks take 3 channels (a grey video failed in their first convolution)."""
    return frames.expand(-1, 3, -1, -1) if frames.shape[1] == 1 else frames


def _check_pair(pred: torch.Tensor, ref: torch.Tensor) -> None:
    if pred.shape != ref.shape and pred.shape[::2] + pred.shape[3:] == ref.shape[::2] + ref.shape[3:]:
        # (before: told to generate both with the same sizes, which they had)
        raise ValueError(f"frame shapes differ in their colour channels only: method {tuple(pred.shape)} vs dense "
                         f"{tuple(ref.shape)} [F, C, H, W]; one video is grey and the other RGB: score both as RGB, "
                         "each as as_rgb(to_frames(video))")
    if pred.shape != ref.shape:
        raise ValueError(f"frame shapes differ: method {tuple(pred.shape)} vs dense {tuple(ref.shape)}; "
                         "generate both with the same --frames/--height/--width")


def psnr_per_frame(pred, ref) -> torch.Tensor:
    """PSNR in dB per frame (``data_range=1``), capped at :data:`PSNR_CAP`. Returns ``[F]``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, ref = to_frames(pred), to_frames(ref)
    _check_pair(pred, ref)
    values = peak_signal_noise_ratio(pred, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.nan_to_num(values, posinf=PSNR_CAP).clamp(max=PSNR_CAP)


def ssim_per_frame(pred, ref) -> torch.Tensor:
    """SSIM per frame (Gaussian window 11, shrunk to fit tiny frames). Returns ``[F]``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, ref = to_frames(pred), to_frames(ref)
    _check_pair(pred, ref)
    side = min(pred.shape[-2:])
    # Odd and fitting the frame (a 1-pixel side takes a 1-pixel window: the reflection padding of 3 needs 2).
    kernel = 11 if side >= 11 else 1 if side < 2 else max(3, side - (1 - side % 2))
    # In float64: the variances are E[x^2] - E[x]^2, which float32 cancels to noise against C2 = 9e-4 on flat
    # regions (identical grey frames scored 0.9996, not 1). A few frames at a time bounds the memory of the doubles.
    values = [structural_similarity_index_measure(p.double(), r.double(), data_range=1.0, reduction="none",
                                                  kernel_size=kernel, sigma=1.5 * kernel / 11)
              for p, r in zip(pred.split(_SSIM_FRAMES), ref.split(_SSIM_FRAMES)) if len(p)]
    return torch.cat(values).float() if values else torch.empty(0)


def paired_metrics(pred, ref, lpips: Optional["LPIPSScorer"] = None) -> Dict[str, object]:
    """PSNR/SSIM (and LPIPS when a scorer is given) per frame and their means."""
    psnr = psnr_per_frame(pred, ref)
    ssim = ssim_per_frame(pred, ref)
    out: Dict[str, object] = {
        "psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
        "psnr_per_frame": [round(float(v), 4) for v in psnr],
        "ssim_per_frame": [round(float(v), 6) for v in ssim],
    }
    if lpips is not None:
        values = lpips(pred, ref)
        out["lpips"] = float(values.mean())
        out["lpips_per_frame"] = [round(float(v), 6) for v in values]
    return out


class LPIPSScorer:
    """LPIPS through torchmetrics, when torchvision and the backbone weights are present.

    Use :meth:`create`, which returns ``(scorer, None)`` or ``(None, skip_line)``.
    """

    def __init__(self, metric):
        self.metric = metric

    @classmethod
    def create(cls, net: str = "alex", device="cpu", frame_size=None):
        """``frame_size`` ``(H, W)``: the frames it will score, tried once here; a backbone whose pooling cannot
        take frames that small (AlexNet below about 30 pixels) is a skip line, not the RuntimeError that ended an
        eval in a traceback after every row had been generated."""
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return None, ("LPIPS skipped: needs torchvision and its pretrained backbone "
                          "(pip install torchvision, then run once online to cache the weights)")
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device)
        except Exception as exc:  # offline without cached backbone weights: one line, not a traceback
            return None, (f"LPIPS skipped: the {net} backbone weights could not be loaded "
                          f"({type(exc).__name__}); run once online to cache them in $TORCH_HOME/hub/checkpoints")
        scorer = cls(metric)
        if frame_size is not None:
            blank = torch.zeros(1, 3, *frame_size)
            try:
                scorer(blank, blank)
            except RuntimeError as exc:
                return None, (f"LPIPS skipped: its {net} backbone cannot take {frame_size[0]}x{frame_size[1]} frames "
                              f"({' '.join(str(exc).split())[:120]}); generate larger frames (--height, --width) to "
                              "score LPIPS")
        return scorer, None

    @torch.no_grad()
    def __call__(self, pred, ref) -> torch.Tensor:
        pred, ref = to_frames(pred), to_frames(ref)
        _check_pair(pred, ref)  # (zip would score the shorter video's frames only)
        pred, ref = as_rgb(pred), as_rgb(ref)  # (its networks take 3 channels)
        device = next(self.metric.parameters(), torch.empty(0)).device
        values = []
        for a, b in zip(pred, ref):
            self.metric.reset()
            values.append(float(self.metric(a[None].to(device), b[None].to(device))))
        return torch.tensor(values)


def mean_or_none(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None
