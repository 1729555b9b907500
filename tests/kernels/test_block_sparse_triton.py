"""Triton block-sparse attention vs the fp32 dense masked reference (tests/utils.py).

On CPU these run through the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so sizes stay small (N <= 257, block 32/64/128). bf16 and large-N checks are
GPU-only (`@pytest.mark.gpu`): the interpreter's bf16 tl.dot is wrong.
"""

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import BlockLayout, block_sparse_attention
from dit_accel.kernels.backends import BackendUnavailable, triton_reason
from dit_accel.kernels.block_sparse.configs import select_config
from dit_accel.kernels.block_sparse.triton import triton_backward, triton_forward
from tests.utils import (DEVICE, DT, TOL, assert_attention_close, assert_grads_close, banded_mask, interpreter,
                         make_qkv, random_mask)

# CPU tensors through Triton's interpreter (`interpreter`; on a CUDA machine the GPU twins below run instead).


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def check_forward(q, k, v, mask, layout, scale=None):
    o, lse = triton_forward(q, k, v, layout.to(q.device), _scale(q, scale))
    assert_attention_close(o, lse, q, k, v, mask, scale)
    return o, lse


def check_backward(q, k, v, mask, layout, scale=None):
    o, lse = triton_forward(q, k, v, layout.to(q.device), _scale(q, scale))
    do = torch.randn_like(o)
    grads = triton_backward(do, q, k, v, o, lse, layout.to(q.device), _scale(q, scale))
    assert_grads_close(grads, q, k, v, mask, do, scale)


# ------------------------------------------------------------------ forward / backward vs reference
# Odd sizes exercise ragged last blocks. 32-blocks give many partial/full/skipped blocks per case.
FWD_CASES = [(n, d, dt) for n in (63, 130, 257) for d in (64, 80) for dt in (torch.float32, torch.float16)]


BLOCK = 32
@pytest.mark.parametrize("n,d,dtype", FWD_CASES, ids=[f"N{n}-D{d}-{DT[t]}" for n, d, t in FWD_CASES])
def test_forward_random_mask(n, d, dtype):
    heads = 2
    # Per-head pattern (Hl = H) with skipped, partial and full blocks, ragged tails and an empty row.
    b = BLOCK
    mask = random_mask(heads, n, n, block=b, seed=n + d, empty_rows=(3,), full_block=(b, 2 * b, 0, 2 * b))
    layout = BlockLayout.from_dense_mask(mask, block_q=BLOCK, block_k=BLOCK)
    assert layout.num_heads == heads and 0 < layout.partial_fraction() < 1
    q, k, v = make_qkv(1, heads, n, n, d, dtype, seed=n)
    check_forward(q, k, v, mask, layout)


BWD_CASES = [(n, d, dt) for n in (63, 130) for d in (64, 80) for dt in (torch.float32, torch.float16)]
BWD_CASES += [(257, 80, torch.float32), (257, 64, torch.float16)]


@pytest.mark.parametrize("n,d,dtype", BWD_CASES, ids=[f"N{n}-D{d}-{DT[t]}" for n, d, t in BWD_CASES])
def test_backward_random_mask(n, d, dtype):
    heads = 2
    b = BLOCK
    mask = random_mask(heads, n, n, block=b, seed=7 * n + d, empty_rows=(5,), full_block=(b, 2 * b, b, 2 * b))
    layout = BlockLayout.from_dense_mask(mask, block_q=BLOCK, block_k=BLOCK)
    assert 0 < layout.density() < 1
    q, k, v = make_qkv(1, heads, n, n, d, dtype, seed=d)
    check_backward(q, k, v, mask, layout)


def test_shared_layout_banded_batch():
    """Hl = 1 (one pattern for all heads, head stride 0), batch 2, 2 heads."""
    n = 100
    mask = banded_mask(n, n, 12)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    assert layout.num_heads == 1 and layout.density() < 0.7
    q, k, v = make_qkv(2, 2, n, n, 64, torch.float32, seed=1)
    check_forward(q, k, v, mask, layout)
    check_backward(q, k, v, mask, layout)


