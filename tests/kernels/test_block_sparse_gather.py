"""The block-sparse forward on raster-order tensors through a row table (kernels/block_sparse/gather.py).

The kernel reads q, k, v where they are and writes o and lse there, instead of the plan gathering them into tiled
order and back: bit for bit what the gathering path returns (the same tiles reach the same products), and close to
the fp32 reference on the raster tokens. Interpreter tests (fp32 / fp16: its bf16 dot is wrong)."""

import pytest
import torch

import dit_accel
from dit_accel.kernels import autotune, selfcheck
from dit_accel.kernels.block_sparse import gather
from dit_accel.kernels.layout import BlockLayout
from dit_accel.patterns.permutation import PackedTilePermutation, TilePermutation
from tests.utils import DEVICE, assert_attention_close, interpreter, make_qkv, pretend_tracing, random_mask

triton = pytest.importorskip("triton")
from dit_accel.kernels.block_sparse.triton import triton_forward  # noqa: E402


def _problem(perm, heads, d, dtype, block_q, block_k, seed):
    """Raster q, k, v and a per-head layout over ``perm``'s tiled positions that never visits a padded key."""
    np_ = perm.num_padded
    mask = random_mask(heads, np_, np_, block=min(block_q, block_k), seed=seed)
    mask[:, :, perm.order < 0] = False
    layout = BlockLayout.from_dense_mask(mask, block_q=block_q, block_k=block_k)
    q, k, v = make_qkv(2, heads, perm.num_tokens, perm.num_tokens, d, dtype, seed=seed)
    return q, k, v, mask, layout


def _gathering(perm, q, k, v, layout, scale):
    """What the plan did before: gather into tiled order, the kernel, scatter back."""
    o, lse = triton_forward(*(perm.permute(x) for x in (q, k, v)), layout, scale)
    return perm.unpermute(o), perm.unpermute(lse, dim=-1)


CASES = [  # (permutation, head dim, dtype, block_q, block_k)
    (TilePermutation((3, 5, 7), (2, 4, 8)), 64, torch.float32, 64, 64),  # padding in every dimension
    (TilePermutation((3, 5, 7), (2, 4, 8)), 40, torch.float16, 32, 64),  # a padded head dim, 32-row tiles
    (TilePermutation((4, 6, 10), (1, 3, 5)), 32, torch.float16, 64, 32),  # no padding
    (PackedTilePermutation((2, 5, 7), (2, 3, 4), block=32), 64, torch.float16, 32, 32),  # fitted: packed tiles
    (TilePermutation((2, 9, 16), (1, 8, 16)), 64, torch.float16, 128, 64),  # 128-row query blocks (CUDA's wide ones)
]


@interpreter
@pytest.mark.parametrize("perm,d,dtype,block_q,block_k", CASES,
                         ids=[f"{type(c[0]).__name__}-{c[0].grid}-d{c[1]}-{str(c[2])[6:]}-{c[3]}x{c[4]}"
                              for c in CASES])
def test_gathered_forward_equals_the_gathering_path_bit_for_bit(perm, d, dtype, block_q, block_k):
    q, k, v, mask, layout = _problem(perm, 2, d, dtype, block_q, block_k, seed=3)
    scale = d ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale, rows=perm.row_table("cpu"))
    want_o, want_lse = _gathering(perm, q, k, v, layout, scale)
    assert torch.equal(o, want_o) and torch.equal(lse, want_lse)
    # (B, N, H, D) in memory, as the gathering path's unpermute and SDPA's CUDA kernels return it
    assert o.shape == q.shape and o.transpose(1, 2).is_contiguous() and lse.shape == q.shape[:3]
    raster = perm.inverse  # the tiled position of each raster token
    assert_attention_close(o, lse, q, k, v, mask[:, raster][:, :, raster], scale)


