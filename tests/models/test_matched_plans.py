"""docs/scripts/tiny_shapes_63_matched_plans.py (BENCHMARKS.md section 8): every method's plan has the shipped
plan's steps and keeps the shipped plan's share of frames on each of them."""
import importlib.util
from pathlib import Path

import pytest

from dit_accel.methods import GNA, SLA, VSA, Dense, Radial, Tile
from dit_accel.models.tiny_shapes import TINY_SHAPES_63_PLAN
from dit_accel.plans.sparse_plan import SparsePlan

_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "scripts" / "tiny_shapes_63_matched_plans.py"
GRID = (32, 12, 12)


@pytest.fixture(scope="module")
def plans():
    spec = importlib.util.spec_from_file_location("tiny_shapes_63_matched_plans", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plans()


def test_the_tile_plan_is_the_shipped_plan(plans):
    assert plans["tile"].content_hash() == SparsePlan.load(TINY_SHAPES_63_PLAN).content_hash()


def test_every_method_keeps_the_shipped_share_of_frames_on_the_shipped_steps(plans):
    shipped = SparsePlan.load(TINY_SHAPES_63_PLAN)
    frames = {(p.start, p.stop): p.method(0).window[0] for p in shipped.phases}  # {(2, 3): 17, (3, None): 3}
    assert set(plans) == {"tile", "gna", "sla", "vsa", "radial"}
    for name in ("gna", "sla", "vsa"):
        plan = plans[name]
        assert {(p.start, p.stop) for p in plan.phases} == set(frames)
        for phase in plan.phases:
            keep = frames[(phase.start, phase.stop)] / GRID[0]
            methods = {phase.method(layer) for layer in range(shipped.num_layers)}
            assert len(methods) == 1 and isinstance(phase.default, Dense)
            method = methods.pop()
            if isinstance(method, GNA):
                assert tuple(method.kernel_size) == (frames[(phase.start, phase.stop)], *GRID[1:])
            elif isinstance(method, SLA):
                assert method.topk == pytest.approx(keep)
            else:
                assert isinstance(method, VSA)  # its cubes hold 4 frames: within one cube row of the share
                assert abs(method.plan(GRID).density - keep) < 4 / GRID[0]
    radial = plans["radial"]
    assert [(p.start, p.stop) for p in radial.phases] == [(shipped.phases[0].start, None)]
    assert isinstance(radial.phases[0].method(0), Radial)
    assert all(isinstance(p.method(0), Tile) for p in plans["tile"].phases)
