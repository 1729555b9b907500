"""block_sparse_attention backends (torch, flex), their selection and input errors, against the dense oracle."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.kernels import BackendUnavailable, BlockLayout, available_backends, block_sparse_attention
from dit_accel.kernels import backends as backends_mod
from dit_accel.kernels.block_sparse import naive
from dit_accel.kernels.block_sparse.naive import torch_block_sparse_attention
from tests.utils import DEVICE, assert_lse_close, largest_output, reference


pytestmark = pytest.mark.usefixtures("one_thread")


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


# ------------------------------------------------------------------ helpers
def random_mask(heads, n, m, block, seed):
    """Random token mask with full blocks, partial blocks, skipped blocks and empty rows."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = -(-n // block), -(-m // block)
    kind = torch.randint(0, 3, (heads, n_q, n_k), generator=g)  # 0 skip, 1 full, 2 partial
    kind[:, :, 0] = 1  # most rows see something
    kind[:, 1] = 0     # ...but query block 1 visits nothing
    def up(t):
        return t.repeat_interleave(block, -2).repeat_interleave(block, -1)[:, :n, :m]

    elem = torch.rand(heads, n, m, generator=g) < 0.5
    mask = (up(kind) == 1) | ((up(kind) == 2) & elem)
    mask[:, 3] = False  # a single empty row inside a visited block
    return mask


