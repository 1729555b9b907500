"""dit_accel.kernels.interpreter: Triton's interpreter patches the language once per launch, not again at every
call of a @triton.jit helper inside it, and leaves the language as it found it."""
import inspect
import threading

import pytest
import torch
import triton
import triton.language as tl

from dit_accel.kernels.interpreter import patch_language_once_per_launch
from dit_accel.kernels.request import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="Triton's interpreter only (TRITON_INTERPRET=1)")


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _doubling_kernel(x_ptr, out_ptr, CALLS: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(x_ptr + offs)
    for _ in tl.static_range(CALLS):
        x = _twice(x)
    tl.store(out_ptr + offs, x)


def _kernels():
    return _doubling_kernel


def _walks(monkeypatch, run) -> int:
    """How many inspect.getmembers walks ``run`` makes."""
    count, real = [0], inspect.getmembers

    def counting(obj, *a, **k):
        count[0] += 1
        return real(obj, *a, **k)

    monkeypatch.setattr(inspect, "getmembers", counting)
    run()
    monkeypatch.setattr(inspect, "getmembers", real)
    return count[0]


def test_helpers_called_inside_a_launch_walk_the_language_no_more_and_compute_the_same(monkeypatch):
    assert patch_language_once_per_launch()  # (tests/conftest.py applied it already: once per process)

    kernel, x = _kernels(), torch.arange(16, dtype=torch.float32)
    outs, walks = {}, {}
    for calls in (1, 6):
        out = torch.empty_like(x)
        walks[calls] = _walks(monkeypatch, lambda: kernel[(3,)](x, out, CALLS=calls))
        outs[calls] = out
    assert walks[1] == walks[6] > 0  # the launch's own walks alone (before: 4 more per helper call)
    assert torch.equal(outs[1], x * 2) and torch.equal(outs[6], x * 64)
    assert getattr(tl.load, "__triton_builtin__", False)  # the language restored after the launch


def test_a_launch_in_another_thread_during_one_patches_for_itself(monkeypatch):
    """The skip is per thread: a launch started in another thread walks the language itself."""
    patch_language_once_per_launch()

    kernel, x = _kernels(), torch.arange(16, dtype=torch.float32)
    out = torch.empty_like(x)
    result = {}

    def other():
        other_out = torch.empty_like(x)
        kernel[(1,)](x, other_out, CALLS=2)
        result["out"] = other_out

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    kernel[(1,)](x, out, CALLS=3)
    assert torch.equal(result["out"], x * 4) and torch.equal(out, x * 8)
