"""How good: quality and speed of sparse attention against dense.

- :mod:`~dit_accel.eval.metrics`: PSNR (capped at 100 dB), SSIM, LPIPS per frame.
- :mod:`~dit_accel.eval.fid`: FID with a pluggable feature extractor.
- :mod:`~dit_accel.eval.clip`: CLIP score from a local or hub CLIP model.
- :mod:`~dit_accel.eval.runner`: ``dit-accel eval`` (dense baseline cached, methods, report).
- :mod:`~dit_accel.eval.bench`: ``dit-accel bench kernels``.
- :mod:`~dit_accel.eval.fidelity`: ``dit-accel bench fidelity`` on captured q/k/v.

Submodules import torchmetrics/matplotlib lazily; ``import dit_accel.eval`` stays light.
"""

__all__ = ["metrics", "fid", "clip", "runner", "report", "timing", "bench", "fidelity"]
