"""On CUDA, a plan under ``auto`` runs dense attention where dense measured faster than its sparse path *with the
gathers into tiled order and back* (the README's main job on a GPU: 4 heads x 4,608 tokens, 11 launches per sparse
call against SDPA's one, 0.56x dense on an H100). The GPU is mocked for the choice only (the kernels run on the
CPU) and the timer is a stub: what is checked is which path runs, what it returns and when the choice is taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.kernels.block_sparse import api

GRID, TILE, WINDOW = (3, 12, 20), (1, 3, 5), (1, 1, 3)  # 720 raster tokens in 960 tiled positions


@pytest.fixture
def gpu_auto(monkeypatch):
    monkeypatch.setattr(api, "_dense_applies", lambda device: True)
    monkeypatch.setattr(api, "_arch", lambda device: "h100")
    monkeypatch.delenv("DIT_ACCEL_BACKEND", raising=False)
    monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "1")
    timed = []

    def timer(sparse_ms, dense_ms):
        times = iter([sparse_ms, dense_ms])
        monkeypatch.setattr(api, "_time_ms", lambda fn: timed.append(fn()) or next(times))
        return timed

    return timer


def _plan(monkeypatch):
    """The Tile plan (plans are shared per method and grid: its decisions are reset, and restored after)."""
    plan = dit_accel.Tile(tile=TILE, window=WINDOW).plan(GRID)
    assert plan.perm is not None and plan.layout.q_len > plan.num_tokens  # gathers and padding
    monkeypatch.setattr(plan, "_short", lambda *a, **kw: None)  # the CPU's own short paths: not a GPU's
    monkeypatch.setattr(plan, "_gpu_choice", {})
    monkeypatch.setattr(plan, "dense_reasons", [])
    return plan


def _qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 720, 32, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _masked(q, k, v):
    mask = dit_accel.patterns.tile_mask(GRID, TILE, WINDOW)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_dense_runs_where_it_measured_faster_than_the_sparse_path(gpu_auto, monkeypatch):
    timed = gpu_auto(2.0, 1.0)
    plan = _plan(monkeypatch)
    q, k, v = _qkv()
    with torch.no_grad():
        for _ in range(3):
            o, lse, extra, density = plan.attend(q, k, v, scale=None, backend="auto")
            torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
            ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) / 32 ** 0.5, dim=-1)
            torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
            assert extra is None and density == plan.density < 1
        assert len(timed) == 2  # timed once: the sparse path, then dense
        assert plan.backend_for(q, k, v, "auto") == api.DENSE
        joint = [torch.cat([x, x[:, :, :7]], 2) for x in (q, k, v)]  # what stats see beside text tokens
        assert plan.backend_for(*joint, "auto") == api.DENSE
    assert plan.dense_reasons == [plan.dense_reasons[0]]
    assert plan.dense_reasons[0].startswith("measured: sparse with its gathers 2.000 ms > dense 1.000 ms at N=720")


def test_sparse_runs_where_it_measured_faster(gpu_auto, monkeypatch):
    timed = gpu_auto(1.0, 2.0)
    plan = _plan(monkeypatch)
    q, k, v = _qkv()
    with torch.no_grad():
        o = plan.attend(q, k, v, scale=None, backend="auto")[0]
        torch.testing.assert_close(o, _masked(q, k, v), atol=1e-5, rtol=1e-5)
        plan.attend(q, k, v, scale=None, backend="auto")
    assert len(timed) == 2 and plan.dense_reasons == []
    assert plan.backend_for(q, k, v, "auto") != api.DENSE


@pytest.mark.parametrize("case", ["forced backend", "autograd", "autotune off", "environment backend"])
def test_no_measurement_where_dense_may_not_replace_the_call(gpu_auto, monkeypatch, case):
    timed = gpu_auto(2.0, 1.0)
    plan = _plan(monkeypatch)
    q, k, v = _qkv(requires_grad=case == "autograd")
    if case == "autotune off":
        monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "0")
    if case == "environment backend":
        monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
    o = plan.attend(q, k, v, scale=None, backend="torch" if case == "forced backend" else "auto")[0]
    torch.testing.assert_close(o, _masked(q, k, v), atol=1e-5, rtol=1e-5)
    assert timed == [] and plan.dense_reasons == []


def test_a_raster_key_no_query_sees_keeps_the_pattern(gpu_auto, monkeypatch):
    """Dense attention would give such a key softmax mass: it is not the pattern's unmasked original."""
    timed = gpu_auto(2.0, 1.0)
    plan = _plan(monkeypatch)
    live = api.live_keys(plan.layout_on("cpu")).clone()
    live[0, plan.perm.inverse[5]] = False
    monkeypatch.setattr("dit_accel.plans.plan.live_keys", lambda layout: live)
    q, k, v = _qkv()
    with torch.no_grad():
        o = plan.attend(q, k, v, scale=None, backend="auto")[0]
    torch.testing.assert_close(o, _masked(q, k, v), atol=1e-5, rtol=1e-5)
    assert timed == [] and plan.dense_reasons == []


def test_a_traced_or_captured_call_takes_the_eager_answer(gpu_auto, monkeypatch):
    """Nothing is timed inside a graph: a captured call runs what the eager call of its signature chose, and a
    signature no eager call decided runs sparse."""
    from dit_accel.plans import plan as plan_module

    timed = gpu_auto(2.0, 1.0)
    plan = _plan(monkeypatch)
    q, k, v = _qkv()
    with torch.no_grad():
        plan.attend(q, k, v, scale=None, backend="auto")
        monkeypatch.setattr(plan_module, "in_graph", lambda: True)
        o = plan.attend(q, k, v, scale=None, backend="auto")[0]
        torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
        q2, k2, v2 = (x[:, :1] for x in (q, k, v))  # another signature, first seen inside the graph
        o2 = plan.attend(q2, k2, v2, scale=None, backend="auto")[0]
        torch.testing.assert_close(o2, _masked(q2, k2, v2), atol=1e-5, rtol=1e-5)
    assert len(timed) == 2
