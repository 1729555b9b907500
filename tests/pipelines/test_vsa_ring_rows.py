"""VSA under ring attention in one process: :meth:`VSAPlan.attend_part` per rank's share of the video rows, with
every key, concatenated, equals :meth:`VSAPlan.attend` on the whole grid and the float64 brute force
(tests/kernels/vsa_reference.py); :meth:`VSAPlan.check_part` refuses shares that cut a cube. The torchrun test
(test_vsa_parallel.py) runs the same through Diffusers' ring attention on a tiny Wan model."""

import math

import pytest
import torch

import dit_accel
from dit_accel.plans.vsa import gate_scope
from tests.kernels.vsa_reference import reference

pytestmark = pytest.mark.usefixtures("one_thread")

# (grid, tile, selection, shards as frame or token ranges): every share is whole cubes
CASES = [
    # partial cubes along every dimension; the last share holds the partial time cubes (frame 4 of 5)
    pytest.param((5, 6, 7), (2, 4, 4), dict(topk=3), "frames", [(0, 2), (2, 4), (4, 5)], id="5x6x7-t244-3shares"),
    # the tiny Wan grid of the torchrun test: two equal shares
    pytest.param((4, 8, 8), (2, 4, 4), dict(sparsity=0.5), "frames", [(0, 2), (2, 4)], id="4x8x8-t244-2shares"),
    # tile depth 1: shares inside a frame, rows of cubes (h 0..3, 4..7, then the partial row h 8 and frames 1, 2)
    pytest.param((3, 9, 10), (1, 4, 8), dict(topk=2), "tokens", [(0, 40), (40, 80), (80, 270)],
                 id="3x9x10-t148-in-frame"),
]


def _tensors(shape, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g) for _ in range(4)]
    return [t.requires_grad_(True) for t in out] if grad else out


def _rows(grid, kind, shards):
    hw = grid[1] * grid[2]
    return [(a * hw, b * hw) for a, b in shards] if kind == "frames" else list(shards)


def _layer_gate(gate):
    """``(B, H, N, D)`` -> the ``(B, N, H * D)`` a layer's to_gate_compress gives (what current_gate holds)."""
    return gate.transpose(1, 2).flatten(2)


def _whole(plan, q, k, v, gate):
    with gate_scope(None if gate is None else (lambda: _layer_gate(gate))):
        o, lse, extra, _ = plan.attend(q, k, v, scale=None, backend="torch")
    return o if extra is None else o + extra, lse


def _by_shares(plan, q, k, v, gate, rows):
    outs, lses = [], []
    for a, b in rows:  # as each ring rank runs it: its own query rows and gate rows, every key
        with gate_scope(None if gate is None else (lambda a=a, b=b: _layer_gate(gate[:, :, a:b]))):
            o, lse, extra, density = plan.attend_part(q[:, :, a:b], k, v, rows=(a, b), shards=rows, scale=None,
                                                      backend="torch", heads=(0, q.shape[1]))
        assert density == plan.density
        outs.append(o if extra is None else o + extra)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


@pytest.mark.parametrize("gated", [False, True], ids=["no-gate", "gate"])
@pytest.mark.parametrize("grid,tile,sel,kind,shards", CASES)
def test_shares_match_the_whole_grid_and_the_reference(grid, tile, sel, kind, shards, gated):
    n = math.prod(grid)
    q, k, v, gate = _tensors((2, 3, n, 16), seed=1)  # a seed whose k-th and (k+1)-th scores are apart
    gate = gate if gated else None
    plan = dit_accel.VSA(tile=tile, **sel).plan(grid)
    rows = _rows(grid, kind, shards)
    assert rows[0][0] == 0 and rows[-1][1] == n
    for share in rows:
        plan.check_part(share)
    got, got_lse = _by_shares(plan, q, k, v, gate, rows)
    want, want_lse = _whole(plan, q, k, v, gate)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-6, rtol=1e-6)
    ref, _, scores = reference(q, k, v, grid, plan.count, tile, gate)
    top = torch.topk(scores, plan.count + 1, dim=-1).values  # fp32 and float64 select alike
    assert bool((top[..., plan.count - 1] - top[..., plan.count]).min() > 1e-4)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=2e-5)