@pytest.mark.parametrize("n,m", [(63, 130), (130, 63)], ids=["q63-kv130", "q130-kv63"])
def test_different_q_and_kv_lengths(n, m):
    mask = random_mask(1, n, m, density=0.5, seed=3, empty_rows=(1,))
    mask |= banded_mask(n, m, 8)
    mask[:, 1] = False
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=64)
    q, k, v = make_qkv(1, 1, n, m, 80, torch.float32, seed=2)
    check_forward(q, k, v, mask, layout)
    check_backward(q, k, v, mask, layout)


@pytest.mark.parametrize("block", [128, 256], ids=["B128", "B256"])
def test_layout_blocks_larger_than_kernel_tile(block):
    """Layout blocks of 128/256 are split into kernel tiles (e.g. fwd 64x64): sub-tile offsets."""
    n, d = 200, 64
    mask = random_mask(1, n, n, density=0.5, block=64, seed=11, empty_rows=(150,), full_block=(0, 128, 128, 200))[0]
    layout = BlockLayout.from_dense_mask(mask, block_q=block, block_k=block)
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        cfg = select_config(kernel, torch.float32, d, block, block, 80)
        assert cfg.block_m < block and cfg.block_n < block, cfg  # really sub-tiled on both sides
    q, k, v = make_qkv(1, 1, n, n, d, torch.float32, seed=4)
    check_forward(q, k, v, mask, layout)
    check_backward(q, k, v, mask, layout)


def test_rows_without_keys_give_zero_and_neg_inf():
    n = 63
    mask = random_mask(2, n, n, density=0.6, seed=5, empty_rows=(0, 31, 32, 62))
    mask[1, :40] = False  # whole query blocks without keys in head 1
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = make_qkv(1, 2, n, n, 64, torch.float32, seed=5)
    o, lse = check_forward(q, k, v, mask, layout)
    assert torch.all(o[0, 1, :40] == 0) and torch.isneginf(lse[0, 1, :40]).all()
    check_backward(q, k, v, mask, layout)


def test_no_visited_blocks_at_all():
    n = 40
    mask = torch.zeros(n, n, dtype=torch.bool)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = make_qkv(1, 1, n, n, 64, torch.float32)
    o, lse = triton_forward(q, k, v, layout.to(q.device), 0.125)
    assert torch.all(o == 0) and torch.isneginf(lse).all()
    dq, dk, dv = triton_backward(torch.randn_like(o), q, k, v, o, lse, layout.to(q.device), 0.125)
    assert all(torch.all(g == 0) for g in (dq, dk, dv))


@pytest.mark.parametrize("n", [63, 257], ids=["N63", "N257"])
def test_full_window_equals_sdpa(n):
    """All-True mask: every block full (ragged last block only bounds-masked) == dense SDPA."""
    d = 64 if n > 100 else 80
    mask = torch.ones(n, n, dtype=torch.bool)
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    assert layout.partial_fraction() == 0 and layout.density() == 1
    q, k, v = make_qkv(1, 1, n, n, d, torch.float32, seed=n)
    o, lse = triton_forward(q, k, v, layout.to(q.device), 0.1)
    o_sdpa = F.scaled_dot_product_attention(q, k, v, scale=0.1)
    torch.testing.assert_close(o, o_sdpa, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][0])
    lse_ref = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.1, dim=-1)
    torch.testing.assert_close(lse, lse_ref, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][0])
    if n == 63:
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(o)
        F.scaled_dot_product_attention(qr, kr, vr, scale=0.1).backward(do)
        grads = triton_backward(do, q, k, v, o, lse, layout.to(q.device), 0.1)
        for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
            torch.testing.assert_close(got, want, atol=TOL[torch.float32][2], rtol=TOL[torch.float32][2])


def test_strided_inputs_and_custom_scale():
    """q/k/v as (B, N, H, D) tensors viewed as (B, H, N, D), like Diffusers' projections."""
    n, h, d = 100, 2, 64
    mask = banded_mask(n, n, 20)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    base = [torch.randn(1, n, h, d).to(DEVICE) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)
    assert not q.is_contiguous()
    check_forward(q, k, v, mask, layout, scale=0.2)
    check_backward(q, k, v, mask, layout, scale=0.2)


