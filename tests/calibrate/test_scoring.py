"""Calibration scoring: the shared score pass gives each candidate's error as its own ``plan.run`` does."""

import math

import pytest
import torch

from dit_accel.calibrate.candidates import Candidate, candidate_grid
from dit_accel.calibrate.sampling import QKVSampler
from dit_accel.calibrate.scoring import score_candidates
from dit_accel.methods import SLA, Radial, Tile
from dit_accel.patterns.permutation import default_tile
from dit_accel.plans.per_head import PerHead
from dit_accel.plans.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, HEAD_DIM = 4, 32


def _sampler(grid, q, k, v, buckets=((0, 1),)):
    sampler = QKVSampler(list(buckets), per_bucket=1, max_bytes=2**30)
    sampler.set_layers(1)
    sampler.save(0, "layer0", grid, 0, q, k, v)
    return sampler


def _qkv(grid, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, HEADS, math.prod(grid), HEAD_DIM, generator=g) for _ in range(3))


def _slow_errors(grid, candidates, q, k, v):
    """The definition, one attention per candidate: ``plan.run`` against dense attention in fp64."""
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vd
    norm = ref.pow(2).sum()
    errors = torch.zeros(len(candidates), q.shape[1], dtype=torch.float64)
    for i, cand in enumerate(candidates):
        if cand.kind != "dense":
            o, _ = cand.method.plan(grid).run(q, k, v)
            errors[i] = (o.double() - ref).pow(2).sum(dim=(0, 2, 3)) / norm
    return errors


def _per_head_tile(grid):
    """A Tile with one window per head on tiles of fewer than 64 tokens: a per-head layout with partial blocks,
    in a token order of its own."""
    windows = [(1,) * len(grid), (1,) * (len(grid) - 1) + (3,), (3,) + (1,) * (len(grid) - 1), (3,) * len(grid)]
    return Candidate(Tile(tile=(2, 4, 4)[-len(grid):], window=tuple(windows)), "block_sparse", 0.5)


def _assert_close(fast, slow):
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-9)


def _radial(grid):
    return Candidate(Radial(decay=0.25, block_size=64, sink_frames=(0,)), "block_sparse", 0.9)


# (id, grid, candidates): the tiled pass (Tile, GNA; SLA runs its plan beside it), tiles padded past an image
# grid, a raster pass of Radial and SLA on a token count that is no multiple of 64, and SLA alone.
SETS = [
    ("video-4x12x12", (4, 12, 12), lambda g: candidate_grid(g, size="default") + [_per_head_tile(g)]),
    ("image-20x24-padded-tiles", (20, 24), lambda g: candidate_grid(g, size="default") + [_per_head_tile(g)]),
    ("video-5x9x11-radial-sla", (5, 9, 11), lambda g: candidate_grid(g, methods=("sla",)) + [_radial(g)]),
    ("video-4x12x12-sla-only", (4, 12, 12), lambda g: candidate_grid(g, size="large", methods=("sla",))),
]


@pytest.mark.parametrize("grid,make", [case[1:] for case in SETS], ids=[case[0] for case in SETS])
def test_shared_pass_equals_each_plan_run(grid, make):
    cands = make(grid)
    q, k, v = _qkv(grid)
    fast = score_candidates(_sampler(grid, q, k, v), cands, 1)[(0, 0)]
    assert fast.dtype == torch.float64 and fast.shape == (len(cands), HEADS)
    assert cands[0].kind == "dense" and (fast[0] == 0).all()
    _assert_close(fast, _slow_errors(grid, cands, q, k, v))


