"""Dense attention on the fastest dense kernel (issue 35 item 6): each candidate's o and lse against the fp32
reference where it runs on the CPU, the lse layouts of the CUDA-only ones, and the choice with injected timers.

On the CPU: ``sdpa`` (o only), ``sdpa-flash`` (ATen's ``_scaled_dot_product_flash_attention_for_cpu``) and
``triton`` (the interpreter, fp32) run here; ``sdpa-cudnn`` and ``sdpa-efficient`` have no CPU kernel (their
numbers are checked by ``tests/kernels/test_gpu_production.py`` on a GPU, their lse layouts here)."""

import pytest
import torch

from dit_accel.kernels import autotune, backends
from dit_accel.kernels.block_sparse import api
from dit_accel.kernels.dense import choice, fastest_attention
from tests.utils import reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    autotune._MEMORY.clear()
    autotune._LOADED.clear()
    choice._CHOSEN.clear()
    yield
    autotune._MEMORY.clear()
    autotune._LOADED.clear()
    choice._CHOSEN.clear()


def _qkv(b=2, h=3, n=63, m=130, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, h, x, d, generator=g, dtype=dtype) for x in (n, m, m)]


@pytest.mark.parametrize("name", ["sdpa", "sdpa-flash", "triton"])
@pytest.mark.parametrize("n,m", [(63, 130), (130, 257)], ids=["63x130", "130x257"])
def test_cpu_candidates_match_the_fp32_reference(name, n, m):
    q, k, v = _qkv(n=n, m=m)
    ref, ref_lse = reference(q, k, v, scale=0.3)
    return_lse = name != "sdpa"
    assert choice.why_not(name, q, k, return_lse) is None
    o, lse = choice.run_candidate(name, q, k, v, 0.3, return_lse)
    assert o.shape == q.shape and o.dtype == q.dtype
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)
    if return_lse:  # natural log, fp32, (B, H, N)
        assert lse.shape == (2, 3, n) and lse.dtype == torch.float32
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    else:
        assert lse is None


def test_cpu_flash_candidate_in_half_precision_and_its_backward():
    q, k, v = (t.half().requires_grad_() for t in _qkv(n=63, m=63))
    ref, ref_lse = reference(q.detach(), k.detach(), v.detach())
    o, lse = choice.run_candidate("sdpa-flash", q, k, v, 32 ** -0.5, True)
    torch.testing.assert_close(o.float(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)
    do = torch.randn_like(o)
    o.backward(do)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference(qr, kr, vr)[0].backward(do.float())
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


def test_cuda_only_candidates_say_why_and_their_lse_layouts_normalise():
    q, k, v = _qkv()
    for name in ("sdpa-cudnn", "sdpa-efficient"):
        assert "CUDA only" in choice.why_not(name, q, k, True)
    assert choice.candidates(q, k, True) == ("sdpa-flash", "triton")
    assert choice.candidates(q, k, False) == ("sdpa", "sdpa-flash", "triton")
    assert "no log-sum-exp" in choice.why_not("sdpa", q, k, True)
    with pytest.raises(ValueError, match="unknown dense candidate 'fa9'"):
        choice.why_not("fa9", q, k, True)
    lse = torch.randn(2, 3, 63)
    assert torch.equal(choice.normalise_lse("sdpa-cudnn", lse[..., None], 63), lse)  # cuDNN: (B, H, N, 1)
    padded = torch.cat([lse, torch.full((2, 3, 1), float("inf"))], -1)  # efficient: rows to a multiple of 32
    assert torch.equal(choice.normalise_lse("sdpa-efficient", padded, 63), lse)


def _timer(times, ran):
    """Runs each contender once (its check and call) and reports ``times[i]`` ms for the i-th one timed."""
    def timer(fn, warmup, repeats):
        fn()
        ran.append(fn)
        return times[len(ran) - 1]
    return timer


def test_choice_takes_the_fastest_measured_once_per_signature():
    q, k, v = _qkv()
    ran = []
    # CPU candidates with lse: sdpa-flash, triton (in that order).
    assert choice.choose(q, k, v, 0.3, True, timer=_timer([2.0, 1.0], ran), tune=True) == "triton"
    assert len(ran) == 2
    assert choice.choose(q, k, v, 0.3, True, timer=_timer([2.0, 1.0], ran), tune=True) == "triton"
    assert len(ran) == 2  # decided once per signature
    entry = next(r for r in autotune.cached_choices() if r["shape"]["family"] == "dense+lse")
    assert entry["choice"] == "triton" and entry["times_ms"] == {"sdpa-flash": 2.0, "triton": 1.0}
    choice._CHOSEN.clear()
    autotune.clear()
    assert choice.choose(q, k, v, 0.3, True, timer=_timer([1.0, 2.0], []), tune=True) == "sdpa-flash"


def test_a_wrong_candidate_is_never_chosen_even_when_faster(monkeypatch):
    q, k, v = _qkv()
    real = choice.run_candidate

    def broken(name, *args):
        o, lse = real(name, *args)
        return (o * 1.1, lse) if name == "triton" else (o, lse)

    monkeypatch.setattr(choice, "run_candidate", broken)
    ran = []
    assert choice.choose(q, k, v, 0.3, True, timer=_timer([2.0, 0.5], ran), tune=True) == "sdpa-flash"
    with pytest.raises(ValueError, match="triton: relative error"):
        choice.check_candidate("triton", q, k, v, 0.3, True)


def test_backward_is_timed_when_autograd_records():
    q, k, v = (t.requires_grad_() for t in _qkv())
    ran = []
    assert choice.choose(q, k, v, 0.3, False, timer=_timer([3.0, 1.0, 2.0], ran), tune=True) == "sdpa-flash"
    assert [r["shape"]["family"] for r in autotune.cached_choices()] == ["dense+bwd"]
    assert q.grad is None  # the timing ran on detached copies


def test_untimed_default_and_fastest_attention():
    q, k, v = _qkv()
    assert choice.choose(q, k, v, 0.3, True) == "sdpa-flash"  # CPU: not timed
    assert choice.choose(q, k, v, 0.3, False) == "sdpa"
    o, lse = fastest_attention(q, k, v, 0.3, return_lse=True)
    ref, ref_lse = reference(q, k, v, scale=0.3)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert choice.chosen(q, k, v, 0.3, return_lse=True) == "sdpa-flash"


def test_auto_dense_fallback_runs_the_chosen_kernel(monkeypatch):
    q, k, v = _qkv()
    used = []
    real = choice.run_candidate
    monkeypatch.setattr(choice, "run_candidate", lambda name, *a: used.append(name) or real(name, *a))
    o, lse = api._run_dense(q, k, v, 0.3, True)
    ref, ref_lse = reference(q, k, v, scale=0.3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert used == ["sdpa-flash"]
    choice._CHOSEN[choice._key(q, k, v, 0.3, True, False, False)] = "triton"
    o2, _ = api._run_dense(q, k, v, 0.3, True)
    assert used[-1] == "triton"
    torch.testing.assert_close(o2, ref, atol=2e-5, rtol=2e-5)


def test_when_no_candidate_runs_the_fixed_order_answers():
    q, k, v = _qkv()

    def failing(fn, warmup, repeats):
        raise RuntimeError("cannot time here")

    assert choice.choose(q, k, v, 0.3, True, timer=failing, tune=True) == "sdpa-flash"
    assert autotune.cached_choices() == []
