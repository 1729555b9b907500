"""The SLA backward's glue kernels (``dit_accel.kernels.sla.glue``) through the Triton interpreter: each kernel
against its definition in float64 (phi written here again), the whole backward with them against the independent
reference (``tests/kernels/sla_reference.py``) and against the PyTorch operators they replace, and when they run
(``DIT_ACCEL_SLA_GLUE``, the self-check, traces and captures). fp32 and fp16 (the interpreter's bf16 dot is wrong)."""

import types

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import selfcheck
from dit_accel.kernels.backends import triton_reason
from dit_accel.kernels.sla import glue, sla_attention, sla_classify
from dit_accel.kernels.sla.common import FEATURE_IDS
from dit_accel.methods import SLA
from tests.kernels.sla_reference import make_proj, reference_sla

interpreter = pytest.mark.skipif(triton_reason("cpu") is not None, reason="runs the Triton interpreter on the CPU")

#: phi in float64, from METHODS.md (SLA's feature maps on the head dim).
PHI = {"softmax": lambda x: torch.softmax(x, -1), "elu": lambda x: F.elu(x) + 1.0, "relu": F.relu}
#: Real head dim 48 inside a padded one of 64 (the launchers pad with zero columns), 1,100 tokens: two chunks of the
#: features kernel (1,024 tokens each), the last one ragged, and a ragged last row tile.
D, DP, N = 48, 64, 1100
#: What one rounding to the dtype may move (a relative error, and an absolute one near zero).
ULP = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3)}


@pytest.fixture(autouse=True)
def _fresh_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    for name in (glue.ENV_GLUE, selfcheck.ENV_FAULT, selfcheck.ENV_SELFCHECK):
        monkeypatch.delenv(name, raising=False)


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _padded(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, DP - x.shape[-1]))


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("feature", ["softmax", "elu", "relu"])
def test_features_and_the_global_sums_gradients(feature, dtype):
    x = _padded(_randn(1, 2, N, D, seed=0)).to(dtype)
    dnum, dden = _padded(_randn(1, 2, N, D, seed=1, scale=1e-3)), _randn(1, 2, N, seed=2, scale=1e-3)
    xf, dkv, dksum, none = glue.features(x, D, FEATURE_IDS[feature], dnum, dden)
    want = _padded(PHI[feature](x[..., :D].double())).to(dtype)
    rtol, atol = ULP[dtype]
    assert xf.dtype == dtype and xf.shape == x.shape and xf.is_contiguous()
    torch.testing.assert_close(xf, want, rtol=rtol, atol=atol)
    assert not xf[..., D:].any()
    f = xf.double().flatten(0, 1)  # (the sums are of the rounded features, what the kernels read)
    for got, want in ((dkv, f.transpose(1, 2) @ dnum.double().flatten(0, 1)),
                      (dksum, (f * dden.double().flatten(0, 1)[..., None]).sum(1))):  # (fp32 sums of 1,100 terms)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    alone = glue.features(x, D, FEATURE_IDS[feature])
    assert none is None and alone[1:] == (None, None, None) and torch.equal(alone[0], xf)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_dden", [False, True], ids=["alone", "plus_den_grad"])
