"""Shared stand-ins of the calibration tests."""
import math

import torch


class StandInHandle:
    """``dit_accel.apply``'s stand-in for calibration tests (``monkeypatch.setattr(dit_accel, "apply", ...)``): the
    layers ``layers`` of the pipeline's ``transformer`` (and of ``transformer_2`` where ``both_experts``), and one
    sampled q/k/v call of a ``grid`` grid at the first layer when a capture is asked for."""

    layers = ("l0",)
    grid, heads, head_dim = (2, 16, 16), 2, 16
    both_experts = False

    def __init__(self, pipe, method, capture=None, timing=False, backend="auto"):
        self.transformer, self.layers = pipe.transformer, list(self.layers)
        self.transformers = [pipe.transformer, pipe.transformer_2] if self.both_experts else [pipe.transformer]
        if capture is not None:
            q = torch.randn(1, self.heads, math.prod(self.grid), self.head_dim,
                            generator=torch.Generator().manual_seed(0))
            capture.save(0, self.layers[0], self.grid, next(iter(capture.steps)), q, q, q)

    def stats(self):
        return [{"time_ms": 1.0}]

    def remove(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
