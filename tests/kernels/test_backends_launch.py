"""The launch glue of the vendor backends on CPU, with stand-ins for the vendor packages that implement the
documented semantics of their calls with the fp32 oracle: NATTEN's ``na3d`` on raster ``[B, *grid, H, D]``
tokens, cuDNN's ``BSA`` forward/backward on padded query blocks. What is tested is dit_accel's side: the
permutations, reshapes, padding, slicing and the autograd wiring. (The real kernels: test_backends_gpu.py.)"""

from __future__ import annotations

import types

import pytest
import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention, dense_attention_reference
from dit_accel.kernels.block_sparse.backends import cudnn as vcudnn
from dit_accel.kernels.block_sparse.backends import fa4 as vfa4
from dit_accel.kernels.block_sparse.backends import natten as vnatten
from dit_accel.patterns.gna import gna_layout

from .test_backends_convert import LAYOUTS, _element_lookup, _expand_lists, _natten_1d, expand_cudnn


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



def _fake_fa4(seen):
    """``flash_attn.cute``'s ``flash_attn_func`` on ``(B, N, H, D)`` with FlexAttention-style block lists: full
    blocks whole, partial blocks through the mask_mod, here evaluated as the aux-table lookup it performs."""
    from collections import namedtuple

    Bst = namedtuple("BlockSparseTensorsTorch", "mask_block_cnt mask_block_idx full_block_cnt full_block_idx "
                     "cu_total_m_blocks cu_block_idx_offsets block_size", defaults=(None,) * 7)

    def flash_attn_func(q, k, v, softmax_scale, mask_mod, aux_tensors, block_sparse_tensors,
                        block_sparse_tensors_bwd, return_lse):
        seen.append((mask_mod, block_sparse_tensors.block_size, block_sparse_tensors_bwd.block_size))
        b, n, h, d = q.shape
        m = k.shape[1]
        bst = block_sparse_tensors
        bq, bk = bst.block_size
        rows = lambda i: slice(i * bq, min((i + 1) * bq, n))  # noqa: E731
        cols = lambda j: slice(j * bk, min((j + 1) * bk, m))  # noqa: E731
        heads = bst.mask_block_cnt.shape[1]
        lookup = None
        if mask_mod is not None:
            lbq, lbk = mask_mod
            nq, nk = aux_tensors[2].tolist()  # the grid comes at run time: one compile per block shape
            lookup = _element_lookup(aux_tensors[0], aux_tensors[1], (lbq, lbk), (nq, nk), heads, n, m)
        mask = _expand_lists(bst.full_block_cnt[0], bst.full_block_idx[0], rows, cols, (heads, n, m))
        if int(bst.mask_block_cnt.sum()):
            assert lookup is not None, "partial blocks without a mask_mod would run unmasked"
            mask |= _expand_lists(bst.mask_block_cnt[0], bst.mask_block_idx[0], rows, cols, (heads, n, m),
                                  fill=lookup)
        o, lse = dense_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                           softmax_scale)
        return o.transpose(1, 2), lse

    cute = types.SimpleNamespace(flash_attn_func=flash_attn_func)
    sparsity = types.SimpleNamespace(BlockSparseTensorsTorch=Bst)
    return lambda module: {"flash_attn.cute": cute, "flash_attn.cute.block_sparsity": sparsity}[module]


@pytest.mark.parametrize("arch", [90, 100])
def test_fa4_launch_passes_both_directions_and_the_element_masks(arch, monkeypatch):
    seen = []
    fake = _fake_fa4(seen)
    monkeypatch.setattr(vfa4, "vendor_import", lambda module, *a: fake(module))
    monkeypatch.setattr(vfa4, "_mask_mod", lambda bq, bk, shared: (bq, bk))
    layout = LAYOUTS["random_perhead_128"] if arch == 100 else LAYOUTS["random_64"]
    plan = vfa4.plan(layout, 64, arch=arch)
    g = torch.Generator().manual_seed(2)
    heads = layout.num_heads if layout.num_heads > 1 else 2
    q, k, v = (torch.randn(2, heads, layout.q_len if i == 0 else layout.kv_len, 64, generator=g) for i in range(3))
    o, lse = vfa4.run(plan, q, k, v, 0.125, return_lse=True)
    ref_o, ref_lse = block_sparse_attention(q, k, v, layout, scale=0.125, return_lse=True, backend="torch")
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(lse, ref_lse)
    mask_mod, fwd_block, bwd_block = seen[0]
    assert mask_mod is not None and fwd_block == (plan.fwd.block_q, plan.fwd.block_k)
    assert bwd_block == (plan.bwd.block_q, plan.bwd.block_k)


def test_natten_is_refused_where_the_lse_needs_a_gradient(monkeypatch):
    """NATTEN's fused backward ignores d(lse): a call that differentiates through the lse (a plan's text merge)
    is refused naming the reason, and a call without an lse gradient still runs through NATTEN."""
    from dit_accel.kernels.backends import BackendUnavailable
    from dit_accel.kernels.block_sparse.backends import call, layout_reason

    monkeypatch.setattr(vnatten, "vendor_import", lambda *a: _fake_natten())
    perm, layout = gna_layout((3, 6, 10), (2, 3, 5), stride=(1, 3, 1), tile=(1, 8, 8), block_q=64, block_k=64)
    vnatten.attach_gna(layout, perm, (2, 3, 5), (1, 3, 1))
    assert "log-sum-exp" in layout_reason("natten", layout, 16, needs_grad=True, return_lse=True)
    assert layout_reason("natten", layout, 16, needs_grad=True, return_lse=False) is None
    assert layout_reason("natten", layout, 16, needs_grad=False, return_lse=True) is None
    g = torch.Generator().manual_seed(1)
    q, k, v = (perm.permute(torch.randn(1, 2, perm.num_tokens, 16, generator=g)).requires_grad_() for _ in range(3))
    with pytest.raises(BackendUnavailable, match="NATTEN's fused backward"):
        call("natten", q, k, v, layout, 0.25, return_lse=True)
    o, _ = call("natten", q, k, v, layout, 0.25, return_lse=False)
    assert o.requires_grad


def test_fa4_compiles_once_per_block_shape_not_per_layout_grid(monkeypatch):
    """FA4's compile cache hashes the mask_mod's closure: it holds block sizes only, the grid rides in aux."""
    asked = []
    seen = []
    fake = _fake_fa4(seen)
    monkeypatch.setattr(vfa4, "vendor_import", lambda module, *a: fake(module))
    monkeypatch.setattr(vfa4, "_mask_mod", lambda *a: asked.append(a) or a[:2])
    g = torch.Generator().manual_seed(3)
    for n in (300, 420):  # two lengths: two layout grids, one block shape
        mask = torch.rand(1, n, n, generator=g) < 0.3
        layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
        plan = vfa4.plan(layout, 64, arch=90)
        q, k, v = (torch.randn(1, 1, n, 64, generator=g) for _ in range(3))
        o = vfa4.run(plan, q, k, v, 0.125, return_lse=False)[0]
        ref = block_sparse_attention(q, k, v, layout, scale=0.125, backend="torch")
        torch.testing.assert_close(o, ref)
    assert len(set(asked)) == 1, asked