def band_layout(n, block, width, heads=1):
    n_b = -(-n // block)
    qb = torch.arange(n_b)[:, None]
    start = (qb - width // 2).clamp(0, max(n_b - width, 0))
    kb = torch.arange(n_b)[None]
    vis = ((kb >= start) & (kb < start + width))[None].repeat(heads, 1, 1)
    for hh in range(1, heads):
        vis[hh] = torch.roll(vis[hh], hh, 1)  # a different (wrapped) band per head
    return BlockLayout.from_block_masks(vis, q_len=n, kv_len=n, block_q=block, block_k=block)


def qkv(b, h, n, m, d, dtype, grad=True):
    t = [torch.randn(b, h, x, d).to(dtype) for x in (n, m, m)]
    return [x.requires_grad_(grad) for x in t]


# ------------------------------------------------------------------ torch backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [64, 80], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("n, heads_layout", [(63, "shared"), (130, "per_head"), (257, "shared"), (257, "per_head")],
                         ids=["N63-shared", "N130-per_head", "N257-shared", "N257-per_head"])
def test_torch_backend_matches_reference(n, heads_layout, d, dtype):
    h = 2
    mask = random_mask(1 if heads_layout == "shared" else h, n, n, 32, seed=n + d)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    assert layout.partial_fraction() > 0
    q, k, v = qkv(1, h, n, n, d, dtype)
    o = block_sparse_attention(q, k, v, layout, backend="torch")
    assert o.dtype == dtype and o.shape == q.shape
    ref, _ = reference(q, k, v, mask)
    torch.testing.assert_close(o.float(), ref, **TOL[dtype])
    assert (o[:, :, 32:64] == 0).all()  # query block 1 visits nothing

    do = torch.randn_like(ref)
    grads = torch.autograd.grad((o.float() * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum(), (q, k, v))
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), rg.float(), **GRAD_TOL[dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_flash", "matmul"])
def test_torch_backend_lse_and_lse_gradient(fused):
    """o and lse on both internal paths; lse gradients (which select the matmul path)."""
    n, m, d = 130, 97, 64  # q_len != kv_len, both ragged
    mask = random_mask(2, n, m, 32, seed=1)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = qkv(2, 2, n, m, d, torch.float32)
    with torch.no_grad():
        o, lse = torch_block_sparse_attention(q, k, v, layout, 0.11, fused=fused)
    ro, rlse = reference(q, k, v, mask, scale=0.11)
    torch.testing.assert_close(o, ro, **TOL[torch.float32])
    assert_lse_close(lse, rlse, atol=1e-5, rtol=1e-5)
    # lse must carry its gradient too (text-token merging differentiates through it).
    g = torch.randn_like(lse)
    def loss(o_, l_):
        return (o_ * 0.5).sum() + (torch.where(torch.isinf(l_), 0.0, l_) * g).sum()

    o2, l2 = block_sparse_attention(q, k, v, layout, return_lse=True, scale=0.11, backend="torch")
    grads = torch.autograd.grad(loss(o2, l2), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ro, rlse), (q, k, v))
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("heads", [1, 3], ids=["shared", "per_head"])
@pytest.mark.parametrize("n, width", [(257, 5), (300, 9)], ids=["N257-band5", "N300-band9"])
def test_torch_backend_banded_runs(n, width, heads):
    """Banded layouts take copy-free paths: strided windows (step 1) and, for the rows of a clamped
    border that share one key range, a single unit whose K/V are a view."""
    layout = band_layout(n, 16, width, heads)
    q, k, v = qkv(1, 3, n, n, 64, torch.float32)
    o, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    mask = layout.to_dense_mask()
    ref, ref_lse = reference(q, k, v, mask)
    torch.testing.assert_close(o, ref, **TOL[torch.float32])
    assert_lse_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    plan = next(iter(naive._PLANS.entries(layout).values()))
    steps = {c.run[2] for c in plan.chunks if c.run is not None}
    assert steps == {1}, steps
    if heads == 1:  # (the other heads' bands wrap around: those rows are gathered)
        assert all(c.run is not None or c.first_kv is not None for c in plan.chunks)  # nothing gathered
    assert width < 9 or any(c.group > 1 for c in plan.chunks)  # the clamped border rows attend together
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum(), (q, k, v))
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("heads", [1, 2], ids=["shared", "per_head"])
def test_torch_backend_shared_key_lists(heads):
    """Query blocks with identical key-block lists (tile layouts) are gathered once per list."""
    n, m, block = 290, 200, 32  # 10 query blocks, 7 ragged key blocks
    g = torch.Generator().manual_seed(3)
    pattern = torch.rand(heads, 5, 7, generator=g) < 0.5
    pattern[..., 0] = True
    visited = pattern.repeat_interleave(2, dim=1)  # query blocks 2i and 2i+1 share a list
    ids = torch.where(torch.rand(heads, 5, 7, generator=g) < 0.4, 0, -1).repeat_interleave(2, dim=1)
    ids[..., 1] = 1
    table = torch.rand(2, block, block, generator=g) < 0.6
    table[1, :, :] = False  # a partial block that allows nothing ...
    table[1, :, :3] = True  # ... except three columns
    layout = BlockLayout.from_block_masks(visited, q_len=n, kv_len=m, block_q=block, block_k=block,
                                          mask_ids=ids.int(), mask_table=table)
    q, k, v = qkv(1, 2, n, m, 64, torch.float32)
    o, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    ref, ref_lse = reference(q, k, v, layout.to_dense_mask())
    with torch.no_grad():  # the CPU flash path (the call above differentiates lse: matmul path)
        o_fused, lse_fused = torch_block_sparse_attention(q, k, v, layout, 1 / 8, fused=True)
    torch.testing.assert_close(o_fused, ref, **TOL[torch.float32])
    assert_lse_close(lse_fused, ref_lse, atol=1e-5, rtol=1e-5)
    for plan in naive._PLANS.entries(layout).values():
        assert any(c.group > 1 for c in plan.chunks)
    torch.testing.assert_close(o, ref, **TOL[torch.float32])
    assert_lse_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum(), (q, k, v))
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("m", [256, 250], ids=["whole-blocks", "ragged-keys"])
def test_inference_calls_reuse_buffers_and_write_in_place(m):
    """Calls without autograd gather into per-thread buffers and write each slice into the output in
    place (rows out of order, rows that visit nothing, many slices, two layouts in turn): same result
    as the reference, call after call, and as the autograd path, which uses fresh buffers."""
    n, block = 320, 32
    g = torch.Generator().manual_seed(5)
    pattern = torch.rand(2, 5, -(-m // block), generator=g) < 0.5
    pattern[..., 0] = True
    visited = pattern.repeat(1, 2, 1)  # query blocks r and r + 5 share a key list: one chunk, rows apart
    visited[:, 7] = False  # a query block that visits nothing
    layout = BlockLayout.from_block_masks(visited, q_len=n, kv_len=m, block_q=block, block_k=block)
    mask = layout.to_dense_mask()
    other = band_layout(n, block, 3, heads=2) if m == n else None
    q, k, v = qkv(2, 2, n, m, 64, torch.float32)
    ref, ref_lse = reference(q, k, v, mask, scale=0.2)
    with torch.enable_grad():
        o_grad, lse_grad = torch_block_sparse_attention(q, k, v, layout, 0.2, chunk_bytes=1 << 16)
    torch.testing.assert_close(o_grad, ref, **TOL[torch.float32])
    with torch.no_grad():
        plan = naive._plan_of(layout)
        assert plan.has_empty and any(c.first_row is None for c in plan.chunks)  # rows scattered; some visit nothing
        for _ in range(2):
            o, lse = torch_block_sparse_attention(q, k, v, layout, 0.2, chunk_bytes=1 << 16)
            torch.testing.assert_close(o, ref, **TOL[torch.float32])
            assert_lse_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(o, o_grad, atol=1e-6, rtol=1e-6)
            if other is not None:  # another layout through the same buffers in between
                o2, _ = torch_block_sparse_attention(q, k, v, other, 0.2, chunk_bytes=1 << 16)
                torch.testing.assert_close(o2, reference(q, k, v, other.to_dense_mask(), scale=0.2)[0],
                                           **TOL[torch.float32])
    assert "k" in naive._SCRATCH.buffers and "v" in naive._SCRATCH.buffers


def test_inference_buffers_are_per_thread():
    """Threads running the twin at once each gather into their own buffers."""
    import threading

    layouts = [scattered_layout(1024, 32, w, seed=w) for w in (5, 9)]
    inputs = [qkv(1, 2, 1024, 1024, 32, torch.float32, grad=False) for _ in layouts]
    with torch.no_grad():
        expected = [torch_block_sparse_attention(*x, lay, 0.1, chunk_bytes=1 << 15)[0]
                    for x, lay in zip(inputs, layouts)]
    results = [[] for _ in layouts]

    def work(i):
        with torch.no_grad():
            for _ in range(4):
                results[i].append(torch_block_sparse_attention(*inputs[i], layouts[i], 0.1, chunk_bytes=1 << 15)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert len(got) == 4
        for o in got:
            torch.testing.assert_close(o, want, atol=0, rtol=0)


def test_inference_calls_split_slices_between_threads():
    """With two torch threads an inference call runs its slices in two threads (one OpenMP thread each):
    the same result as one thread and as the reference, and the caller's thread count is restored."""
    layout = scattered_layout(2048, 64, 6, seed=1)
    q, k, v = qkv(2, 2, 2048, 2048, 64, torch.float32, grad=False)
    ref, ref_lse = reference(q, k, v, layout.to_dense_mask(), scale=0.1)
    with torch.no_grad():
        one, one_lse = torch_block_sparse_attention(q, k, v, layout, 0.1)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            jobs = []
            original = naive._split
            naive._split = lambda j, parts: jobs.append((len(j), parts)) or original(j, parts)
            try:
                two, two_lse = torch_block_sparse_attention(q, k, v, layout, 0.1)
            finally:
                naive._split = original
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(threads)
    assert jobs and jobs[0][0] > 1 and jobs[0][1] == 2  # the slices were split between two threads
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two_lse, one_lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two, ref, **TOL[torch.float32])
    assert_lse_close(two_lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_torch_backend_n8192_without_n_by_n():
    n, block, d = 8192, 64, 32
    # Window with partial edge blocks (via element masks) plus per-head difference.
    base = band_layout(n, block, 9, heads=2)
    visited, _ = base.block_masks()
    n_b = n // block
    ids = torch.full(visited.shape, -1, dtype=torch.int32)
    edge = torch.zeros_like(visited)
    edge[:, torch.arange(n_b), (torch.arange(n_b) + 4).clamp(max=n_b - 1)] = True
    ids[edge & visited] = 0
    table = torch.tril(torch.ones(block, block, dtype=torch.bool))[None]
    layout = BlockLayout.from_block_masks(visited, q_len=n - 5, kv_len=n - 5, block_q=block, block_k=block,
                                          mask_ids=ids, mask_table=table)
    q, k, v = qkv(1, 2, n - 5, n - 5, d, torch.float32, grad=False)
    ran = []
    with torch.no_grad():
        largest = largest_output(lambda: ran.append(block_sparse_attention(q, k, v, layout, return_lse=True,
                                                                           backend="torch")))
    o, lse = ran[0]
    assert largest < n * n // 4, f"largest intermediate {largest} elements ~ N x N"
    # Check a few query blocks against the reference on those rows only.
    vis, mids = layout.block_masks()
    for qb in (0, 37, n_b - 1):
        rows = torch.arange(qb * block, min((qb + 1) * block, n - 5))
        mask = torch.zeros(2, rows.numel(), n - 5, dtype=torch.bool)
        for hh in range(2):
            for kb in vis[hh, qb].nonzero().flatten().tolist():
                cols = slice(kb * block, min((kb + 1) * block, n - 5))
                tile = table[0] if mids[hh, qb, kb] >= 0 else torch.ones(block, block, dtype=torch.bool)
                mask[hh, :, cols] = tile[: rows.numel(), : cols.stop - cols.start]
        ref, ref_lse = reference(q[:, :, rows], k, v, mask)
        torch.testing.assert_close(o[:, :, rows], ref, **TOL[torch.float32])
        assert_lse_close(lse[:, :, rows], ref_lse, atol=1e-5, rtol=1e-5)


def scattered_layout(n, block, per_row, seed=0):
    """Every query block visits ``per_row`` random key blocks (distinct lists, not one range: gathered)."""
    n_b = -(-n // block)
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n_b, n_b, generator=g).argsort(-1)[:, :per_row]
    vis = torch.zeros(n_b, n_b, dtype=torch.bool).scatter_(1, order, True)
    return BlockLayout.from_block_masks(vis, q_len=n, kv_len=n, block_q=block, block_k=block)


def test_dense_is_faster_decides_from_density_gathers_and_size():
    assert naive.dense_is_faster(band_layout(8192, 64, 128), batch_heads=4)  # everything visited
    assert not naive.dense_is_faster(band_layout(8192, 64, 13), batch_heads=4)  # a 0.1 band: views, no gather
    sparse, dense = scattered_layout(8192, 64, 13), scattered_layout(8192, 64, 64)  # densities 0.1, 0.5
    assert not naive.dense_is_faster(sparse, batch_heads=4)
    assert naive.dense_is_faster(dense, batch_heads=4)
    # Gathered lists cost more than a band of the same density.
    assert naive.sparse_cost_ratio(sparse, batch_heads=4) > naive.sparse_cost_ratio(band_layout(8192, 64, 13),
                                                                                    batch_heads=4)
    # Small N: a call's fixed cost is not paid back by few skipped blocks, more heads help.
    small = band_layout(320, 64, 3)  # 0.6 density at 5 blocks
    assert naive.dense_is_faster(small, batch_heads=1, head_dim=32)
    assert naive.sparse_cost_ratio(small, batch_heads=64, head_dim=32) < naive.sparse_cost_ratio(small, head_dim=32)
    ratios = [naive.sparse_cost_ratio(scattered_layout(4096, 64, w), batch_heads=8) for w in (4, 16, 32, 48)]
    assert ratios == sorted(ratios)  # monotone in density


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_full_window_equals_sdpa(backend):
    n, d = 130, 64
    layout = BlockLayout.from_dense_mask(torch.ones(n, n, dtype=torch.bool), block_q=32, block_k=32)
    assert layout.density() == 1.0
    q, k, v = qkv(2, 2, n, n, d, torch.float32, grad=False)
    with torch.no_grad():
        o = block_sparse_attention(q, k, v, layout, backend=backend)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


# ------------------------------------------------------------------ flex backend
@pytest.mark.skipif(available_backends()["flex"] is not None, reason="FlexAttention not in this torch")
@pytest.mark.parametrize("heads_layout", ["shared", "per_head"])
@pytest.mark.parametrize("n", [63, 130], ids=lambda n: f"N{n}")
def test_flex_backend_matches_reference(n, heads_layout):
    h = 2
    m = n + 7
    mask = random_mask(1 if heads_layout == "shared" else h, n, m, 32, seed=n)
    layout = BlockLayout.from_dense_mask(mask, block_q=32, block_k=32)
    q, k, v = qkv(1, h, n, m, 64, torch.float32, grad=False)
    o, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="flex")
    ref, ref_lse = reference(q, k, v, mask)
    torch.testing.assert_close(o, ref, **TOL[torch.float32])
    assert_lse_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_flex_backward_on_cpu_says_what_to_do():
    layout = BlockLayout.from_dense_mask(torch.ones(40, 40, dtype=torch.bool), 32, 32)
    q, k, v = qkv(1, 1, 40, 40, 16, torch.float32)
    with pytest.raises(BackendUnavailable, match="backend='torch'"):
        block_sparse_attention(q, k, v, layout, backend="flex")


@pytest.mark.skipif(available_backends()["flex"] is not None, reason="FlexAttention not in this torch")
def test_flex_backend_compiles_on_cpu_forward():
    """torch.compile of backend='flex' runs the fused CPU kernel (the lse is not requested unless asked);
    asking for the lse, or for gradients, fails with a message that says what to do."""
    from dit_accel.kernels.block_sparse.api import prepare_layout

    n = 130
    mask = random_mask(1, n, n, 32, seed=5)
    layout = prepare_layout(BlockLayout.from_dense_mask(mask, block_q=32, block_k=32), "cpu", backend="flex")
    q, k, v = qkv(1, 2, n, n, 64, torch.float32, grad=False)
    torch._dynamo.reset()
    run = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout, backend="flex"), fullgraph=True)
    with torch.no_grad():
        o = run(q, k, v)
    torch.testing.assert_close(o, reference(q, k, v, mask)[0], **TOL[torch.float32])
    with_lse = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout, backend="flex", return_lse=True),
                             fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="return_lse=False"):
        with_lse(q, k, v)
    with pytest.raises(Exception, match="backward"):
        run(q.requires_grad_(), k, v).sum().backward()


