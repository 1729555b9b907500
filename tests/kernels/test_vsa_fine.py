"""VSA's fine branch planned per call without a layout (:mod:`dit_accel.kernels.vsa.fine`).

The plan it computes from a selection must be, bit for bit, the tile plan the launcher builds from the selection's
layout (:func:`tile_plan`), whose kernel path the block-sparse tests prove against references; its outputs must
be the general path's; and every call it must not take (a backward to record, an opt-in forward that plans
otherwise, an interceptor, a capture without a template) must take the general path.
"""

from __future__ import annotations


import pytest
import torch

from dit_accel.kernels.block_sparse.tile_plans import tile_plan
from dit_accel.kernels.vsa import api, fine
from dit_accel.kernels.vsa.naive import cube_rows, cubes_of, selected_count

_LAYOUT_OF_ROWS = api._layout_of_rows  # (the tests below count the calls of the patched one)
from tests.utils import interpreter  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_vsa")  # (tests/kernels/conftest.py)


def _selection(heads: int, rows: int, cubes: int, count: int, seed: int) -> torch.Tensor:
    """``(1, heads, rows, count)`` distinct key cubes per row, ascending (a top-k of random scores)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, heads, rows, cubes, generator=g).topk(count, -1).indices.sort(-1).values


# ----------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("grid,tile", [((4, 8, 8), (4, 4, 4)), ((16, 28, 52), (4, 4, 4)), ((21, 30, 52), (4, 4, 4)),
                                       ((5, 6, 7), (4, 4, 4)), ((3, 9, 10), (2, 4, 8))],
                         ids=["whole", "fastwan-whole", "wan480p-partial", "partial", "partial-t248"])
@pytest.mark.parametrize("heads", [1, 3])
def test_rows_plan_is_the_layouts_tile_plan(grid, tile, heads):
    """Whole cubes (the lists as they are) and partial ones (whole cubes first, each kind ascending, with their bit
    offsets), one layout head or several: the same int32 tensor tile_plan builds from the layout."""
    cubes = cubes_of(grid, tile)
    for sparsity, seed in ((0.9, 0), (0.5, 1), (0.0, 2)):
        count = selected_count(cubes.count, None, sparsity)
        selection = _selection(heads, cubes.count, cubes.count, count, seed)
        layout = api.vsa_layout(cubes, selection)
        rows = selection.reshape(heads, cubes.count, count)
        mask_ids = api._cube_masks(cubes, rows.device)[0]
        want = tile_plan(layout, layout.block_q, layout.block_k).plan
        got = fine.rows_plan(rows, fine.cube_tables(layout, mask_ids, rows.shape))
        assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got, want), (grid, sparsity)
        partial = (mask_ids >= 0)[rows]
        assert torch.equal(got[..., 1], partial.sum(-1).int())  # the header counts the partial cubes
        if bool(partial.any()):  # partial cubes after the whole ones, each kind ascending
            listed = got[..., 2:2 + count].long()
            assert torch.equal((mask_ids >= 0)[listed].int().diff(dim=-1).clamp(max=0).sum(), torch.tensor(0))


def test_rows_plan_of_a_ring_share():
    """A ring rank's share (its query cubes x every key cube): the rectangular layout's plan."""
    grid, tile = (5, 6, 7), (4, 4, 4)
    cubes = cubes_of(grid, tile)
    part = cube_rows(cubes, (4 * 6 * 7, 5 * 6 * 7))  # the last frame: the second rank's share of two
    assert part is not None
    share = part.cubes[1] - part.cubes[0]
    count = selected_count(cubes.count, None, 0.5)
    selection = _selection(2, share, cubes.count, count, seed=3)
    layout = api.vsa_layout(cubes, selection)
    rows = selection.reshape(2, share, count)
    tables = fine.cube_tables(layout, api._cube_masks(cubes, rows.device)[0], rows.shape)
    assert torch.equal(fine.rows_plan(rows, tables), tile_plan(layout, layout.block_q, layout.block_k).plan)


# ----------------------------------------------------------------------------- the calls
def _inputs(grid, tile, heads=2, d=32, dtype=torch.float32, grad=False, seed=0):
    cubes = cubes_of(grid, tile)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, cubes.perm.num_padded, d, generator=g).to(dtype).requires_grad_(grad)
               for _ in range(3))
    return cubes, q, k, v


def _general(cubes, q, k, v, selection, scale):
    """The general path, by hand: the selection's layout through block_sparse_attention (Triton)."""
    from dit_accel.kernels import block_sparse_attention

    b, h, n, d = q.shape
    layout = _LAYOUT_OF_ROWS(cubes, selection)  # (ascending rows)
    o, lse = block_sparse_attention(*(x.reshape(1, b * h, -1, d) for x in (q, k, v)), layout, scale=scale,
                                    return_lse=True, backend="triton")
    return cubes.perm.unpermute(o.view(b, h, n, d), dim=-2), cubes.perm.unpermute(lse.view(b, h, n), dim=-1)