# ------------------------------------------------------------------ API boundary
def _small():
    mask = banded_mask(64, 64, 10)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = make_qkv(1, 2, 64, 64, 64, torch.float32)
    return q, k, v, layout


def test_unavailable_reason():
    assert triton_reason(DEVICE) is None  # CPU: conftest set TRITON_INTERPRET=1
    reason = triton_reason("meta")
    assert isinstance(reason, str) and "backend='torch'" in reason


@pytest.mark.parametrize("bad", ["dtype", "mixed_dtype", "ndim", "length", "heads", "head_dim", "block",
                                 "layout_type"])
def test_bad_inputs_raise_clear_errors(bad):
    """Checked once by block_sparse_attention before the triton launcher is chosen."""
    q, k, v, layout = _small()
    if bad == "dtype":
        q, k, v = (x.double() for x in (q, k, v))
        err, match = TypeError, "float16, bfloat16 or float32"
    elif bad == "mixed_dtype":
        k = k.half()
        err, match = TypeError, "share one dtype"
    elif bad == "ndim":
        q = q[0]
        err, match = ValueError, "4 dims"
    elif bad == "length":
        q = q[:, :, :50]
        err, match = ValueError, "q_len=64"
    elif bad == "heads":
        layout = BlockLayout.from_dense_mask(torch.ones(3, 64, 64, dtype=torch.bool), 32, 32)
        err, match = ValueError, "1 \\(shared by all heads\\) or H=2"
    elif bad == "head_dim":
        q, k, v = (torch.zeros(1, 2, 64, 264, device=q.device) for _ in range(3))
        err, match = BackendUnavailable, "head dim 264 > 256.*backend='torch'"
    elif bad == "block":
        layout = BlockLayout.from_dense_mask(torch.ones(64, 64, dtype=torch.bool), 8, 8)
        err, match = BackendUnavailable, "block_q=8"
    else:
        layout = "not a layout"
        err, match = TypeError, "BlockLayout"
    with pytest.raises(err, match=match):
        block_sparse_attention(q, k, v, layout, backend="triton")


@pytest.mark.parametrize("arch", [80, 89, 90])
def test_configs_tile_the_layout_blocks(arch):
    """Every kernel tile divides the layout block it serves (pure Python, no compile)."""
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (32, 64, 80, 96, 128, 256):
                for bq in (64, 128, 256):
                    for bk in (64, 128, 256):
                        cfg = select_config(kernel, dtype, d, bq, bk, arch)
                        assert bq % cfg.block_m == 0 and bk % cfg.block_n == 0, cfg
                        assert cfg.block_d >= d and cfg.block_d & (cfg.block_d - 1) == 0


