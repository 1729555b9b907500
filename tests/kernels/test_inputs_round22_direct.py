"""Kernel entry points called directly, round 22 (area K): each test pins one fault found by calling
``dense_attention``, ``fastest_attention``, ``block_sparse_attention``, ``sla_attention`` and ``vsa_attention`` as a
NATTEN or FlashAttention user calls theirs (a refusal SDPA does not make, a misleading error, or a silent wrong
answer, before the fix). Numbers are checked against an fp64 softmax attention written here, at ragged sizes."""

import numpy as np
import pytest
import torch

from dit_accel.kernels import BlockLayout, SLAParams, block_sparse_attention, sla_attention
from dit_accel.kernels.dense import dense_attention, fastest_attention
from dit_accel.kernels.vsa import vsa_attention

N, D = 70, 24  # no whole block, a head dim that is no power of two


def _qkv(b=1, h=2, n=N, m=N, d=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, length, d, generator=g).to(dtype) for length in (n, m, m)]


def _reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v in fp64."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


def _full(n=N, m=N):
    return BlockLayout.from_dense_mask(torch.ones(n, m, dtype=torch.bool), block_q=16, block_k=16)


# ------------------------------------------------------------ dense entry points under torch.autocast
# dense_attention and fastest_attention were the only entry points without SDPA's autocast casts: inside a region
# q bf16 with k, v fp32 (Diffusers' RMSNorm on q alone) was refused with "q, k, v must share one dtype", where
# SDPA, block_sparse_attention, sla_attention and vsa_attention run it; fp32 inputs returned fp32.
def test_fastest_attention_takes_mixed_dtypes_in_autocast_as_sdpa():
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = fastest_attention(q.bfloat16(), k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k, v)
    assert o.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(o.double(), _reference(q, k, v), atol=3e-2, rtol=3e-2)


def test_fastest_attention_returns_the_region_dtype():
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = fastest_attention(q, k, v, return_lse=True)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_dense_attention_takes_mixed_dtypes_in_autocast():
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.float16):  # (fp16: the interpreter's bf16 dot is wrong)
        o = dense_attention(q.half(), k, v)
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.double(), _reference(q, k, v), atol=5e-3, rtol=5e-3)


# ------------------------------------------------------------ a 3-D tensor where (B, H, N, D) is expected
# The message told every caller to "Reshape (B, N, H, D) inputs with .transpose(1, 2)": a transposed 3-D tensor is
# still 3-D. It now says which dim to add.
@pytest.mark.parametrize("call", ["block_sparse", "sla", "vsa", "dense"])
def test_three_dim_input_says_which_dim_to_add(call):
    q, k, v = _qkv(n=64, m=64)
    run = {"block_sparse": lambda: block_sparse_attention(q[0], k, v, _full(64, 64), backend="torch"),
           "sla": lambda: sla_attention(q[0], k, v, SLAParams(topk=0.5), backend="torch"),
           "vsa": lambda: vsa_attention(q[0], k, v, (1, 8, 8), topk=1, backend="torch"),
           "dense": lambda: dense_attention(q[0], k, v)}[call]
    with pytest.raises(ValueError, match=r"q must have 4 dims .*got shape \(2, 64, 24\)") as info:
        run()
    assert "unsqueeze(1)" in str(info.value) and "Reshape (B, N, H, D) inputs" not in str(info.value)
    # and the advice works: one head added to (B, N, D)
    q4, k4, v4 = (x[0].unsqueeze(1) for x in (q, k, v))
    o = block_sparse_attention(q4, k4, v4, _full(64, 64), backend="torch")
    torch.testing.assert_close(o.double(), _reference(q4, k4, v4), atol=1e-5, rtol=1e-5)


def test_five_dim_packed_input_says_unbind():
    qkv = torch.randn(1, N, 3, 2, D)
    with pytest.raises(ValueError, match=r"unbind\(2\)"):
        dense_attention(qkv, qkv, qkv)


# ------------------------------------------------------------ VSA's grid and tile as integer arrays
# A grid computed with numpy (np.array(latents.shape[2:]) // patch) or torch was refused as not "positive ints",
# and a tile of numpy uint8 or int16 ints too (only int32 and int64 numpy scalars were ints).
@pytest.mark.parametrize("grid", [np.array([2, 4, 8]), torch.tensor([2, 4, 8]), (np.int16(2), np.uint8(4), 8)],
                         ids=["numpy", "tensor", "numpy-int16-uint8"])
