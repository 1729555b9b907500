"""The Triton path as torch custom ops: numerics, fake kernels, autograd and torch.compile tracing.

On CPU triton runs in its interpreter (conftest sets TRITON_INTERPRET=1), so sizes stay tiny.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dit_accel.kernels.block_sparse.ops  # noqa: F401  (registers the dit_accel:: custom ops)
from dit_accel.kernels import BlockLayout, available_backends, block_sparse_attention, dense_attention_reference


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(available_backends()["triton"] is not None,
                       reason=f"triton backend unavailable: {available_backends()['triton']}"),
]

N, D, H = 40, 16, 2


def _case(dtype=torch.float32, grad=True, seed=0, n=N, h=H):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, n, generator=g) < 0.5
    mask[:16, 16:] = True    # a full block
    mask[5] = False          # an empty row
    layout = BlockLayout.from_dense_mask(mask, block_q=16, block_k=16)
    q, k, v = (torch.randn(1, h, n, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v, mask, layout


def _op_args(q, k, v, layout, scale=0.25):
    return (q, k, v, *[getattr(layout, n) for n in BlockLayout.TENSORS],
            layout.q_len, layout.kv_len, layout.block_q, layout.block_k, scale)


def test_triton_op_forward_backward_including_lse_gradient():
    q, k, v, mask, layout = _case()
    o, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    ref, ref_lse = dense_attention_reference(q, k, v, mask)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[:, :, 5]).all() and (o[:, :, 5] == 0).all()
    g = torch.randn_like(lse)
    def loss(o_, l_):
        return (o_ * 0.3).sum() + (torch.where(torch.isinf(l_), 0.0, l_) * g).sum()

    grads = torch.autograd.grad(loss(o, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref, ref_lse), (q, k, v))
    for name, gr, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(gr, rg, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_fake_implementations_give_shapes_without_running():
    from dit_accel.kernels.block_sparse.ops import block_sparse_bwd, block_sparse_fwd

    q, k, v, _, layout = _case(torch.float16, grad=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = block_sparse_fwd(*_op_args(q, k, v, layout))
        dq, dk, dv = block_sparse_bwd(o, *_op_args(q, k, v, layout)[:3], o, lse,
                                      *_op_args(q, k, v, layout)[3:])
    assert o.shape == q.shape and o.dtype == torch.float16
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.dtype == torch.float16


def test_opcheck_forward_and_backward_ops():
    from dit_accel.kernels.block_sparse.ops import block_sparse_bwd, block_sparse_fwd

    q, k, v, _, layout = _case(n=20, h=1)  # tiny: opcheck runs the interpreted kernels many times
    # aot_dispatch is covered by the torch.compile(backend="aot_eager") test below.
    torch.library.opcheck(block_sparse_fwd, _op_args(q, k, v, layout),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        o, lse = block_sparse_fwd(*_op_args(q, k, v, layout))
    args = _op_args(q.detach(), k.detach(), v.detach(), layout)
    torch.library.opcheck(block_sparse_bwd, (torch.randn_like(o), *args[:3], o, lse, *args[3:]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_traces_triton_backend(compile_backend):
    q, k, v, mask, layout = _case()

    def fn(q, k, v):
        o, lse = block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
        return o * 2.0, lse

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compile_backend, fullgraph=True)  # graph break -> error
    o, lse = compiled(q, k, v)
    ref, _ = dense_attention_reference(q, k, v, mask)
    torch.testing.assert_close(o, 2.0 * ref, atol=1e-5, rtol=1e-5)
    (dq,) = torch.autograd.grad(o.sum(), q)
    (ref_dq,) = torch.autograd.grad((2.0 * ref).sum(), q)
    torch.testing.assert_close(dq, ref_dq, atol=1e-4, rtol=1e-4)
