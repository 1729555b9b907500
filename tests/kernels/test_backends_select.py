"""The backend peers and ``auto``'s measured selection among them, on CPU: declared capabilities, reasons for
missing vendor packages, scripted timers with planning costs, fallbacks (a contender that raises, one that
failed its self-check, one that cannot serve the layout) and ties."""

from __future__ import annotations

import pytest
import torch

from dit_accel.kernels import BackendUnavailable, BlockLayout, autotune, backends, block_sparse_attention
from dit_accel.kernels.backends import Request, backend_peers, backend_reasons, resolve
from dit_accel.kernels.block_sparse import select_backend as sel
from dit_accel.kernels.block_sparse import backends as vendor
from dit_accel.kernels.block_sparse.backends import cudnn as vcudnn


pytestmark = pytest.mark.usefixtures("fresh_choices")


def _shape():
    return autotune.ShapeClass(device_name="FakeGPU", torch="2.x", triton="3.x", dit_accel="0.x",
                               family="block_sparse", dtype="bfloat16", head_dim=128, density="<=0.1")


def _by_name(times):
    """A timer reporting scripted milliseconds per contender name (an Exception raises); records the order."""
    seen = []

    def timer(fn, warmup, repeats):
        seen.append(fn.name)
        t = times[fn.name]
        if isinstance(t, Exception):
            raise t
        return t

    timer.seen = seen
    return timer


def _contenders(plan_ms):
    return [sel.Contender(name, lambda: None, ms) for name, ms in plan_ms.items()]


# ----------------------------------------------------------------------------- the peers
def test_peers_declare_what_they_serve_and_keep_the_old_table():
    peers = {b.name: b for b in backend_peers("block_sparse")}
    assert list(peers) == ["triton", "flex", "torch", "fa4", "cudnn", "natten"]
    assert backends.BACKENDS == ("triton", "flex", "torch", "fa4", "cudnn", "natten")
    assert [(n, a) for n, _, a in backends._TABLE["block_sparse"]][:3] == [("triton", True), ("flex", False),
                                                                         ("torch", True)]
    assert set(backends.TUNED["block_sparse"]) == {"triton", "flex", "fa4", "cudnn", "natten"}
    fa4 = peers["fa4"].declared()
    assert fa4["dtypes"] == ["float16", "bfloat16"] and fa4["archs"] == ["sm_9x", "sm_10x"] and fa4["backward"]
    assert peers["cudnn"].head_dims == (64, 128) and peers["torch"].declared()["archs"] == "any device"
    assert all(not peers[n].auto for n in backends.VENDOR_BACKENDS)  # an optional package is never a default


@pytest.mark.parametrize("name,package", [("fa4", "flash-attn-4"), ("cudnn", "nvidia-cudnn-frontend"),
                                          ("natten", "natten")])
def test_a_forced_vendor_backend_that_cannot_run_raises_with_the_reason(name, package, monkeypatch):
    layout = BlockLayout.from_dense_mask(torch.rand(70, 70) < 0.5, 32, 32)
    q = torch.randn(1, 2, 70, 16)
    with pytest.raises(BackendUnavailable, match=f"attention backend '{name}' cannot run"):
        block_sparse_attention(q, q, q, layout, backend=name)
    monkeypatch.setenv(backends.ENV_BACKEND, name)
    with pytest.raises(BackendUnavailable, match=name):
        block_sparse_attention(q, q, q, layout)
    # not installed: the reason names the pip package and the extra
    monkeypatch.setattr(vendor.module(name), "package_reason",
                        lambda module, pip, extra: f"the {pip} package is not installed ([{extra}])")
    why = backend_reasons("cpu")[name]
    assert package in why and f"[{name}]" in why
    assert backend_reasons("cpu")["torch"] is None and set(backend_reasons("cpu")) == set(backends.BACKENDS)


def test_no_cuda_is_a_reason_when_the_package_is_there(monkeypatch):
    monkeypatch.setattr(vendor.module("fa4"), "package_reason", lambda *a: None)
    why = vendor.module("fa4").reason(Request(torch.device("cpu"), torch.bfloat16, 128))
    assert "CUDA" in why


