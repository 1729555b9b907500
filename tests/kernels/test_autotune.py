"""Runtime backend choice (``backend="auto"`` on CUDA): the decision logic with injected timings, on CPU."""

import os

import pytest
import torch

from dit_accel.kernels import BlockLayout, autotune, backends
from dit_accel.kernels.backends import Request, resolve
from dit_accel.kernels.block_sparse.api import block_sparse_tuner


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    autotune._MEMORY.clear()
    autotune._LOADED.clear()
    yield
    autotune._MEMORY.clear()
    autotune._LOADED.clear()


def _shape(density=0.1, dtype="bfloat16", head_dim=128):
    return autotune.ShapeClass("FakeGPU", "2.x", "3.x", "block_sparse", dtype, head_dim,
                               autotune.density_bucket(density))


def _timer(times):
    """A timer that runs each contender once and reports the injected milliseconds by call order."""
    calls = []

    def timer(fn, warmup, repeats):
        fn()
        calls.append(fn)
        t = times[len(calls) - 1]
        if isinstance(t, Exception):
            raise t
        return t

    timer.calls = calls
    return timer


def test_density_buckets():
    assert autotune.density_bucket(None) == "any"
    assert autotune.density_bucket(0.05) == "<=0.05"
    assert autotune.density_bucket(0.07) == "<=0.1"
    assert autotune.density_bucket(0.5) == "<=0.5"
    assert autotune.density_bucket(1.0) == "<=1"


def test_fastest_wins_is_stored_and_reused():
    timer = _timer([3.0, 1.5])
    assert autotune.choose(_shape(), {"triton": lambda: None, "flex": lambda: None}, timer) == "flex"
    assert len(timer.calls) == 2
    again = _timer([0.1, 9.0])
    assert autotune.choose(_shape(), {"triton": lambda: None, "flex": lambda: None}, again) == "flex"
    assert again.calls == []  # cached: nothing timed
    (row,) = autotune.cached_choices()
    assert row["choice"] == "flex" and row["times_ms"] == {"triton": 3.0, "flex": 1.5}
    assert row["shape"]["head_dim"] == "128" and row["shape"]["density"] == "<=0.1"
    assert autotune.cache_path().exists()
    summary = autotune.info()
    assert summary["enabled"] and list(summary["choices"].values())[0].startswith("flex (triton 3.000 ms")
    # Another density bucket, dtype or head dim is another shape class.
    assert autotune.choose(_shape(density=0.4), {"triton": lambda: None, "flex": lambda: None},
                           _timer([1.0, 2.0])) == "triton"


def test_choice_survives_a_new_process_through_the_file():
    autotune.choose(_shape(), {"triton": lambda: None, "flex": lambda: None}, _timer([1.0, 2.0]))
    autotune._MEMORY.clear()
    autotune._LOADED.clear()
    assert autotune.cached_choice(_shape()) == "triton"


def test_failing_contender_is_never_chosen_and_ties_keep_order():
    assert autotune.choose(_shape(), {"triton": lambda: None, "flex": lambda: None},
                           _timer([RuntimeError("no"), 5.0])) == "flex"
    assert autotune.cached_choices()[0]["times_ms"]["triton"] is None
    assert autotune.choose(_shape(0.3), {"triton": lambda: None, "flex": lambda: None}, _timer([2.0, 2.0])) == "triton"
    # Every contender failing: the first, and nothing stored.
    assert autotune.choose(_shape(0.9), {"a": lambda: None, "b": lambda: None},
                           _timer([RuntimeError(), RuntimeError()])) == "a"
    assert autotune.cached_choice(_shape(0.9)) is None


def test_env_switch(monkeypatch):
    assert autotune.enabled()
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    assert not autotune.enabled()


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA request where both tuned backends can run (no GPU needed: the table is patched)."""
    table = dict(backends._TABLE)
    table["block_sparse"] = (("triton", lambda r: None, True), ("flex", lambda r: None, False),
                             ("torch", lambda r: None, True))
    monkeypatch.setattr(backends, "_TABLE", table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    return Request(torch.device("cuda"), torch.bfloat16, 128, density=0.1)


def test_resolve_auto_on_cuda_asks_the_tuner_once_per_class(fake_cuda):
    seen = []

    def tuner(names, request):
        seen.append(list(names))
        return autotune.choose(autotune.ShapeClass.of("block_sparse", request, request.density),
                               {n: (lambda: None) for n in names}, _timer([4.0, 2.0]))

    assert resolve("block_sparse", "auto", fake_cuda, tuner=tuner) == "flex"
    assert seen == [["triton", "flex"]]
    assert resolve("block_sparse", "auto", fake_cuda, tuner=tuner) == "flex"  # stored: the tuner is not asked
    assert seen == [["triton", "flex"]]
    assert resolve("block_sparse", "auto", fake_cuda) == "flex"  # entry points without a tuner read the store


def test_resolve_without_tuning(fake_cuda, monkeypatch):
    def tuner(names, request):
        raise AssertionError("must not tune")

    assert resolve("block_sparse", "triton", fake_cuda, tuner=tuner) == "triton"  # forced
    assert resolve("block_sparse", "auto", fake_cuda) == "triton"  # nothing stored, no tuner: table order
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    assert resolve("block_sparse", "auto", fake_cuda, tuner=tuner) == "triton"
    cpu = Request(torch.device("cpu"), torch.float32, 64)
    monkeypatch.delenv(autotune.ENV_AUTOTUNE)
    assert resolve("block_sparse", "auto", cpu, tuner=tuner) == "torch"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="times the interpreted triton kernel on CPU tensors (the GPU benchmark tunes for real)")
def test_block_sparse_tuner_times_the_real_calls():
    """The tuner runs each backend on the given inputs (CPU: torch and the interpreted triton kernel)."""
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    layout = BlockLayout.from_dense_mask(mask, 32, 32)
    q, k, v = (torch.randn(1, 1, 64, 32) for _ in range(3))
    timer = _timer([7.0, 3.0])
    tune = block_sparse_tuner(q, k, v, layout, 0.2, timer=timer)
    request = Request(torch.device("cpu"), torch.float32, 32)
    assert tune(["torch", "triton"], request) == "triton"
    assert len(timer.calls) == 2
    (row,) = autotune.cached_choices()
    assert row["shape"]["density"] == autotune.density_bucket(layout.density())