def test_the_linear_branchs_gradients_from_its_outputs_gradient(dtype, with_dden):
    """From do_l, o_l and ``inv = 1 / (den + eps)`` (softmax features): d den and the per-(batch, head) scale
    (``linear_grads``), then d num over that scale rounded to the dtype and the sums of d num (``features``), as
    the PyTorch operators form them: ``d num = do_l inv``, ``d den = -(do_l . o_l) inv``, scale ``max(|d num|,
    |d den|)``."""
    dol, o_l = (_padded(_randn(1, 2, N, D, seed=s)).to(dtype) for s in (15, 16))
    inv = _randn(1, 2, N, seed=17).abs() * 1e-3 + 1e-4
    dden_in = _randn(1, 2, N, seed=18) * 1e-3 if with_dden else None
    dden, dscale = glue.linear_grads(dol, o_l, inv, dden_in)
    dnum = dol.double() * inv.double()[..., None]
    want_dden = -(dol.double() * o_l.double()).sum(-1) * inv.double() + (0 if dden_in is None else dden_in.double())
    torch.testing.assert_close(dden, want_dden.float(), rtol=1e-5, atol=1e-6 * want_dden.abs().max().item())
    want_scale = torch.maximum(dnum.abs().amax((-1, -2)), want_dden.abs().amax(-1)).float()
    torch.testing.assert_close(dscale, want_scale, rtol=1e-6, atol=0)
    q = _padded(_randn(1, 2, N, D, seed=19)).to(dtype)
    xf, dkv, dksum, dnum_s = glue.features(q, D, FEATURE_IDS["softmax"], dol, dden, inv, dscale)
    dnum32 = dol.float() * inv[..., None]  # (the fp32 product the operators make)
    assert torch.equal(dnum_s, (dnum32 / dscale[..., None, None]).to(dtype))
    f = xf.double().flatten(0, 1)
    want = f.transpose(1, 2) @ dnum32.double().flatten(0, 1)
    torch.testing.assert_close(dkv, want.float(), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    alone = glue.features(q, D, FEATURE_IDS["softmax"], dol, None, inv, dscale, sums=False)
    assert alone[1:3] == (None, None) and torch.equal(alone[3], dnum_s)


def _chain(x, feature, g, g_phi):
    """``g + phi'(x)^T g_phi`` through autograd in float64 (over the real columns)."""
    x64 = x[..., :D].double().requires_grad_()
    (back,) = torch.autograd.grad(PHI[feature](x64), x64, g_phi[..., :D].double())
    return g[..., :D].double() + back


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("feature", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("with_global", [True, False], ids=["global", "blocks"])
def test_gradient_kernels_add_phis_backward_and_the_global_terms_once(feature, dtype, with_global):
    n = 77  # (ragged row tiles)
    q, k, v = (_padded(_randn(1, 2, n, D, seed=s)).to(dtype) for s in (3, 4, 5))
    g, g_phi, g_v, dnum = (_padded(_randn(1, 2, n, D, seed=s)) for s in (6, 7, 8, 9))
    dden = _randn(1, 2, n, seed=10)
    kv, dkv = (F.pad(_randn(2, D, D, seed=s, scale=0.1), (0, DP - D, 0, DP - D)) for s in (11, 12))
    ksum, dksum = (_padded(_randn(2, D, seed=s)) for s in (13, 14))
    extra_q = (dnum, dden, kv, ksum) if with_global else ()
    extra_k = (dkv, dksum) if with_global else ()
    dq = glue.grad_q(q, g, g_phi, D, FEATURE_IDS[feature], *extra_q)
    dk, dv = glue.grad_k(k, v, g, g_phi, g_v, D, FEATURE_IDS[feature], *extra_k)
    gq, gk, gv = g_phi.double(), g_phi.double(), g_v.double()
    if with_global:
        gq = gq + dnum.double() @ kv.double().transpose(-1, -2).unsqueeze(0) + dden.double()[..., None] * ksum.double()[None, :, None]
        gk = gk + v.double() @ dkv.double().transpose(-1, -2).unsqueeze(0) + dksum.double()[None, :, None]
        f_k = _padded(PHI[feature](k[..., :D].double())).to(dtype).double()  # rounded, as the sums' operand
        gv = gv + f_k @ dkv.double().unsqueeze(0)
    rtol, atol = ULP[dtype]
    for got, want in ((dq, _chain(q, feature, g, gq)), (dk, _chain(k, feature, g, gk)), (dv, gv[..., :D])):
        assert got.dtype == dtype and got.shape == (1, 2, n, D) and got.is_contiguous()
        torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol * max(1.0, want.abs().max().item()))


#: (nq, nk, d, SLA arguments, strided) through ``sla_attention``: the plan the linear branch takes in brackets.
CASES = [
    (300, 300, 64, dict(topk=0.2, negligible=0.2), False),  # (subtract: global sums less blocks)
    (257, 257, 64, dict(topk=0.4, negligible=0.2, feature_map="elu"), True),  # (direct: the marginal blocks)
    (130, 257, 80, dict(topk=0.25, linear_tokens="all", feature_map="relu"), False),  # (all: global sums alone)
    (257, 257, 64, dict(topk=0.2, negligible=0.2, block_q=128), False),  # (subtract, 128-row blocks)
]
IDS = ["subtract", "direct-elu-strided", "all-relu-d80-nq130", "subtract-bq128"]


def _qkv(nq, nk, d, dtype, strided):
    if strided:  # (B, N, H, D) storage seen as (B, H, N, D)
        return [_randn(1, n, 2, d, seed=20 + i).to(dtype).transpose(1, 2) for i, n in enumerate((nq, nk, nk))]
    return [_randn(1, 2, n, d, seed=20 + i).to(dtype) for i, n in enumerate((nq, nk, nk))]


def _spy_glue(monkeypatch) -> list:
    launched, real = [], dict(glue.KERNELS)

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launched.append(self.name)
            return real[self.name][grid]

    for name in real:
        monkeypatch.setitem(glue.KERNELS, name, Spy(name))
    return launched


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("nq,nk,d,kw,strided", CASES, ids=IDS)
def test_the_backward_with_its_glue_kernels_matches_the_reference(monkeypatch, nq, nk, d, kw, strided, dtype):
    """``sla_attention``'s gradients (q, k, v and the projection's) with the glue kernels against the reference's
    (autograd through dense masks in fp32) and against the PyTorch operators' (``DIT_ACCEL_SLA_GLUE=0``)."""
    method = SLA(**kw)
    q, k, v = _qkv(nq, nk, d, dtype, strided)
    proj = make_proj(d).to(dtype)
    do = _randn(1, 2, nq, d, seed=30)
    launched = _spy_glue(monkeypatch)
    grads = {}
    for on in ("1", "0"):
        monkeypatch.setenv(glue.ENV_GLUE, on)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = sla_attention(*leaves, method, proj, backend="triton")
        grads[on] = torch.autograd.grad((o.float() * do).sum(), leaves + [proj.weight])
        assert bool(launched) == (on == "1")
        launched.clear()
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_proj = make_proj(d)
    ref = reference_sla(*ref_in, sla_classify(q.float(), k.float(), method).classes, method, ref_proj)[0]
    want = torch.autograd.grad((ref * do).sum(), ref_in + [ref_proj.weight])
    for name, got, host, w in zip(["dq", "dk", "dv", "dW"], grads["1"], grads["0"], want):
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, w.abs().max().item())
        torch.testing.assert_close(got.float(), w, atol=tol, rtol=1e-3, msg=lambda m: f"{name} vs reference: {m}")
        # (the same products in another order, and phi from the kernels' exp)
        close = (2e-5 if dtype == torch.float32 else 4e-3) * max(1.0, host.abs().max().item())
        torch.testing.assert_close(got, host, atol=close, rtol=1e-3, msg=lambda m: f"{name} vs operators: {m}")