# ------------------------------------------------------------------ selection and errors
def test_available_backends_on_cpu(monkeypatch):
    avail = available_backends()
    assert set(avail) == {"triton", "flex", "torch"} and avail["torch"] is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = available_backends("cpu")["triton"]
    assert reason is not None and "TRITON_INTERPRET" in reason and "backend='torch'" in reason


def test_auto_picks_torch_on_cpu_and_env_overrides(monkeypatch):
    monkeypatch.delenv(backends_mod.ENV_BACKEND, raising=False)
    assert backends_mod.env_value() is None
    request = backends_mod.Request(torch.device("cpu"), torch.float32, 64)
    resolve = backends_mod.resolve
    assert resolve("block_sparse", "auto", request) == "torch"
    assert resolve("sla", "auto", request) == "torch"
    monkeypatch.setenv(backends_mod.ENV_BACKEND, "flex")
    assert backends_mod.env_value() == "flex"
    assert resolve("block_sparse", "auto", request) == "flex"
    assert resolve("sla", "auto", request) == "torch"  # SLA has no flex variant: its twin runs
    assert resolve("block_sparse", "torch", request) == "torch"  # explicit choice wins over env
    monkeypatch.setenv(backends_mod.ENV_BACKEND, "cuda-magic")
    with pytest.raises(ValueError, match="DIT_ACCEL_BACKEND"):
        resolve("block_sparse", "auto", request)


