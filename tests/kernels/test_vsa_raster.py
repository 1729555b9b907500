"""VSA on raster-order tensors (kernels/vsa/raster.py): inference and training calls.

Both branches read q, k and v where they are (the pool launch and the fine branch's gathered forward through the
cube permutation's row table) instead of copies in cube order: the same sums and the same tiles reach the same
products, so every part is the cube-order path's bit for bit, and the float64 reference's within rounding.
Interpreter tests (fp32 / fp16: its bf16 dot is wrong)."""
from __future__ import annotations


import pytest
import torch

import dit_accel
from dit_accel.kernels import autotune, selfcheck
from dit_accel.kernels.block_sparse import gather
from dit_accel.kernels.vsa import api, fine, layouts, raster
from dit_accel.kernels.vsa.naive import cubes_of, selected_count
from tests.kernels.vsa_reference import reference

triton = pytest.importorskip("triton")
from dit_accel.kernels.vsa.triton import coarse_triton  # noqa: E402
from tests.utils import interpreter, pretend_tracing  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_vsa")  # (tests/kernels/conftest.py)


def _qkv(grid, batch=1, heads=2, d=32, dtype=torch.float32, layout="bnhd", n=4, seed=0):
    """``n`` raster tensors ``(B, H, N, D)``: views of ``(B, N, H, D)`` (a pipeline's) or contiguous."""
    tokens = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    if layout == "bnhd":
        return [torch.randn(batch, tokens, heads, d, generator=g).to(dtype).transpose(1, 2) for _ in range(n)]
    return [torch.randn(batch, heads, tokens, d, generator=g).to(dtype) for _ in range(n)]


def _both_orders(monkeypatch, call) -> dict:
    """``{"0": call(), "1": call()}``: in cube order (``DIT_ACCEL_GATHER=0``), then reading raster order (``1``)."""
    outs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv(gather.ENV_GATHER, forced)
        outs[forced] = call()
    return outs


def _spy(monkeypatch) -> list:
    calls = []
    real = raster.raster_forward
    monkeypatch.setattr(raster, "raster_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@interpreter
@pytest.mark.parametrize("grid,tile,dtype,batch,layout", [
    ((5, 6, 7), (2, 2, 4), torch.float32, 1, "bnhd"),  # partial cubes in every dimension
    ((5, 6, 7), (4, 4, 4), torch.float16, 2, "bhnd"),  # two batches folded into heads
    ((4, 8, 8), (4, 4, 4), torch.float16, 1, "bnhd"),  # whole cubes
], ids=["partial-fp32", "partial-b2-fp16", "whole-fp16"])
@pytest.mark.parametrize("with_output", [True, False], ids=["coarse", "selection-only"])
def test_the_pool_launch_reads_raster_order_bit_for_bit(grid, tile, dtype, batch, layout, with_output):
    cubes = cubes_of(grid, tile)
    q, k, v = _qkv(grid, batch, dtype=dtype, layout=layout, n=3)
    count = max(1, cubes.count // 4)
    want = coarse_triton(*(cubes.perm.permute(x, dim=-2) for x in (q, k, v)), cubes, count, 0.2, with_output)
    got = coarse_triton(q, k, v, cubes, count, 0.2, with_output, rows=cubes.perm.row_table("cpu"))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))


@interpreter
@pytest.mark.parametrize("grid,dtype", [((5, 6, 7), torch.float32), ((3, 9, 10), torch.float16),
                                        ((4, 8, 8), torch.float16)], ids=["partial-fp32", "partial-fp16", "whole-fp16"])
