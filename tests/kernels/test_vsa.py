"""VSA (FastVideo semantics): the op and its twin against a float64 brute force written from METHODS.md.

The reference (tests/kernels/vsa_reference.py) shares nothing with dit_accel: cube ids come from token
coordinates, means from index_add over real tokens, the fine branch is dense attention under a per-query
token mask built from the selection. Forward and gradients (q, k, v, gate), partial cubes, gate and no gate, topk and sparsity,
ties.
"""

import math

import pytest
import torch

import dit_accel
from dit_accel.kernels.vsa import cubes_of, selected_count, vsa_naive, vsa_parts_naive
from tests.kernels.vsa_reference import reference


def _qkv(shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]
    if grad:
        for t in out:
            t.requires_grad_(True)
    return out


def _well_posed(scores, count):
    """The k-th and (k+1)-th coarse scores are apart, so fp32 and float64 select alike."""
    if count >= scores.shape[-1]:
        return True
    top = torch.topk(scores, count + 1, dim=-1).values
    return bool((top[..., count - 1] - top[..., count]).min() > 1e-4)


CASES = [
    pytest.param((5, 6, 7), (4, 4, 4), dict(topk=3), id="partial-5x6x7-t444-topk3"),
    pytest.param((5, 6, 7), (4, 4, 4), dict(sparsity=0.75), id="partial-5x6x7-t444-sp0.75"),
    pytest.param((4, 8, 8), (4, 4, 4), dict(topk=2), id="full-4x8x8-topk2"),
    pytest.param((3, 9, 10), (2, 4, 8), dict(sparsity=0.5), id="partial-3x9x10-t248"),
    pytest.param((2, 3, 3), (4, 4, 4), dict(topk=5), id="grid-smaller-than-tile"),
    pytest.param((4, 8, 12), (4, 8, 8), dict(topk=1), id="t488-topk1"),
]


