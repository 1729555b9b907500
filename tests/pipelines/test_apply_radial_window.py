"""dit_accel.apply(..., Radial(spatial="window")) on the tiny Wan transformer (CPU, fp32).

The reference is independent of dit_accel's attention path:
``tests.utils.ReferenceAttention`` replaces every self-attention SDPA call of the
*unmodified* model by the dense oracle under ``radial_window_mask`` (raster
order). Wan's self-attention is video-only, so the mask covers the whole sequence.
"""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import radial_window_layout, radial_window_mask
from tests.utils import ReferenceAttention, first_output as _run

GRID = (6, 12, 16)  # S = 192, B = 64: far frame pairs get a 9 x 13 window, distance 5 is dropped


@pytest.fixture(scope="module")
def wan():
    model = T.build_tiny_transformer("wan")
    return model, T.tiny_transformer_inputs("wan", model, grid=GRID, batch=1)


@pytest.mark.parametrize("sinks", [(0,), ()], ids=["sink0", "nosink"])
def test_window_matches_masked_reference(wan, sinks):
    model, kwargs = wan
    method = dit_accel.Radial(block_size=64, decay=1.0, sink_frames=sinks, spatial="window")
    pattern = radial_window_mask(GRID, 64, 1.0, sinks)
    assert not pattern.all()
    with ReferenceAttention(pattern, "none") as ref_mode:
        ref = _run(model, kwargs)
    assert ref_mode.calls == 2  # two transformer blocks
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        plan, rows = handle.plan(method, GRID), handle.stats()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert plan.kind == "layout" and plan.perm is not None and plan.perm.tile[0] == 1
    expected = radial_window_layout(GRID, 64, 1.0, sinks)[1].density()
    assert plan.density == pytest.approx(expected) and expected < 1
    assert all(r["sparse_calls"] == 1 and r["density"] == pytest.approx(expected) for r in rows)


def test_window_differs_from_band_and_band_stays_raster(wan):
    model, kwargs = wan
    outs = {}
    for spatial in ("band", "window"):
        method = dit_accel.Radial(block_size=64, sink_frames=(), spatial=spatial)
        with dit_accel.apply(model, method, backend="torch") as handle:
            outs[spatial] = _run(model, kwargs)
            plan = handle.plan(method, GRID)
        assert (plan.perm is None) == (spatial == "band")
    assert (outs["band"] - outs["window"]).abs().max() > 1e-4