def test_vsa_attention_reads_raster_order_bit_for_bit(monkeypatch, grid, dtype):
    """With a gate, twice (the second call runs the class's raster template, no layout): the cube-order path's bits
    and the float64 reference's numbers."""
    calls = _spy(monkeypatch)
    built = []
    real_layout = api._layout_of_rows
    for module in (api, layouts):  # (the cube-order path's layouts, and the raster one's)
        name = "_layout_of_rows" if module is api else "layout_of_rows"
        monkeypatch.setattr(module, name, lambda *a: built.append(1) or real_layout(*a))
    for seed in (0, 1):
        q, k, v, gate = _qkv(grid, dtype=dtype, seed=seed)
        outs = _both_orders(monkeypatch, lambda: dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate,
                                                                         backend="triton", return_selection=True))
        assert torch.equal(outs["0"][0], outs["1"][0]) and torch.equal(outs["0"][1], outs["1"][1])
        ref = reference(*(x.double() for x in (q, k, v)), grid, 3, (4, 4, 4), gate.double())[0]
        tol = 2e-3 if dtype == torch.float16 else 1e-4
        torch.testing.assert_close(outs["1"][0].double(), ref, atol=tol, rtol=tol)
    assert calls == [1, 1] and list(api._RASTER_CHOICES.values()) == [True]
    assert len(built) == 2  # each path's first call builds its layout; the second runs its template
    assert len(fine._TEMPLATES) == 2 and any(key[-1] for key in fine._TEMPLATES)


@interpreter
@pytest.mark.parametrize("grid", [(5, 6, 7), (4, 8, 8)], ids=["partial", "whole"])
def test_fine_and_lse_come_back_in_raster_order(monkeypatch, grid):
    """What a caller that merges text keys reads (plans with ``lse``): fine and lse in raster order, equal to the
    cube-order path's; the fine output laid out as (B, N, H, D), as SDPA returns it."""
    cubes = cubes_of(grid, (4, 4, 4))
    count = selected_count(cubes.count, None, 0.5)
    q, k, v = _qkv(grid, n=3, dtype=torch.float16)
    parts = _both_orders(monkeypatch, lambda: api.vsa_parts(q, k, v, grid, count, (4, 4, 4), 0.25, backend="triton"))
    for name in ("fine", "lse", "coarse", "selection"):
        assert torch.equal(getattr(parts["0"], name), getattr(parts["1"], name)), name
    assert parts["1"].fine.transpose(1, 2).is_contiguous()


@interpreter
def test_batches_that_do_not_fold_run_one_at_a_time_bit_for_bit(monkeypatch):
    """A pipeline's batch of two (B, N, H, D): (B, H) do not fold into one head axis as a view, so each batch runs
    the raster launches on its own and the parts are joined: the cube-order path's bits all the same."""
    grid = (5, 6, 7)
    q, k, v, gate = _qkv(grid, batch=2, dtype=torch.float16, seed=6)
    assert not raster.folds(q)
    from dit_accel.kernels.vsa import triton as vsa_triton

    launches = []
    real = vsa_triton.coarse_triton
    monkeypatch.setattr(vsa_triton, "coarse_triton", lambda *a, **kw: launches.append(a[0].shape) or real(*a, **kw))
    outs = _both_orders(monkeypatch, lambda: dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate,
                                                                     backend="triton", return_selection=True))
    assert torch.equal(outs["0"][0], outs["1"][0]) and torch.equal(outs["0"][1], outs["1"][1])
    assert launches[-2:] == [(1, 2, 210, 32)] * 2 and list(api._RASTER_CHOICES.values()) == [True]


@interpreter
def test_joint_text_calls_through_the_plan_match_bit_for_bit(monkeypatch):
    """A plan call with text tokens after the video ones (its video part a strided slice, merged by the lse)."""
    grid = (5, 6, 7)
    plan = dit_accel.VSA(topk=3).plan(grid)
    n = 5 * 6 * 7 + 7
    q, k, v = _qkv((1, 1, n), n=3, dtype=torch.float16, seed=4)
    calls = _spy(monkeypatch)
    outs = _both_orders(monkeypatch, lambda: plan.run(q, k, v, num_text=7, text_first=False, backend="triton")[0])
    assert calls == [1] and torch.equal(outs["0"], outs["1"])