@interpreter
def test_strides_of_their_own_and_a_strided_head_dim_read_the_same():
    """q contiguous, k a (B, N, H, D) view, v strided in its head dim (the launcher's contiguous copy): each row
    is found from its own tensor's stride."""
    perm = TilePermutation((3, 5, 7), (2, 4, 8))
    q, k, v, mask, layout = _problem(perm, 2, 64, torch.float16, 64, 64, seed=14)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    o, lse = triton_forward(q, k, v, layout, 0.125, rows=perm.row_table("cpu"))
    want_o, want_lse = _gathering(perm, q, k, v, layout, 0.125)
    assert torch.equal(o, want_o) and torch.equal(lse, want_lse)


@interpreter
def test_row_table_is_the_raster_token_of_each_tiled_position_once_per_device():
    perm = TilePermutation((3, 5, 7), (2, 4, 8))
    table = perm.row_table("cpu")
    assert table.dtype == torch.int32 and table.shape == (perm.num_padded,)
    assert perm.row_table("cpu") is table
    real = table[table >= 0].long()
    assert torch.equal(real.sort().values, torch.arange(perm.num_tokens))  # each raster token named once
    x = torch.randn(1, 1, perm.num_tokens, 4)
    assert torch.equal(perm.permute(x)[0, 0][table >= 0], x[0, 0][real])
    assert (perm.permute(x)[0, 0][table < 0] == 0).all()


@interpreter
def test_padded_keys_are_never_seen_by_a_plan_layout_and_a_layout_that_sees_one_is_refused():
    plan = _tile_plan()
    assert gather.padding_unseen(plan.layout, plan.perm)
    perm = TilePermutation((3, 5, 7), (2, 4, 8))
    mask = torch.ones(1, perm.num_padded, perm.num_padded, dtype=torch.bool)  # padded keys too
    assert not gather.padding_unseen(BlockLayout.from_dense_mask(mask, block_q=64, block_k=64), perm)


def test_gather_fits_where_every_row_offset_of_a_slice_fits_32_bits():
    def bnhd(n, h, d):  # (B, H, N, D) views of (B, N, H, D) memory: token stride H * D
        return torch.empty_strided((1, h, n, d), (n * h * d, d, h * d, 1), device="meta")

    wan_720p = bnhd(75_600, 40, 128)
    assert gather.gather_fits(wan_720p, wan_720p, wan_720p)
    too_long = bnhd(420_000, 40, 128)  # 420k x 5,120 > 2**31
    assert not gather.gather_fits(too_long, too_long, too_long)
    spread = torch.empty_strided((1, 2, 1000, 64), (0, 64, 2 ** 22, 1), device="meta")  # one stride alone
    assert not gather.gather_fits(bnhd(1000, 2, 64), bnhd(1000, 2, 64), spread)


def _spy_gathered(monkeypatch) -> list:
    """A list that gets an entry for each call the plans make of the gathered forward."""
    calls = []
    real = gather.gathered_forward
    monkeypatch.setattr("dit_accel.plans.plan.gathered_forward", lambda *a: calls.append(1) or real(*a))
    return calls


#: Tiny Diffusers transformers under ``apply`` (name, grid, method), with the tests' ids.
MODELS = [
    ("wan", (3, 8, 10), dit_accel.Tile(tile=(1, 4, 4), window=(1, 3, 3))),  # padded in H and W: 3 x 2 x 3 tiles
    ("hunyuan", (2, 6, 8), dit_accel.GNA(kernel_size=(2, 3, 5))),  # text beside the video tokens: lse merges
]
MODEL_IDS = ["wan-tile", "hunyuan-gna"]


def _tile_plan():
    plan = dit_accel.Tile(tile=(2, 4, 4), window=(1, 3, 3)).plan((3, 6, 10))
    assert plan.perm is not None and not plan.perm.identity
    return plan


def _attend(plan, q, k, v):
    return plan.attend(q, k, v, scale=None, backend="triton")[:2]  # (the default scale: 1 / sqrt(D))


