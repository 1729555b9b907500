"""Every Triton launch in the package runs with its inputs' GPU current (``occupancy.on_inputs_device``).

Triton launches on the current device: a launcher handed tensors on ``cuda:1`` while ``cuda:0`` is current (a
pipeline placed over two GPUs) would launch on the wrong one. Read from the source: each function that launches a
Triton kernel (``kernel[grid](...)``) is wrapped, or every caller in the package reaches it only from wrapped
launchers. (SLA's classification launches and VSA's coarse ones were not; the wrapper itself is tested in
``test_aot_launch.py``.)"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "dit_accel" / "kernels"


def _scan(sources):
    """``{(module, name): (node, wrapped, launches)}`` of the top-level host functions of ``{module: source}``."""
    found = {}
    for module, source in sources.items():
        for fn in ast.parse(source).body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in fn.decorator_list]
            if any("jit" in d for d in decorators):
                continue
            launches = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                           and ("kernel" in ast.unparse(n.func.value).lower() or "KERNELS" in ast.unparse(n.func.value))
                           for n in ast.walk(fn))
            found[(module, fn.name)] = (fn, any("on_inputs_device" in d for d in decorators), launches)
    return found


def _functions():
    """:func:`_scan` of the kernels package."""
    return _scan({str(path.relative_to(ROOT)): path.read_text() for path in sorted(ROOT.rglob("*.py"))})


def _callers(functions, module: str, name: str):
    """The functions that call ``name`` (a private one: in its own module only)."""
    out = []
    for key, (node, _, _) in functions.items():
        if key == (module, name) or (name.startswith("_") and key[0] != module):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Call):
                callee = getattr(n.func, "id", None) or getattr(n.func, "attr", None)
                if callee == name:
                    out.append(key)
                    break
    return out


def _reached_wrapped(functions, key, seen=()) -> bool:
    if functions[key][1]:
        return True
    callers = [c for c in _callers(functions, *key) if c not in seen]
    return bool(callers) and all(_reached_wrapped(functions, c, seen + (key,)) for c in callers)


def test_every_launch_runs_on_its_inputs_gpu():
    functions = _functions()
    sites = [key for key, (_, _, launches) in functions.items() if launches]
    assert len(sites) >= 14, sites  # (the scan finds the launchers: forward, backward, SLA, VSA, glue)
    assert [key for key in sites if not _reached_wrapped(functions, key)] == []


def test_the_scan_finds_an_unwrapped_launch():
    src = ("import triton\n@triton.jit\ndef _fwd_kernel(x):\n    pass\n\n"
           "def launch(x):\n    _fwd_kernel[(1,)](x)\n\n"
           "@occupancy.on_inputs_device\ndef wrapped(x):\n    inner(x)\n\n"
           "def inner(x):\n    KERNELS['k'][(1,)](x)\n")
    functions = _scan({"m.py": src})
    assert {key for key, (_, _, launches) in functions.items() if launches} == {("m.py", "launch"), ("m.py", "inner")}
    assert not _reached_wrapped(functions, ("m.py", "launch"))
    assert _reached_wrapped(functions, ("m.py", "inner"))


class _Streams:
    """Stands in for ``torch.cuda``'s events, streams and synchronisation: records which device's stream each
    event was recorded on and which device was synchronised."""

    def __init__(self, monkeypatch):
        import torch

        self.recorded, self.synced = [], []
        streams = self

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self, stream=None):
                streams.recorded.append(stream)

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 2.0

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.synced.append(device))


def test_timers_record_on_the_devices_stream(monkeypatch):
    """A model on ``cuda:1`` while ``cuda:0`` is current: the kernels run on cuda:1's stream (the launchers make
    it current), so every timer records its events there and synchronises that device. Events on the current
    device's stream, as the timers recorded them, timed nothing of the work (the handle's attention seconds,
    ``generate``'s stage times, ``bench gpu``'s spans and ``auto``'s timed choices)."""
    import torch

    from dit_accel._util import Timer
    from dit_accel.eval.timing import CudaCallTimer, StageTimer
    from dit_accel.kernels import autotune

    streams = _Streams(monkeypatch)
    cuda1 = torch.device("cuda:1")
    timer = Timer(cuda1)
    with timer:
        pass
    assert timer.seconds == 2.0 / 1e3
    stage = StageTimer(torch.nn.Module(), cuda1)
    stage.start()
    stage._end("transformer", stage._begin())
    stage.stop()
    assert CudaCallTimer(cuda1).span(lambda: None, 3)[0] == 2.0 / 1e3
    assert autotune.cuda_event_timer(lambda: None, 1, 2, device=cuda1) == 2.0
    assert autotune.timer_on(cuda1)(lambda: None, 1, 2) == 2.0
    assert streams.recorded and set(streams.recorded) == {"stream of cuda:1"}, streams.recorded
    assert set(streams.synced) == {cuda1}, streams.synced


def test_decisions_time_on_the_inputs_device(monkeypatch):
    """The timed choices (raster order or gathering, one- or two-pass backward, the dense kernels, the sparse
    backends) take their default timer on the call's inputs' device."""
    import torch

    from dit_accel.kernels import autotune
    from dit_accel.kernels.block_sparse import gather

    asked = []
    monkeypatch.setattr(autotune, "timer_on", lambda device: asked.append(device) or (lambda fn, w=3, r=10: 1.0))
    monkeypatch.setattr(autotune, "enabled", lambda: True)
    monkeypatch.setattr(autotune, "cached_choice", lambda shape: None)
    monkeypatch.setattr(autotune, "_store", lambda key, row: None)
    q = torch.zeros(1, 2, 64, 16)
    gather.raster_faster("vsa.gather", q, 64, 64, 0.5, lambda gathered: None)
    assert asked == [q.device]
    for path in ("block_sparse/bwd_fused.py", "dense/choice.py", "block_sparse/select_backend.py"):
        assert "autotune.timer_on(q.device)" in (ROOT / path).read_text(), path
