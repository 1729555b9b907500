"""The block-sparse backward on raster-order tensors through a row table (bwd_kernels.py with GATHER, gather.py).

A training call that reads raster order in its forward reads it in its backward too: the two-pass kernels load q,
k, v and dO and store dQ, dK and dV through the permutation's row table. The same tiles reach the same products as
in the gathering path (gather into tiled order, the kernels, scatter the gradients back), so the gradients are its
own bit for bit, and the fp32 reference's on the raster mask within rounding. Interpreter tests (fp32 / fp16)."""

import pytest
import torch

import dit_accel
from dit_accel.kernels import autotune, selfcheck
from dit_accel.kernels.block_sparse import gather
from dit_accel.patterns.permutation import TilePermutation
from tests.kernels.test_block_sparse_gather import CASES, MODEL_IDS, MODELS, _problem, _spy_gathered, _tile_plan
from tests.utils import assert_grads_close, interpreter, make_qkv

triton = pytest.importorskip("triton")
from dit_accel.kernels.block_sparse.triton import triton_backward, triton_forward  # noqa: E402


@pytest.fixture(autouse=True)
def _no_selfcheck(monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")


@interpreter
@pytest.mark.parametrize("perm,d,dtype,block_q,block_k", CASES,
                         ids=[f"{type(c[0]).__name__}-{c[0].grid}-d{c[1]}-{str(c[2])[6:]}-{c[3]}x{c[4]}"
                              for c in CASES])
def test_raster_backward_equals_the_gathering_path_bit_for_bit(perm, d, dtype, block_q, block_k):
    q, k, v, mask, layout = _problem(perm, 2, d, dtype, block_q, block_k, seed=3)
    g = torch.Generator().manual_seed(4)
    do, dlse = torch.randn(q.shape, generator=g).to(dtype), torch.randn(q.shape[:3], generator=g)
    scale, rows = d ** -0.5, perm.row_table("cpu")
    o, lse = triton_forward(q, k, v, layout, scale, rows=rows)
    got = triton_backward(do, q, k, v, o, lse, layout, scale, dlse=dlse, rows=rows)
    tiled = [perm.permute(x) for x in (q, k, v)]
    o_t, lse_t = triton_forward(*tiled, layout, scale)
    want = triton_backward(perm.permute(do), *tiled, o_t, lse_t, layout, scale,
                           dlse=perm.permute(dlse, dim=-1))
    for name, a, b, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert torch.equal(a, perm.unpermute(b)), name
        assert a.shape == x.shape and a.stride() == x.stride(), name  # laid out like its input
    raster = perm.inverse
    assert_grads_close(triton_backward(do, q, k, v, o, lse, layout, scale, rows=rows), q, k, v,
                       mask[:, raster][:, :, raster], do, scale)


@interpreter
def test_gradients_of_bnhd_views_come_back_in_their_layout():
    """q, k, v as a pipeline hands them over ((B, N, H, D) memory): the gradients keep that layout, and match."""
    perm = TilePermutation((3, 5, 7), (2, 4, 8))
    q, k, v, mask, layout = _problem(perm, 2, 64, torch.float16, 64, 64, seed=8)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    rows = perm.row_table("cpu")
    o, lse = triton_forward(q, k, v, layout, 0.125, rows=rows)
    grads = triton_backward(do, q, k, v, o, lse, layout, 0.125, rows=rows)
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    assert_grads_close(grads, q, k, v, mask[:, perm.inverse][:, :, perm.inverse], do, 0.125)
    with pytest.raises(ValueError, match="one_pass=True"):  # none ships for raster order
        triton_backward(do, q, k, v, o, lse, layout, 0.125, rows=rows, one_pass=True)


def test_an_incoming_gradient_whose_rows_pass_32_bits_is_made_dense_first():
    """dO reaches the backward after gather_fits checked q, k, v and o: the launcher copies one whose row offsets
    would pass the gathered kernels' 32 bits (a view into a huge buffer) dense first (gather.rows_fit)."""
    n, d = 1000, 64
    dense = torch.empty((1, 2, n, d), device="meta")
    wide = torch.empty_strided((1, 2, n, d), (2 * n * 2 ** 22, 2 ** 22, 2 ** 22 * 2, 1), device="meta")
    assert gather.rows_fit(dense) and not gather.rows_fit(wide)
    assert gather.rows_fit(wide.contiguous())


def _train(plan, q, k, v, text=0):
    """Forward and backward of a plan call on fresh leaves; ``(o, lse, dq, dk, dv)``."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if text:
        o = plan.run(*leaves, num_text=text, backend="triton")[0]
        lse = None
    else:
        o, lse = plan.attend(*leaves, scale=None, backend="triton")[:2]
    loss = o.float().square().sum() + (0 if lse is None else lse.sum())  # (the lse's gradient enters too)
    loss.backward()
    return (o,) + (() if lse is None else (lse,)) + tuple(x.grad for x in leaves)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plan_training_calls_read_raster_order_bit_for_bit(monkeypatch, dtype):
    plan = _tile_plan()
    n = plan.perm.num_tokens
    q, k, v = make_qkv(1, 2, n, n, 64, dtype, seed=5)
    calls = _spy_gathered(monkeypatch)
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    want = _train(plan, q, k, v)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    got = _train(plan, q, k, v)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(got, want))
    assert [key[5] for key, hit in plan._gather_choice.items() if hit] == [True]  # (decided for training calls)
    monkeypatch.delenv(gather.ENV_GATHER)  # unset on a CPU: the gathering path
    got = _train(plan, q, k, v)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(got, want))


@interpreter
def test_a_training_call_reading_raster_order_keeps_no_copy_of_q_k_v(monkeypatch):
    """What a Tile training call leaves alive for its backward beyond q, k and v themselves: the gathering path
    keeps their tiled copies and the tiled output (about 4 q-sized tensors); reading raster order, only the output
    and its lse (about 1)."""
    from tests.utils import saved_beyond

    plan = _tile_plan()
    n = plan.perm.num_tokens
    q, k, v = make_qkv(1, 2, n, n, 64, torch.float32, seed=6)
    unit = q.numel() * q.element_size()
    saved = {}
    for forced in ("0", "1", "0", "1"):  # (the first call of each decides its path: its own runs are not counted)
        monkeypatch.setenv(gather.ENV_GATHER, forced)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        saved[forced] = saved_beyond(lambda: plan.run(*leaves, backend="triton"), leaves) / unit
    assert saved["0"] >= 3.5 and saved["1"] <= 1.2, saved


@interpreter
def test_joint_text_training_calls_match_bit_for_bit(monkeypatch):
    """Text tokens beside the video ones: the video part a strided slice, merged with the text keys by the lse,
    whose gradient reaches the raster backward."""
    plan = _tile_plan()
    n = plan.perm.num_tokens + 7
    q, k, v = make_qkv(1, 2, n, n, 64, torch.float32, seed=13)
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    want = _train(plan, q, k, v, text=7)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    got = _train(plan, q, k, v, text=7)
    assert True in plan._gather_choice.values() and all(torch.equal(a, b) for a, b in zip(got, want))


@interpreter
def test_the_training_choice_times_forward_and_backward_on_detached_copies(monkeypatch, tmp_path):
    """Unforced (on a GPU, once both self-checks passed): the two paths timed forward and backward together under
    the family block_sparse.gather_train, on copies of the call's inputs, so no gradient reaches the caller's
    tensors; stored per shape class."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    plan = _tile_plan()
    n = plan.perm.num_tokens
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, n, n, 64, torch.float16, seed=6))
    monkeypatch.setattr("dit_accel.plans.plan.gather_runs", lambda *a: True)
    families, runs = [], []
    real = gather.gather_faster

    def timed(layout, q_, run, timer=None, family="block_sparse.gather"):
        families.append(family)

        def timer_(fn, *_):
            fn()
            runs.append(1)
            return 1.0 if len(runs) % 2 else 2.0  # the first contender, the raster path, faster
        return real(layout, q_, run, timer=timer_, family=family)

    monkeypatch.setattr("dit_accel.plans.plan.gather_faster", timed)
    layout = plan.layout_on(q.device)
    assert plan._gather_decision(q, k, v, layout, None, "triton", True, None, True)
    assert families == ["block_sparse.gather_train"] and len(runs) == 2
    assert q.grad is None and k.grad is None and v.grad is None
    with torch.no_grad():  # an inference call: its own family
        assert plan._gather_decision(q, k, v, layout, None, "triton", True, None, False)
    assert families[-1] == "block_sparse.gather"


