"""plans: backend="auto" on CPU runs a layout too dense to pay off as masked dense attention (same result)."""

import pytest
import torch

import dit_accel
from dit_accel.kernels.block_sparse.naive import sparse_cost_ratio
from dit_accel.plans.plan import DENSE_MASKED


def _qkv(n, heads=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("method, grid, dense", [
    (dit_accel.GNA(kernel_size=(3, 7, 7)), (4, 16, 16), True),        # density 0.39, cost ratio 1.07
    (dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)), (4, 16, 16), False),  # density 0.06, ratio 0.12
    (dit_accel.GNA(kernel_size=(3, 7, 7)), (3, 10, 10), True),  # tiles pad 300 tokens to 576: mask in raster order
])
def test_auto_takes_masked_dense_only_when_the_twin_would_be_slower(method, grid, dense):
    plan = method.plan(grid)
    q, k, v = _qkv(plan.num_tokens)
    assert (sparse_cost_ratio(plan.layout, batch_heads=4, head_dim=64) >= 1.0) == dense
    with torch.no_grad():
        assert (plan.backend_for(q, k, v, "auto") == DENSE_MASKED) == dense
        assert plan.backend_for(q, k, v, "torch") == "torch"  # an explicit backend is always obeyed
        auto, _ = plan.run(q, k, v, backend="auto")
        twin, _ = plan.run(q, k, v, backend="torch")
    torch.testing.assert_close(auto, twin, rtol=1e-5, atol=1e-5)
    # With gradients the twin runs (the dense path is forward-only).
    q.requires_grad_(True)
    assert plan.backend_for(q, k, v, "auto") != DENSE_MASKED


def test_joint_text_merges_exactly_on_the_dense_path():
    plan = dit_accel.GNA(kernel_size=(3, 7, 7)).plan((4, 16, 16))
    q, k, v = _qkv(plan.num_tokens + 16, seed=1)
    with torch.no_grad():
        assert plan.backend_for(q[:, :, 16:], k, v, "auto") == DENSE_MASKED
        auto, _ = plan.run(q, k, v, num_text=16, text_first=True, backend="auto")
        twin, _ = plan.run(q, k, v, num_text=16, text_first=True, backend="torch")
    torch.testing.assert_close(auto, twin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [4096, 7], ids=["one-chunk", "chunked"])
def test_attend_with_lse_matches_softmax_in_one_chunk_and_in_several(monkeypatch, chunk):
    """The text branch: one chunk returns its result without a concatenated copy; several are concatenated."""
    from dit_accel import plans

    monkeypatch.setattr(plans, "_TEXT_CHUNK", chunk)
    q, k, v = _qkv(20, heads=2, d=16, seed=3)
    valid = torch.tensor([[True, False, True, True, False, True]])
    k, v = k[:, :, :6], v[:, :, :6]
    o, lse = plans.attend_with_lse(q, k, v, valid, 0.25)
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)


def test_backend_for_a_padded_tiling_resolves_once_per_call_signature(monkeypatch):
    """Pipelines' statistics ask ``backend_for`` on every attention call; for a tiling that pads the grid (raster
    lengths differ from the kernels') it resolved the backend table each time: tens of microseconds of host time per
    call, which a launch-bound GPU pipeline pays (the main job on an H200, BENCHMARKS 10.3). It is resolved once per
    call signature now, and a new signature (gradients, another backend, ``$DIT_ACCEL_BACKEND``) resolves again."""
    from dit_accel.plans import plan as plan_module

    plan = dit_accel.Tile(tile=(1, 3, 5), window=(1, 1, 3)).plan((3, 12, 20))
    assert plan.layout.q_len > plan.num_tokens  # padded: the kernels see other lengths
    monkeypatch.setattr(plan, "_short", lambda *a, **kw: None)  # not the CPU's own short paths
    monkeypatch.setattr(plan, "_padded_backends", {})
    calls = []
    real = plan_module.resolve
    monkeypatch.setattr(plan_module, "resolve", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    q, k, v = _qkv(plan.num_tokens, heads=2, d=32)
    with torch.no_grad():
        assert [plan.backend_for(q, k, v, "auto") for _ in range(3)] == ["torch"] * 3
        assert plan.backend_for(q, k, v, "flex") == "flex"
    assert calls == ["auto", "flex"]
    q.requires_grad_(True)
    assert plan.backend_for(q, k, v, "auto") == "torch" and calls == ["auto", "flex", "auto"]
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
    assert plan.backend_for(q, k, v, "auto") == "torch" and len(calls) == 4