def _layouts_built(monkeypatch) -> list:
    built = []
    real = api._layout_of_rows
    monkeypatch.setattr(api, "_layout_of_rows", lambda *a: built.append(1) or real(*a))
    return built


@interpreter
@pytest.mark.parametrize("grid,tile,dtype", [
    ((4, 8, 8), (4, 4, 4), torch.float32), ((4, 8, 8), (4, 4, 4), torch.float16),
    ((3, 9, 10), (4, 4, 4), torch.float32), ((3, 9, 10), (4, 4, 4), torch.float16),
    ((5, 6, 7), (2, 2, 4), torch.float16)], ids=["whole-fp32", "whole-fp16", "partial-fp32", "partial-fp16",
                                                 "partial-16-token-cubes-fp16"])
def test_later_calls_run_the_template_and_match_the_general_path(monkeypatch, grid, tile, dtype):
    """The class's first call builds its layout; the next ones do not, and give the general path's bits (same
    kernel, plan and launch) on other selections, and the fp32 twin's numbers."""
    cubes, q, k, v = _inputs(grid, tile, dtype=dtype)
    count = selected_count(cubes.count, None, 0.5)
    built = _layouts_built(monkeypatch)
    for seed in range(3):
        selection = _selection(2, cubes.count, cubes.count, count, seed)
        before = len(built)
        got = api._fine_branch(q, k, v, cubes, cubes.perm, None, selection, 0.3, "triton")
        assert len(built) == before + (seed == 0)  # only the first call builds its layout
        want_o, want_lse = _general(cubes, q, k, v, selection, 0.3)
        assert torch.equal(got.fine, want_o) and torch.equal(got.lse, want_lse)
        twin = api._fine_branch(*(x.float() for x in (q, k, v)), cubes, cubes.perm, None, selection, 0.3, "torch")
        torch.testing.assert_close(got.fine.float(), twin.fine, atol=2e-3 if dtype == torch.float16 else 1e-5,
                                   rtol=2e-3 if dtype == torch.float16 else 1e-5)
    assert fine.has_template(grid, (1, 2, cubes.perm.num_padded, 32))
    (template,) = fine._TEMPLATES.values()  # it keeps no call's plan (tens of MB at Wan 14B): each call brings its own
    # (pointer kernels: the items too, and without a row table the unread RIDX)
    assert template.launch.args[0] is None and template.launch.args[3] is None and template.launch.args[4] is None


@interpreter
def test_the_public_op_takes_it_and_stays_exact(monkeypatch):
    """``vsa_attention`` with a gate, twice on a grid with partial cubes: the second call plans without a layout
    and still matches the float64 reference of tests/kernels/vsa_reference.py."""
    import dit_accel
    from tests.kernels.vsa_reference import reference

    grid = (5, 6, 7)
    n = 5 * 6 * 7
    built = _layouts_built(monkeypatch)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        q, k, v, gate = (torch.randn(1, 2, n, 16, generator=g) for _ in range(4))
        out = dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate, backend="triton")
        ref = reference(*(x.double() for x in (q, k, v)), grid, 3, (4, 4, 4), gate.double())[0]
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert len(built) == 1


@interpreter
def test_calls_it_must_not_take_run_the_general_path(monkeypatch):
    """A backward to record, the opt-in length or warp-specialized forwards, an active dispatch mode: each builds
    its layout (and a gradient flows); no template is made inside a capture."""
    from torch.utils._python_dispatch import TorchDispatchMode

    grid, tile = (3, 9, 10), (4, 4, 4)
    cubes, q, k, v = _inputs(grid, tile)
    count = selected_count(cubes.count, None, 0.5)
    selection = _selection(2, cubes.count, cubes.count, count, 0)
    built = _layouts_built(monkeypatch)

    def call(*xs):
        return api._fine_branch(*(xs or (q, k, v)), cubes, cubes.perm, None, selection, 0.3, "triton")

    monkeypatch.setattr(fine, "in_graph", lambda: True)  # a capture: the general path, no template kept
    call()
    call()
    assert len(built) == 2 and not fine._TEMPLATES
    monkeypatch.undo()  # (the fixture's stand-ins too: set again, so no template outlives this test)
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")
    monkeypatch.setattr(fine, "_TEMPLATES", {})
    built = _layouts_built(monkeypatch)
    call()  # the template
    assert len(built) == 1
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    res = call(qg, kg, vg)
    res.fine.sum().backward()
    assert len(built) == 2 and qg.grad is not None and bool(qg.grad.abs().sum() > 0)
    for env in ("DIT_ACCEL_WS", "DIT_ACCEL_LENGTHS"):
        monkeypatch.setenv(env, "1")
        call()
        monkeypatch.delenv(env)
    assert len(built) == 4

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        call()
    assert len(built) == 5
    call()
    assert len(built) == 5  # and the template again