# ------------------------------------------------------------------ GPU only
GPU_CASES = [(n, d, dt, b) for n in (1000, 4133) for d in (64, 128) for dt in (torch.bfloat16, torch.float16)
             for b in (64, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,dtype,block", GPU_CASES,
                         ids=[f"N{n}-D{d}-{DT[t]}-B{b}" for n, d, t, b in GPU_CASES])
def test_gpu_forward_backward_large(n, d, dtype, block):
    mask = random_mask(2, n, n, density=0.05, seed=n, empty_rows=(7,), full_block=(0, 256, 256, 512))
    mask |= banded_mask(n, n, 100)
    mask[:, 7] = False
    layout = BlockLayout.from_dense_mask(mask.to(DEVICE), block_q=block, block_k=block)
    q, k, v = make_qkv(1, 2, n, n, d, dtype, seed=d)
    check_forward(q, k, v, mask, layout)
    check_backward(q, k, v, mask, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [80, 96, 256], ids=["D80", "D96", "D256"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_odd_head_dims(d, dtype):
    n = 777
    mask = random_mask(1, n, n, density=0.2, seed=d, full_block=(128, 256, 0, 128))[0]
    layout = BlockLayout.from_dense_mask(mask.to(DEVICE), block_q=64, block_k=64)
    q, k, v = make_qkv(2, 2, n, n, d, dtype, seed=d)
    check_forward(q, k, v, mask, layout)
    check_backward(q, k, v, mask, layout)


@pytest.mark.gpu
def test_gpu_full_window_bf16_equals_sdpa():
    n, d = 4096, 128
    layout = BlockLayout.from_dense_mask(torch.ones(n, n, dtype=torch.bool, device=DEVICE), 128, 128)
    q, k, v = make_qkv(1, 4, n, n, d, torch.bfloat16)
    o, _ = triton_forward(q, k, v, layout, d ** -0.5)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ the tile plan, TMA, 64-bit offsets
def test_plan_splits_blocks_into_full_partial_and_skipped_tiles():
    """A partial 64-block whose 32-column halves are all-True / all-False gives a full and a skipped tile."""
    from dit_accel.kernels.block_sparse.triton import tile_plan

    n = 128
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:64, :32] = True          # block (0, 0): left half full, right half empty
    mask[64:, 64:] = True          # block (1, 1): full
    mask[64:70, 0] = True          # block (1, 0): partial everywhere it is visited
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    assert layout.partial_fraction() == pytest.approx(2 / 3)
    plan = tile_plan(layout, 64, 32)
    rows = plan.plan[0]
    n_full, n_part = rows[:, 0].tolist(), rows[:, 1].tolist()
    assert n_full == [1, 2] and n_part == [0, 1]  # row 1: key tiles 2, 3 full; tile 0 partial; tile 1 skipped
    assert plan.w >= 3 and rows[1, 2:2 + 3].tolist() == [2, 3, 0]  # full tiles first, then partial
    q, k, v = make_qkv(1, 1, n, n, 64, torch.float32, seed=3)
    check_forward(q, k, v, mask, layout)


def test_plan_is_built_once_per_layout_and_tile():
    from dit_accel.kernels.block_sparse import triton as bst

    layout = BlockLayout.from_dense_mask(banded_mask(96, 96, 10), block_q=32, block_k=32)
    first = bst._plan(layout, 32, 32, False)
    rebuilt = BlockLayout(*(getattr(layout, f) for f in ("q_len", "kv_len", "block_q", "block_k")),
                          *(getattr(layout, t) for t in BlockLayout.TENSORS))  # as the custom op does
    assert bst._plan(rebuilt, 32, 32, False) is first
    assert bst._plan(layout, 32, 32, True) is not first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_path_through_the_interpreter(monkeypatch, dtype):
    """sm_90 configurations load K/V (Q/dO for dK/dV) through TMA descriptors: out-of-range rows and
    head-dim columns arrive as zeros. Pretend the device is an sm_90 to run that path."""
    from dit_accel.kernels.block_sparse import triton as bst

    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    assert select_config("fwd", dtype, 80, 32, 32, 90).tma
    n, d = 100, 80
    mask = random_mask(2, n, n, block=32, seed=9, empty_rows=(4,), full_block=(32, 64, 0, 64))
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = make_qkv(1, 2, n, n, d, dtype, seed=9)
    check_forward(q, k, v, mask, layout)
    check_backward(q, k, v, mask, layout)


@interpreter
def test_misaligned_tensors_fall_back_to_pointers(monkeypatch):
    from dit_accel.kernels.block_sparse import triton as bst

    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    base = torch.randn(1, 1, 64, 64 + 1)[..., 1:]  # base pointer 4 bytes off 16-byte alignment
    assert not bst.tma_ok(base) and bst.tma_ok(torch.randn(1, 1, 64, 64))
    layout = BlockLayout.from_dense_mask(banded_mask(64, 64, 8), 32, 32)
    assert not bst._config("fwd", base, layout, (base, base)).tma
    check_forward(base, base, base, banded_mask(64, 64, 8), layout)


@interpreter
def test_token_offsets_are_64_bit_in_the_bnhd_layout():
    """k, v in (B, N, H, D) storage with H*D = 5120: token 420,000 sits at element 2.15e9 > 2^31.
    Only the last key blocks are visited and only they are written: the rest of the 4.3 GB storage
    stays untouched virtual memory, so this runs through the interpreter in fp16."""
    h, d, m, n = 40, 128, 420_096, 64
    storage = torch.empty(1, m, h, d, dtype=torch.float16)  # allocated lazily: pages appear when written
    k = storage.transpose(1, 2)
    keys = slice(m - 128, m)
    g = torch.Generator().manual_seed(0)
    storage[:, keys] = torch.randn(1, 128, h, d, generator=g).half()
    v = k  # same storage, same offsets
    q = torch.randn(1, h, n, d, generator=g).half()
    visited = torch.zeros(1, -(-m // 64), dtype=torch.bool)
    visited[0, -2:] = True
    layout = BlockLayout.from_block_masks(visited, q_len=n, kv_len=m, block_q=64, block_k=64)
    o, lse = triton_forward(q, k, v, layout, d ** -0.5)
    kk = k[:, :, keys].float()
    ref = torch.softmax((q.float() @ kk.transpose(-1, -2)) * d ** -0.5, -1) @ kk
    torch.testing.assert_close(o.float(), ref, atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(lse, torch.logsumexp((q.float() @ kk.transpose(-1, -2)) * d ** -0.5, -1),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_gpu_token_offsets_are_64_bit_bf16():
    h, d, m, n = 40, 128, 420_096, 256
    storage = torch.randn(1, m, h, d, dtype=torch.bfloat16, device="cuda")
    k = v = storage.transpose(1, 2)
    q = torch.randn(1, h, n, d, dtype=torch.bfloat16, device="cuda")
    visited = torch.zeros(-(-n // 128), -(-m // 128), dtype=torch.bool, device="cuda")
    visited[:, -3:] = True
    visited[:, :2] = True
    layout = BlockLayout.from_block_masks(visited, q_len=n, kv_len=m, block_q=128, block_k=128)
    o, _ = triton_forward(q, k, v, layout, d ** -0.5)
    idx = torch.cat([torch.arange(256), torch.arange(m - 3 * 128, m)]).cuda()
    kk = k[:, :, idx].float()
    ref = torch.softmax((q.float() @ kk.transpose(-1, -2)) * d ** -0.5, -1) @ kk
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ the persistent forward (sm_90 path)
def _uneven_layout(heads, n, block=32, seed=0):
    """Per-head layout whose rows visit different numbers of key blocks (a band plus random blocks),
    with partial, full, skipped and ragged tiles and an empty row."""
    mask = random_mask(heads, n, n, block=block, seed=seed, empty_rows=(2,), full_block=(0, block, 0, n))
    mask |= banded_mask(n, n, 5)
    mask[:, 2] = False
    return mask, BlockLayout.from_dense_mask(mask, block_q=block, block_k=block)


def test_work_order_covers_every_query_tile_once_longest_rows_first():
    from dit_accel.kernels.block_sparse.triton import tile_plan, work_order

    for heads, shared in ((3, False), (2, True)):
        mask, layout = _uneven_layout(1 if shared else heads, 130, seed=heads)
        plan = tile_plan(layout, 32, 32)
        items = work_order(plan, 2, heads)
        r = plan.plan.shape[1]
        assert items.dtype == torch.int32
        assert torch.equal(items.sort().values, torch.arange(2 * heads * r, dtype=torch.int32))  # each once
        bh, row = items.long() // r, items.long() % r
        counts = plan.plan[..., 0] + plan.plan[..., 1]
        length = counts[0 if shared else bh % heads, row]
        assert len(set(length.tolist())) > 2  # rows really differ
        assert torch.all(length[:-1] >= length[1:])  # longest first
        same = length[:-1] == length[1:]
        assert torch.all(items[:-1][same] < items[1:][same])  # ties keep (batch, head, tile) order


@pytest.mark.parametrize("programs", [1, 4, 1000], ids=["1-program", "4-programs", "a-program-per-item"])
@pytest.mark.parametrize("n,dtype", [(130, torch.float32), (257, torch.float16)], ids=["N130-fp32", "N257-fp16"])
def test_persistent_forward_one_loop(monkeypatch, programs, n, dtype):
    """The sm_90 forward (TMA loads, one loop over full and partial tiles, programs striding over the
    work order) against the reference: batch 2, per-head rows of different lengths, ragged tails."""
    from dit_accel.kernels.block_sparse import triton as bst

    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    monkeypatch.setattr(bst, "INTERPRETER_PROGRAMS", programs)
    heads = 2
    mask, layout = _uneven_layout(heads, n, seed=n)
    cfg = bst._config("fwd", torch.empty(1, dtype=dtype), layout, ())
    assert cfg.tma and 0 < layout.partial_fraction() < 1
    q, k, v = make_qkv(2, heads, n, n, 80, dtype, seed=programs)
    check_forward(q, k, v, mask, layout)


# ------------------------------------------------------------------ the warp-specialized forward (sm_90 path)
def _spy_ws(monkeypatch, bst):
    """Pretend the device is an sm_90 whose cost model always takes ws; record what _ws_forward did."""
    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    monkeypatch.setattr(bst, "ws_pays", lambda *a, **k: True)
    monkeypatch.setenv("DIT_ACCEL_WS", "1")  # the ws forward is opt-in
    _pretend_ws_applies(monkeypatch)
    ran = []
    real = bst._ws_forward
    # The ws variant's first-use self-check runs it once with force=True: the spy records the calls' own runs.
    monkeypatch.setattr(bst, "_ws_forward",
                        lambda *a, **k: real(*a, **k) if k.get("force") else ran.append(real(*a, **k)) or ran[-1])
    return ran


def _ws_layout(heads, n, seed=0):
    """128-blocks. Query block 0: full tiles (keys 0-127) and partial ones (element masks, the ragged
    last key tile): both passes write its rows. Query block 1: whole key blocks only (no resume pass
    for its rows), one more of them on the last head. Row 256 (when N > 256): no key at all."""
    mask = random_mask(heads, n, n, block=64, seed=seed) | banded_mask(n, n, 3)
    mask[:, :128, :128] = True
    mask[:, 128:256] = False
    mask[:, 128:256, :128] = True
    mask[heads - 1, 128:256, 128:256] = True
    mask[:, 256:257] = False
    return mask, BlockLayout.from_dense_mask(mask, block_q=128, block_k=128)


@pytest.mark.parametrize("n,d", [(257, 80), (256, 128)], ids=["N257-D80-ragged", "N256-D128-aligned"])
def test_ws_forward_then_resume_pass(monkeypatch, n, d):
    """The sm_90 warp-specialized forward: full tiles in the ws kernel (descriptors made in the
    kernel; the interpreter ignores warp_specialize), partial tiles in the resume pass started from
    its O and LSE. 128-blocks, per-head rows of different lengths, an empty row, rows with and without
    partial tiles, fp16 (the interpreter's bf16 dot is wrong)."""
    from dit_accel.kernels.block_sparse import triton as bst
    from dit_accel.kernels.block_sparse.configs import ws_config

    ran = _spy_ws(monkeypatch, bst)
    mask, layout = _ws_layout(2, n, seed=n)
    q, k, v = make_qkv(2, 2, n, n, d, torch.float16, seed=d)
    ws = ws_config(bst._config("fwd", q, layout, (k, v)), 90)
    assert ws is not None and ws.ws and (ws.block_m, ws.block_n) == (128, 64)
    plan = bst._plan(layout, 128, 64, False)
    items, resumed = bst.ws_schedule(plan, 2, 2, ws)
    part = plan.plan[..., 1]
    assert 0 < resumed.numel() < items.numel() and torch.all(part > 0) == (resumed.numel() == items.numel())
    check_forward(q, k, v, mask, layout)
    assert ran == [True]


def test_ws_schedule_resumes_exactly_the_rows_with_partial_tiles(monkeypatch):
    from dit_accel.kernels.block_sparse import triton as bst
    from dit_accel.kernels.block_sparse.configs import select_config, ws_config
    from dit_accel.kernels.block_sparse.triton import tile_plan, work_order, ws_schedule

    ws = ws_config(select_config("fwd", torch.float16, 128, 128, 128, 90), 90)
    assert ws_schedule(tile_plan(_uneven_layout(1, 300, block=128)[1], 128, 64), 1, 1, ws) is None  # model: no
    for heads, shared in ((3, False), (2, True)):
        mask, layout = _ws_layout(1 if shared else heads, 300, seed=heads)
        plan = tile_plan(layout, 128, 64)
        monkeypatch.setattr(bst, "ws_pays", lambda *a, **k: True)
        items, resumed = ws_schedule(plan, 2, heads, ws, arch="h100")
        monkeypatch.undo()
        assert torch.equal(items, work_order(plan, 2, heads))
        r = plan.plan.shape[1]
        bh, row = items.long() // r, items.long() % r
        has_part = plan.plan[0 if shared else bh % heads, row, 1] > 0
        assert torch.equal(resumed, items[has_part]) and 0 < resumed.numel() < items.numel()


def test_ws_pays_follows_the_cost_model():
    from dit_accel.kernels.block_sparse.configs import ws_pays

    assert ws_pays(27_000, 100, 100, 128, 64)  # mostly full tiles: ws wins
    assert not ws_pays(0, 5_000, 1_000, 128, 64)  # no full tile: nothing to gain, a pass to pay
    assert not ws_pays(10, 10, 1_000, 128, 64)  # few full tiles per resumed row


@pytest.mark.parametrize("dtype,d,block", [(torch.float32, 128, 128), (torch.float16, 128, 64),
                                           (torch.float16, 256, 128)], ids=["fp32", "64-blocks", "d256"])
def test_no_ws_where_there_is_no_ws_configuration(monkeypatch, dtype, d, block):
    """fp32, tiles below 128 x 64 and head dims over 128 keep the one-loop kernel."""
    from dit_accel.kernels.block_sparse import triton as bst

    ran = _spy_ws(monkeypatch, bst)
    n = 130
    mask = banded_mask(n, n, 40)
    layout = BlockLayout.from_dense_mask(mask, block_q=block, block_k=block)
    q, k, v = make_qkv(1, 1, n, n, d, dtype, seed=1)
    check_forward(q, k, v, mask, layout)
    assert ran == [False]


def test_ws_forward_is_off_unless_asked_for(monkeypatch):
    """Its first GPU run (H100, triton 3.6) gave non-finite rows: on a pretended sm_90 whose cost model takes
    ws, the launcher runs the one-loop kernel unless DIT_ACCEL_WS=1, and selftest calls the variant n/a."""
    from dit_accel.kernels import _selfchecks
    from dit_accel.kernels.block_sparse import triton as bst

    monkeypatch.delenv("DIT_ACCEL_WS", raising=False)
    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    monkeypatch.setattr(bst, "ws_pays", lambda *a, **k: True)
    mask, layout = _ws_layout(2, 257)
    q, k, v = make_qkv(1, 2, 257, 257, 128, torch.float16)
    cfg = bst._config("fwd", q, layout, (k, v))
    o, lse = torch.empty_like(q), torch.empty(q.shape[:-1])
    assert not bst._ws_forward(q, k, v, o, lse, layout, cfg, 0.1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_selfchecks, "_triton_applies", lambda device: None)
    assert "off by default" in _selfchecks._sm90_applies(torch.device("cuda"))
    monkeypatch.setenv("DIT_ACCEL_WS", "1")
    assert _selfchecks._sm90_applies(torch.device("cuda")) is None


def _pretend_ws_applies(monkeypatch):
    """The ws variant applies on sm_90 only (``selfcheck.usable`` says no elsewhere): pretend this is one."""
    import dataclasses

    from dit_accel.kernels import selfcheck as _sc

    name = "block_sparse.triton.fwd_ws"
    monkeypatch.setitem(_sc._REGISTRY, name, dataclasses.replace(_sc.variant(name), applies=lambda device: None))