@interpreter
def test_a_forced_training_call_whose_backward_variant_fails_its_self_check_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(selfcheck.ENV_FAULT, gather.BWD_VARIANT)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    plan = _tile_plan()
    n = plan.perm.num_tokens
    q, k, v = make_qkv(1, 2, n, n, 64, torch.float16, seed=7)
    with pytest.raises(selfcheck.VariantFailed, match="block_sparse.triton.bwd_gather failed its self-check"):
        _train(plan, q, k, v)
    with torch.no_grad():  # an inference call asks the forward's check only
        plan.attend(q, k, v, scale=None, backend="triton")


@interpreter
@pytest.mark.filterwarnings("ignore:.*saves no work")  # (grids this small: every key block is some query's)
@pytest.mark.parametrize("name,grid,method", MODELS, ids=MODEL_IDS)
def test_a_model_trained_under_apply_reads_raster_order_bit_for_bit(monkeypatch, name, grid, method):
    """A tiny Diffusers transformer under ``apply`` with the Triton kernels: a training step's every parameter
    gradient is the same whether its attention calls gather into tiled order or read raster order both ways
    (which every layer then did)."""
    from dit_accel.models import tiny as T

    model = T.build_tiny_transformer(name)
    kwargs = T.tiny_transformer_inputs(name, model, grid=grid, batch=1)
    calls = _spy_gathered(monkeypatch)
    grads, layers = {}, []
    for forced in ("0", "1"):
        monkeypatch.setenv(gather.ENV_GATHER, forced)
        model.zero_grad(set_to_none=True)
        with dit_accel.apply(model, method, backend="triton") as handle:
            model(**kwargs)[0].float().square().mean().backward()
            layers.append([r["sparse_calls"] for r in handle.stats()])
        grads[forced] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert layers[0] == layers[1] and set(layers[0]) == {1} and len(calls) == len(layers[1])
    assert grads["0"] and grads["0"].keys() == grads["1"].keys()
    assert all(torch.equal(grads["0"][n], grads["1"][n]) for n in grads["0"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_raster_training_call_matches_the_gathering_path(dtype, monkeypatch, tmp_path):
    """Wan 2.1 1.3B's heads over a third of its 480p grid, Tile fitted at 10 %: a training call's output and
    gradients with both passes reading raster order against the gathering path (the TMA kernels on sm_90), and the
    default choice (both self-checks, then timing forward and backward) made once."""
    from tests.utils import DEVICE

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(gather.ENV_GATHER, raising=False)
    grid = (7, 30, 52)
    plan = dit_accel.Tile().at_density(grid, 0.1).replace(fit=True).plan(grid)
    layout = plan.layout_on(DEVICE)
    n = plan.perm.num_tokens
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(1, 12, n, n, 128, dtype, seed=11))
    outs = {}
    for forced in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = plan._sparse(*leaves, layout, 128 ** -0.5, "triton", False, gather=forced)[0]
        o.float().square().mean().backward()
        outs[forced] = [o] + [x.grad for x in leaves]
    for got, want in zip(outs[True], outs[False]):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert gather.gather_runs(q.device, dtype, 128, layout.block_q, layout.block_k, None, True)  # checks passed
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        plan.attend(*leaves, scale=128 ** -0.5, backend="triton")[0].float().square().mean().backward()
        torch.testing.assert_close(leaves[0].grad.float(), outs[False][1].float(), atol=2e-2, rtol=2e-2)
    assert [key[5] for key in plan._gather_choice] == [True]  # decided once, for training calls