@interpreter
def test_calls_it_must_not_take_keep_cube_order(monkeypatch):
    """The PyTorch twin (with or without a backward to record), the switch off, a CPU call unasked, a trace: each
    runs in cube order."""
    grid = (5, 6, 7)
    calls = _spy(monkeypatch)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    q, k, v = _qkv(grid, n=3)
    dit_accel.vsa_attention(q, k, v, grid, topk=3, backend="torch")  # (the twin: decided, cube order)
    leaves = [x.requires_grad_() for x in _qkv(grid)]
    dit_accel.vsa_attention(*leaves[:3], grid, topk=3, gate=leaves[3], backend="torch").sum().backward()
    assert calls == [] and list(api._RASTER_CHOICES.values()) == [False, False]
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    dit_accel.vsa_attention(q, k, v, grid, topk=3, backend="triton")
    monkeypatch.delenv(gather.ENV_GATHER)
    dit_accel.vsa_attention(q, k, v, grid, topk=3, backend="triton")
    assert calls == [] and len(api._RASTER_CHOICES) == 2  # (nothing decided since)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    pretend_tracing(monkeypatch)
    monkeypatch.setattr(api, "_raster_decision", lambda *a: pytest.fail("decided"))
    assert not api._reads_raster(q, k, v, cubes_of(grid, (4, 4, 4)), 3, 0.2, True, "triton", False)


def _train_step(q, k, v, gate, grid, forced: str, monkeypatch, **kw):
    """``(out, selection, [dq, dk, dv, dgate])`` of one VSA training call on fresh leaves of q, k, v and gate."""
    monkeypatch.setenv(gather.ENV_GATHER, forced)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gate) if x is not None]
    out, selection = dit_accel.vsa_attention(*leaves[:3], grid, gate=leaves[3] if gate is not None else None,
                                             return_selection=True, **kw)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype))
    return out.detach(), selection, [x.grad for x in leaves]


def _reference_step(q, k, v, gate, grid, count):
    """The float64 reference's ``(out, [dq, dk, dv, dgate])`` under the same output gradient."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, gate) if x is not None]
    out = reference(*leaves[:3], grid, count, (4, 4, 4), leaves[3] if gate is not None else None)[0]
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape))
    return out.detach(), [x.grad for x in leaves]


@interpreter
@pytest.mark.parametrize("grid,batch,layout,gated", [
    ((5, 6, 7), 1, "bnhd", True),  # partial cubes in every dimension
    ((4, 8, 8), 1, "bnhd", True),  # whole cubes: each cube's gradient a broadcast
    ((5, 6, 7), 2, "bhnd", False),  # two batches folded into heads; no gate (the fine branch alone)
    ((3, 9, 10), 2, "bnhd", True),  # a batch that does not fold: one batch at a time
], ids=["partial", "whole", "b2-nogate", "b2-unfolded"])
def test_a_training_call_reads_raster_order_both_ways(monkeypatch, grid, batch, layout, gated):
    """A call that records a backward reads raster order in its forward and its backward (the gathered two-pass
    kernels, and each cube's mean gradient added over its tokens in place): the output and every gradient within
    fp32 rounding of the cube-order path's and of the float64 reference's, the same selection."""
    calls = []
    real = raster.raster_train
    monkeypatch.setattr(raster, "raster_train", lambda *a: calls.append(1) or real(*a))
    q, k, v, gate = _qkv(grid, batch=batch, heads=3 - batch, layout=layout, seed=4)
    gate = gate if gated else None
    count = 3
    cube = _train_step(q, k, v, gate, grid, "0", monkeypatch, topk=count, backend="triton")
    assert calls == []
    got = _train_step(q, k, v, gate, grid, "1", monkeypatch, topk=count, backend="triton")
    # (a batch that does not fold runs each of its videos through raster_train again)
    assert calls == [1] * (1 if raster.folds(q) else 1 + batch) and list(api._RASTER_CHOICES.values()) == [True]
    assert torch.equal(got[1], cube[1])
    torch.testing.assert_close(got[0], cube[0], atol=1e-5, rtol=1e-5)
    ref_out, ref_grads = _reference_step(q, k, v, gate, grid, count)
    torch.testing.assert_close(got[0].double(), ref_out, atol=1e-4, rtol=1e-4)
    for name, a, b, ref in zip("qkvg", got[2], cube[2], ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name} against cube order: {m}")
        torch.testing.assert_close(a.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@interpreter
def test_a_training_calls_coarse_branch_writes_no_cube_by_cube_tensor_but_the_selections(monkeypatch):
    """The coarse output's autograd on the cube means wrote the C x C scores, their softmax and in the backward
    their gradients (about 6 q-sized units a call at Wan 480p with 2 heads of 64, MODELLED); one fused attention op
    writes none of them. What is left is the selection launch's scores (forward only)."""
    from torch.utils._pytree import tree_leaves

    from tests.utils import dispatched

    grid = (8, 12, 16)  # 2 x 3 x 4 = 24 cubes, head dim 32
    c = 24
    q, k, v, gate = _qkv(grid, seed=3)
    monkeypatch.setenv(gather.ENV_GATHER, "1")

    def squares(made):  # the C x C tensors an operator writes
        def record(func, args, kwargs, out):
            if not (func.is_view or func.__name__.startswith("set_")):  # (views, the interpreter's copies: no tensor)
                made.extend(func.__name__ for t in tree_leaves(out)
                            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (c, c))
        return dispatched(record)

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gate)]
    dit_accel.vsa_attention(*leaves[:3], grid, topk=3, gate=leaves[3], backend="triton")  # (decides the path)
    forward, backward = [], []
    with squares(forward):
        out = dit_accel.vsa_attention(*leaves[:3], grid, topk=3, gate=leaves[3], backend="triton")
    with squares(backward):
        out.sum().backward()
    assert list(api._RASTER_CHOICES.values()) == [True]
    assert forward == ["empty.memory_format"] and backward == [], (forward, backward)


