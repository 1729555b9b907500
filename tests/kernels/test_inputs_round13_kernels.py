"""Kernel entry points, round 13: each fix test pins one fault found by calling the kernels the way a second thread,
an odd tensor or a NaN would. Another thread compiling is Dynamo's process-wide flag set, with no tracing context in
the test's thread (see the fixture)."""

import os

import pytest
import torch

from dit_accel.kernels import BlockLayout, block_sparse_attention
from dit_accel.kernels.backends import BackendUnavailable
from dit_accel.kernels.request import in_graph, tracing

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels through the interpreter on CPU")]

N, D, BLOCK = 40, 16, 16  # a ragged last block


def _qkv(b=1, h=2, n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


def _layout(h=2, n=N):
    mask = torch.rand(h, n, n, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[..., 0] = True
    return BlockLayout.from_dense_mask(mask, BLOCK, BLOCK)


@pytest.fixture
def another_thread_compiling(monkeypatch):
    """The state of this thread while another thread is inside ``torch.compile``: Dynamo's process-wide flag set
    (``torch.compiler.is_compiling()`` True here too) and no tracing context in this thread. (A real second thread
    holding a compile open gives the same; it costs Dynamo's import and a compile, some 20 s.)"""
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling()


# ------------------------------------------------------------ another thread compiling
def test_an_eager_call_is_not_traced_while_another_thread_compiles(another_thread_compiling):
    """The one thread-local check (traced code reads True: the compile tests run every kernel under it)."""
    assert not tracing() and not in_graph()


def test_flex_returns_the_lse_on_cpu_while_another_thread_compiles(another_thread_compiling, monkeypatch):
    """Before: ``backend="flex", return_lse=True`` on CPU raised NotImplementedError ("cannot return the log-sum-exp
    under torch.compile on CPU") in an eager call whenever any other thread was compiling. (FlexAttention itself is
    stubbed: its first call imports Dynamo, seconds; the call reaching it, asking for the lse, is the point.)"""
    from dit_accel.kernels.block_sparse import flex

    class Reached(Exception):
        pass

    def stub(q, k, v, **kwargs):
        raise Reached(sorted(kwargs))

    monkeypatch.setattr(flex, "flex_function", lambda device: stub)
    q, k, v = _qkv()
    with pytest.raises(Reached, match="return_"):
        block_sparse_attention(q, k, v, _layout(), backend="flex", return_lse=True)


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_a_forced_backend_is_still_checked_while_another_thread_compiles(backend, another_thread_compiling):
    """Before: ``resolve`` took every eager call for a traced one while another thread compiled and returned a forced
    backend unchecked: ``torch.func.grad`` over ``backend="triton"`` died in torch's "must override the
    setup_context staticmethod", ``backend="flex"`` with a gradient on CPU in FlexAttention's own NotImplementedError,
    instead of the BackendUnavailable that says what to use."""
    q, k, v = _qkv()
    layout = _layout()

    def loss(x):
        return block_sparse_attention(x, k, v, layout, backend=backend).sum()

    with pytest.raises(BackendUnavailable, match="backend='torch'"):
        torch.func.grad(loss)(q)


def test_a_failing_kernel_variant_is_not_trusted_while_another_thread_compiles(another_thread_compiling, tmp_path,
                                                                                monkeypatch):
    """Before: ``selfcheck.usable`` took an eager call for one inside a trace (which may run no check) and trusted a
    variant never checked: an eager GPU call made while another thread compiled ran a kernel variant that fails its
    self-check (a wrong answer, silently). Here the fault switch breaks the dense forward: usable must say False."""
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.ENV_SELFCHECK, raising=False)
    monkeypatch.setenv(selfcheck.ENV_FAULT, "dense.triton.fwd")
    monkeypatch.setattr(selfcheck, "_WARNED", set())  # (warned once per process: maybe by another test already)
    shape = {"head_dim": 16, "block_q": 16, "block_k": 16}
    with pytest.warns(UserWarning, match="failed its self-check"):
        assert selfcheck.usable("dense.triton.fwd", torch.device("cpu"), torch.float32, shape) is False


# ------------------------------------------------------------ forward-mode derivatives (jvp, jacfwd, forward_ad)
def _masked_reference(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def _jvp_case():
    q, k, v = _qkv()
    mask = torch.rand(2, N, N, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[..., 0] = True
    tangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    want = torch.func.jvp(lambda x: _masked_reference(x, k, v, mask), (q,), (tangent,))[1]
    return q, k, v, BlockLayout.from_dense_mask(mask, BLOCK, BLOCK), tangent, want


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_jvp_through_block_sparse_attention_follows_the_tangent(backend):
    """Before: ``torch.func.jvp`` (consistency-model distillation, ``jacfwd``) over the PyTorch twin died in ATen's
    "Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"; the twin now takes its matmul path."""
    q, k, v, layout, tangent, want = _jvp_case()
    got = torch.func.jvp(lambda x: block_sparse_attention(x, k, v, layout, backend=backend), (q,), (tangent,))[1]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_jvp_through_a_forced_kernel_backend_is_refused_not_zero():
    """Before: ``torch.func.jvp`` over ``backend="triton"`` returned a zero tangent (max error 2.6 against the masked
    reference), silently: the kernels' hand-written backward has no forward-mode rule. Plain
    ``torch.autograd.forward_ad`` died in a TypeError from inside torch."""
    import torch.autograd.forward_ad as fwAD

    q, k, v, layout, tangent, _ = _jvp_case()
    with pytest.raises(BackendUnavailable, match="no forward-mode derivative.*backend='torch'"):
        torch.func.jvp(lambda x: block_sparse_attention(x, k, v, layout, backend="triton"), (q,), (tangent,))
    with fwAD.dual_level(), pytest.raises(BackendUnavailable, match="no forward-mode derivative"):
        block_sparse_attention(fwAD.make_dual(q, tangent), k, v, layout, backend="triton")


def test_dense_attention_refuses_forward_ad_dual_tensors_by_name():
    """Before: ``dense_attention`` on ``torch.autograd.forward_ad`` dual tensors died in torch's "You must implement
    the jvp function for custom autograd.Function" (torch.func.jvp was already refused with the advice)."""
    import torch.autograd.forward_ad as fwAD

    from dit_accel.kernels.dense import dense_attention

    q, k, v = _qkv()
    with fwAD.dual_level(), pytest.raises(BackendUnavailable, match="no forward-mode derivative.*scaled_dot_product"):
        dense_attention(q, k, fwAD.make_dual(v, torch.ones_like(v)))


# ------------------------------------------------------------ a first-use self-check inside torch.func
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_a_self_check_asked_inside_a_torch_func_transform_passes(transform, tmp_path, monkeypatch):
    """Before: a kernel's first-use self-check, asked for inside ``torch.vmap`` or ``torch.func.grad``/``jvp`` (the
    first call of a vmapped attention), ran its own check under the caller's transform and crashed ("vmap: called
    random operation", "Cannot access data pointer of Tensor that doesn't have storage"): the failed verdict was
    stored in the cache and the sound variant stayed disabled on that machine."""
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.ENV_SELFCHECK, raising=False)
    monkeypatch.delenv(selfcheck.ENV_FAULT, raising=False)
    shape = {"head_dim": 16, "block_q": 16, "block_k": 16}
    seen = []

    def inside(x):
        seen.append(selfcheck.verdict("block_sparse.triton.fwd", torch.device("cpu"), torch.float32, shape,
                                      fresh=True))
        return (x * 2).sum()

    x = torch.randn(2, 3)
    torch.vmap(inside)(x) if transform == "vmap" else torch.func.grad(inside)(x)
    assert seen and seen[0]["ok"], seen[0]["problem"]


def test_the_thread_check_carries_the_mark_dynamo_s_constant_decorator_sets():
    """``tracing()``'s thread check is marked for Dynamo by hand (importing Dynamo costs seconds): the mark must be
    the one ``torch._dynamo.assume_constant_result`` sets, or Dynamo would trace into it (a graph break per call)."""
    import torch._dynamo

    from dit_accel.kernels.request import _traced_in_this_thread

    def probe():
        return None

    marked = torch._dynamo.assume_constant_result(probe)
    names = [n for n in vars(marked) if n.startswith("_dynamo")]
    assert names and all(getattr(_traced_in_this_thread, n, None) == getattr(marked, n) for n in names)