def test_share_selects_its_query_cubes_rows_of_the_whole_selection():
    from dit_accel.kernels.vsa import vsa_parts
    from dit_accel.kernels.vsa.api import vsa_parts_rows
    from dit_accel.kernels.vsa.naive import cube_rows

    grid, tile = (5, 6, 7), (2, 4, 4)
    plan = dit_accel.VSA(topk=3, tile=tile).plan(grid)
    q, k, v, _ = _tensors((1, 2, math.prod(grid), 8), seed=3)
    whole = vsa_parts(q, k, v, grid, plan.count, tile, 0.3, cubes=plan.cubes)
    part = cube_rows(plan.cubes, (84, 168))  # frames 2, 3: the second row of cubes in time
    assert part.cubes == (4, 8)
    mine = vsa_parts_rows(q[:, :, 84:168], k, v, part, plan.cubes, plan.count, 0.3)
    assert torch.equal(mine.selection.sort(-1).values, whole.selection[:, :, 4:8].sort(-1).values)
    torch.testing.assert_close(mine.coarse, whole.coarse[:, :, 4:8])  # (per query cube)
    gate = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(mine.gated(gate[:, :, 84:168], torch.float32),
                               whole.gated(gate, torch.float32)[:, :, 84:168])
    with pytest.raises(ValueError, match="expected the 84 rows 84..167"):
        vsa_parts_rows(q[:, :, 84:160], k, v, part, plan.cubes, plan.count, 0.3)


@pytest.mark.parametrize("grid,tile,sel,kind,shards", [CASES[0], CASES[2]])
def test_gradients_match_the_whole_grid(grid, tile, sel, kind, shards):
    n = math.prod(grid)
    plan = dit_accel.VSA(tile=tile, **sel).plan(grid)
    rows = _rows(grid, kind, shards)
    dout = torch.randn((1, 2, n, 8), generator=torch.Generator().manual_seed(5))
    grads = []
    for split in (False, True):
        q, k, v, gate = _tensors((1, 2, n, 8), seed=11, grad=True)
        out = _by_shares(plan, q, k, v, gate, rows)[0] if split else _whole(plan, q, k, v, gate)[0]
        out.backward(dout)
        grads.append([x.grad for x in (q, k, v, gate)])
    for name, mine, want in zip("qkv", *grads):
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(grads[1][3], grads[0][3], atol=1e-5, rtol=1e-5, msg="gate")


@pytest.mark.parametrize("grid,tile,rows,frames", [
    pytest.param((4, 8, 8), (4, 4, 4), (0, 128), "2", id="half-of-a-cube-deep"),
    pytest.param((5, 6, 7), (2, 4, 4), (0, 126), "3", id="odd-frames"),
    pytest.param((4, 8, 8), (2, 4, 4), (0, 96), "1.5", id="inside-a-frame"),
    pytest.param((4, 8, 8), (1, 4, 4), (16, 80), "1", id="cuts-cube-rows"),
])
def test_check_part_refuses_shares_that_cut_cubes(grid, tile, rows, frames):
    plan = dit_accel.VSA(topk=1, tile=tile).plan(grid)
    with pytest.raises(ValueError) as info:
        plan.check_part(rows)
    msg = str(info.value)
    for part in ("ring attention", f"tokens {rows[0]}..{rows[1] - 1}", f"({frames} frames of grid {grid})",
                 f"tile={tile}", f"multiple of the ring degree x {tile[0]}", "Ulysses"):
        assert part in msg, (part, msg)
    n = math.prod(grid)
    q, k, v, _ = _tensors((1, 1, n, 8), seed=1)
    with pytest.raises(ValueError, match="do not fill whole cubes"):  # attend_part refuses alike
        plan.attend_part(q[:, :, rows[0]:rows[1]], k, v, rows=rows, shards=[rows], scale=None, backend="torch")


def test_check_part_accepts_whole_cube_shares():
    plan = dit_accel.VSA(topk=1, tile=(2, 4, 4)).plan((6, 8, 8))
    for rows in ((0, 128), (128, 256), (256, 384), (0, 384), (0, 256)):  # three ranks of 2 frames; 6; 4
        plan.check_part(rows)
    with pytest.raises(ValueError, match="do not fill whole cubes"):
        plan.check_part((0, 192))  # two ranks of 3 frames, a tile 2 deep


def test_a_gate_of_other_rows_is_refused_clearly():
    grid, tile = (4, 8, 8), (2, 4, 4)
    plan = dit_accel.VSA(topk=1, tile=tile).plan(grid)
    q, k, v, gate = _tensors((1, 2, 256, 8), seed=2)
    with gate_scope(lambda: _layer_gate(gate)):  # the whole sequence's gate on a rank holding half of it
        with pytest.raises(ValueError, match="gate covers the tokens of the attention module's input.*ring rank"):
            plan.attend_part(q[:, :, :128], k, v, rows=(0, 128), shards=[(0, 128), (128, 256)], scale=None,
                             backend="torch", heads=(0, 2))