@interpreter
def test_a_batch_of_strided_videos_with_more_keys_than_queries_matches_the_operators():
    """Two (B, N, H, D) videos of 3 heads, 130 queries against 257 keys, softmax features (d num and d den from the
    output's gradient in the kernels), the global sums less the critical blocks: the operators' gradients."""
    q = _randn(2, 130, 3, 64, seed=60).half().transpose(1, 2)
    k, v = (_randn(2, 257, 3, 64, seed=s).half().transpose(1, 2) for s in (61, 62))
    proj, do = make_proj(64).half(), _randn(2, 3, 130, 64, seed=63)
    grads = []
    for on in (True, False):
        with glue.forced(on):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            o = sla_attention(*leaves, SLA(topk=0.1), proj, backend="triton")
            grads.append(torch.autograd.grad((o.float() * do).sum(), leaves))
    for name, got, want in zip(["dq", "dk", "dv"], *grads):
        assert got.shape == want.shape and got.stride() == want.stride(), name
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 1e-4, f"{name}: relative difference {err:.1e}"


@interpreter
def test_a_traced_training_step_runs_the_glue_kernels_as_eager_does(monkeypatch):
    """Under ``torch.compile`` (AOT autograd traces the backward: the op takes do_l, o_l and 1 / (den + eps) through
    its fake implementation) with the glue forced, the gradients equal the eager call's, and the eager operators'
    within rounding."""
    monkeypatch.setenv(glue.ENV_GLUE, "1")
    q, k, v = (_randn(1, 2, 256, 64, seed=s).half() for s in (70, 71, 72))
    proj = make_proj(64).half()

    def step(a, b, c):
        return sla_attention(a, b, c, SLA(topk=0.1), proj, backend="triton")

    launched = _spy_glue(monkeypatch)
    grads = {}
    for name, fn in (("eager", step), ("traced", torch.compile(step, backend="aot_eager"))):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grads[name] = torch.autograd.grad(fn(*leaves).float().square().sum(), leaves)
        assert "linear_grads" in launched and "grad_q" in launched
        launched.clear()
    monkeypatch.setenv(glue.ENV_GLUE, "0")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    operators = torch.autograd.grad(step(*leaves).float().square().sum(), leaves)
    for got, eager, ops in zip(grads["traced"], grads["eager"], operators):
        assert torch.equal(got, eager)
        torch.testing.assert_close(got, ops, rtol=1e-3, atol=1e-3 * ops.abs().max().item())


# ----------------------------------------------------------------------------- when they run
def test_the_switch_reads_its_values_and_names_itself(monkeypatch):
    for raw, want in (("1", True), ("on", True), ("0", False), ("no", False), ("", None)):
        monkeypatch.setenv(glue.ENV_GLUE, raw)
        assert glue.glue_forced() is want
    monkeypatch.setenv(glue.ENV_GLUE, "maybe")
    with pytest.raises(ValueError, match="DIT_ACCEL_SLA_GLUE='maybe': expected 1"):
        glue.glue_forced()