def test_forcing_unavailable_backend_raises_reason(monkeypatch):
    monkeypatch.setattr(backends_mod, "triton_reason", lambda device: "triton is not installed; do X")
    layout = BlockLayout.from_dense_mask(torch.ones(16, 16, dtype=torch.bool), 16, 16)
    q, k, v = qkv(1, 1, 16, 16, 16, torch.float32, grad=False)
    with pytest.raises(BackendUnavailable, match="triton is not installed; do X"):
        block_sparse_attention(q, k, v, layout, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, layout, backend="cuda")


def _bad_calls():
    q, k, v = qkv(1, 2, 40, 40, 16, torch.float32, grad=False)
    lay = BlockLayout.from_dense_mask(torch.ones(40, 40, dtype=torch.bool), 16, 16)
    lay3 = BlockLayout.from_dense_mask(torch.ones(3, 40, 40, dtype=torch.bool), 16, 16)
    lay_short = BlockLayout.from_dense_mask(torch.ones(39, 40, dtype=torch.bool), 16, 16)
    return {
        "q_3d": ((q[0], k, v, lay), {}, ValueError, "q must have 4 dims"),
        "int_dtype": ((q.long(), k, v, lay), {}, TypeError, "q must be float16, bfloat16 or float32"),
        "mixed_dtype": ((q, k.half(), v, lay), {}, TypeError, "share one dtype"),
        "heads_mismatch": ((q, k[:, :1], v[:, :1], lay), {}, ValueError, "H=2"),
        "kv_shape": ((q, k, v[..., :8], lay), {}, ValueError, "k and v must have the same shape"),
        "not_layout": ((q, k, v, torch.ones(40, 40)), {}, TypeError, "from_dense_mask"),
        "layout_len": ((q, k, v, lay_short), {}, ValueError, "q_len=39"),
        "layout_heads": ((q, k, v, lay3), {}, ValueError, "layout has 3 heads"),
        "scale": ((q, k, v, lay), {"scale": float("nan")}, ValueError, "scale must be"),
        "backend_type": ((q, k, v, lay), {"backend": 3}, TypeError, "backend must be a string"),
        "head_dim_triton": ((*(torch.randn(1, 1, 16, 300, device=DEVICE) for _ in range(3)),
                             BlockLayout.from_dense_mask(torch.ones(16, 16, dtype=torch.bool), 16, 16)),
                            {"backend": "triton"}, BackendUnavailable, "head dim 300 > 256.*backend='torch'"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_errors_name_the_argument(case):
    args, kwargs, exc, text = _bad_calls()[case]
    with pytest.raises(exc, match=text):
        block_sparse_attention(*args, **kwargs)


@pytest.mark.parametrize("shape", [(0, 2, 64, 16), (1, 0, 64, 16), (1, 2, 64, 0)], ids=["batch", "heads", "dim"])
def test_an_empty_dimension_is_refused_by_every_entry_point(shape):
    """A head count or head dim of 0 raised ZeroDivisionError deep inside, and SLA with no heads killed the process
    (SIGFPE in the CPU attention op); every public entry point now names the shapes instead."""
    from dit_accel.kernels import sla_attention
    from dit_accel.kernels.dense import dense_attention

    q = torch.randn(*shape)
    grid_layout = BlockLayout.from_dense_mask(torch.ones(64, 64, dtype=torch.bool), 16, 16)
    calls = {"block_sparse": lambda: block_sparse_attention(q, q, q, grid_layout),
             "vsa": lambda: dit_accel.vsa_attention(q, q, q, (4, 4, 4), topk=1),
             "sla": lambda: sla_attention(q, q, q, dit_accel.SLA(topk=0.5)),
             "dense": lambda: dense_attention(q, q, q)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"must have no empty dimension: B, H, N, M and D are each >= 1"):
            call()


def test_a_switch_argument_that_is_not_a_bool_is_refused_and_a_bad_gate_names_its_dtype():
    """``return_selection="no"`` (a truthy string) returned a tuple; a long gate was reported by its (matching)
    shape alone."""
    from dit_accel.kernels import sla_attention
    from dit_accel.kernels.dense import dense_attention, fastest_attention

    q = torch.randn(1, 2, 64, 16)
    layout = BlockLayout.from_dense_mask(torch.ones(64, 64, dtype=torch.bool), 16, 16)
    calls = {"return_lse": [lambda f: block_sparse_attention(q, q, q, layout, return_lse=f),
                            lambda f: dense_attention(q, q, q, return_lse=f),
                            lambda f: fastest_attention(q, q, q, return_lse=f)],
             "return_selection": [lambda f: dit_accel.vsa_attention(q, q, q, (4, 4, 4), topk=1, return_selection=f)],
             "return_parts": [lambda f: sla_attention(q, q, q, dit_accel.SLA(topk=0.5), return_parts=f)]}
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=f"{name}='no' is invalid: expected True or False"):
                fn("no")
            assert isinstance(fn(False), torch.Tensor)
    with pytest.raises(ValueError, match=r"gate must be a float tensor .* got a torch.int64 tensor of shape "
                                         r"\(1, 2, 64, 16\)"):
        dit_accel.vsa_attention(q, q, q, (4, 4, 4), topk=1, gate=torch.ones_like(q, dtype=torch.long))


def test_large_head_dims_run_on_the_torch_backend():
    """Only the Triton kernels stop at D = 256; auto on CPU runs the twin at any head dim."""
    q, k, v = qkv(1, 1, 40, 40, 300, torch.float32, grad=False)
    mask = torch.rand(40, 40) < 0.5
    mask[:, 0] = True
    layout = BlockLayout.from_dense_mask(mask, 16, 16)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), reference(q, k, v, mask)[0],
                               **TOL[torch.float32])


def test_import_does_not_import_triton():
    code = "import sys, dit_accel.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_twin_reads_k_and_v_of_a_transposed_batch_in_place(batch):
    """Diffusers hands q, k, v over as transposes of (B, N, H, D). At batch 1 the twin's key blocks are views of the
    caller's k and v (no copy); at batch 2 they are one copy. Both equal the masked reference."""
    n, block, heads, d = 512, 64, 2, 32
    layout = band_layout(n, block, 3)
    q, k, v = (torch.randn(batch, n, heads, d).transpose(1, 2) for _ in range(3))
    with torch.no_grad():
        kb, vb = naive._kv_blocks(k, v, batch * heads, (n // block, block, d), True)
        o, _ = torch_block_sparse_attention(q, k, v, layout, d ** -0.5)
    shares = kb.data_ptr() == k.data_ptr() and vb.data_ptr() == v.data_ptr()
    assert shares == (batch == 1)
    assert torch.equal(kb.reshape(batch, heads, n, d), k) and torch.equal(vb.reshape(batch, heads, n, d), v)
    torch.testing.assert_close(o, reference(q, k, v, layout.to_dense_mask(), scale=d ** -0.5)[0], atol=1e-5, rtol=1e-5)
