"""VSA training calls reading raster order: each cube mean's gradient added by the backward kernels as they store a
gradient's rows (kernels/vsa/raster.py, ``ADD_Q`` / ``ADD_K`` / ``ADD_V`` in the two-pass kernels).

The gradient of the coarse branch reaches q, k and v through the cube means: each token of a cube gets its cube
mean's gradient over the cube's size. That was a pass of its own over each of dQ, dK and dV after the kernels (an
in-place add, about 4.5 q-sized units a call at Wan 480p, ``python -m dit_accel.eval.traffic``); the kernels now add
it before their one rounding. Interpreter tests (fp32 / fp16: its bf16 dot is wrong).
"""
from __future__ import annotations

import pytest
import torch

from dit_accel.kernels import selfcheck
from dit_accel.kernels.block_sparse import triton as bst
from dit_accel.kernels.vsa import raster
from tests.kernels.test_vsa_raster import _qkv, _reference_step, _train_step
from tests.utils import interpreter

pytestmark = pytest.mark.usefixtures("fresh_vsa")  # (tests/kernels/conftest.py)


def _spreads(monkeypatch) -> list:
    """Whether each ``triton_backward`` call was given the means' gradients to add."""
    seen, real = [], bst.triton_backward
    monkeypatch.setattr(bst, "triton_backward", lambda *a, spread=None, **kw: seen.append(spread is not None)
                        or real(*a, spread=spread, **kw))
    return seen


@interpreter
@pytest.mark.parametrize("grid,batch,layout,dtype", [
    ((5, 6, 7), 1, "bnhd", torch.float32),  # partial cubes in every dimension
    ((3, 9, 10), 2, "bnhd", torch.float32),  # a batch that does not fold: one video at a time
    ((4, 8, 8), 2, "bhnd", torch.float16),  # whole cubes, two videos folded into heads
], ids=["partial-fp32", "b2-unfolded-fp32", "whole-b2-fp16"])
def test_the_backward_kernels_add_the_means_gradients(monkeypatch, grid, batch, layout, dtype):
    """A gated training call (heads of 64): the backward kernels take the means' gradients; the output, the selection
    and every gradient are the separate pass's within one rounding of the gradients' dtype (fp32: the same sums), and
    the float64 reference's within the usual bound."""
    seen = _spreads(monkeypatch)
    q, k, v, gate = (x.to(dtype) for x in _qkv(grid, batch=batch, heads=2, d=64, layout=layout, seed=4))
    got = _train_step(q, k, v, gate, grid, "1", monkeypatch, topk=3, backend="triton")
    calls = batch if layout == "bnhd" and batch > 1 else 1  # (the class's first call ran cube order once before)
    assert seen[-calls:] == [True] * calls, seen
    seen.clear()
    monkeypatch.setattr(raster, "spread_runs", lambda q: False)
    apart = _train_step(q, k, v, gate, grid, "1", monkeypatch, topk=3, backend="triton")
    assert seen == [False] * calls, seen
    assert torch.equal(got[1], apart[1]) and torch.equal(got[0], apart[0])
    for name, a, b in zip("qkvg", got[2], apart[2]):
        ulp = torch.finfo(dtype).eps * b.float().abs().clamp_min(1.0)
        assert bool(((a.float() - b.float()).abs() <= ulp).all()), f"d{name}"
    ref_out, ref_grads = _reference_step(q, k, v, gate, grid, 3)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    for name, a, ref in zip("qkvg", got[2], ref_grads):
        torch.testing.assert_close(a.double(), ref, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")


@interpreter
def test_a_head_dim_the_kernels_pad_keeps_the_separate_pass(monkeypatch, tmp_path):
    """Heads of 32 run in 64 columns: no spread (and no self-check asked for it, so a forced raster call with the
    checks on does not fail); the gradients still hold the means' gradients."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "1")
    seen = _spreads(monkeypatch)
    grid = (5, 6, 7)
    q, k, v, gate = _qkv(grid, heads=2, d=32, seed=2)
    assert not raster.spread_runs(q)
    got = _train_step(q, k, v, gate, grid, "1", monkeypatch, topk=3, backend="triton")
    assert seen and not any(seen)
    for name, a, ref in zip("qkvg", got[2], _reference_step(q, k, v, gate, grid, 3)[1]):
        torch.testing.assert_close(a.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@interpreter
@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_the_traffic_around_a_training_call_drops_by_the_separate_pass(monkeypatch, grid):
    """The traffic model (``python -m dit_accel.eval.traffic``): the in-place pass read and wrote dQ, dK and dV once
    more (3 q-sized units or more, and on a grid a cube does not divide, the cube rows' gathers); the kernels read
    the means' gradients instead (a few percent of a unit)."""
    from dit_accel.eval.traffic import measure_traffic

    def units(spread: bool):
        with monkeypatch.context() as m:
            if not spread:
                m.setattr(raster, "spread_runs", lambda q: False)
            return measure_traffic(grid=grid, heads=1, cases=("vsa_train_raster",))["vsa_train_raster"]

    apart, fused = units(False), units(True)
    assert apart["units"] - fused["units"] >= 3.0, (apart, fused)
    assert 0 < fused["kernel_units"] - apart["kernel_units"] < 0.2, (apart, fused)