@interpreter
def test_unforced_they_run_on_a_gpu_only_and_forced_wherever_their_check_passes(monkeypatch):
    q = torch.zeros(1, 2, 64, 64, dtype=torch.float16)
    assert not glue.glue_runs(q)  # (the interpreter: the operators stay the reference)
    with glue.forced(True):
        assert glue.glue_runs(q)
    monkeypatch.setenv(glue.ENV_GLUE, "1")
    assert glue.glue_runs(q)
    with glue.forced(False):  # (the context wins over the variable: the self-checks rely on it)
        assert not glue.glue_runs(q)
    monkeypatch.setenv(selfcheck.ENV_FAULT, glue.VARIANT)
    with pytest.raises(selfcheck.VariantFailed, match="sla.triton.bwd_glue failed its self-check"):
        glue.glue_runs(q)


def test_on_a_gpu_the_self_check_decides_and_a_trace_or_capture_runs_none(monkeypatch):
    """Unforced on a GPU: the variant's check (through ``selfcheck.gate``); inside a trace or a capture, which may run
    no check, only a stored verdict that passed lets them run."""
    from dit_accel.kernels import request

    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 12, 32760, 128))
    asked = []
    monkeypatch.setattr(selfcheck, "gate", lambda names, *a, forced: asked.append((names, a, forced)) or True)
    assert glue.glue_runs(q) and asked == [([glue.VARIANT], (q.device, q.dtype, {"head_dim": 128, "block_q": 64,
                                                                                 "block_k": 64}), False)]
    monkeypatch.setattr(request, "in_graph", lambda: True)
    for stored, want in ((None, False), (False, False), (True, True)):
        monkeypatch.setattr(selfcheck, "stored", lambda *a, s=stored: s)
        assert glue.glue_runs(q) is want
    assert len(asked) == 1


@interpreter
def test_a_forced_glue_that_fails_its_check_raises_and_unforced_the_operators_run(monkeypatch):
    q, k, v = (_randn(1, 2, 200, 64, seed=s).half().requires_grad_() for s in (40, 41, 42))
    monkeypatch.setenv(selfcheck.ENV_FAULT, glue.VARIANT)
    o = sla_attention(q, k, v, SLA(topk=0.25), make_proj(64).half(), backend="triton")
    monkeypatch.setenv(glue.ENV_GLUE, "1")
    with pytest.raises(selfcheck.VariantFailed, match="sla.triton.bwd_glue"):
        o.sum().backward(retain_graph=True)
    monkeypatch.delenv(glue.ENV_GLUE)
    o.sum().backward()  # (the interpreter's default: the PyTorch operators)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", [dict(topk=0.05), dict(topk=0.6)], ids=["subtract", "direct"])
def test_gpu_glue_kernels_match_the_operators(dtype, kw, monkeypatch):
    """Wan 2.1 1.3B's heads (12 x 128) over a third of its 480p tokens, trained SLA (a random projection): the
    gradients with the glue kernels against the PyTorch operators', and the default on a GPU takes the kernels once
    their self-check passed."""
    from tests.utils import DEVICE

    n = 7 * 30 * 52
    q, k, v = (_randn(1, n, 12, 128, seed=s).to(DEVICE, dtype).transpose(1, 2) for s in (50, 51, 52))
    proj = make_proj(128).to(DEVICE, dtype)
    grads = {}
    for on in ("1", "0"):
        monkeypatch.setenv(glue.ENV_GLUE, on)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = sla_attention(*leaves, SLA(**kw), proj, backend="triton")
        grads[on] = torch.autograd.grad(o.float().square().mean(), leaves)
    for name, got, want in zip(["dq", "dk", "dv"], grads["1"], grads["0"]):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
    monkeypatch.delenv(glue.ENV_GLUE)
    assert glue.glue_runs(q)


def test_info_says_whether_the_glue_kernels_run(monkeypatch):
    from dit_accel.cli.info import _glue_status

    assert "self-check passed" in _glue_status() and "DIT_ACCEL_SLA_GLUE=0 turns it off" in _glue_status()
    monkeypatch.setenv(glue.ENV_GLUE, "0")
    assert _glue_status() == "off (DIT_ACCEL_SLA_GLUE=0)"
    monkeypatch.setenv(glue.ENV_GLUE, "1")
    assert _glue_status().startswith("on (DIT_ACCEL_SLA_GLUE=1), wherever the fused SLA backward runs")
    monkeypatch.setenv(glue.ENV_GLUE, "maybe")
    assert "DIT_ACCEL_SLA_GLUE='maybe': expected 1" in _glue_status()
