"""Kernel entry points, round 21: each test pins one fault a user of the public kernel functions would hit."""

import pytest
import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_triton_launches_split_the_batch_where_b_times_h_passes_the_grid_limit(monkeypatch):
    # The Triton kernels put B*H on the launch grid's second axis, which CUDA caps at 65,535: a call with more
    # (B=2048, H=40) failed on a GPU with a raw launch error. The batch now runs in slices within the limit.
    from dit_accel.kernels import limits
    from dit_accel.kernels.block_sparse import api

    run = api._triton_path()
    seen = []

    def recording(q, k, v, layout, scale):
        seen.append(q.shape[0] * q.shape[1])
        return run(q, k, v, layout, scale)

    monkeypatch.setattr(limits, "GRID_AXIS_LIMIT", 4)
    monkeypatch.setattr(api, "_triton_path", lambda: recording)
    n = 32
    layout = BlockLayout.from_dense_mask(torch.ones(n, n, dtype=torch.bool).tril(), block_q=16, block_k=16)
    q, k, v = (_randn(3, 2, n, 16, seed=s).requires_grad_() for s in range(3))
    o, lse = block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert seen and max(seen) <= 4 and sum(seen) == 6
    o_ref, lse_ref = block_sparse_attention(q, k, v, layout, backend="torch", return_lse=True)
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4)
    g = torch.autograd.grad(o.sum(), (q, k, v))
    g_ref = torch.autograd.grad(o_ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    # and the heads, past the limit (VSA's fine branch folds B into H), with a layout per head or a shared one
    per_head = BlockLayout.from_block_masks(torch.rand(5, 2, 2, generator=torch.Generator().manual_seed(1)) < 0.6,
                                            q_len=n, kv_len=n, block_q=16, block_k=16)
    for lay in (per_head, layout):
        seen.clear()
        q5, k5, v5 = (_randn(2, 5, n, 16, seed=s) for s in range(3))
        o5 = block_sparse_attention(q5, k5, v5, lay, backend="triton")
        assert max(seen) <= 4
        torch.testing.assert_close(o5, block_sparse_attention(q5, k5, v5, lay, backend="torch"), atol=1e-4, rtol=1e-4)


def test_the_fused_sla_kernel_refuses_b_times_h_past_the_grid_limit_and_auto_takes_the_twin(monkeypatch):
    # The fused SLA launches put B*H on the grid's second axis (at most 65,535 on CUDA): B*H=70,000 on a GPU was a
    # raw launch error after classification. Now a forced backend says why and "auto" runs the PyTorch twin.
    from dit_accel.kernels import backends
    from dit_accel.kernels.request import Request

    monkeypatch.setattr(backends, "triton_reason", lambda device: None)  # (as on a GPU with triton)
    monkeypatch.setattr(backends, "_verified", lambda *a, **kw: True)
    monkeypatch.setattr(backends, "_tuned", lambda *a, **kw: None)
    big = Request(torch.device("cuda"), torch.float16, 64, batch_heads=70000)
    with pytest.raises(backends.BackendUnavailable, match="B\\*H=70000.*backend='torch'"):
        backends.resolve("sla", "triton", big)
    assert backends.resolve("sla", "auto", big) == "torch"
    assert backends.resolve("sla", "auto", Request(torch.device("cuda"), torch.float16, 64, batch_heads=40)) == "triton"


def test_vsa_keeps_each_triton_launch_within_the_grid_limit(monkeypatch, fresh_vsa):
    # VSA folds the batch into the heads (one launch of B*H heads) and its raster, template and gated-backward
    # launches put B*H on the grid's second axis: past 65,535 each was a raw CUDA launch error. Now the fine
    # branch takes the general path, which splits the heads, and the raster and gated kernels step aside.
    from dit_accel.kernels import limits
    from dit_accel.kernels.vsa import vsa_attention
    from dit_accel.kernels.block_sparse import triton as bs_triton
    from dit_accel.kernels.vsa import api as vsa_api, fine, gated

    monkeypatch.setattr(limits, "GRID_AXIS_LIMIT", 4)
    launch, seen = bs_triton.launch_forward, []

    def recording(launch_, q, *args, **kwargs):
        seen.append(q.shape[0] * q.shape[1])
        return launch(launch_, q, *args, **kwargs)

    monkeypatch.setattr(bs_triton, "launch_forward", recording)
    grid = (2, 4, 4)
    q, k, v = (_randn(3, 2, 32, 16, seed=s) for s in range(3))
    ref = vsa_attention(q, k, v, grid, topk=1, tile=(2, 4, 4), backend="torch")
    for _ in range(2):  # (the second call would take the first's launch template)
        out = vsa_attention(q, k, v, grid, topk=1, tile=(2, 4, 4), backend="triton")
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert seen and max(seen) <= 4
    assert not fine._direct(q.reshape(1, 6, 32, 16), k.reshape(1, 6, 32, 16), v.reshape(1, 6, 32, 16))
    monkeypatch.setenv("DIT_ACCEL_GATHER", "1")
    assert not gated.gated_kernel_runs(q)
    cubes = vsa_api.cubes_of(grid, (2, 4, 4))
    assert not vsa_api._reads_raster(q, k, v, cubes, 1, 0.25, False, "triton", False)


def test_dense_attention_splits_its_launches_past_the_grid_limit(monkeypatch):
    # dense_attention's launches put B*H on the grid's second axis too: B*H above 65,535 was a raw CUDA launch error
    # (also where block_sparse_attention's auto ran dense). It now runs the batch, or the heads, in slices.
    from dit_accel.kernels import dense_attention_reference, limits
    from dit_accel.kernels.dense import dense_attention, triton as dense_triton

    monkeypatch.setattr(limits, "GRID_AXIS_LIMIT", 4)
    forward, seen = dense_triton.dense_forward, []

    def recording(q, *args, **kwargs):
        seen.append(q.shape[0] * q.shape[1])
        return forward(q, *args, **kwargs)

    monkeypatch.setattr(dense_triton, "dense_forward", recording)
    for shape in ((3, 2, 32, 16), (2, 5, 32, 16)):
        q, k, v = (_randn(*shape, seed=s).requires_grad_() for s in range(3))
        o, lse = dense_attention(q, k, v, return_lse=True)
        o_ref, lse_ref = dense_attention_reference(q, k, v)
        torch.testing.assert_close(o, o_ref.to(o.dtype), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, lse_ref.to(lse.dtype), atol=1e-4, rtol=1e-4)
        assert max(seen) <= 4
        g = torch.autograd.grad(o.sum(), (q, k, v))
        g_ref = torch.autograd.grad(o_ref.sum(), (q, k, v))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-3, rtol=1e-3)