def test_env_backend_lists_the_vendor_backends(monkeypatch):
    monkeypatch.setenv(backends.ENV_BACKEND, "fa5")
    with pytest.raises(ValueError, match="fa4, cudnn, natten"):
        backends.env_backend()
    monkeypatch.setenv(backends.ENV_BACKEND, "NATTEN")
    assert backends.env_backend() == "natten"
    # SLA has no vendor backend: a forced vendor name runs SLA's PyTorch twin, like "flex" does
    assert resolve("sla", "auto", Request(torch.device("cpu"), torch.float32, 64)) == "torch"


# ----------------------------------------------------------------------------- the selection
def test_planning_cost_counts_per_reuse():
    times = {"triton": 1.5, "fa4": 1.0}
    plan = {"triton": 0.0, "fa4": 10.0}
    assert sel.select(_shape(), _contenders(plan), _by_name(times), reuses=1) == "triton"  # 1.0 + 10 > 1.5
    autotune.clear()
    assert sel.select(_shape(), _contenders(plan), _by_name(times), reuses=100) == "fa4"  # 1.0 + 0.1 < 1.5
    stored = autotune.cached_choices()[0]
    assert stored["choice"] == "fa4" and stored["times_ms"] == {"triton": 1.5, "fa4": pytest.approx(1.1)}
    assert sel.decisions()[-1].plan_ms == plan and sel.decisions()[-1].reuses == 100


def test_a_contender_that_raises_is_out():
    timer = _by_name({"fa4": RuntimeError("launch failed"), "cudnn": 2.0, "triton": 3.0})
    assert sel.select(_shape(), _contenders({"fa4": 0, "cudnn": 0, "triton": 0}), timer) == "cudnn"
    assert autotune.cached_choices()[0]["times_ms"]["fa4"] is None


def test_a_contender_that_failed_its_self_check_is_never_timed():
    timer = _by_name({"fa4": 0.5, "natten": 0.7, "triton": 3.0})
    chosen = sel.select(_shape(), _contenders({"fa4": 0, "natten": 0, "triton": 0}), timer,
                        verified=lambda name: name != "fa4")
    assert chosen == "natten" and "fa4" not in timer.seen
    assert "self-check" in sel.decisions()[-1].skipped["fa4"]


def test_ties_go_to_the_earlier_contender_and_the_choice_is_kept():
    timer = _by_name({"triton": 2.0, "cudnn": 2.0})
    assert sel.select(_shape(), _contenders({"triton": 0, "cudnn": 0}), timer) == "triton"
    again = _by_name({"triton": 9.0, "cudnn": 1.0})
    assert sel.select(_shape(), _contenders({"triton": 0, "cudnn": 0}), again) == "triton"  # stored per class
    assert again.seen == []


def test_when_every_contender_failed_its_check_none_is_chosen_and_nothing_stored():
    assert sel.select(_shape(), _contenders({"fa4": 0, "triton": 0}), _by_name({}), verified=lambda n: False) is None
    assert autotune.cached_choices() == []


def test_a_contender_whose_output_on_the_call_is_wrong_is_not_stored():
    timer = _by_name({"fa4": 0.5, "triton": 3.0})
    chosen = sel.select(_shape(), _contenders({"fa4": 0, "triton": 0}), timer, verify=lambda name: name != "fa4")
    assert chosen == "triton" and autotune.cached_choices()[0]["choice"] == "triton"


@pytest.fixture
def masked_layout():
    """Partial (element-masked) blocks at every block size cuDNN takes."""
    g = torch.Generator().manual_seed(0)
    return BlockLayout.from_dense_mask(torch.rand(200, 200, generator=g) < 0.3, 64, 64)


