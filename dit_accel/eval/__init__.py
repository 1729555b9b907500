"""How good: quality and speed of sparse attention against dense.

- :mod:`~dit_accel.eval.metrics`: PSNR (capped at 100 dB), SSIM, LPIPS per frame.
- :mod:`~dit_accel.eval.fid`: FID with a pluggable feature extractor.
- :mod:`~dit_accel.eval.clip`: CLIP score from a local or hub CLIP model.
- :mod:`~dit_accel.eval.runner`: ``dit-accel eval`` (dense baseline cached, methods, report).
- :mod:`~dit_accel.eval.bench`: ``dit-accel bench kernels``.
- :mod:`~dit_accel.eval.fidelity`: ``dit-accel bench fidelity`` on captured q/k/v.
- :mod:`~dit_accel.eval.stats`: paired statistics (t-interval, bootstrap, paired t-test, verdicts).
- :mod:`~dit_accel.eval.floor`: the dense-vs-dense floor's second dense backend.
- :mod:`~dit_accel.eval.provenance` / :mod:`~dit_accel.eval.compare`: what ran; ``eval --compare A B``.
- :mod:`~dit_accel.eval.temporal`: frame-to-frame consistency, frozen / looping detection.

Submodules import torchmetrics/matplotlib lazily; ``import dit_accel.eval`` stays light.
"""

__all__ = ["metrics", "fid", "clip", "runner", "report", "timing", "bench", "fidelity", "stats", "floor",
           "provenance", "compare", "temporal"]
