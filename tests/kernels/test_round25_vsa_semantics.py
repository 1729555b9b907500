"""VSA's forward against its definition (METHODS.md, "VSA"), through an oracle written here from the text alone.

The oracle (float64) numbers cubes from token coordinates with plain loops, takes means over each cube's real
tokens, runs the coarse softmax over every cube at scale 1/sqrt(D), keeps the top-k key cubes per query cube by a
sort on (-score, cube index) (an exact tie to the lower index), and runs the fine branch as dense attention under
the token mask of the selected cubes; out = coarse * gate + fine, the fine branch alone without a gate.
"""

import math

import pytest
import torch

import dit_accel
from dit_accel.kernels.vsa.api import vsa_attention
from dit_accel.kernels.vsa.naive import selected_count
from dit_accel.plans.vsa import gate_scope


def _cube_of_tokens(grid, tile):
    """Cube index of every raster token (t-major cubes, then h, then w), and the cube count."""
    t_n, h_n, w_n = grid
    per = [math.ceil(g / c) for g, c in zip(grid, tile)]
    ids = []
    for t in range(t_n):
        for h in range(h_n):
            for w in range(w_n):
                ids.append(((t // tile[0]) * per[1] + h // tile[1]) * per[2] + w // tile[2])
    return torch.tensor(ids), math.prod(per)


def oracle(q, k, v, grid, *, topk=None, sparsity=None, tile=(4, 4, 4), gate=None, text_k=None, text_v=None):
    """float64 VSA: ``(out, selection, coarse per token, k)``; text keys (if any) join every query's fine softmax."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1])
    ids, cubes = _cube_of_tokens(grid, tile)
    members = [torch.nonzero(ids == c).flatten() for c in range(cubes)]
    qc, kc, vc = (torch.stack([x[:, :, m].mean(2) for m in members], 2) for x in (q, k, v))
    scores = qc @ kc.transpose(-1, -2) * scale
    coarse = torch.softmax(scores, -1) @ vc
    count = topk if topk is not None else math.ceil((1 - sparsity) * cubes)
    count = max(1, min(count, cubes))
    b, h = q.shape[:2]
    selection = torch.empty(b, h, cubes, count, dtype=torch.long)
    for i in range(b):
        for j in range(h):
            for c in range(cubes):
                row = scores[i, j, c].tolist()
                best = sorted(range(cubes), key=lambda x: (-row[x], x))[:count]
                selection[i, j, c] = torch.tensor(sorted(best))
    chosen = torch.zeros(b, h, cubes, cubes, dtype=torch.bool).scatter_(-1, selection, True)
    mask = chosen[:, :, ids][:, :, :, ids]  # query token's cube chose the key token's cube
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    vv = v
    if text_k is not None:
        s = torch.cat([s, q @ text_k.double().transpose(-1, -2) * scale], -1)
        vv = torch.cat([v, text_v.double()], 2)
    out = torch.softmax(s, -1) @ vv
    coarse_tok = coarse[:, :, ids]
    if gate is not None:
        out = out + coarse_tok * gate.double()
    return out, selection, coarse_tok, count


def _qkv(grid, b=2, h=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(4))


CASES = [  # (grid, topk, sparsity)
    pytest.param((4, 8, 8), None, 0.5, id="whole-cubes"),
    pytest.param((5, 6, 7), None, 0.5, id="partial-every-dim"),
    pytest.param((1, 8, 8), 1, None, id="one-frame-topk1"),
    pytest.param((1, 3, 5), 1, None, id="smaller-than-a-cube"),
    pytest.param((2, 3, 9), None, 0.8, id="thin-partial"),
    pytest.param((6, 6, 6), 8, None, id="topk-all-cubes"),
    pytest.param((5, 6, 7), 100, None, id="topk-past-cubes"),
    pytest.param((4, 4, 28), None, 0.8, id="7cubes-s0.8"),
    pytest.param((4, 4, 52), None, 0.85, id="13cubes-s0.85"),
]


@pytest.mark.parametrize("gated", [False, True], ids=["no-gate", "gate"])
@pytest.mark.parametrize("grid, topk, sparsity", CASES)
def test_twin_matches_definition(grid, topk, sparsity, gated):
    q, k, v, gate = _qkv(grid)
    gate = gate if gated else None
    ref, ref_sel, _, count = oracle(q, k, v, grid, topk=topk, sparsity=sparsity, gate=gate)
    out, sel = vsa_attention(q, k, v, grid, topk=topk, sparsity=sparsity, gate=gate, backend="torch",
                             return_selection=True)
    assert sel.shape[-1] == count
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("tile", [(1, 8, 8), (2, 4, 8), (3, 3, 3), (2, 2, 2)], ids=str)
def test_other_tiles_match_definition(tile):
    grid = (5, 6, 7)
    q, k, v, gate = _qkv(grid, b=1, h=2)
    ref, ref_sel, _, _ = oracle(q, k, v, grid, sparsity=0.6, tile=tile, gate=gate)
    out, sel = vsa_attention(q, k, v, grid, sparsity=0.6, tile=tile, gate=gate, backend="torch",
                             return_selection=True)
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


def test_count_is_ceil_of_kept_fraction_of_cubes():
    # ceil((1 - s) * cubes) in double precision, clamped to [1, cubes] (METHODS.md; FastVideo's _compute_cur_topk)
    assert [selected_count(c, None, s) for c, s in [(7, 0.8), (13, 0.85), (28, 0.9), (28, 0.99)]] == [2, 2, 3, 1]
    assert selected_count(10, None, 0.7) == 4  # (1 - 0.7) * 10 = 3.0000000000000004: FastVideo keeps 4 too
    assert selected_count(8, 100, None) == 8 and selected_count(8, None, 0.0) == 8
    plan = dit_accel.VSA(sparsity=0.9).plan((4, 8, 56))  # 28 cubes
    assert (plan.cubes.count, plan.count) == (28, 3)


def test_all_cubes_without_gate_is_dense_attention():
    grid = (5, 6, 7)  # 8 cubes, partial in every dimension
    q, k, v, _ = _qkv(grid)
    out = vsa_attention(q, k, v, grid, topk=8, backend="torch")
    dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.double()
    torch.testing.assert_close(out.double(), dense, atol=2e-6, rtol=2e-6)


def test_gate_scales_coarse_branch_over_every_cube():
    # out(gate) - out(None) = coarse * gate: the coarse softmax covers every cube (topk=1 does not limit it), at
    # scale 1/sqrt(D), on the means over real tokens only (partial cubes).
    grid = (5, 6, 7)
    q, k, v, gate = _qkv(grid)
    _, _, coarse, _ = oracle(q, k, v, grid, topk=1)
    fine = vsa_attention(q, k, v, grid, topk=1, backend="torch")
    gated = vsa_attention(q, k, v, grid, topk=1, gate=gate, backend="torch")
    ones = vsa_attention(q, k, v, grid, topk=1, gate=torch.ones_like(q), backend="torch")
    torch.testing.assert_close((ones - fine).double(), coarse, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close((gated - fine).double(), coarse * gate.double(), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_ties_go_to_lower_cube(backend):
    grid = (5, 6, 7)
    q, _, v, _ = _qkv(grid, b=1, h=2, d=16)
    k = torch.zeros_like(q)  # every score exactly 0 on every path
    ref, ref_sel, _, _ = oracle(q, k, v, grid, topk=3)
    out, sel = vsa_attention(q, k, v, grid, topk=3, backend=backend, return_selection=True)
    assert torch.equal(sel, ref_sel) and sel[0, 0, 0].tolist() == [0, 1, 2]
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("grid, gated", [((5, 6, 7), True), ((4, 8, 8), False)], ids=["partial-gate", "whole"])
def test_triton_interpreter_matches_definition(grid, gated):
    q, k, v, gate = _qkv(grid, b=1, h=2, d=16)
    gate = gate if gated else None
    ref, ref_sel, _, _ = oracle(q, k, v, grid, sparsity=0.5, gate=gate)
    out, sel = vsa_attention(q, k, v, grid, sparsity=0.5, gate=gate, backend="triton", return_selection=True)
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("num_text", [0, 5], ids=["video", "text-keys"])
def test_plan_run_with_checkpoint_gate_matches_definition(num_text):
    grid, b, h, d = (5, 6, 7), 2, 3, 8
    n = math.prod(grid)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n + num_text, d, generator=g) for _ in range(3))
    hidden_gate = torch.randn(b, n, h * d, generator=g)  # to_gate_compress's (B, N, H*D)
    gate = hidden_gate.unflatten(2, (h, d)).transpose(1, 2)
    text = dict(text_k=k[:, :, n:], text_v=v[:, :, n:]) if num_text else {}
    ref, _, _, _ = oracle(q[:, :, :n], k[:, :, :n], v[:, :, :n], grid, topk=2, gate=gate, **text)
    plan = dit_accel.VSA(topk=2).plan(grid)
    with gate_scope(lambda: hidden_gate):
        out, density = plan.run(q, k, v, num_text=num_text, backend="torch")
    assert density == 2 / 8
    torch.testing.assert_close(out[:, :, :n].double(), ref, atol=2e-6, rtol=2e-6)


def test_gradients_match_definition():
    grid = (5, 6, 7)
    q, k, v, gate = _qkv(grid, b=1, h=2)
    ours = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    theirs = [x.double().requires_grad_() for x in (q, k, v, gate)]
    out = vsa_attention(*ours[:3], grid, sparsity=0.5, gate=ours[3], backend="torch")
    ref = oracle(*theirs[:3], grid, sparsity=0.5, gate=theirs[3])[0]
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out.double() * w).sum(), ours),
                    torch.autograd.grad((ref * w).sum(), theirs)):
        torch.testing.assert_close(a.double(), b, atol=5e-6, rtol=5e-6)


@pytest.mark.parametrize("layout, fix", [("hidden", "unflatten(-1, (3, 8)).transpose(1, 2)"),
                                         ("bnhd", "gate.transpose(1, 2)")])
def test_gate_in_hidden_states_layout_names_the_fix(layout, fix):
    grid = (5, 6, 7)
    q, k, v, _ = _qkv(grid)
    n = math.prod(grid)
    gate = torch.ones(2, n, 24) if layout == "hidden" else torch.ones(2, n, 3, 8)
    with pytest.raises(ValueError, match="gate must be a float tensor shaped like q") as err:
        vsa_attention(q, k, v, grid, sparsity=0.5, gate=gate)
    assert fix in str(err.value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_key_is_selected_so_it_shows(backend):
    # A NaN score ranks above every number: every query cube keeps the NaN key's cube, so the head's output is
    # NaN, not a finite answer that silently skipped it.
    grid = (5, 6, 7)
    q, k, v, _ = _qkv(grid, b=1, h=2, d=16)
    k[0, 1, 200, 3] = float("nan")  # a token of the last (partial) cube, 7
    out, sel = vsa_attention(q, k, v, grid, topk=2, backend=backend, return_selection=True)
    assert (sel[0, 1] == 7).any(-1).all()
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()