@interpreter
def test_plans_read_raster_order_where_asked_and_match_the_gathering_path(monkeypatch):
    plan = _tile_plan()
    q, k, v = make_qkv(1, 2, plan.perm.num_tokens, plan.perm.num_tokens, 64, torch.float16, seed=5)
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    want = _attend(plan, q, k, v)
    calls = _spy_gathered(monkeypatch)
    assert not calls and set(plan._gather_choice.values()) <= {False}
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    for _ in range(2):
        got = _attend(plan, q, k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert calls == [1, 1] and True in plan._gather_choice.values()
    # Unset on a CPU: the gathering path
    monkeypatch.delenv(gather.ENV_GATHER)
    got = _attend(plan, q, k, v)
    assert calls == [1, 1] and torch.equal(got[0], want[0])


@interpreter
def test_a_capture_takes_the_eager_answer_and_a_trace_the_gathering_path(monkeypatch):
    plan = _tile_plan()
    q, k, v = make_qkv(1, 2, plan.perm.num_tokens, plan.perm.num_tokens, 64, torch.float16, seed=12)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    calls = _spy_gathered(monkeypatch)
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: True)  # a capture before any eager call
    want = _attend(plan, q, k, v)
    assert calls == [] and not plan._gather_choice  # it decided nothing
    monkeypatch.undo()
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    calls = _spy_gathered(monkeypatch)  # (counting again, from none: the capture above made none)
    _attend(plan, q, k, v)  # eager: decides (gathered)
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: True)
    got = _attend(plan, q, k, v)  # a capture after it: the eager answer
    assert calls == [1, 1] and torch.equal(got[0], want[0])
    pretend_tracing(monkeypatch)  # a trace: the gathered launch is no op
    assert plan._reads_raster(q, k, v, plan.layout_on(q.device), None, "triton", True) is False


@interpreter
@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_joint_text_calls_read_the_video_part_in_raster_order_bit_for_bit(monkeypatch, text_first):
    """A pipeline's call with text tokens beside the video ones (its video part a strided slice, merged with the
    text keys by the lse): the same output either way."""
    plan = _tile_plan()
    n = plan.perm.num_tokens + 7
    q, k, v = make_qkv(1, 2, n, n, 64, torch.float16, seed=13)
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    want = plan.run(q, k, v, num_text=7, text_first=text_first, backend="triton")
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    got = plan.run(q, k, v, num_text=7, text_first=text_first, backend="triton")
    assert True in plan._gather_choice.values() and torch.equal(got[0], want[0])


@interpreter
def test_a_forced_gather_that_fails_its_self_check_raises_and_a_bad_switch_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(selfcheck.ENV_FAULT, gather.VARIANT)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    plan = _tile_plan()
    q, k, v = make_qkv(1, 2, plan.perm.num_tokens, plan.perm.num_tokens, 64, torch.float16, seed=7)
    with pytest.raises(selfcheck.VariantFailed, match="block_sparse.triton.fwd_gather failed its self-check"):
        _attend(plan, q, k, v)
    monkeypatch.setenv(gather.ENV_GATHER, "sometimes")
    with pytest.raises(ValueError, match="DIT_ACCEL_GATHER='sometimes': expected 1 .* 0 .* or unset"):
        gather.gather_forced()
    for text, want in (("", None), (" ON ", True), ("no", False)):
        monkeypatch.setenv(gather.ENV_GATHER, text)
        assert gather.gather_forced() is want
    assert not gather.gather_runs(torch.device("cpu"), torch.float16, 64, 64, 64, None)  # never unasked off a GPU