@interpreter
@pytest.mark.parametrize("grid", [(4, 8, 8), (5, 6, 7)], ids=["whole", "partial"])
def test_a_training_call_keeps_no_copy_of_q_k_v_for_its_backward(monkeypatch, grid):
    """What a training call leaves alive for its backward beyond q, k, v and the gate themselves: in cube order the
    copies of q, k and v and the tiled output (about 4 q-sized tensors); reading raster order, the output and its
    lse and the cube-sized parts (1.10 at whole cubes, 1.20 at partial ones since the gated term's backward runs in
    one launch, :mod:`dit_accel.kernels.vsa.gated`: it keeps the cube rows, where the operators kept them spread
    along a partial dimension in fp32, 2.16 here)."""
    from tests.utils import saved_beyond

    q, k, v, gate = _qkv(grid, seed=7)
    unit = q.numel() * q.element_size()

    def saved_beyond_inputs(forced: str) -> float:
        monkeypatch.setenv(gather.ENV_GATHER, forced)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gate)]
        return saved_beyond(lambda: dit_accel.vsa_attention(*leaves[:3], grid, topk=3, gate=leaves[3],
                                                            backend="triton"), leaves) / unit

    for forced in ("0", "1"):  # (the first call of each decides its path: its own runs are not counted)
        saved_beyond_inputs(forced)
    cube, raster_ = saved_beyond_inputs("0"), saved_beyond_inputs("1")
    assert cube - raster_ >= 3.0, (cube, raster_)
    assert raster_ <= 1.25, raster_