def test_the_tuner_skips_a_vendor_that_cannot_serve_the_layout(masked_layout, monkeypatch):
    monkeypatch.setattr(vcudnn, "cuda_arch", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    q = torch.randn(1, 2, 200, 64)
    tune = sel.measured_tuner(q, q, q, masked_layout, 0.125, 0.5, attention=lambda *a, **k: None,
                              timer=_by_name({"triton": 500.0, "flex": 1.0}),
                              reuses=4, verified=lambda name: True, verify=lambda name: True,
                              free=lambda device: None)
    request = Request(torch.device("cuda"), torch.bfloat16, 64, block_q=64, block_k=64)
    assert tune(["triton", "flex", "cudnn"], request) == "flex"
    decision = sel.decisions()[-1]
    assert "element masks" in decision.skipped["cudnn"] and decision.reuses == 4
    assert decision.plan_ms["flex"] > 0  # FlexAttention's BlockMask build, timed once per layout
    assert sel._FLEX_PLAN.entries(masked_layout)["ms"] == decision.plan_ms["flex"]


def test_a_stored_vendor_choice_falls_back_on_a_layout_it_cannot_serve(masked_layout, monkeypatch):
    monkeypatch.setattr(vcudnn, "cuda_arch", lambda device: 90)
    cpu = Request(torch.device("cpu"), torch.float32, 64)
    assert sel.layout_fallback("cudnn", masked_layout, cpu, return_lse=False) == "torch"
    radial = BlockLayout.from_block_masks(torch.eye(4, dtype=torch.bool), q_len=256, kv_len=256, block_q=64,
                                          block_k=64)
    assert sel.layout_fallback("cudnn", radial, cpu, return_lse=False) == "cudnn"
    # cuDNN's backward takes no lse gradient
    grad = Request(torch.device("cpu"), torch.bfloat16, 128, needs_grad=True)
    assert sel.layout_fallback("cudnn", radial, grad, return_lse=True) == "torch"


def test_planning_time_is_measured_once_per_layout(masked_layout, monkeypatch):
    monkeypatch.setattr(vendor.module("fa4"), "cuda_arch", lambda device: 90)
    first = vendor.plan_seconds("fa4", masked_layout, 64)
    assert first > 0 and vendor.plan_seconds("fa4", masked_layout, 64) == first
    assert not isinstance(vendor.plan("fa4", masked_layout, 64), str)


def test_expected_reuses(masked_layout):
    assert sel.expected_reuses(masked_layout) == sel.DEFAULT_REUSES == 1
    assert sel.expected_reuses(sel.expect_reuses(masked_layout, 40 * 50)) == 2000
    with pytest.raises(ValueError, match="positive int"):
        sel.expect_reuses(masked_layout, 0)


def test_vendor_contenders_is_empty_without_the_packages_and_says_why(masked_layout):
    q = torch.randn(1, 2, 200, 64)
    assert vendor.vendor_contenders(masked_layout, q, q, q) == {}
    reasons = vendor.vendor_reasons(masked_layout, q, q, q)
    assert set(reasons) == {"fa4", "cudnn", "natten"} and all(reasons.values())


def test_info_lists_every_backend_and_why_not(monkeypatch):
    from dit_accel.cli.info import _backends  # the "backends" section of `dit-accel info`

    monkeypatch.setattr(vendor.module("cudnn"), "package_reason", lambda *a: "the nvidia-cudnn-frontend package is "
                        "not installed")
    listed = _backends(torch.device("cpu"))
    assert list(listed) == list(backends.BACKENDS)
    assert listed["torch"] == "usable" and listed["cudnn"].startswith("not usable: the nvidia-cudnn-frontend")


def test_dispatch_runs_a_forced_vendor_backend_and_refuses_a_layout_it_cannot_serve(masked_layout, monkeypatch):
    """backend='cudnn' goes through the peers' can_run, the vendor plan and its run (a stand-in here)."""
    from dit_accel.kernels.block_sparse.naive import torch_block_sparse_attention

    table = dict(backends._TABLE)
    table["block_sparse"] = tuple((n, (lambda r: None) if n == "cudnn" else c, a) for n, c, a in table["block_sparse"])
    monkeypatch.setattr(backends, "_TABLE", table)
    monkeypatch.setattr(vcudnn, "cuda_arch", lambda device: 90)
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")  # the stand-in serves only this test's layout, not the check's
    ran = []

    def fake_run(blocks, q, k, v, scale, return_lse):
        ran.append(blocks)
        return torch_block_sparse_attention(q, k, v, whole, scale)[0], None

    monkeypatch.setattr(vcudnn, "run", fake_run)
    whole = BlockLayout.from_block_masks(torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5,
                                         q_len=250, kv_len=250, block_q=64, block_k=64)
    q = torch.randn(1, 2, 250, 32)
    out = block_sparse_attention(q, q, q, whole, backend="cudnn")
    assert len(ran) == 1 and isinstance(ran[0], vcudnn.CudnnBlocks)
    torch.testing.assert_close(out, block_sparse_attention(q, q, q, whole, backend="torch"))
    q2 = torch.randn(1, 2, 200, 32)
    with pytest.raises(BackendUnavailable, match="cannot run this layout: .*element masks"):
        block_sparse_attention(q2, q2, q2, masked_layout, backend="cudnn")


def test_vendor_versions_name_the_packages():
    found = vendor.versions()
    assert set(found) == set(vendor.NAMES) and all(v is None or isinstance(v, str) for v in found.values())
    assert vendor.PACKAGES["fa4"] == "flash-attn-4"


# ----------------------------------------------------------------------------- issue 46, item 8
def test_a_vendor_verdict_is_keyed_by_its_package_version(monkeypatch):
    """An upgrade of the vendor package is checked again: its version is part of the verdict's key."""
    from dit_accel.kernels import selfcheck

    cpu, shape = torch.device("cpu"), {"head_dim": 128, "block_q": 64, "block_k": 64}
    monkeypatch.setattr(vendor, "versions", lambda: {"fa4": "4.0.0b36", "cudnn": None, "natten": "0.21.7"})
    old = selfcheck._key("block_sparse.natten.bwd", cpu, torch.bfloat16, shape)
    assert old.endswith("package natten 0.21.7")
    monkeypatch.setattr(vendor, "versions", lambda: {"fa4": "4.0.0b36", "cudnn": None, "natten": "0.22.0"})
    assert selfcheck._key("block_sparse.natten.bwd", cpu, torch.bfloat16, shape) != old
    assert "package" not in selfcheck._key("block_sparse.triton.fwd", cpu, torch.float16, shape)


def test_natten_without_libnatten_is_refused(monkeypatch):
    import types

    from dit_accel.kernels.block_sparse.backends import natten as vnatten

    monkeypatch.setattr(vnatten, "package_reason", lambda *a: None)
    monkeypatch.setattr(vnatten, "cuda_reason", lambda *a: None)
    for has, refused in ((False, True), (True, False)):
        vnatten.libnatten_reason.cache_clear()
        monkeypatch.setattr(vnatten, "vendor_import", lambda *a, has=has: types.SimpleNamespace(HAS_LIBNATTEN=has))
        why = vnatten.reason(Request(torch.device("cuda"), torch.bfloat16, 64))
        assert (why is not None and "libnatten" in why and "full score matrix" in why) == refused, why
    vnatten.libnatten_reason.cache_clear()


def test_cudnn_backward_is_refused_on_sm101(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cudnn.block_sparse_attention" else real(name, *a))
    monkeypatch.setattr(vcudnn, "package_reason", lambda *a: None)
    monkeypatch.setattr(vcudnn, "cuda_reason", lambda *a: None)
    for arch, refused in ((101, True), (100, False), (90, False)):
        monkeypatch.setattr(vcudnn, "cuda_arch", lambda device, arch=arch: arch)
        grad = vcudnn.reason(Request(torch.device("cuda"), torch.bfloat16, 128, needs_grad=True))
        assert (grad is not None and "sm_101" in grad) == refused, grad
        assert vcudnn.reason(Request(torch.device("cuda"), torch.bfloat16, 128)) is None  # the forward serves


def test_the_fallback_after_a_vendor_is_itself_verified(masked_layout, monkeypatch):
    """A stored cuDNN choice this layout cannot take falls back; a fallback whose self-check failed is skipped."""
    monkeypatch.setattr(vcudnn, "cuda_arch", lambda device: 90)
    cuda = Request(torch.device("cuda"), torch.bfloat16, 64)
    monkeypatch.setattr(backends, "_TABLE", {"block_sparse": [("triton", lambda r: None, True),
                                                               ("flex", lambda r: None, True)]})
    monkeypatch.setattr(backends, "_verified", lambda family, name, request, forced=False: name != "triton")
    assert sel.layout_fallback("cudnn", masked_layout, cuda, return_lse=False) == "flex"