@pytest.mark.parametrize("gated", [False, True], ids=["no-gate", "gate"])
@pytest.mark.parametrize("grid,tile,sel", CASES)
def test_forward_matches_float64_reference(grid, tile, sel, gated):
    n = math.prod(grid)
    q, k, v, gate = _qkv((2, 3, n, 16), seed=n)
    count = selected_count(math.prod(-(-g // t) for g, t in zip(grid, tile)), sel.get("topk"), sel.get("sparsity"))
    ref, ref_sel, scores = reference(q, k, v, grid, count, tile, gate if gated else None)
    assert _well_posed(scores, count)
    out, selection = dit_accel.vsa_attention(q, k, v, grid, tile=tile, gate=gate if gated else None,
                                             return_selection=True, **sel)
    assert torch.equal(selection.sort(-1).values, ref_sel.sort(-1).values)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    twin, twin_sel = vsa_naive(q.double(), k.double(), v.double(), grid, count, tile,
                               gate.double() if gated else None)
    assert torch.equal(twin_sel.sort(-1).values, ref_sel.sort(-1).values)
    torch.testing.assert_close(twin, ref, atol=1e-12, rtol=1e-12)
    if not gated:  # the gate matters: without it the coarse branch is absent
        gated_out = dit_accel.vsa_attention(q, k, v, grid, tile=tile, gate=gate, **sel)
        assert (gated_out - out).abs().max() > 1e-3


@pytest.mark.parametrize("grid,tile,sel", [CASES[0], CASES[3]])
def test_gradients_match_float64_reference(grid, tile, sel):
    n = math.prod(grid)
    q, k, v, gate = _qkv((1, 2, n, 8), seed=7, grad=True)
    count = selected_count(math.prod(-(-g // t) for g, t in zip(grid, tile)), sel.get("topk"), sel.get("sparsity"))
    qd, kd, vd, gd = (x.detach().double().requires_grad_(True) for x in (q, k, v, gate))
    ref, _, scores = reference(qd, kd, vd, grid, count, tile, gd)
    assert _well_posed(scores, count)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref.backward(dout)
    out = dit_accel.vsa_attention(q, k, v, grid, tile=tile, gate=gate, backend="torch", **sel)
    out.backward(dout.float())
    for mine, theirs, name in ((q, qd, "q"), (k, kd, "k"), (v, vd, "v"), (gate, gd, "gate")):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=1e-4, rtol=1e-4, msg=name)
        assert theirs.grad.abs().max() > 0


def test_twin_gradcheck_in_float64():
    """The twin's own gradients, numerically (both branches and the gate; the selection is constant)."""
    grid, tile = (3, 3, 5), (2, 2, 4)  # 8 cubes, partial along every dimension
    small = [x.double().requires_grad_(True) for x in _qkv((1, 2, 45, 2), seed=11)]
    assert torch.autograd.gradcheck(lambda a, b, c, g: vsa_naive(a, b, c, grid, 3, tile, g)[0], small,
                                     fast_mode=True)


def test_ties_go_to_the_lower_cube_index():
    grid, tile = (4, 8, 8), (4, 4, 4)  # 4 full cubes
    q, k, v, gate = _qkv((1, 2, 256, 8), seed=1)
    k = k.clone()
    k[:] = k[:, :, :1]  # every key the same vector: every cube mean ties
    ref, ref_sel, scores = reference(q, k, v, grid, 2, tile, gate)
    assert bool((scores == scores[..., :1]).all())  # a real tie
    out, sel = dit_accel.vsa_attention(q, k, v, grid, topk=2, tile=tile, gate=gate, return_selection=True)
    expected = torch.tensor([0, 1]).expand(1, 2, 4, 2)  # FastVideo's fused kernel: the lowest indices first
    assert torch.equal(sel, expected) and torch.equal(ref_sel, expected)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sparsity,kept", [(0.7, 433), (0.85, 217), (0.95, 73)])
def test_sparsity_keeps_fastvideos_count_at_wan_720p(sparsity, kept):
    """FastVideo keeps ceil((1 - s) * C) cubes computed in double precision; at Wan 720p's 1,440 cubes these
    products land a hair above an integer (0.3 * 1440 = 432.00000000000006), so one more cube is kept."""
    from dit_accel.calibrate.candidates import candidate_grid

    grid = (21, 45, 80)
    assert math.prod(-(-g // 4) for g in grid) == 1440
    assert selected_count(1440, None, sparsity) == kept
    plan = dit_accel.VSA(sparsity=sparsity).plan(grid)
    assert plan.cubes.count == 1440 and plan.count == kept and plan.describe()["selected"] == kept
    assert plan.density == kept / 1440
    if sparsity in (0.7, 0.85):  # the calibration's own VSA candidates price the same count
        found = [c for c in candidate_grid(grid, methods=("vsa",)) if c.kind == "vsa"
                 and c.method.effective_sparsity == sparsity]
        assert [c.density for c in found] == [kept / 1440]


def test_topk_and_sparsity_counts():
    assert selected_count(10, None, 0.9) == 1
    assert selected_count(10, None, 0.85) == 2  # ceil(1.5)
    assert selected_count(10, None, 0.0) == 10
    assert selected_count(7, 100, None) == 7  # clamped to the cube count
    assert selected_count(3, None, 0.99) == 1  # at least one
    q, k, v, _ = _qkv((1, 1, 5 * 6 * 7, 8))
    a = dit_accel.vsa_attention(q, k, v, (5, 6, 7), topk=2)
    b = dit_accel.vsa_attention(q, k, v, (5, 6, 7), sparsity=0.75)  # 8 cubes -> 2
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    dense = dit_accel.vsa_attention(q, k, v, (5, 6, 7), sparsity=0.0)
    torch.testing.assert_close(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5,
                               rtol=1e-5)


def test_the_gated_term_is_each_tokens_cube_row_in_fp32_rounded_once():
    """The coarse output per raster token is its cube's row (cube ids from token coordinates here), whole grid and a
    ring rank's rows alike; the gated output is fine + coarse * gate in fp32, rounded to bf16 once (bit for bit)."""
    from dit_accel.kernels.vsa import cubes_of, vsa_parts
    from dit_accel.kernels.vsa.api import vsa_parts_rows
    from dit_accel.kernels.vsa.naive import coarse_attention, cube_rows
    from tests.utils import dispatched

    grid, tile, count, scale = (5, 6, 7), (4, 4, 4), 3, 16 ** -0.5
    q, k, v, gate = (x.to(torch.bfloat16) for x in _qkv((1, 2, 210, 16), seed=7))
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    cube = ((t // 4) * 2 + h // 4) * 2 + w // 4  # 2 x 2 x 2 cubes, t-major
    cubes = cubes_of(grid, tile)
    per_cube = coarse_attention(*(cubes.perm.permute(x, dim=-2) for x in (q, k, v)), cubes, count, scale)[0]
    parts = vsa_parts(q, k, v, grid, count, tile, scale, backend="torch")
    assert torch.equal(parts.coarse, per_cube)
    out = dit_accel.vsa_attention(q, k, v, grid, topk=count, tile=tile, gate=gate, scale=scale, backend="torch")
    assert torch.equal(out, (parts.fine.float() + per_cube[:, :, cube.flatten()] * gate.float()).to(torch.bfloat16))
    made = []

    def fp32_rows(func, args, kwargs, out):  # fp32 tensors of one row per token and channel the call makes
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel() >= q.numel() and \
                func.__name__ != "view.default":
            made.append(func.__name__)

    with dispatched(fp32_rows):
        dit_accel.vsa_attention(q, k, v, grid, topk=count, tile=tile, gate=gate, scale=scale, backend="torch")
    # (the twin's fine branch widens q, k and v first) the gated term on a grid no dimension of which divides by the
    # cube's: the cube rows gathered to token resolution (the last of three gathers, one per dimension), then one
    # pass writes the bf16 output; no fp32 product, sum or copy of the gate or of the output
    assert made[-1] == "index_select.default" and "mul.Tensor" not in made and "repeat" not in str(made), made
    part = cube_rows(cubes, (168, 210))  # the last frame: the second slab of cubes
    rows = vsa_parts_rows(q[:, :, 168:], k, v, part, cubes, count, scale, backend="torch")
    torch.testing.assert_close(rows.coarse, per_cube[:, :, 4:], atol=1e-6, rtol=1e-6)
    assert torch.equal(rows.gated(gate[:, :, 168:], torch.bfloat16),
                       (per_cube[:, :, cube.flatten()[168:]] * gate[:, :, 168:].float()).to(torch.bfloat16))


@pytest.mark.parametrize("grid", [(8, 8, 12), (5, 8, 12), (5, 6, 12), (8, 6, 7)],
                         ids=["all-divide", "t-partial", "t-h-partial", "h-w-partial"])
def test_gated_term_spreads_cube_rows_over_the_tokens(grid):
    """``VSAResult.gated``: each raster token takes its own cube's coarse row (cube = (t // 4, h // 4, w // 4),
    t-major, written here from the coordinates), times the gate, plus the fine output when asked, in fp32 rounded
    once; the same values and gradients as the token-resolution product. Where a dimension divides by the cube's, no
    fp32 tensor of the tokens' size is made."""
    from tests.utils import dispatched

    from dit_accel.kernels.vsa import cubes_of, vsa_parts

    tile, count, scale = (4, 4, 4), 2, 16 ** -0.5
    n = math.prod(grid)
    q, k, v, gate = (x.to(torch.bfloat16) for x in _qkv((1, 2, n, 16), seed=3))
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    cubes_per = [-(-g // 4) for g in grid]
    cube = (((t // 4) * cubes_per[1] + h // 4) * cubes_per[2] + w // 4).flatten()
    parts = vsa_parts(q, k, v, grid, count, tile, scale, backend="torch")
    per_token = parts.coarse[:, :, cube]
    want_extra = (per_token * gate.float()).to(torch.bfloat16)
    want_out = (parts.fine.float() + per_token * gate.float()).to(torch.bfloat16)
    assert torch.equal(parts.gated(gate, torch.bfloat16), want_extra)
    assert torch.equal(parts.gated(gate, torch.bfloat16, add_fine=True), want_out)
    made = []

    def fp32_rows(func, args, kwargs, out):
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel() >= q.numel():
            made.append(func.__name__)

    with dispatched(fp32_rows):
        parts.gated(gate, torch.bfloat16, add_fine=True)
    assert made == [], made  # (a dimension that divides keeps the gathered cube rows a quarter of the tokens at most)
    # Gradients through the coarse rows, the gate and the fine output: those of the per-token product.
    coarse = parts.coarse.clone().requires_grad_()
    fine, g32 = parts.fine.float().requires_grad_(), gate.float().requires_grad_()
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    out = parts._replace(coarse=coarse, fine=fine).gated(g32, torch.float32, add_fine=True)
    (out * weight).sum().backward()
    grads = [x.grad for x in (coarse, fine, g32)]
    for x in (coarse, fine, g32):
        x.grad = None
    ((fine + coarse[:, :, cube] * g32) * weight).sum().backward()
    for mine, want in zip(grads, (coarse.grad, fine.grad, g32.grad)):
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5)
    # In bf16, the gate's and the fine output's gradients are autograd's bit for bit (the same fp32 products, rounded
    # once), the cube rows' are the same fp32 sums (in another order, perhaps)
    fine, g16, coarse.grad = parts.fine.clone().requires_grad_(), gate.clone().requires_grad_(), None
    parts._replace(coarse=coarse, fine=fine).gated(g16, torch.bfloat16, add_fine=True).backward(weight.bfloat16())
    grads = [x.grad for x in (coarse, fine, g16)]
    for x in (coarse, fine, g16):
        x.grad = None
    (fine.float() + coarse[:, :, cube] * g16.float()).to(torch.bfloat16).backward(weight.bfloat16())
    torch.testing.assert_close(grads[0], coarse.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[1], fine.grad) and torch.equal(grads[2], g16.grad)
    assert cubes_of(grid, tile).count == parts.coarse.shape[2]


@pytest.mark.parametrize("grid", [(8, 8, 12), (5, 8, 12)], ids=["whole-cubes", "t-partial"])
def test_a_gated_call_reads_the_fine_output_in_tiled_order_where_the_cubes_are_whole(grid):
    """``tiled_fine``: on a grid of whole cubes the fine output stays in tiled order, viewed in raster order (each
    dimension split into cubes and extent), and the gated pass reads it there: no un-permutation of its own (one
    gather of the output's size fewer); elsewhere the raster fine output as before. The output and every gradient
    (q, k, v, gate) are the raster path's bit for bit, in bf16 with autograd."""
    from tests.utils import dispatched

    from dit_accel.kernels.vsa import cubes_of, vsa_parts

    tile, count, scale = (4, 4, 4), 2, 16 ** -0.5
    n, whole = math.prod(grid), all(g % 4 == 0 for g in grid)
    q, k, v, gate = (x.to(torch.bfloat16).requires_grad_() for x in _qkv((1, 2, n, 16), seed=4))
    cubes = cubes_of(grid, tile)
    nested = vsa_parts(q, k, v, grid, count, tile, scale, backend="torch", cubes=cubes, tiled_fine=True)
    assert nested.fine.dim() == (9 if whole else 4)
    if whole:
        assert nested.fine.shape == (1, 2, 2, 4, 2, 4, 3, 4, 16)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    outs, grads = [], []
    for tiled in (True, False):
        parts = vsa_parts(q, k, v, grid, count, tile, scale, backend="torch", cubes=cubes, tiled_fine=tiled)
        out = parts.gated(gate, torch.bfloat16, add_fine=True)
        out.backward(weight)
        outs.append(out)
        grads.append([x.grad.clone() for x in (q, k, v, gate)])
        for x in (q, k, v, gate):
            x.grad = None
    assert outs[0].shape == q.shape and torch.equal(outs[0], outs[1])
    for mine, want in zip(*grads):
        assert torch.equal(mine, want)
    gathers = []

    def token_gathers(func, args, kwargs, out):  # token-sized gathers along the token axis: back to raster order
        if func.__name__.startswith("index_select") and args[0].numel() >= q.numel():
            gathers.append(tuple(args[0].shape))

    with torch.no_grad():
        for tiled in (True, False):
            gathers.clear()
            with dispatched(token_gathers):
                vsa_parts(q, k, v, grid, count, tile, scale, backend="torch", cubes=cubes,
                          tiled_fine=tiled).gated(gate, torch.bfloat16, add_fine=True)
            if tiled:
                found = len(gathers)
            else:
                assert len(gathers) == found + (1 if whole else 0), (gathers, found)


def test_gated_term_keeps_no_spread_made_in_a_capture(monkeypatch):
    """The cube coordinates of a partial dimension are made on the device (no host copy) and kept per grid, except
    when made inside a capture or a trace (their memory would be the graph's, written only when it replays)."""
    import dit_accel.kernels.request as request
    from dit_accel.kernels.vsa import cubes_of, layouts, vsa_parts

    grid = (5, 8, 12)
    q, k, v, gate = _qkv((1, 1, 480, 16), seed=2)
    parts = vsa_parts(q, k, v, grid, 2, (4, 4, 4), 0.25, backend="torch")
    monkeypatch.setattr(layouts, "SPREADS", {})
    monkeypatch.setattr(request, "in_graph", lambda: True)
    inside = parts.gated(gate, torch.float32)
    assert layouts.SPREADS == {}
    monkeypatch.setattr(request, "in_graph", lambda: False)
    assert torch.equal(parts.gated(gate, torch.float32), inside) and len(layouts.SPREADS) == 1
    assert cubes_of(grid, (4, 4, 4)).perm.grid == grid


def test_the_coarse_twin_pools_without_widened_copies_of_q_k_v():
    """The twin's coarse branch (the training path's: the Triton launches are forward only) sums each cube in fp32
    as it reads bf16, with no fp32 copy of q, k or v (three token-sized tensors per call), and equals the sum of
    the widened copy bit for bit."""
    from tests.utils import dispatched

    from dit_accel.kernels.vsa import cubes_of
    from dit_accel.kernels.vsa.naive import _cube_means, coarse_attention

    cubes = cubes_of((5, 6, 7), (4, 4, 4))
    q, k, v, _ = (cubes.perm.permute(x.to(torch.bfloat16), dim=-2) for x in _qkv((1, 2, 210, 16), seed=3))

    made = []

    def copies(func, args, kwargs, out):
        if func.__name__.startswith("_to_copy") and out.numel() >= q.numel():
            made.append(out.dtype)

    with dispatched(copies):
        coarse_attention(q, k, v, cubes, 3, 0.25)
    assert made == []
    widened = q.float().view(1, 2, cubes.count, cubes.volume, 16).sum(3) / cubes.sizes[:, None]
    assert torch.equal(_cube_means(q, cubes, torch.float32), widened)


def test_cube_sum_gradients_meet_the_fine_branch_without_a_copy():
    """Under autograd the cube sums' gradient is autograd's own (the fp32 gradient cast to the input's dtype, bit for
    bit) but expanded over each cube, not copied; in a gated training call it meets the fine branch's at the shared
    (B, H, C, V, D) view, so the backward makes no token-sized cast (the old one per q, k, v) and the gradients of
    q, k, v and the gate equal the float64 reference's."""
    from tests.utils import dispatched

    from dit_accel.kernels.vsa import cubes_of
    from dit_accel.kernels.vsa.naive import _cube_means

    cubes = cubes_of((5, 6, 7), (4, 4, 4))
    x = cubes.perm.permute(_qkv((1, 2, 210, 16), seed=4)[0].to(torch.bfloat16), dim=-2).requires_grad_()
    grads = []
    for fn in (lambda: _cube_means(x, cubes, torch.float32),
               lambda: x.view(1, 2, cubes.count, 64, 16).sum(3, dtype=torch.float32) / cubes.sizes[:, None]):
        weight = torch.randn(1, 2, cubes.count, 16, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad((fn() * weight).sum(), x)[0])
    assert torch.equal(grads[0], grads[1])
    x5 = x.detach().view(1, 2, cubes.count, 64, 16).requires_grad_()
    out = _cube_means(x5, cubes, torch.float32)
    (g5,) = torch.autograd.grad(out, x5, torch.ones_like(out), retain_graph=True)
    assert g5.stride(3) == 0  # expanded, not materialised

    # (float16 on the Triton backend, whose fine backward is one op: the twin's widens q, k, v to fp32 and back)
    q, k, v, gate = (t.to(torch.float16).requires_grad_() for t in _qkv((1, 2, 210, 16), seed=6))
    out = dit_accel.vsa_attention(q, k, v, (5, 6, 7), topk=3, gate=gate, backend="triton")
    casts = []

    def fp16_casts(func, args, kwargs, out):
        if func.__name__.startswith("_to_copy") and out.dtype == torch.float16 and out.numel() >= q.numel():
            casts.append(tuple(out.shape))

    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    with dispatched(fp16_casts):
        out.backward(weight)
    assert casts == [], casts
    q64, k64, v64, g64 = (t.detach().double().requires_grad_() for t in (q, k, v, gate))
    want = reference(q64, k64, v64, (5, 6, 7), 3, (4, 4, 4), g64)[0]
    want.backward(weight.double())
    for mine, ref in zip((q.grad, k.grad, v.grad, gate.grad), (q64.grad, k64.grad, v64.grad, g64.grad)):
        torch.testing.assert_close(mine.double(), ref, atol=5e-3, rtol=5e-3)


def test_twin_parts_and_layout_agree():
    grid, tile = (5, 6, 7), (4, 4, 4)
    q, k, v, _ = _qkv((2, 2, 210, 8), seed=5)
    from dit_accel.kernels.vsa import cubes_of, vsa_layout, vsa_parts

    parts = vsa_parts_naive(q, k, v, grid, 3, tile, 8 ** -0.5)
    api = vsa_parts(q, k, v, grid, 3, tile, 8 ** -0.5, backend="torch")
    torch.testing.assert_close(api.fine, parts.fine, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(api.lse, parts.lse, atol=1e-5, rtol=1e-5)
    assert api.density == pytest.approx(3 / 8)
    layout = vsa_layout(cubes_of(grid, tile), api.selection)
    assert layout.num_heads == 4 and layout.block_q == 64 and layout.partial_fraction() > 0
    mask = layout.to_dense_mask()  # padding keys are never allowed
    cubes = cubes_of(grid, tile)
    assert not mask[:, :, cubes.perm.order < 0].any()



def test_a_traced_call_gathers_the_fine_branch_and_agrees_with_the_block_sparse_twin(monkeypatch):
    """Traced (torch.compile), the fine branch on the PyTorch twin gathers each query cube's selected key cubes
    (``naive.fine_gathered``: tensor ops, where the twin reads its block lists on the host, which raised under
    ``fullgraph=True``). Partial cubes and a ring rank's query share, against the eager block-sparse twin and the
    float64 reference; the CUDA backends still take the block-sparse call."""
    from dit_accel.kernels.vsa import cubes_of, vsa_parts
    from dit_accel.kernels.vsa.naive import coarse_attention, fine_gathered

    grid, tile = (5, 6, 7), (4, 4, 4)
    q, k, v, _ = _qkv((2, 2, 210, 8), seed=7)
    eager = vsa_parts(q, k, v, grid, 3, tile, 8 ** -0.5, backend="torch")
    pretend_tracing(monkeypatch)
    traced = vsa_parts(q, k, v, grid, 3, tile, 8 ** -0.5, backend="torch")
    torch.testing.assert_close(traced.fine, eager.fine, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced.lse, eager.lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(traced.selection, eager.selection)
    want, _ = vsa_naive(q.double(), k.double(), v.double(), grid, 3, tile)
    torch.testing.assert_close(traced.fine.double(), want, atol=1e-5, rtol=1e-5)
    cubes = cubes_of(grid, tile)
    q_t, k_t, v_t = (cubes.perm.permute(x, dim=-2) for x in (q, k, v))
    sel = coarse_attention(q_t, k_t, v_t, cubes, 3, 8 ** -0.5, False)[2]
    whole, lse = fine_gathered(q_t, k_t, v_t, cubes, sel, 8 ** -0.5)
    rows = slice(2 * 64, 5 * 64)  # query cubes 2..4 (a ring rank's share)
    share, share_lse = fine_gathered(q_t[:, :, rows], k_t, v_t, cubes, sel[:, :, 2:5], 8 ** -0.5)
    torch.testing.assert_close(share, whole[:, :, rows])
    torch.testing.assert_close(share_lse, lse[:, :, rows])
    from dit_accel.kernels.backends import runs_twin

    assert runs_twin("torch", q.device) and runs_twin("auto", q.device)
    assert not runs_twin("auto", torch.device("cuda")) and not runs_twin("triton", q.device)
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "torch")
    assert runs_twin("auto", torch.device("cuda"))


def test_the_layout_is_built_without_reading_the_device(monkeypatch):
    """vsa_layout (built on every call, on the selection's device) reads no count back (no int()/bool()/item() of
    a tensor, what a CUDA graph capture forbids), and holds the same visits as a layout packed to the widest row."""
    from dit_accel.kernels.layout import BlockLayout
    from dit_accel.kernels.vsa import cubes_of, vsa_layout
    from dit_accel.kernels.vsa.api import _cube_masks

    grid, tile = (5, 6, 7), (4, 4, 4)
    cubes = cubes_of(grid, tile)
    scores = torch.randn(2, 3, cubes.count, cubes.count, generator=torch.Generator().manual_seed(1))
    selection = scores.topk(3, dim=-1).indices
    _cube_masks(cubes, selection.device)  # the per-grid part, once, before any call

    def no_sync(self, *a, **k):
        raise AssertionError("a host read of a tensor while building the layout")

    for name in ("__int__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    layout = vsa_layout(cubes, selection, check=False)  # (as on a GPU: the default reads a CPU selection's values)
    monkeypatch.undo()
    visited = torch.zeros(6, cubes.count, cubes.count, dtype=torch.bool)
    visited.scatter_(2, selection.reshape(6, cubes.count, -1), True)
    mask_ids, table = _cube_masks(cubes, selection.device)
    packed = BlockLayout.from_block_masks(visited, q_len=cubes.perm.num_padded, kv_len=cubes.perm.num_padded,
                                          block_q=64, block_k=64, mask_ids=mask_ids.expand(6, 8, 8), mask_table=table)
    assert torch.equal(layout.to_dense_mask(), packed.to_dense_mask())
    for side in ("kv", "q"):
        counts = getattr(layout, f"{side}_counts")
        assert torch.equal(counts, getattr(packed, f"{side}_counts"))
        for field in ("indices", "mask_ids"):
            ours, ref = getattr(layout, f"{side}_{field}"), getattr(packed, f"{side}_{field}")
            keep = torch.arange(ref.shape[-1]) < counts[..., None]
            assert torch.equal(ours[..., :ref.shape[-1]][keep], ref[keep])
    assert layout.kv_indices.shape[-1] == 3 and layout.q_indices.shape[-1] == cubes.count

@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(topk=2, sparsity=0.5), "exactly one"),
    (dict(topk=0), "topk=0"),
    (dict(topk=1.5), "topk=1.5"),
    (dict(sparsity=1.0), "sparsity=1.0"),
    (dict(sparsity=-0.1), "sparsity=-0.1"),
    (dict(topk=1, tile=(4, 4)), "tile="),
    (dict(topk=1, tile=(4, 0, 4)), "tile="),
])
def test_bad_arguments_are_named(kwargs, match):
    q, k, v, _ = _qkv((1, 1, 64, 8))
    with pytest.raises(ValueError, match=match):
        dit_accel.vsa_attention(q, k, v, (4, 4, 4), **kwargs)


def test_bad_shapes_are_named():
    q, k, v, gate = _qkv((1, 1, 64, 8))
    with pytest.raises(ValueError, match="grid=\\(8, 8\\)"):
        dit_accel.vsa_attention(q, k, v, (8, 8), topk=1)
    with pytest.raises(ValueError, match="holds 48"):
        dit_accel.vsa_attention(q, k, v, (3, 4, 4), topk=1)
    with pytest.raises(ValueError, match="gate must be"):
        dit_accel.vsa_attention(q, k, v, (4, 4, 4), topk=1, gate=gate[..., :4])


from tests.utils import interpreter, pretend_tracing  # noqa: E402


@interpreter
def test_fine_branch_on_the_triton_block_sparse_kernels():
    """The fine branch's cube layout (per (batch, head) layout heads, element-masked partial cubes) through the
    Triton block-sparse kernels, forward and backward, fp32 in the interpreter (its bf16 dot is wrong)."""
    grid, tile = (3, 6, 7), (2, 4, 8)  # 4 cubes of 64, all partial
    q, k, v, gate = _qkv((1, 2, 126, 16), seed=2, grad=True)
    qd, kd, vd, gd = (x.detach().double().requires_grad_(True) for x in (q, k, v, gate))
    ref, _, scores = reference(qd, kd, vd, grid, 2, tile, gd)
    assert _well_posed(scores, 2)
    out = dit_accel.vsa_attention(q, k, v, grid, topk=2, tile=tile, gate=gate, backend="triton")
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(dout)
    out.backward(dout.float())
    for mine, theirs in ((q, qd), (k, kd), (v, vd), (gate, gd)):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=2e-4, rtol=2e-4)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("grid,tile", [((5, 6, 7), (4, 4, 4)), ((3, 9, 10), (2, 4, 8)), ((7, 7, 9), (2, 2, 4))],
                         ids=["5x6x7-t444", "3x9x10-t248", "7x7x9-t224-many-cubes"])
def test_triton_coarse_branch_matches_the_twin(grid, tile, dtype):
    """Cube pooling + coarse attention + selection in Triton (interpreter): output, scores, the selection as a set."""
    from dit_accel.kernels.vsa.naive import coarse_attention, cubes_of
    from dit_accel.kernels.vsa.triton import coarse_triton

    cubes = cubes_of(grid, tile)
    q, k, v, _ = _qkv((2, 2, cubes.perm.num_tokens, 24), dtype=dtype, seed=4)
    q_t, k_t, v_t = (cubes.perm.permute(x) for x in (q, k, v))
    count = max(1, cubes.count // 3)
    got = coarse_triton(q_t, k_t, v_t, cubes, count, 0.3)
    want = coarse_attention(q_t, k_t, v_t, cubes, count, 0.3)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2].sort(-1).values, want[2].sort(-1).values)
    assert coarse_triton(q_t, k_t, v_t, cubes, count, 0.3, with_output=False)[0] is None


@interpreter
def test_forced_triton_forward_uses_the_fused_coarse_branch_and_matches_the_reference(monkeypatch):
    from dit_accel.kernels.vsa import triton as vsa_triton

    calls = []
    real = vsa_triton.coarse_triton
    monkeypatch.setattr(vsa_triton, "coarse_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    grid, tile = (3, 6, 7), (2, 4, 8)
    q, k, v, gate = _qkv((1, 2, 126, 16), seed=2)
    ref, _, scores = reference(q, k, v, grid, 2, tile, gate)
    assert _well_posed(scores, 2)
    with torch.no_grad():
        dit_accel.vsa_attention(q, k, v, grid, topk=2, tile=tile, gate=gate, backend="triton")  # (+ its self-check)
        calls.clear()
        out = dit_accel.vsa_attention(q, k, v, grid, topk=2, tile=tile, gate=gate, backend="triton")
    assert calls == [1]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    calls.clear()
    dit_accel.vsa_attention(q, k, v, grid, topk=2, tile=tile, gate=gate, backend="torch")
    assert calls == []  # the twin's coarse branch on backend="torch"


@interpreter
def test_coarse_variant_passes_its_self_check_and_the_fault_switch_fails_it(tmp_path, monkeypatch):
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.ENV_FAULT, raising=False)
    shape = {"head_dim": 64, "block_q": 64, "block_k": 64}
    ok = selfcheck.verdict("vsa.triton.coarse", torch.device("cpu"), torch.float32, shape, fresh=True)
    assert ok["ok"] and ok["error"] <= ok["tolerance"], ok
    monkeypatch.setenv(selfcheck.ENV_FAULT, "vsa.triton.coarse")
    bad = selfcheck.verdict("vsa.triton.coarse", torch.device("cpu"), torch.float32, shape, fresh=True)
    assert not bad["ok"], bad


def test_a_tile_larger_than_the_grid_is_clamped_per_dimension():
    """Issue 74, item 1: ``vsa_attention(..., tile=(100, 100, 100))`` on a 4x12x12 grid tried to allocate for a
    million-token cube. A tile longer than the grid along a dimension is one cube of the grid's extent there."""
    from dit_accel.kernels.vsa import cubes_of

    grid = (4, 12, 12)
    q, k, v, _ = _qkv((1, 2, 576, 8), seed=4)
    out = dit_accel.vsa_attention(q, k, v, grid, topk=1, tile=(100, 100, 100))  # one cube: dense attention
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5,
                               rtol=1e-5)
    assert cubes_of(grid, (100, 100, 100)).perm.tile == (4, 16, 16)  # (powers of two stay powers of two)
    assert cubes_of((3, 6, 7), (2, 4, 8)).perm.tile == (2, 4, 8)  # a tile within the grid's reach is kept
    cubes = cubes_of(grid, (3, 100, 5))
    assert cubes.perm.tile == (3, 16, 5) and cubes.volume == 240 and cubes.perm.num_padded == 6 * 16 * 15
    a, sel = dit_accel.vsa_attention(q, k, v, grid, topk=2, tile=(3, 100, 5), return_selection=True)
    ref, ref_sel, _ = reference(q, k, v, grid, 2, (3, 100, 5))  # the reference never clamps: cube ids by division
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(a.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tile, message, short", [
    ((100, 100, 100), r"tile=\(100, 100, 100\) on the video token grid \(21, 45, 80\) makes cubes of \(32, 64, 100\) "
                      r"= 204800 tokens.*\(4, 4, 4\)", "204800 tokens"),
    # 75,600 cubes: the coarse scores (C x C per head) and the pool launch's grid axis (65,535 programs) failed
    # deep in a launch or an allocation
    ((1, 1, 1), r"tile=\(1, 1, 1\) cuts the video token grid \(21, 45, 80\) into 75,600 cubes, more than 65,535 "
                r".*22\.9 GB.*\(4, 4, 4\).*1,440 cubes here", "75,600 cubes"),
], ids=["cube-too-large", "too-many-cubes"])
def test_a_tile_the_kernels_cannot_take_is_refused_naming_the_grid(tile, message, short):
    grid = (21, 45, 80)
    q = torch.zeros(1, 1, math.prod(grid), 1)
    with pytest.raises(ValueError, match=message):
        dit_accel.vsa_attention(q, q, q, grid, topk=1, tile=tile)
    with pytest.raises(ValueError, match=short):
        dit_accel.VSA(tile=tile, sparsity=0.9).plan(grid)


def test_the_cube_count_bound_is_the_launch_grids():
    assert cubes_of((1, 65535, 1), (1, 1, 1)).count == 65535
    with pytest.raises(ValueError, match="65,536 cubes"):
        cubes_of((1, 65536, 1), (1, 1, 1))


def test_a_vsa_call_copies_nothing_from_the_host(monkeypatch):
    """Issue 72, item 5: VSA's launch path must be CUDA-graph safe. On "meta" tensors (a device whose values are
    never on the host) a second call through the plan runs no op on a CPU tensor (no host-side tensor copied to
    the device per call, as the cube sizes were) and reads no value back (item/tolist/cpu/bool would raise on
    meta). The fine branch's block-sparse backend is stubbed: its own backends are checked where they live."""
    from tests.utils import dispatched
    from torch.utils._pytree import tree_leaves

    import dit_accel.kernels.vsa.api as api

    def fine_stub(q, k, v, layout, scale=None, return_lse=False, backend="auto"):
        return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)

    host_ops = []

    def on_host(func, args, kwargs, out):
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs, out))):
            host_ops.append(str(func))

    monkeypatch.setattr(api, "block_sparse_attention", fine_stub)
    grid = (5, 6, 7)
    plan = dit_accel.VSA(topk=3).plan(grid)
    q, k, v = (torch.randn(2, 3, 210, 16, device="meta") for _ in range(3))
    plan.prepare("meta")
    plan.attend(q, k, v, scale=None, backend="torch")  # first call: per-device tables are made once
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host sync: Tensor.{_n}"))
    with dispatched(on_host):
        fine, lse, extra, density = plan.attend(q, k, v, scale=None, backend="torch")
    assert host_ops == [] and fine.device.type == "meta" and density == 3 / 8
    # the launch reuses the sizes made for this device: no call reads cubes.sizes (host) again
    from dit_accel.kernels.vsa.naive import coarse_attention, cube_sizes

    no_sizes = plan.cubes._replace(sizes=None)
    assert cube_sizes(no_sizes, "meta", inverse=False) is cube_sizes(plan.cubes, "meta")
    q_t = plan.cubes.perm.permute(q, dim=-2)
    coarse_attention(q_t, q_t, q_t, no_sizes, 3, 0.25)


@interpreter
def test_a_call_reads_nothing_back_after_the_first_call_of_its_shape(monkeypatch):
    """Issue 72, item 5. On an H200 (2026-11-27) VSA's fine launch took 10.1 ms per call back to back and 3.6 ms
    replayed in a CUDA graph, and the whole call 17.5 ms: each call rebuilt the cube permutation on the host and
    planned its fresh layout with host reads (the tile plan's width, its length masks), on top of auto's
    decision (next test). After the first call of a shape, a call (new inputs, so a new selection) runs the
    coarse launches and reaches the fine launch without reading a value back. The fine launch itself is stubbed
    here: the kernels' numbers are checked by the tests above."""
    from triton.runtime import interpreter as triton_interpreter

    from dit_accel.kernels import selfcheck

    launch = triton_interpreter.GridExecutor.__call__
    launched = []

    def stub_fine(self, *a, **k):
        launched.append(self.fn.__name__)
        return None if self.fn.__name__ == "_fwd_kernel" else launch(self, *a, **k)

    monkeypatch.setattr(triton_interpreter.GridExecutor, "__call__", stub_fine)
    monkeypatch.setattr(selfcheck, "usable_fast", lambda *a, **k: True)
    monkeypatch.setattr(selfcheck, "gate", lambda *a, **k: True)
    g = torch.Generator().manual_seed(0)
    grid = (5, 6, 7)  # 8 cubes, partial ones among them: element masks and lengths

    def call():
        q, k, v, gate = (torch.randn(1, 2, 210, 64, generator=g).half() for _ in range(4))
        return dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate, backend="triton")

    call()
    for name in ("__int__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host read: Tensor.{_n}"))
    launched.clear()
    call()
    assert "_fwd_kernel" in launched and len(launched) > 1, launched  # the coarse launches, then the fine one
    from dit_accel.kernels.vsa import cubes_of

    assert cubes_of(grid, (4, 4, 4)) is cubes_of(list(grid), (4, 4, 4))  # one permutation (and device copy) per grid


def test_auto_decides_the_fine_backend_once_per_shape_on_cuda(monkeypatch):
    """A fine branch's layout is new on every call: on CUDA, ``auto`` decides once per shape class (the first
    eager call, on its layout) and later calls, captured ones too, run that backend by name. A dense verdict is
    not kept (the next layout may differ), nor is anything decided inside a capture."""
    import dit_accel.kernels.block_sparse.api as bs_api
    import dit_accel.kernels.request as request
    import dit_accel.kernels.vsa.api as api
    from dit_accel.kernels.vsa import cubes_of

    class OnCuda:  # the attributes the decision reads, of a CUDA tensor (there is no GPU here)
        device, dtype, requires_grad = torch.device("cuda"), torch.float16, False

        def __init__(self, *shape):
            self.shape = torch.Size(shape)

    class Layout:
        kv_indices = torch.zeros(1, 3, 8, 3)

    asked = []
    verdict = ["triton"]
    monkeypatch.setattr(api, "_FINE_BACKENDS", {})
    monkeypatch.setattr(bs_api, "block_sparse_backend", lambda *a, **k: asked.append(a[4]) or verdict[0])
    cubes = cubes_of((5, 6, 7), (4, 4, 4))
    q = OnCuda(1, 3, 512, 64)
    assert [api._fine_backend(q, q, q, Layout(), "auto", cubes) for _ in range(3)] == ["triton"] * 3
    assert asked == ["auto"]
    assert api._fine_backend(q, q, q, Layout(), "torch", cubes) == "torch" and asked == ["auto"]
    other = OnCuda(2, 3, 512, 64)
    verdict[0] = bs_api.DENSE
    assert [api._fine_backend(other, other, other, Layout(), "auto", cubes) for _ in range(2)] == ["auto"] * 2
    assert asked == ["auto"] * 3  # decided again each time: a dense verdict is not kept
    monkeypatch.setattr(request, "in_graph", lambda: True)
    third = OnCuda(4, 3, 512, 64)
    assert api._fine_backend(third, third, third, Layout(), "auto", cubes) == "auto" and len(asked) == 3
    assert api._fine_backend(q, q, q, Layout(), "auto", cubes) == "triton"  # a capture runs the eager choice