@interpreter
def test_gather_faster_times_both_paths_once_per_shape_class(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))  # (the choices are stored there)
    perm = TilePermutation((3, 5, 7), (2, 4, 8))
    q, _, _, _, layout = _problem(perm, 2, 64, torch.float16, 64, 64, seed=8)
    runs, times = [], {True: 2.0, False: 1.0}

    def run(g):
        runs.append(g)

    def timer(fn, *_):
        fn()
        return times[runs[-1]]

    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    assert not gather.gather_faster(layout, q, run, timer=timer) and runs == []  # untimed: the gathering path
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    assert not gather.gather_faster(layout, q, run, timer=timer) and runs == [True, False]
    assert not gather.gather_faster(layout, q, run, timer=timer) and len(runs) == 2  # stored per class
    times[True] = 0.5
    other = _problem(TilePermutation((4, 6, 10), (1, 3, 5)), 2, 64, torch.float16, 64, 64, seed=9)
    assert gather.gather_faster(other[4], other[0], run, timer=timer) and len(runs) == 4
    monkeypatch.setattr("dit_accel.kernels.request.in_graph", lambda: True)
    assert not gather.gather_faster(layout, q, run, timer=timer) and len(runs) == 4  # a graph times nothing


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_gathered_tile_plan_matches_the_gathering_path(dtype, monkeypatch, tmp_path):
    """Wan 2.1 1.3B's heads over a third of its 480p grid, Tile fitted at 10 %: the gathered pointer kernel against
    the gathering path (the TMA kernel on sm_90), and the default choice (self-check, then timing on sm_90)."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(gather.ENV_GATHER, raising=False)
    grid = (7, 30, 52)
    plan = dit_accel.Tile().at_density(grid, 0.1).replace(fit=True).plan(grid)
    layout = plan.layout_on(DEVICE)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in
               make_qkv(1, 12, plan.perm.num_tokens, plan.perm.num_tokens, 128, dtype, seed=11))
    scale = 128 ** -0.5
    got, got_lse = plan._sparse(q, k, v, layout, scale, "triton", True, gather=True)
    want, want_lse = plan._sparse(q, k, v, layout, scale, "triton", True, gather=False)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-3, rtol=1e-3)
    assert got.transpose(1, 2).is_contiguous()
    assert gather.gather_runs(q.device, dtype, 128, layout.block_q, layout.block_k)  # its self-check passed here
    for _ in range(2):  # (triton named: auto may run dense attention where that timed faster, another result)
        o = plan.attend(q, k, v, scale=scale, backend="triton")[0]
        torch.testing.assert_close(o.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert len(plan._gather_choice) == 1  # decided once (timed against the gathering path)


def test_info_says_whether_the_raster_order_forward_is_on(monkeypatch):
    from dit_accel.cli.info import _gather_status

    monkeypatch.delenv(gather.ENV_GATHER, raising=False)
    assert "timed faster" in _gather_status() and "DIT_ACCEL_GATHER=0 turns it off" in _gather_status()
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    assert _gather_status() == "off (DIT_ACCEL_GATHER=0)"
    monkeypatch.setenv(gather.ENV_GATHER, "maybe")
    assert "DIT_ACCEL_GATHER='maybe': expected 1" in _gather_status()


@interpreter
@pytest.mark.filterwarnings("ignore:.*saves no work")  # (grids this small: every key block is some query's)
@pytest.mark.parametrize("name,grid,method", MODELS, ids=MODEL_IDS)
def test_a_model_under_apply_reads_raster_order_bit_for_bit(monkeypatch, name, grid, method):
    """A tiny Diffusers transformer through ``apply`` with the Triton kernel: the same output whether its
    attention calls gather into tiled order or let the kernel read raster order (which they then did)."""
    from dit_accel.models import tiny as T

    model = T.build_tiny_transformer(name)
    kwargs = T.tiny_transformer_inputs(name, model, grid=grid, batch=1)
    calls = _spy_gathered(monkeypatch)
    outs, layers = {}, []
    for forced in ("0", "1"):
        monkeypatch.setenv(gather.ENV_GATHER, forced)
        with dit_accel.apply(model, method, backend="triton") as handle, torch.no_grad():
            outs[forced] = model(**kwargs)[0]
            layers.append([r["sparse_calls"] for r in handle.stats()])
    assert layers[0] == layers[1] and set(layers[0]) == {1}
    assert len(calls) == len(layers[1])  # every layer's call, with the kernel reading raster order
    assert torch.equal(outs["0"], outs["1"])
