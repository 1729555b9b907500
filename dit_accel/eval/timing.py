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

:func:`measure_call` times one kernel call the ways a pipeline sees it (``bench kernels``,
``bench gpu``): latency from an idle GPU, throughput of back-to-back calls, a CUDA-graph
replay, and the host time per call. :class:`CallTimer` is the backend it runs on; tests pass
a fake one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .._util import cuda_event

__all__ = ["StageTimer", "median_times", "times_problem", "CallTiming", "CallTimer", "CudaCallTimer", "CpuCallTimer",
           "measure_call"]

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
        self.device = torch.device(device or _pipe_device(pipe))
        self.cuda = self.device.type == "cuda"
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
            return cuda_event(self.device)
        return time.perf_counter()

    def _end(self, stage: str, token) -> None:
        end = self._begin()
        self._spans.setdefault(stage, []).append((token, end))

    def start(self) -> None:
        # A call that raised inside a hooked module left its span open (no forward hook ran): closed by the next
        # run's call, it timed the failed run too (transformer seconds above the total), so a new run starts clean.
        self._spans, self._open, self._tokens = {}, {}, {}
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._t0 = self._begin()

    def calls(self, stage: str) -> int:
        """Completed calls of ``stage`` in the run since :meth:`start` (nested transformer calls count once)."""
        return len(self._spans.get(stage, ()))

    def stop(self) -> Dict[str, float]:
        """Seconds per stage for the run since :meth:`start` (``total`` = end to end). Each run is one
        :meth:`start` and one ``stop``: RuntimeError otherwise (a second ``stop`` added another span to ``total``,
        so a run of 0.05 s read 0.15 s; one without ``start`` was a TypeError about NoneType)."""
        if self._t0 is None:
            raise RuntimeError("StageTimer.stop() without a run to stop: call timer.start() before each timed "
                               "pipeline call, then stop() once after it")
        self._end("total", self._t0)
        self._t0 = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = {"total": 0.0, "transformer": 0.0, "vae_decode": 0.0, "text_encoder": 0.0}
        if self.attention_modules:
            out["attention"] = 0.0
        for stage, spans in self._spans.items():
            if self.cuda:
                out[stage] = sum(a.elapsed_time(b) for a, b in spans) / 1000.0
            else:
                out[stage] = sum(b - a for a, b in spans)
        return out


def timing_device(device) -> str:
    """What a timing depends on beyond the settings: the GPU's name (``"cuda:NVIDIA H100 80GB HBM3"``), or the CPU
    type and core count (``"cpu:x86_64:2"``); a dense cache entry's times are reused only on the same one."""
    import os
    import platform

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{os.cpu_count()}"


def times_problem(times) -> Optional[str]:
    """What makes ``times`` no :meth:`StageTimer.stop` result (a dict of stage -> finite seconds >= 0, with
    ``total``), or None."""
    from .._util import is_number

    if not isinstance(times, dict) or "total" not in times:
        return f"times {str(times)[:80]} are not a dict of seconds per stage with a 'total'"
    bad = next((k for k, v in times.items() if not (is_number(v) and 0 <= v < float("inf"))), None)
    return None if bad is None else f"times[{bad!r}] is {times[bad]!r}, not a finite number of seconds >= 0"


def median_times(runs: List[Dict[str, float]]) -> Optional[Dict[str, float]]:
    """Median over repeated runs, per stage (``None`` without runs). ValueError naming the run when one is no
    :meth:`StageTimer.stop` result or lacks a stage the first has (before: a KeyError, a TypeError for a None, and
    a NaN sorted into the median without a word)."""
    if not runs:
        return None
    for i, run in enumerate(runs):
        problem = times_problem(run) or next((f"it has no {k!r} time, which run 0 has" for k in runs[0]
                                              if k not in run), None)
        if problem:
            raise ValueError(f"median_times: run {i} of {len(runs)}: {problem}; pass the dicts StageTimer.stop() "
                             "returned, one per timed run of the same stages")
    return {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]}


