"""Traced and captured calls on CUDA, with the GPU-only parts scripted (issue 46, items 2 and 3).

- A call that ``torch.compile`` traces, or that a CUDA graph captures, may not time anything (a
  ``synchronize()`` inside a capture breaks it): the autotuner, the measured dense rule and the dense kernel's
  choice are skipped there, and the eager call's decision for the same shape is reused, so compiled and eager
  calls run the same kernel.
- The launcher's tile plan, built on first use of a layout, takes no host sync inside a capture.

CUDA tensors here are FakeTensors (shapes, dtypes and devices without memory); the capture state is scripted by
replacing ``torch.cuda.is_current_stream_capturing``.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dit_accel.kernels import backends, request
from dit_accel.kernels.block_sparse import api
from dit_accel.kernels.layout import BlockLayout
from tests.utils import random_mask


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _fake_cuda_qkv(n=128, d=64):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return tuple(torch.empty(1, 2, n, d, dtype=torch.float16, device="cuda") for _ in range(3))


def _no_timing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("timed inside a traced or captured call")

    monkeypatch.setattr(api, "block_sparse_tuner", boom)
    monkeypatch.setattr(api, "_measured_reason", boom)
    monkeypatch.setattr(api, "layout_on", lambda layout, device: layout)  # (the fake device copy: the layout)


def test_in_graph_sees_a_capture(capturing):
    assert request.in_graph()


def test_a_captured_call_reuses_the_eager_choice_for_its_shape(capturing, monkeypatch):
    _no_timing(monkeypatch)
    mask = random_mask(1, 128, 128, block=64, seed=0)
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    q, k, v = _fake_cuda_qkv()
    for eager in ("flex", api.DENSE):
        layout.derived[("block_sparse.eager_choice", api._shape_key(q, k, False, False))] = eager
        assert api._decide(q, k, v, layout, None, "auto", False)[1] == eager
    # another shape has no eager choice: decided without any timing (boom above)
    q2, k2, v2 = _fake_cuda_qkv(n=128, d=32)
    api._decide(q2, k2, v2, layout, None, "auto", False)


def test_an_eager_cuda_decision_is_stored_for_traced_calls(monkeypatch):
    mask = random_mask(1, 128, 128, block=64, seed=1)
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    q, k, v = _fake_cuda_qkv()
    monkeypatch.setattr(api, "_decide_eager", lambda q, k, v, layout, scale, backend, lse: (0.125, "flex", layout))
    monkeypatch.setattr(api, "_static_for_graphs", lambda layout: True)
    assert api._decide(q, k, v, layout, None, "auto", False)[1] == "flex"
    assert api._EAGER.peek(layout, api._shape_key(q, k, False, False)) == "flex"


def test_a_traced_training_step_does_not_reuse_a_no_grad_eager_choice(monkeypatch):
    """An eager inference call (no grad) chose dense attention; the compiled or captured training step of the same
    shape records a backward, so it decides for itself instead of running the inference call's backend."""
    mask = random_mask(1, 128, 128, block=64, seed=2)
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    q, k, v = _fake_cuda_qkv()
    decided = []

    def decide(q, k, v, layout, scale, backend, lse):
        decided.append(request.in_graph())
        return 0.125, ("triton" if request.in_graph() else api.DENSE), layout

    monkeypatch.setattr(api, "_decide_eager", decide)
    monkeypatch.setattr(api, "_static_for_graphs", lambda layout: True)
    with torch.no_grad():
        assert api._decide(q, k, v, layout, None, "auto", False)[1] == api.DENSE  # the eager inference call
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with torch.no_grad():  # the same inference call, captured: the eager choice
        assert api._decide(q, k, v, layout, None, "auto", False)[1] == api.DENSE
    qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
    assert api._decide(qg, kg, vg, layout, None, "auto", False)[1] == "triton"  # the training step decides
    assert decided == [False, True]


def test_the_autotuner_times_nothing_in_a_capture(capturing, monkeypatch):
    """Two tuned contenders that can run, nothing stored for the shape class: an eager call would time them; a
    captured one returns None (its caller reuses the eager decision) without calling the tuner."""
    from dit_accel.kernels import autotune

    monkeypatch.setattr(autotune, "enabled", lambda: True)
    monkeypatch.setattr(autotune, "cached_choice", lambda shape: None)
    monkeypatch.setattr(autotune.ShapeClass, "of", classmethod(lambda cls, *a: "shape"))  # (no CUDA here)
    monkeypatch.setattr(backends, "_verified", lambda family, name, request, forced=False: True)
    fake = (("a", lambda r: None, True), ("b", lambda r: None, True))
    monkeypatch.setitem(backends._TABLE, "block_sparse", fake)
    monkeypatch.setitem(backends.TUNED, "block_sparse", ("a", "b"))
    req = request.Request(torch.device("cuda"), torch.float16, 64)
    timed = []

    def tuner(names, r):
        timed.append(list(names))
        return "b"

    assert backends._tuned("block_sparse", req, tuner) is None and timed == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # the same call, eager: timed
    assert backends._tuned("block_sparse", req, tuner) == "b" and timed == [["a", "b"]]