@interpreter
def test_a_training_class_is_decided_apart_and_timed_with_its_backward(monkeypatch, tmp_path):
    """The autograd state is part of the class: an inference call's choice is not a training call's. Unforced, a
    training class times forward and backward of both paths (family vsa.gather_train) and asks for the gathered
    backward's self-check too."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(gather.ENV_GATHER, raising=False)
    grid = (5, 6, 7)
    cubes = cubes_of(grid, (4, 4, 4))
    q, k, v = _qkv(grid, n=3)
    asked, families, backwards = [], [], []
    monkeypatch.setattr("dit_accel.kernels.block_sparse.gather.gather_runs",
                        lambda *a: asked.append(a[-1]) or True)  # (its last argument: backward)
    monkeypatch.setattr("torch.autograd.grad", lambda *a, real=torch.autograd.grad, **kw: backwards.append(1) or
                        real(*a, **kw))

    def faster(family, *a, **kw):
        families.append(family)
        for gathered in (True, False):
            a[-1](gathered)
        return True

    monkeypatch.setattr("dit_accel.kernels.block_sparse.gather.raster_faster", faster)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    args = (cubes, 3, True, "triton", None)
    assert api._raster_key(q, k, v, *args) != api._raster_key(*leaves, *args)
    assert api._raster_decision(q, k, v, cubes, 3, 0.2, True, "triton", None, False)
    assert asked == [False] and families == [raster.FAMILY] and backwards == []
    assert api._raster_decision(*leaves, cubes, 3, 0.2, True, "triton", None, False)
    assert asked == [False, True] and families == [raster.FAMILY, raster.TRAIN_FAMILY]
    assert len(backwards) == 3  # (the decision's cube-order run, then both paths timed)
    assert all(x.grad is None for x in leaves)  # timed on detached copies


@interpreter
def test_a_capture_takes_the_eager_answer_and_decides_nothing(monkeypatch):
    grid = (5, 6, 7)
    cubes = cubes_of(grid, (4, 4, 4))
    q, k, v = _qkv(grid, n=3, dtype=torch.float16)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    ran = []
    real = api._cube_order
    monkeypatch.setattr(api, "_cube_order", lambda *a: ran.append(1) or real(*a))
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: True)  # a capture before any eager call
    assert not api._reads_raster(q, k, v, cubes, 3, 0.2, True, "triton", False)
    assert not api._RASTER_CHOICES and ran == []
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: False)
    assert api._reads_raster(q, k, v, cubes, 3, 0.2, True, "triton", False)  # eager: decides
    assert ran == [1]  # (the cube-order path ran once, deciding the fine branch's backend)
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: True)
    assert api._reads_raster(q, k, v, cubes, 3, 0.2, True, "triton", False) and ran == [1]


@interpreter
def test_unforced_it_is_timed_against_cube_order_once_per_class(monkeypatch, tmp_path):
    """Unforced (on a GPU, once its self-check passed) the choice is the autotuner's, family vsa.gather: both
    paths timed on the call's inputs, the faster kept; with the autotuner off, cube order."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(gather.ENV_GATHER, raising=False)
    grid = (5, 6, 7)
    cubes = cubes_of(grid, (4, 4, 4))
    q, k, v = _qkv(grid, n=3, dtype=torch.float16)
    monkeypatch.setattr("dit_accel.kernels.block_sparse.gather.gather_runs", lambda *a: True)
    timed = []

    def timer(fn, *_):
        fn()
        timed.append(1)
        return 0.5 if len(timed) == 1 else 1.0  # the first contender (the raster path) is faster

    real = gather.raster_faster
    monkeypatch.setattr("dit_accel.kernels.block_sparse.gather.raster_faster",
                        lambda *a: real(*a, timer=timer))
    decide = api._raster_decision
    assert decide(q, k, v, cubes, 3, 0.2, True, "triton", None, False) and len(timed) == 2
    assert decide(q, k, v, cubes, 3, 0.2, True, "triton", None, False) and len(timed) == 2  # stored
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    assert not decide(q, k, v, cubes, 3, 0.3, False, "triton", None, False) and len(timed) == 2


@interpreter
def test_a_forced_raster_call_whose_variant_fails_its_self_check_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(selfcheck.ENV_FAULT, gather.VARIANT)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    grid = (5, 6, 7)
    q, k, v = _qkv(grid, n=3, dtype=torch.float16)
    with pytest.raises(selfcheck.VariantFailed, match="block_sparse.triton.fwd_gather failed its self-check"):
        dit_accel.vsa_attention(q, k, v, grid, topk=3, backend="triton")


@interpreter
def test_a_gated_model_under_apply_reads_raster_order_bit_for_bit(monkeypatch, tmp_path):
    """Tiny Wan with FastVideo's to_gate_compress gates under ``apply(VSA)`` and the Triton kernels: the same output
    whether its attention calls copy into cube order or read raster order (which every layer then did)."""
    from dit_accel.models import tiny as T
    from tests.pipelines.test_vsa_gates import GRID, _gated_checkpoint, _load

    _gated_checkpoint(tmp_path)
    model = _load(tmp_path)
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID, batch=1)
    calls = _spy(monkeypatch)

    def run():
        with dit_accel.apply(model, dit_accel.VSA(topk=2), backend="triton") as handle, torch.no_grad():
            out = model(**kwargs)[0]
            assert len(handle.vsa_gates) == 2
        return out

    outs = _both_orders(monkeypatch, run)
    assert len(calls) == len(model.blocks) and torch.equal(outs["0"], outs["1"])


