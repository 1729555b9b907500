"""The launch glue of the vendor backends on CPU, with stand-ins for the vendor packages that implement the
documented semantics of their calls with the fp32 oracle: NATTEN's ``na3d`` on raster ``[B, *grid, H, D]``
tokens, cuDNN's ``BSA`` forward/backward on padded query blocks. What is tested is dit_accel's side: the
permutations, reshapes, padding, slicing and the autograd wiring. (The real kernels: test_vendor_gpu.py.)"""

from __future__ import annotations

import types

import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention, dense_attention_reference
from dit_accel.kernels.block_sparse.vendor import cudnn as vcudnn
from dit_accel.kernels.block_sparse.vendor import natten as vnatten
from dit_accel.patterns.gna import gna_layout

from .test_vendor_convert import _natten_1d, expand_cudnn


def _fake_natten():
    def na(q, k, v, kernel_size, stride, dilation, is_causal, scale, return_lse):
        b, *grid, h, d = q.shape
        rels = [_natten_1d(*a) for a in zip(grid, kernel_size, stride, dilation, is_causal)]
        mask = rels[0]
        for r in rels[1:]:
            mask = torch.kron(mask.int(), r.int()).bool()
        flat = lambda x: x.reshape(b, -1, h, x.shape[-1]).transpose(1, 2)  # noqa: E731
        o, lse = dense_attention_reference(flat(q), flat(k), flat(v), mask, scale)
        return o.transpose(1, 2).reshape(q.shape).to(q.dtype), lse.transpose(1, 2).reshape(b, *grid, h)

    return types.SimpleNamespace(na1d=na, na2d=na, na3d=na)


def test_natten_launch_permutes_and_pads_exactly(monkeypatch):
    monkeypatch.setattr(vnatten, "vendor_import", lambda *a: _fake_natten())
    perm, layout = gna_layout((3, 6, 10), (2, 3, 5), stride=(1, 3, 1), tile=(1, 8, 8), block_q=64, block_k=64)
    w = vnatten.attach_gna(layout, perm, (2, 3, 5), (1, 3, 1))
    g = torch.Generator().manual_seed(0)
    q, k, v = (perm.permute(torch.randn(2, 3, perm.num_tokens, 16, generator=g)) for _ in range(3))
    o, lse = vnatten.run(w, q, k, v, 0.25, return_lse=True)
    ref_o, ref_lse = dense_attention_reference(q, k, v, layout.to_dense_mask(), 0.25)
    real = perm.order >= 0
    torch.testing.assert_close(o[:, :, real], ref_o[:, :, real])
    torch.testing.assert_close(lse[:, :, real], ref_lse[:, :, real])
    assert (o[:, :, ~real] == 0).all() and torch.isneginf(lse[:, :, ~real]).all()


def _fake_bsa(calls):
    def mask_of(index, nums, block_sizes, block, n, m):
        return expand_cudnn(vcudnn.CudnnBlocks(block, index[0], nums[0], block_sizes, False), n, m)

    def forward(q, k, v, index, block_sizes=None, q2k_block_nums=None, *, sparse_block_size, softmax_scale,
                allow_empty_block_nums):
        assert q.shape[2] % sparse_block_size == 0 and index.shape[:2] == q.shape[:2]  # sm_90: whole query blocks
        calls.append(("fwd", allow_empty_block_nums))
        mask = mask_of(index, q2k_block_nums, block_sizes, sparse_block_size, q.shape[2], k.shape[2])
        o, lse = dense_attention_reference(q, k, v, mask, softmax_scale)
        return {"o_tensor": o.to(q.dtype), "lse_tensor": lse}

    def backward(do, q, k, v, o, lse, index, block_sizes=None, q2k_block_nums=None, *, softmax_scale,
                 sparse_block_size):
        calls.append(("bwd", q.shape[2]))
        mask = mask_of(index, q2k_block_nums, block_sizes, sparse_block_size, q.shape[2], k.shape[2])
        with torch.enable_grad():  # a Function's backward runs without autograd; the stand-in needs it
            leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
            out = dense_attention_reference(*leaves, mask, softmax_scale)[0]
            dq, dk, dv = torch.autograd.grad(out, leaves, do.float())
        return {"dq_tensor": dq.to(q.dtype), "dk_tensor": dk.to(q.dtype), "dv_tensor": dv.to(q.dtype)}

    return types.SimpleNamespace(BSA=types.SimpleNamespace(block_sparse_attention_forward=forward,
                                                           block_sparse_attention_backward=backward))


def test_cudnn_launch_pads_queries_and_wires_the_backward(monkeypatch):
    calls = []
    monkeypatch.setattr(vcudnn, "vendor_import", lambda *a: _fake_bsa(calls))
    g = torch.Generator().manual_seed(1)
    visited = torch.rand(2, 5, 5, generator=g) < 0.5
    visited[:, 3] = False  # an empty query block
    layout = BlockLayout.from_block_masks(visited, q_len=300, kv_len=290, block_q=64, block_k=64)
    blocks = vcudnn.to_cudnn(layout, 64)
    q = torch.randn(1, 2, 300, 32, generator=g, dtype=torch.float64).float().requires_grad_(True)
    k = torch.randn(1, 2, 290, 32, generator=g).requires_grad_(True)
    v = torch.randn(1, 2, 290, 32, generator=g).requires_grad_(True)
    o, lse = vcudnn.run(blocks, q, k, v, 0.2, return_lse=True)
    assert calls[0] == ("fwd", True)  # the empty row is declared
    ref_o, ref_lse = block_sparse_attention(q, k, v, layout, scale=0.2, return_lse=True, backend="torch")
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse, ref_lse)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(ref_o, (q, k, v), do)
    assert calls[-1] == ("bwd", 320)  # padded to whole 64-token query blocks
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

