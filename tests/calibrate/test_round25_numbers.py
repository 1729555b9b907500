"""Calibration's numbers against brute force written from their definitions (docs/calibration.md, the module
docstrings): each candidate's error on a q/k/v sample (dense fp64 attention and the method's token mask, written
here), each candidate's cost (visited blocks counted pair by pair), the per-layer choice of the search (every
assignment enumerated), the layer-error bound, and the evidence script's settings."""

import itertools
import math
import random

import pytest
import torch

from dit_accel.calibrate import evidence
from dit_accel.calibrate.candidates import Candidate, candidate_grid
from dit_accel.calibrate.costs import CostModel
from dit_accel.calibrate.run import CalibrationSettings, split_jobs
from dit_accel.calibrate.sampling import QKVSampler, step_buckets
from dit_accel.calibrate.scoring import score_candidates
from dit_accel.calibrate.search import SearchSpace, uniform_options
from dit_accel.kernels import cost as kernel_cost
from dit_accel.methods import SLA, Dense, Tile

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the definitions, written here
def _sta_1d(extent: int, tile: int, window: int) -> torch.Tensor:
    """STA along one dimension: a query in tile q sees the key tiles within w // 2 of clamp(q, w // 2, n - 1 - w // 2)
    (an even window covers w + 1 tiles; one of at least n tiles covers the dimension)."""
    n, half = -(-extent // tile), (window | 1) // 2
    tiles = torch.arange(extent) // tile
    if (window | 1) >= n:
        return torch.ones(extent, extent, dtype=torch.bool)
    centre = tiles.clamp(half, n - 1 - half)
    return (tiles[None, :] - centre[:, None]).abs() <= half


def _na_1d(extent: int, kernel: int) -> torch.Tensor:
    """Neighbourhood attention along one dimension: a window of ``kernel`` keys centred on the query, shifted inside."""
    i, kernel = torch.arange(extent), min(kernel, extent)
    start = (i - kernel // 2).clamp(0, extent - kernel)
    return (i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + kernel)


def _kron(relations):
    mask = relations[0]
    for r in relations[1:]:
        mask = (mask[:, None, :, None] & r[None, :, None, :]).reshape(mask.shape[0] * r.shape[0], -1)
    return mask


def _mask(method, grid) -> torch.Tensor:
    if isinstance(method, Tile):
        return _kron([_sta_1d(g, t, w) for g, t, w in zip(grid, method.tile, method.window)])
    return _kron([_na_1d(g, k) for g, k in zip(grid, method.kernel_size)])


def _errors(q, k, v, masks) -> torch.Tensor:
    """``[candidates, heads]``: sum over rows of ||o_m[:, h] - o*[:, h]||^2 / ||o*||^2, in fp64."""
    qd, kd, vd = q.double(), k.double(), v.double()
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    ref = s.softmax(-1) @ vd
    out = [((s.masked_fill(~m, -math.inf).softmax(-1) @ vd - ref).pow(2).sum((0, 2, 3)) / ref.pow(2).sum())
           for m in masks]
    return torch.stack(out)


def _sampler(grid, q, k, v):
    sampler = QKVSampler([(0, 1)], per_bucket=1, max_bytes=2**30)
    sampler.set_layers(1)
    sampler.save(0, "layer0", grid, 0, q, k, v)
    return sampler


def _qkv(grid, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(2 * torch.randn(batch, heads, math.prod(grid), dim, generator=g) for _ in range(3))


# ------------------------------------------------------------------ errors
# (a grid of whole 64-token tiles; one padded to whole tiles, (5, 9, 11) in tiles (1, 8, 8); a frame tile of 48
# tokens, whose Tile candidates run their own plan in blocks of one tile)
ERROR_CASES = [("2x8x12", (2, 8, 12), None), ("5x9x11-padded", (5, 9, 11), None), ("3x6x8-frame-tiles", (3, 6, 8),
                                                                                   (1, 6, 8))]


@pytest.mark.parametrize("grid,tile", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_equal_dense_fp64_attention_under_the_written_masks(grid, tile):
    """Batch 2 (a CFG pair), 3 heads: each Tile and GNA candidate's per-head error is the brute-force one."""
    cands = [c for c in candidate_grid(grid, size="small", methods=("tile", "gna"), tile=tile) if c.kind != "dense"]
    assert cands
    q, k, v = _qkv(grid)
    fast = score_candidates(_sampler(grid, q, k, v), [Candidate(Dense(), "dense", 1.0)] + cands, 1)[(0, 0)]
    assert (fast[0] == 0).all()
    slow = _errors(q, k, v, [_mask(c.method, grid) for c in cands])
    assert (slow > 1e-4).all()  # (sparse enough to be a test)
    torch.testing.assert_close(fast[1:], slow, rtol=1e-4, atol=1e-9)
    # the error is the layer's: summed over heads, the squared relative L2 of the whole output
    wrong = slow.clone()
    wrong[:, 0] *= 1.01
    with pytest.raises(AssertionError):
        torch.testing.assert_close(fast[1:], wrong, rtol=1e-4, atol=1e-9)


def test_a_zero_dense_output_scores_zero_not_nan():
    """v all zero (a layer that adds nothing): every candidate's output is the dense one, so its error is 0 and the
    layer may run the cheapest candidate (before: 0 / 0, NaN for every candidate, dense included)."""
    grid = (2, 8, 8)
    q, k, _ = _qkv(grid, heads=2)
    v = torch.zeros_like(q)
    cands = candidate_grid(grid, size="small")
    assert {c.kind for c in cands} >= {"dense", "block_sparse", "sla"}
    errors = score_candidates(_sampler(grid, q, k, v), cands, 1)[(0, 0)]
    assert torch.equal(errors, torch.zeros_like(errors))


# ------------------------------------------------------------------ costs
@pytest.mark.parametrize("grid,tile", [((3, 8, 12), None), ((5, 9, 11), None), ((4, 12, 12), (1, 12, 12)),
                                       ((20, 24), None)], ids=["3x8x12", "5x9x11-padded", "frame-tiles", "image"])
def test_costs_count_the_visited_blocks_pair_by_pair(grid, tile):
    """Each candidate's priced tiles (``kernels.cost.tile_counts`` of its layout, what the cost model reads) are the
    blocks of its token order holding a visited real pair, and its density is their share."""
    for cand in candidate_grid(grid, size="small", methods=("tile", "gna"), tile=tile)[1:]:
        plan = cand.method.plan(grid)
        lay = plan.layout
        order = plan.perm.order if plan.perm is not None else torch.arange(math.prod(grid))
        bq, bk = lay.block_q, lay.block_k
        nq, nk = -(-order.numel() // bq), -(-order.numel() // bk)
        order = torch.cat([order, order.new_full((max(nq * bq, nk * bk) - order.numel(),), -1)])
        real = order >= 0
        m = _mask(cand.method, grid)[order.clamp_min(0)][:, order.clamp_min(0)] & real[:, None] & real[None, :]
        visited = m[:nq * bq, :nk * bk].reshape(nq, bq, nk, bk).any(3).any(1)
        counts = kernel_cost.tile_counts(lay, heads=1)
        assert counts.full_tiles + counts.partial_tiles == int(visited.sum()), cand.label
        assert cand.density == pytest.approx(float(visited.double().mean()), abs=1e-12), cand.label


# ------------------------------------------------------------------ the search's per-layer choice
class _Costs:
    """Per-head and per-launch costs given as numbers."""

    def __init__(self, head, launch):
        self.head_of, self.launches = head, launch

    def head(self, cand):
        return self.head_of[cand.label]

    def launch(self, kind):
        return self.launches[kind]

    def dense_head(self):
        return self.head_of["dense"]


_CANDS = [Candidate(Dense(), "dense", 1.0), Candidate(Tile(tile=(1, 8, 8), window=(1, 1, 1)), "block_sparse", 0.2),
          Candidate(Tile(tile=(1, 8, 8), window=(1, 3, 3)), "block_sparse", 0.5),
          Candidate(SLA(topk=0.3), "sla", 0.3)]


def _space(errors, head_costs, launch, full=1.05):
    heads = len(errors[0])
    costs = _Costs(dict(zip([c.label for c in _CANDS], head_costs)), launch)
    return SearchSpace(_CANDS, {(0, 0): torch.tensor(errors, dtype=torch.float64)}, costs, 1, [(0, 1)], heads, full)


def _best_by_enumeration(space, lam, max_error):
    """The least ``cost + lam * error`` over every assignment of the docs' launch structures (the dense layer; a
    block-sparse launch, heads dense inside it or sparse, not all dense; every head SLA; SLA and block-sparse heads,
    both present) whose error is within ``max_error`` (relative L2, squared against the summed squared errors)."""
    err, heads, sla = space.errors[(0, 0)], space.heads, space.sla[0]
    best = space.dense_layer_cost
    structures = [(("block_sparse",), [-1] + space.block), (("sla",), [sla]),
                  (("block_sparse", "sla"), [-1] + space.block + [sla])]
    for launches, options in structures:
        for picks in itertools.product(options, repeat=heads):
            if (all(i == -1 for i in picks) or (len(launches) == 2 and (sla not in picks
                                                                        or all(i == sla for i in picks)))):
                continue
            cost = sum(space.costs.launch(k) for k in launches) + sum(
                space.full_head_cost if i < 0 else float(space.head_cost[i]) for i in picks)
            error = sum(0.0 if i < 0 else float(err[i, h]) for h, i in enumerate(picks))
            if max_error is None or error <= max_error ** 2:
                best = min(best, cost + lam * error)
    return best


def _value(choice, lam):
    return choice.cost + lam * choice.error


# Two heads whose cheapest choices break the bound together while each alone keeps it: the old search dropped the
# structure and ran the layer dense (3.5 per call where (tile w1x1x1, dense inside) costs 1.475 at error 0.09^2).
_TWO = dict(errors=[[0.0, 0.0], [0.0081, 0.0081], [0.003, 0.002], [0.02, 0.02]], head_costs=[1.0, 0.425, 0.72, 0.6],
            launch={"dense": 0.5, "block_sparse": 0.0, "sla": 0.8})


def test_a_layer_bound_that_the_cheapest_heads_break_keeps_a_cheaper_sparse_layer():
    space = _space(**_TWO)
    assert space.choose(0, 0, 0.0).error > 0.1 ** 2  # (every head at its cheapest breaks the bound below)
    choice = space.choose(0, 0, 0.0, max_error=0.1)
    assert not choice.dense, "the layer ran dense where a sparse assignment within the bound costs less"
    assert choice.error <= 0.1 ** 2
    assert _value(choice, 0.0) == pytest.approx(_best_by_enumeration(space, 0.0, 0.1))


@pytest.mark.parametrize("seed", range(3))
def test_the_per_layer_choice_against_every_assignment(seed):
    """No bound: the choice is the enumerated optimum. A bound: always within it, never dearer than the dense layer,
    and the enumerated optimum in all but a few knapsack corners (within 1% of it on average)."""
    rng = random.Random(seed)
    gaps = []
    for _ in range(40):
        heads = rng.choice([2, 3])
        errors = [[0.0] * heads] + [[rng.uniform(0, 0.1) for _ in range(heads)] for _ in range(3)]
        head_costs = [1.0, rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.6)]
        launch = {"dense": 0.5, "block_sparse": rng.uniform(0.2, 0.8), "sla": rng.uniform(0.2, 0.8)}
        space = _space(errors, head_costs, launch)
        for lam in (0.0, 10.0):
            choice = space.choose(0, 0, lam)
            assert _value(choice, lam) == pytest.approx(_best_by_enumeration(space, lam, None), abs=1e-12)
            for bound in (0.3, 0.15):
                choice = space.choose(0, 0, lam, max_error=bound)
                best = _best_by_enumeration(space, lam, bound)
                assert choice.error <= bound ** 2 * (1 + 1e-9)
                assert _value(choice, lam) <= space.dense_layer_cost + 1e-12
                gaps.append(_value(choice, lam) / best - 1)
    assert min(gaps) > -1e-9  # (nothing beats the enumeration)
    assert sum(g < 1e-9 for g in gaps) >= 0.85 * len(gaps) and sum(gaps) / len(gaps) < 0.01


def test_a_layer_where_no_candidate_meets_the_bound_runs_dense_and_is_named():
    space = _space(**_TWO)
    assert space.bound_note(0.1) is None
    choice = space.choose(0, 0, 0.0, max_error=0.01)  # every (candidate, head) error is above 0.01^2
    assert choice.dense
    note = space.bound_note(0.01)
    assert "--max-layer-error 0.01" in note and "1 of 1" in note and "layer 0, steps 0-0" in note
    assert "run dense" in note and "a larger --max-layer-error" in note


def test_a_budget_exactly_at_a_uniform_plans_cost_affords_it():
    space = _space(**_TWO)
    steps = 1
    for i in space.block + space.sla:
        at = space.layer_cost(i) * steps * 1e3  # one layer, one step, one pass: ms
        picked = [o.candidate for o in uniform_options(space, at, 1, 10)]
        assert i in picked
        cheaper = [o for o in uniform_options(space, at * (1 - 1e-6), 1, 10) if o.candidate == i]
        assert not cheaper or cheaper[0].warmup > 0


# ------------------------------------------------------------------ validation and the evidence script
def test_validation_prompts_are_never_searched():
    prompts = [f"prompt {i}" for i in range(7)]
    for validate in (None, 2, 3):
        search, held, _ = split_jobs(prompts, [0], validate)
        assert held and not {p for p, _ in search} & {p for p, _ in held}
        assert {p for p, _ in search} | {p for p, _ in held} == set(prompts)


def test_the_evidence_runs_use_the_size_and_steps_the_calibration_ran_with():
    """``calibrate`` fills the model's defaults into a copy of the settings: the held-out runs take them from the
    result (before: ``steps`` None, a TypeError pricing the uniform rows, and videos at the pipeline's own size)."""
    settings = CalibrationSettings("tiny-shapes", ["a red circle", "a blue square"], seeds=[0])
    assert settings.steps is None and settings.call_kwargs() == {}
    ran = {"frames": 7, "height": 48, "width": 48, "steps": 12, "guidance_scale": 2.0, "max_sequence_length": 16,
           "grid": [4, 6, 6], "heads": 2, "layers": 2}
    resolved = evidence._as_calibrated(settings, {"settings": ran})
    assert resolved.steps == 12
    call = resolved.call_kwargs()
    assert call["num_inference_steps"] == 12 and call["num_frames"] == 7 and call["height"] == 48
    assert settings.steps is None  # (the caller's settings as they were)


# ------------------------------------------------------------------ bad inputs at the public entry points
@pytest.mark.parametrize("call,match", [
    (lambda: candidate_grid((4.5, 12, 12)), r"grid=\(4\.5, 12, 12\) is invalid: expected 1 to 3 positive ints"),
    (lambda: candidate_grid("abc"), r"grid='abc' is invalid"),
    (lambda: candidate_grid((4, 12, 12), max_density=0), r"max_density=0\.0 is invalid: must be a number in \(0, 1\]"),
    (lambda: candidate_grid((4, 12, 12), methods=3), r"methods=3 is invalid: method names such as \('tile', 'sla'\)"),
    (lambda: step_buckets(12.5, 3), r"steps=12\.5 and phases=3 must be whole numbers >= 1"),
    (lambda: step_buckets(12, 3, warmup=(1.5,)), r"warmup=\(1\.5,\) is invalid: whole numbers of steps"),
    (lambda: QKVSampler([(0, 1)], per_bucket=0), r"per_bucket=0 is invalid: a whole number of steps >= 1"),
    (lambda: QKVSampler([(0, 1)], max_bytes=-1), r"max_bytes=-1 is invalid: a whole number of bytes >= 0"),
    (lambda: CostModel((4, 12, 12), 0), r"head_dim=0 is invalid: expected a positive int"),
    (lambda: CostModel((4, 12, 12), 32.7), r"head_dim=32\.7 is invalid: expected a positive int"),
], ids=["grid-fraction", "grid-str", "max-density-0", "methods-int", "steps-fraction", "warmup-fraction",
        "per-bucket-0", "max-bytes-negative", "head-dim-0", "head-dim-fraction"])
def test_bad_inputs_name_the_argument_and_what_is_allowed(call, match):
    """Before: truncated (a grid of 4.5 frames scored as 4, head_dim 32.7 priced as 32), empty (max_density 0: dense
    alone; per_bucket 0: no sample, nothing scored) or wrong (12.5 steps: a bucket (12, 12.5)) without a word."""
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_one_method_name_is_a_method_not_its_letters():
    """Before: ``methods="tile"`` was read letter by letter ("methods ['e', 'i', 'l', 't'] cannot be calibrated")."""
    labels = [c.label for c in candidate_grid((4, 12, 12), size="small", methods="tile,sla")]
    assert labels == [c.label for c in candidate_grid((4, 12, 12), size="small", methods=("tile", "sla"))]
    assert [c.label.split()[0] for c in candidate_grid((4, 12, 12), size="small", methods="tile")[1:]] == ["tile"] * 3


def test_the_bound_note_is_logged_once_and_none_without_a_bound():
    space = _space(**_TWO)
    lines = []
    assert space.bound_note(None, lines.append) is None and space.bound_note(0.1, lines.append) is None
    assert space.bound_note(0.01, lines.append) and lines == ["note: " + space.bound_note(0.01)]