@interpreter
def test_a_gated_model_trained_under_apply_reads_raster_order(monkeypatch, tmp_path):
    """A training step of the tiny gated Wan under ``apply(VSA)`` with the Triton kernels: every layer's attention
    reads raster order both ways, and the output and every parameter's gradient are the cube-order step's within
    fp32 rounding."""
    from dit_accel.models import tiny as T
    from tests.pipelines.test_vsa_gates import GRID, _gated_checkpoint, _load

    _gated_checkpoint(tmp_path)
    model = _load(tmp_path).train()
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID, batch=1)
    calls = []
    real = raster.raster_train
    monkeypatch.setattr(raster, "raster_train", lambda *a: calls.append(1) or real(*a))

    def step():
        model.zero_grad(set_to_none=True)
        with dit_accel.apply(model, dit_accel.VSA(topk=2), backend="triton") as handle:
            out = model(**kwargs)[0]
            out.square().mean().backward()
            assert len(handle.vsa_gates) == 2
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    outs = _both_orders(monkeypatch, step)
    assert len(calls) == len(model.blocks)
    torch.testing.assert_close(outs["1"][0], outs["0"][0], atol=1e-5, rtol=1e-5)
    assert outs["1"][1].keys() == outs["0"][1].keys() and len(outs["0"][1]) > 10
    for name, grad in outs["0"][1].items():
        torch.testing.assert_close(outs["1"][1][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [(16, 28, 52), (21, 30, 52)], ids=["fastwan-whole", "wan480p-partial"])
def test_gpu_raster_order_matches_cube_order(grid, monkeypatch, tmp_path):
    """FastWan's shape and Wan 480p's (partial cubes), 12 heads of 128 in bf16, gated, sparsity 0.9: the raster
    path (both branches through the row table) against the cube-order one, the first call and a template's call;
    and the default choice (self-checks, then timing) made once per class."""
    from tests.utils import DEVICE

    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(gather.ENV_GATHER, raising=False)
    q, k, v, gate = (x.to(DEVICE) for x in _qkv(grid, heads=12, d=128, dtype=torch.bfloat16, seed=3))
    for _ in range(2):
        outs = _both_orders(monkeypatch, lambda: dit_accel.vsa_attention(q, k, v, grid, sparsity=0.9, gate=gate,
                                                                         backend="triton", return_selection=True))
        assert torch.equal(outs["0"][1], outs["1"][1])  # the same pools: the same selection
        torch.testing.assert_close(outs["1"][0].float(), outs["0"][0].float(), atol=2e-2, rtol=2e-2)
    monkeypatch.delenv(gather.ENV_GATHER)
    monkeypatch.setattr(api, "_RASTER_CHOICES", {})
    for _ in range(2):
        out = dit_accel.vsa_attention(q, k, v, grid, sparsity=0.9, gate=gate, backend="triton")
        torch.testing.assert_close(out.float(), outs["0"][0].float(), atol=2e-2, rtol=2e-2)
    assert len(api._RASTER_CHOICES) == 1  # decided once (timed against cube order where its checks passed)


@pytest.mark.gpu
def test_gpu_training_raster_order_matches_cube_order(monkeypatch, tmp_path):
    """A grid of partial cubes (60 of them), 2 heads of 128 in bf16, gated, 6 key cubes per query cube: a training
    call reading raster order both ways (the gathered forward and backward, each cube's mean gradient spread in
    place) against the cube-order one and the float64 reference: the same selection (no near-tie at 60 cubes),
    the output and every gradient within bf16 rounding. Small enough for the dense reference; at Wan's 798 cubes
    the two paths' fp32 means (the pool launch's, the twin's) can rank a near-tie apart."""
    from tests.utils import DEVICE

    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    grid = (9, 15, 18)
    q, k, v, gate = (x.to(DEVICE) for x in _qkv(grid, heads=2, d=128, dtype=torch.bfloat16, seed=5))
    cube = _train_step(q, k, v, gate, grid, "0", monkeypatch, topk=6, backend="triton")
    got = _train_step(q, k, v, gate, grid, "1", monkeypatch, topk=6, backend="triton")
    assert torch.equal(got[1], cube[1])
    ref_out, ref_grads = _reference_step(*(x.cpu() for x in (q, k, v, gate)), grid, 6)
    torch.testing.assert_close(got[0].float(), cube[0].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[0].double().cpu(), ref_out, atol=2e-2, rtol=2e-2)
    for a, b, ref in zip(got[2], cube[2], ref_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a.double().cpu(), ref, atol=2e-2, rtol=2e-2)