def test_a_training_call_does_not_reuse_the_autotuners_no_grad_choice(monkeypatch, tmp_path):
    """The autotuner's stored choice is keyed by whether the calls record a backward: the inference calls' pick
    ("b") is not a training step's, which is timed on its own (here it picks "a")."""
    from dit_accel.kernels import autotune

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    autotune.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr(autotune, "enabled", lambda: True)
    monkeypatch.setattr(backends, "_verified", lambda family, name, request, forced=False: True)
    monkeypatch.setitem(backends._TABLE, "block_sparse", (("a", lambda r: None, True), ("b", lambda r: None, True)))
    monkeypatch.setitem(backends.TUNED, "block_sparse", ("a", "b"))
    timed = []

    def tuner(pick):
        def tune(names, r):
            timed.append(r.needs_grad)
            shape = autotune.ShapeClass.of("block_sparse", r, r.density)
            return autotune.choose(shape, {n: (lambda: None) for n in names},
                                   timer=lambda fn, w, rep, n=iter(names): 1.0 if next(n) == pick else 2.0)
        return tune

    infer = request.Request(torch.device("cuda"), torch.float16, 64)
    train = request.Request(torch.device("cuda"), torch.float16, 64, needs_grad=True)
    assert backends._tuned("block_sparse", infer, tuner("b")) == "b"
    assert backends._tuned("block_sparse", train, tuner("a")) == "a" and timed == [False, True]
    assert backends._tuned("block_sparse", infer, tuner("a")) == "b" and len(timed) == 2  # each kept its own
    autotune.clear()


def test_the_dense_choice_in_a_capture_is_the_eager_measured_one(capturing, monkeypatch):
    from dit_accel.kernels import autotune
    from dit_accel.kernels.dense import choice

    monkeypatch.setattr(autotune, "enabled", lambda: True)
    monkeypatch.setattr(autotune, "choose", lambda *a, **k: pytest.fail("timed inside a capture"))
    q, k, v = _fake_cuda_qkv()
    assert len(choice.candidates(q, k, True)) >= 2  # (an eager call would time them)
    try:
        # No eager measurement for this signature: the fixed order answers, nothing is timed.
        assert choice.choose(q, k, v, 0.125, True) == choice.default_choice(q, k, True)
        choice._CHOSEN.clear()
        choice._CHOSEN[choice._key(q, k, v, 0.125, True, False, True)] = "sdpa-cudnn"
        assert choice.choose(q, k, v, 0.125, True) == "sdpa-cudnn"  # the eager call's measured choice
    finally:
        choice._CHOSEN.clear()


def test_a_tile_plan_built_in_a_capture_takes_no_host_sync(monkeypatch):
    """Same plan entries as the eager one (row lengths, tiles), only wider: nothing reads past a row's count."""
    pytest.importorskip("triton")
    from dit_accel.kernels.block_sparse import triton as bst

    mask = random_mask(2, 200, 170, block=32, seed=3)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    eager = bst.tile_plan(layout, 32, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def no_sync(self, *a, **k):
        raise AssertionError("host sync inside a capture")

    monkeypatch.setattr(torch.Tensor, "__int__", no_sync)
    captured = bst.tile_plan(layout, 32, 32)
    monkeypatch.undo()
    assert captured.plan.shape[-1] >= eager.plan.shape[-1]
    w = eager.w
    counts = eager.plan[..., :2]
    assert torch.equal(captured.plan[..., :2], counts)
    wc = (captured.plan.shape[-1] - 2) // 2
    for h in range(eager.plan.shape[0]):
        for r in range(eager.plan.shape[1]):
            n = int(counts[h, r].sum())
            assert torch.equal(captured.plan[h, r, 2:2 + n], eager.plan[h, r, 2:2 + n])
            assert torch.equal(captured.plan[h, r, 2 + wc:2 + wc + n], eager.plan[h, r, 2 + w:2 + w + n])