# ---------------------------------------------------------------- one kernel call, as a pipeline sees it
@dataclass
class CallTiming:
    """Seconds per call of one contender, measured four ways (None where not measured).

    - ``latency_s``: one call from an idle device (synchronised before, events around the call):
      what a lone call costs, host path and launch included;
    - ``throughput_s``: ``calls`` back-to-back calls between one event pair, divided by ``calls``:
      what a pipeline that keeps the GPU busy pays per call;
    - ``graph_s``: the same calls captured once in a CUDA graph and replayed (None where the
      contender cannot be captured: ``notes`` says why);
    - ``host_s``: wall time of issuing the back-to-back calls on the host, per call (the host
      path; when it exceeds ``throughput_s`` the GPU waits on the host).
    """

    latency_s: Optional[float] = None
    throughput_s: Optional[float] = None
    graph_s: Optional[float] = None
    host_s: Optional[float] = None
    calls: int = 0
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class CallTimer:
    """How :func:`measure_call` reads time; one subclass per device kind (and fakes in tests)."""

    def sync(self) -> None:
        """Wait for the device to finish queued work."""

    def span(self, fn: Callable[[], object], calls: int) -> tuple:
        """``(device seconds, host seconds)`` of ``calls`` back-to-back calls of ``fn`` (device seconds:
        first launch to last completion; host seconds: issuing them)."""
        raise NotImplementedError

    def graph(self, fn: Callable[[], object], calls: int) -> float:
        """Seconds of ``calls`` replays of ``fn`` captured in a graph; raises when it cannot capture."""
        raise RuntimeError("CUDA graphs need a CUDA device")


class CpuCallTimer(CallTimer):
    """perf_counter; device and host seconds coincide (no graphs)."""

    def span(self, fn, calls):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        seconds = time.perf_counter() - start
        return seconds, seconds


class CudaCallTimer(CallTimer):
    """CUDA events on ``device``'s current stream; graphs captured on a side stream after one warm call."""

    def __init__(self, device=None):
        self.device = torch.device(device or "cuda")

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def span(self, fn, calls):
        start = cuda_event(self.device)
        host = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - host
        end = cuda_event(self.device)
        end.synchronize()
        return start.elapsed_time(end) / 1e3, host

    def graph(self, fn, calls):
        with torch.cuda.device(self.device):  # (the capture's side stream and pool on the inputs' GPU)
            return self._graph(fn, calls)

    def _graph(self, fn, calls):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()  # warm on the capture stream (allocator pools, lazy initialisation)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        self.sync()
        seconds, _ = self.span(graph.replay, calls)
        del graph
        return seconds


def measure_call(fn: Callable[[], object], timer: CallTimer, *, calls: int = 10, repeats: int = 5,
                 graph: bool = True) -> CallTiming:
    """Time ``fn`` as :class:`CallTiming` describes: ``repeats`` idle-device single calls (median), then
    the median of ``repeats`` spans of ``calls`` back-to-back calls, then (``graph``) a graph replay.
    The caller warms ``fn`` up first. A failure of the graph capture is a note, not an error. ``calls`` and
    ``repeats`` are integers >= 1: ValueError naming them (before: ZeroDivisionError, "no median for empty data")."""
    from .._util import is_int

    for name, value in (("calls", calls), ("repeats", repeats)):
        if not (is_int(value) and value >= 1):
            raise ValueError(f"measure_call: {name}={value!r} is invalid: an integer >= 1 (calls: back-to-back calls "
                             "per span; repeats: the spans whose median is taken)")
    result = CallTiming(calls=calls)
    single = []
    for _ in range(repeats):
        timer.sync()
        single.append(timer.span(fn, 1)[0])
    result.latency_s = statistics.median(single)
    spans = []
    for _ in range(repeats):
        timer.sync()
        spans.append(timer.span(fn, calls))
    result.throughput_s = statistics.median(d for d, _ in spans) / calls
    result.host_s = statistics.median(h for _, h in spans) / calls
    if graph:
        try:
            timer.sync()
            result.graph_s = timer.graph(fn, calls) / calls
        except Exception as exc:  # host syncs, data-dependent shapes, CPU tensors: not capturable
            result.notes.append(f"no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return result