@interpreter
def test_a_plan_that_differs_keeps_the_general_path(monkeypatch):
    """The one comparison per class: a per-call plan unlike the layout's (a fault) makes no template and warns;
    every call then builds its layout and stays right."""
    grid, tile = (3, 9, 10), (4, 4, 4)
    cubes, q, k, v = _inputs(grid, tile)
    count = selected_count(cubes.count, None, 0.5)
    real = fine.rows_plan
    monkeypatch.setattr(fine, "rows_plan", lambda rows, t: real(rows, t).flip(-1).contiguous())
    built = _layouts_built(monkeypatch)
    with pytest.warns(RuntimeWarning, match="keeps the general path"):
        api._fine_branch(q, k, v, cubes, cubes.perm, None, _selection(2, cubes.count, cubes.count, count, 0), 0.3,
                         "triton")
    selection = _selection(2, cubes.count, cubes.count, count, 1)
    got = api._fine_branch(q, k, v, cubes, cubes.perm, None, selection, 0.3, "triton")
    assert len(built) == 2 and not fine.has_template(grid, (1, 2, cubes.perm.num_padded, 32))
    assert torch.equal(got.fine, _general(cubes, q, k, v, selection, 0.3)[0])


def test_auto_off_cuda_never_takes_it():
    """``auto`` on a CPU is the PyTorch twin: the fine branch keeps its layout path and makes no template."""
    grid, tile = (4, 8, 8), (4, 4, 4)
    cubes, q, k, v = _inputs(grid, tile)
    count = selected_count(cubes.count, None, 0.5)
    for seed in (0, 1):
        api._fine_branch(q, k, v, cubes, cubes.perm, None, _selection(2, cubes.count, cubes.count, count, seed),
                         0.3, "auto")
    assert not fine._TEMPLATES


# ----------------------------------------------------------------------------- the check pytest -m gpu runs too
def check_planned_per_call(monkeypatch, grid, *, device, dtype, heads: int, d: int, tol: float, capture: bool):
    """A class's first fine-branch call makes its template; a later one, on another selection, matches the fp32
    gathered twin (within ``tol``) and the general path on the same selection bit for bit; with ``capture`` (CUDA)
    it captures into a CUDA graph whose replays on new inputs and selections equal eager calls."""
    from dit_accel.kernels.vsa.naive import fine_gathered

    monkeypatch.setattr(fine, "_TEMPLATES", {})
    cubes = cubes_of(grid, (4, 4, 4))
    count = selected_count(cubes.count, None, 0.9)
    n, scale = cubes.perm.num_padded, d ** -0.5
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))

    def selection(seed):
        return _selection(heads, cubes.count, cubes.count, count, seed).to(device)

    def call(sel, qq=None):  # q, k, v in cube order, as the fine branch takes them
        return api._fine_branch(q if qq is None else qq, k, v, cubes, cubes.perm, None, sel, scale, "triton")

    with torch.no_grad():
        call(selection(0))
        assert fine.has_template(grid, (1, heads, n, d))
        sel = selection(1)
        got = call(sel)
        ref = fine_gathered(q.float(), k.float(), v.float(), cubes, sel, scale)[0]
        ref = cubes.perm.unpermute(ref, dim=-2)
        err = float((got.fine.float() - ref).norm() / ref.norm())
        assert err <= tol, err
        with monkeypatch.context() as general:
            general.setattr(fine, "_TEMPLATES", {})
            general.setattr(fine, "remember", lambda *args: None)
            want = call(sel)
        assert torch.equal(got.fine, want.fine) and torch.equal(got.lse, want.lse)
        if not capture:
            return
        static_q, static_sel = q.clone(), sel.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(static_sel, static_q)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(static_sel, static_q)
        for seed in (2, 3):
            static_q.copy_(torch.randn(static_q.shape, generator=g).to(device=device, dtype=dtype))
            static_sel.copy_(selection(seed))
            graph.replay()
            torch.cuda.synchronize()
            eager = call(static_sel.clone(), static_q.clone())
            assert torch.equal(out.fine, eager.fine)


@interpreter
@pytest.mark.parametrize("grid", [(4, 8, 8), (3, 9, 10)], ids=["whole", "partial"])
def test_planned_per_call_check_on_the_cpu(monkeypatch, grid):
    """The GPU test's check (tests/kernels/test_gpu_production.py) at interpreter sizes, capture apart."""
    check_planned_per_call(monkeypatch, grid, device="cpu", dtype=torch.float16, heads=2, d=32, tol=2e-3,
                           capture=False)