def test_vsa_takes_an_integer_array_grid(grid):
    q, k, v = _qkv(n=64, m=64)
    o = vsa_attention(q, k, v, grid, topk=2, tile=np.array([2, 4, 4]), backend="torch")
    torch.testing.assert_close(o, vsa_attention(q, k, v, (2, 4, 8), topk=2, tile=(2, 4, 4), backend="torch"))
    full = vsa_attention(q, k, v, grid, topk=4, tile=np.array([2, 4, 4]), backend="torch")  # every key cube
    torch.testing.assert_close(full.double(), _reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [np.array([2.0, 4.0, 8.0]), torch.tensor([[2, 4, 8]]), np.array([2, 4, 8, 1])],
                         ids=["float-array", "2d-tensor", "four-dims"])
def test_vsa_still_refuses_a_float_or_misshapen_array_grid(grid):
    q, k, v = _qkv(n=64, m=64)
    with pytest.raises(ValueError, match="grid=.* is invalid"):
        vsa_attention(q, k, v, grid, topk=2, backend="torch")


# ------------------------------------------------------------ shape inference (meta tensors) under any backend
# sla_attention(..., backend="triton") on meta tensors (a model built under init_empty_weights with the backend
# forced) raised "triton kernels support CUDA ..., not 'meta'", where block_sparse_attention and vsa_attention
# shape-infer under a forced "triton"; and fastest_attention(..., return_lse=True) said no dense kernel returns
# the log-sum-exp on meta, where dense_attention shapes it.
def _meta_qkv():
    return [torch.empty(1, 2, N, D, device="meta", requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("parts", [False, True], ids=["output", "parts"])
def test_sla_forced_triton_shape_infers_on_meta(parts):
    q, k, v = _meta_qkv()
    out = sla_attention(q, k, v, SLAParams(topk=0.5), torch.nn.Linear(D, D, device="meta"), backend="triton",
                        return_parts=parts)
    o, lse = (out[0], out[1]) if parts else (out, None)
    assert o.device.type == "meta" and o.shape == q.shape
    assert lse is None or lse.shape == q.shape[:-1]
    o.sum().backward()  # a shape-only backward runs too
    with pytest.raises(ValueError, match="backend must be one of"):  # a misspelt name is still refused
        sla_attention(q, k, v, SLAParams(topk=0.5), backend="tritn")


def test_fastest_attention_shapes_the_lse_on_meta():
    q, k, v = _meta_qkv()
    o, lse = fastest_attention(q, k, v, return_lse=True)
    assert o.shape == q.shape and o.device.type == "meta"
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    (o.sum() + lse.sum()).backward()


# ------------------------------------------------------------ k/v whose batch, heads or head dim differ from q's
# Every mismatch was told "Repeat k/v heads for grouped-query attention", a batch of 1 and a head dim of 32
# against q's 24 too. The advice now names the dim that differs, and following it runs.
def test_grouped_query_kv_is_refused_with_the_repeat_that_fixes_it():
    q, k, v = _qkv(h=4)
    with pytest.raises(ValueError, match=r"grouped-query .*repeat_interleave\(2, dim=1\)"):
        block_sparse_attention(q, k[:, :2], v[:, :2], _full(), backend="torch")
    k2, v2 = (x[:, :2].repeat_interleave(2, dim=1) for x in (k, v))
    o = block_sparse_attention(q, k2, v2, _full(), backend="torch")
    torch.testing.assert_close(o.double(), _reference(q, k2, v2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call", ["dense", "sla", "fastest"])
def test_kv_batch_and_head_dim_mismatch_say_which(call):
    run = {"dense": dense_attention, "fastest": fastest_attention,
           "sla": lambda q, k, v: sla_attention(q, k, v, SLAParams(topk=1.0), backend="torch")}[call]  # (every block)
    q, k, v = _qkv(b=2)
    with pytest.raises(ValueError, match=r"k/v hold batch 1, q batch 2: expand .*k\.expand\(B, -1, -1, -1\)") as info:
        run(q, k[:1], v[:1])
    assert "grouped-query" not in str(info.value)
    k2, v2 = (x[:1].expand(2, -1, -1, -1) for x in (k, v))
    torch.testing.assert_close(run(q, k2, v2).double(), _reference(q, k2, v2), atol=1e-5, rtol=1e-5)
    _, k8, v8 = _qkv(d=D + 8)
    with pytest.raises(ValueError, match=r"one head dim \(q's D=24, k/v's 32\)") as info:
        run(q[:1], k8, v8)
    assert "grouped-query" not in str(info.value)
