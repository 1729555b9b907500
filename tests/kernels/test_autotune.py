"""Runtime backend choice (``backend="auto"`` on CUDA): the decision logic with injected timings, on CPU."""

import os

import pytest
import torch

from dit_accel.kernels import BlockLayout, autotune, backends
from dit_accel.kernels.backends import Request, resolve
from dit_accel.kernels.block_sparse.api import block_sparse_tuner


pytestmark = pytest.mark.usefixtures("fresh_choices")


def _shape(density=0.1, dtype="bfloat16", head_dim=128, tokens="<=4096x<=4096"):
    return autotune.ShapeClass(device_name="FakeGPU", torch="2.x", triton="3.x", dit_accel="0.x",
                               family="block_sparse", dtype=dtype, head_dim=head_dim,
                               density=autotune.density_bucket(density), tokens=tokens, blocks="128x128")


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
    # Every contender failing: None (the caller's fixed order decides), and nothing stored.
    assert autotune.choose(_shape(0.9), {"a": lambda: None, "b": lambda: None},
                           _timer([RuntimeError(), RuntimeError()])) is None
    assert autotune.cached_choice(_shape(0.9)) is None


def test_env_switch(monkeypatch):
    assert autotune.enabled()
    for off in ("0", " Off ", "no"):
        monkeypatch.setenv(autotune.ENV_AUTOTUNE, off)
        assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "yes")
    assert autotune.enabled()
    # A value that is neither (it read as "on" before) is refused, naming the variable and both values.
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "disable")
    with pytest.raises(ValueError, match=r"DIT_ACCEL_AUTOTUNE='disable': expected 1 .*, 0 \(the cost model alone"):
        autotune.enabled()