def test_rows_whose_visited_keys_underflow_are_recomputed():
    grid = (4, 12, 12)
    q, k, v = _qkv(grid)
    scale = 1 / math.sqrt(HEAD_DIM)
    far = math.prod(grid) - 1  # the last frame's far corner: outside every small window of tokens 0 and 1
    block = slice(far // 64 * 64, far)  # the other keys of its 64-token block
    # Key `far` scores 300 above every key a small window of query 0 holds (they underflow to exactly 0 in
    # fp32) and about 100 above those of query 1 (they become subnormal, with few significant bits).
    k[:, :, :, 0] = 0
    k[:, :, far, 0] = 300.0
    q[:, :, 0] = 0
    q[:, :, 0, 0] = 1 / scale
    q[:, :, 1, 0] = 100.0 / 300.0 / scale
    # SLA never picks the block of `far` (its pooled scores are the lowest), so its rows 0 and 1 underflow too.
    k[:, :, block, 0] = -300.0 / (far % 64)  # (the block's pooled key: 0 along dim 0)
    k[:, :, block, 2] -= 20.0
    q[:, :, 2:, 2] = 3.0
    cands = candidate_grid(grid, size="default") + [_radial(grid)]  # (Radial: SLA takes the shared pass)
    small = next(c for c in cands if c.label == "tile w1x1x1")
    plan = small.method.plan(grid)
    mask = plan.layout.to_dense_mask()[0][plan.perm.inverse][:, plan.perm.inverse]  # raster order
    weights = torch.softmax((q[0, 0] * scale) @ k[0, 0].T, -1)
    assert weights[0][mask[0]].sum() == 0 and 0 < weights[1][mask[1]].sum() < 1e-30  # the hazard is real

    fast = score_candidates(_sampler(grid, q, k, v), cands, 1)[(0, 0)]
    _assert_close(fast, _slow_errors(grid, cands, q, k, v))
    assert fast[cands.index(small)].min() > 0.1  # the skipped key dominates: a large error, not a NaN or 0


def _with_fallbacks(grid):
    tile = default_tile(grid, 64)
    mixed = PerHead((Tile(tile=tile, window=(1, 1, 3)),) * 2 + (SLA(topk=0.3),) * 2)  # a PerHeadPlan
    covering = Tile(tile=tile, window=(3, 7, 7))  # covers the grid: a DensePlan
    assert type(covering.plan(grid)).__name__ == "DensePlan"
    return candidate_grid(grid, size="default") + [Candidate(mixed, "block_sparse", 0.5),
                                                   Candidate(covering, "block_sparse", 1.0)]


# (id, candidates on grid (4, 12, 12), the plans that still run): beside the tiled pass, the default SLA
# top-k run their own plans (cheaper than a raster pass for them alone); beside Radial they join its pass.
RUNS = [
    ("tiles-sla-and-fallbacks", _with_fallbacks, ["DensePlan", "PerHeadPlan", "SLAPlan", "SLAPlan", "SLAPlan"]),
    ("radial-sla-gna", lambda g: candidate_grid(g, methods=("gna", "sla")) + [_radial(g)], []),
]


@pytest.mark.parametrize("make,expected", [case[1:] for case in RUNS], ids=[case[0] for case in RUNS])
def test_only_candidates_outside_the_shared_pass_run_their_plan(monkeypatch, make, expected):
    grid = (4, 12, 12)
    cands = make(grid)
    q, k, v = _qkv(grid)
    sampler = _sampler(grid, q, k, v, buckets=((0, 1), (1, 2)))  # bucket 1 has no sample
    runs = []
    plain_run = Plan.run

    def counted(self, *args, **kwargs):
        runs.append(type(self).__name__)
        return plain_run(self, *args, **kwargs)

    monkeypatch.setattr(Plan, "run", counted)
    ticks = []
    out = score_candidates(sampler, cands, 1, progress=ticks.append)
    assert sorted(runs) == expected  # Tile, GNA, Radial (and SLA beside Radial): the shared pass
    assert sum(ticks) == 2 * len(cands) and list(out) == [(0, 0)]
    monkeypatch.setattr(Plan, "run", plain_run)
    _assert_close(out[(0, 0)], _slow_errors(grid, cands, q, k, v))
