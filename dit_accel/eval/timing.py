"""Wall-clock timing of pipeline stages: transformer, VAE decode, text encoding.

:class:`StageTimer` hooks a Diffusers pipeline's components and accumulates
their time per generation. On CUDA it records CUDA events around every call
and reads them after one synchronisation at the end of the run (no host sync
on the hot path); on CPU it uses ``time.perf_counter``.

Example::

    with StageTimer(pipe) as timer:
        timer.start()
        pipe(prompt)
        times = timer.stop()   # {"total": s, "transformer": s, "vae_decode": s, "text_encoder": s}

``StageTimer(pipe, attention_modules=[...])`` also times those modules as the
``attention`` stage (e.g. the self-attention modules ``dit_accel.apply`` wrapped:
projections, attention and output projection of every layer).
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional

import torch

__all__ = ["StageTimer", "median_times"]

_TRANSFORMERS = ("transformer", "transformer_2")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _pipe_device(pipe) -> torch.device:
    device = getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


class StageTimer:
    """Accumulates per-stage time of one pipeline call between :meth:`start` and :meth:`stop`."""

    def __init__(self, pipe, device=None, attention_modules=()):
        self.pipe = pipe
        self.attention_modules = list(attention_modules)
        self.cuda = torch.device(device or _pipe_device(pipe)).type == "cuda"
        self._handles: List = []
        self._restore: List = []
        self._spans: Dict[str, List] = {}
        self._open: Dict[int, str] = {}  # module id -> stage of the calls in progress
        self._tokens: Dict[int, object] = {}
        self._t0 = None

    # ------------------------------------------------------------- install
    def __enter__(self) -> "StageTimer":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        for name in _TRANSFORMERS:
            self._hook_module(getattr(self.pipe, name, None), "transformer")
        for name in _TEXT_ENCODERS:
            self._hook_module(getattr(self.pipe, name, None), "text_encoder")
        for module in self.attention_modules:
            self._hook_module(module, "attention")
        vae = getattr(self.pipe, "vae", None)
        if vae is not None and hasattr(vae, "decode"):
            original = vae.decode

            def decode(*args, **kwargs):
                token = self._begin()
                try:
                    return original(*args, **kwargs)
                finally:
                    self._end("vae_decode", token)

            vae.decode = decode  # instance attribute shadows the method; removed in remove()
            self._restore.append(lambda: vae.__dict__.pop("decode", None))

    def _hook_module(self, module, stage: str) -> None:
        if not isinstance(module, torch.nn.Module):
            return

        def pre(mod, args):
            if stage not in self._open.values():  # a transformer inside another one's forward counts once
                self._open[id(mod)] = stage
                self._tokens[id(mod)] = self._begin()

        def post(mod, args, out):
            if self._open.pop(id(mod), None) is not None:
                self._end(stage, self._tokens.pop(id(mod)))

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for undo in self._restore:
            undo()
        self._handles, self._restore = [], []

    # --------------------------------------------------------------- spans
    def _begin(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _end(self, stage: str, token) -> None:
        end = self._begin()
        self._spans.setdefault(stage, []).append((token, end))

    def start(self) -> None:
        self._spans = {}
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = self._begin()

    def calls(self, stage: str) -> int:
        """Completed calls of ``stage`` in the run since :meth:`start` (nested transformer calls count once)."""
        return len(self._spans.get(stage, ()))

    def stop(self) -> Dict[str, float]:
        """Seconds per stage for the run since :meth:`start` (``total`` = end to end)."""
        self._end("total", self._t0)
        if self.cuda:
            torch.cuda.synchronize()
        out = {"total": 0.0, "transformer": 0.0, "vae_decode": 0.0, "text_encoder": 0.0}
        if self.attention_modules:
            out["attention"] = 0.0
        for stage, spans in self._spans.items():
            if self.cuda:
                out[stage] = sum(a.elapsed_time(b) for a, b in spans) / 1000.0
            else:
                out[stage] = sum(b - a for a, b in spans)
        return out


def median_times(runs: List[Dict[str, float]]) -> Optional[Dict[str, float]]:
    """Median over repeated runs, per stage (``None`` without runs)."""
    if not runs:
        return None
    return {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]}