@pytest.mark.parametrize("env, read", [("DIT_ACCEL_WS", "ws_enabled"), ("DIT_ACCEL_LENGTHS", "lengths_enabled")])
def test_opt_in_kernel_switches_refuse_a_value_that_is_neither_on_nor_off(monkeypatch, env, read):
    """A typo (``DIT_ACCEL_WS=treu``) read as off before, silently; ``dit-accel info`` shows the error instead."""
    from dit_accel.cli.info import _kernel_status
    from dit_accel.kernels.block_sparse import configs

    assert not getattr(configs, read)()
    monkeypatch.setenv(env, "On")
    assert getattr(configs, read)()
    monkeypatch.setenv(env, "false")
    assert not getattr(configs, read)()
    monkeypatch.setenv(env, "treu")
    with pytest.raises(ValueError, match=f"{env}='treu': expected 1 \\(use the .*\\), 0 \\(off\\) or unset"):
        getattr(configs, read)()
    assert f"{env}='treu': expected 1" in " ".join(_kernel_status().values())


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA request where both tuned backends can run (no GPU needed: the table is patched)."""
    table = dict(backends._TABLE)
    table["block_sparse"] = (("triton", lambda r: None, True), ("flex", lambda r: None, False),
                             ("torch", lambda r: None, True))
    monkeypatch.setattr(backends, "_TABLE", table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr(backends, "_verified", lambda *a, **k: True)  # no GPU to self-check on
    return Request(torch.device("cuda"), torch.bfloat16, 128, density=0.1, q_len=4096, kv_len=4096, batch_heads=24)


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


# ------------------------------------------------------------------ a tuner that cannot poison itself
def test_the_key_holds_token_buckets_block_sizes_and_the_version(fake_cuda):
    """A choice made on a 4,096-token FLUX call is not reused for a 32,760-token Wan call, nor for another
    layout block size or dit_accel version."""
    flux = autotune.ShapeClass.of("block_sparse", fake_cuda, 0.1)
    wan = autotune.ShapeClass.of("block_sparse", Request(torch.device("cuda"), torch.bfloat16, 128, density=0.1,
                                                         q_len=32760, kv_len=32760, batch_heads=80), 0.1)
    assert flux.tokens == "<=4096x<=4096" and wan.tokens == "<=32768x<=32768"
    assert flux.key() != wan.key()
    other_blocks = Request(torch.device("cuda"), torch.bfloat16, 128, block_q=128, block_k=128, density=0.1,
                           q_len=4096, kv_len=4096)
    assert autotune.ShapeClass.of("block_sparse", other_blocks, 0.1).key() != flux.key()
    import dit_accel

    assert flux.dit_accel == dit_accel.__version__
    assert autotune.token_bucket(1) == "<=1024" and autotune.token_bucket(4097) == "<=8192"


def test_resolve_stores_per_token_bucket(fake_cuda):
    seen = []

    def tuner(names, request):
        seen.append(request.q_len)
        return autotune.choose(autotune.ShapeClass.of("block_sparse", request, request.density),
                               {n: (lambda: None) for n in names}, _timer([1.0, 5.0]))

    assert resolve("block_sparse", "auto", fake_cuda, tuner=tuner) == "triton"
    longer = Request(torch.device("cuda"), torch.bfloat16, 128, density=0.1, q_len=32760, kv_len=32760)
    resolve("block_sparse", "auto", longer, tuner=tuner)
    assert seen == [4096, 32760]  # the 4,096-token choice was not reused


def test_a_contender_that_does_not_fit_in_memory_is_not_tried():
    from dit_accel.kernels.block_sparse.api import memory_skips

    q = torch.empty(2, 40, 32760, 1, device="meta")
    skips = memory_skips(["triton", "flex"], q, q, free=80 * 2 ** 30)
    assert list(skips) == ["flex"] and "GiB of scores" in skips["flex"] and "N=32760" in skips["flex"]
    small = torch.empty(1, 24, 4096, 1, device="meta")
    assert memory_skips(["triton", "flex"], small, small, free=80 * 2 ** 30) == {}
    from dit_accel.kernels.block_sparse import flex

    assert flex.materialises(torch.device("cpu")) and not flex.materialises(torch.device("cuda"))
    with pytest.MonkeyPatch.context() as mp:  # compiled FlexAttention (CUDA) holds no scores: never skipped
        mp.setattr(flex, "materialises", lambda device: False)
        assert memory_skips(["triton", "flex"], q, q, free=80 * 2 ** 30) == {}
    timer = _timer([1.0])
    assert autotune.choose(_shape(), {"triton": lambda: None, "flex": lambda: None}, timer,
                           skip=skips) == "triton"
    assert len(timer.calls) == 1  # flex was never run
    assert autotune.cached_choices()[0]["skipped"] == skips


def test_a_choice_is_stored_only_after_it_matched_the_reference():
    checked = []

    def verify(name):
        checked.append(name)
        return name != "flex"  # the fastest one gives wrong numbers on this call

    assert autotune.choose(_shape(), {"triton": lambda: None, "flex": lambda: None}, _timer([3.0, 1.0]),
                           verify=verify) == "triton"
    assert checked == ["flex", "triton"]
    (row,) = autotune.cached_choices()
    assert row["choice"] == "triton" and row["rejected"] == ["flex"]
    # Nothing matched: nothing stored, None returned (the table order, which is self-checked, decides).
    assert autotune.choose(_shape(0.4), {"triton": lambda: None, "flex": lambda: None}, _timer([1.0, 2.0]),
                           verify=lambda name: False) is None
    assert autotune.cached_choice(_shape(0.4)) is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the interpreted triton kernel")
def test_the_real_tuner_rejects_a_corrupted_fastest_backend(monkeypatch, tmp_path):
    """The tuner's reference check on the call itself: a triton forward that returns wrong numbers
    (DIT_ACCEL_FAULT) is timed fastest but never stored; the PyTorch twin is."""
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv(selfcheck.ENV_FAULT, "block_sparse.triton.fwd")
    monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "0")  # the first-use check would disable it before the tuner
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    layout = BlockLayout.from_dense_mask(mask, 32, 32)
    q, k, v = (torch.randn(1, 1, 64, 32) for _ in range(3))
    tune = block_sparse_tuner(q, k, v, layout, 0.2, timer=_timer([1.0, 7.0]), free=lambda device: None)
    request = Request(torch.device("cpu"), torch.float32, 32, q_len=64, kv_len=64)
    assert tune(["triton", "torch"], request) == "torch"
    (row,) = autotune.cached_choices()
    assert row["rejected"] == ["triton"]
