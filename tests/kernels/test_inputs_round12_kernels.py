"""Kernel entry points' gradients, round 12: each fix test pins one fault found by differentiating
``dense_attention``, ``block_sparse_attention``, ``vsa_attention`` and ``merge_attention`` in unusual but legal ways (a
second derivative, a torch.func transform, rows empty on both sides of a merge, a self-check that could not see a
broken lse gradient); the rest pin the corner cases that
were found right (only q or only v requiring grad, a graph kept and run twice, an expanded or transposed upstream
gradient, half inputs; VSA on grids that are no whole number of cubes, top-k at 1 and at every cube, with and
without a gate, a batch whose samples select differently). Numbers are checked against fp64 masked softmax attention
written here, the fp32 SLA reference and the fp64 VSA brute force of the tests, through the Triton interpreter."""

import os

import pytest
import torch

from dit_accel.kernels import BlockLayout, SLAParams, block_sparse_attention, selfcheck, sla_attention
from dit_accel.kernels.backends import BackendUnavailable
from dit_accel.kernels.dense import dense_attention
from dit_accel.kernels.vsa import vsa_attention
from tests.kernels.sla_reference import brute_force_classes, make_proj, reference_sla
from tests.kernels.vsa_reference import count_for
from tests.kernels.vsa_reference import reference as vsa_reference

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels through the interpreter on CPU")]

N, M, D, BLOCK = 40, 56, 20, 16  # ragged last blocks each way, a head dim that is no power of two
SECOND = "has no second derivative"


@pytest.fixture
def trusted(monkeypatch):
    """The kernels run unchecked (their self-checks are proven in test_selfcheck.py): the tests stay fast."""
    monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "0")
    monkeypatch.delenv(selfcheck.ENV_FAULT, raising=False)


def _qkv(b=1, h=2, n=N, m=M, d=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(dtype) for length in (n, m, m)]


def _mask(h=2, n=N, m=M):
    mask = torch.rand(h, n, m, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[..., 0] = True  # (every row sees a key: the brute force's softmax stays finite)
    return mask


def _brute(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D)) v over the token mask in fp64."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


MASK = _mask()
LAYOUT = BlockLayout.from_dense_mask(MASK, BLOCK, BLOCK)
ENTRIES = {  # name: (call on q, k, v, the token mask of its brute force)
    "dense": (dense_attention, None),
    "block_sparse-triton": (lambda q, k, v: block_sparse_attention(q, k, v, LAYOUT, backend="triton"), MASK),
}


def _leaves(tensors, which=(0, 1, 2), dtype=None):
    """Fresh leaves of ``tensors`` (in ``dtype``, default theirs), those at ``which`` requiring grad."""
    return [t.detach().to(dtype or t.dtype).requires_grad_(i in which) for i, t in enumerate(tensors)]


# ------------------------------------------------------------ the dense self-check sees the lse gradient
def test_the_dense_backward_self_check_fails_when_the_lse_gradient_is_dropped(tmp_path, monkeypatch):
    """Before: the dense backward's self-check fed no lse gradient, so a backward dropping it (round 11's fault:
    ``dense_attention(..., return_lse=True)`` merged with other keys trained on wrong dq and dk) passed it."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.ENV_SELFCHECK, raising=False)
    monkeypatch.setenv(selfcheck.ENV_FAULT, "dense.triton.bwd_dlse")  # (the clean pass: test_selfcheck.py)
    shape = {"head_dim": 64, "block_q": 64, "block_k": 64}
    bad = selfcheck.verdict("dense.triton.bwd", torch.device("cpu"), torch.float32, shape, fresh=True)
    assert not bad["ok"] and bad["error"] > 5 * bad["tolerance"] and "lse" in bad["problem"], bad


# ------------------------------------------------------------ no silent second derivative
@pytest.mark.parametrize("name", list(ENTRIES))
def test_a_second_derivative_through_the_triton_kernels_is_refused_not_zero(name, trusted):
    """Before: a gradient taken with ``create_graph=True`` (a gradient penalty) came back as a constant to autograd:
    ``autograd.grad(penalty + loss, q)`` gave the loss's gradient alone, the penalty's second-order terms dropped
    without a word. Now differentiating it raises, naming the kernel; taking it alone still matches the brute force."""
    fn, mask = ENTRIES[name]
    q, k, v = _leaves(_qkv())
    out = fn(q, k, v)
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)  # (no incoming gradient requires grad)
    ref_q, ref_k, ref_v = _leaves((q, k, v), dtype=torch.float64)
    ref = _brute(ref_q, ref_k, ref_v, mask)
    want, = torch.autograd.grad(ref.sum(), ref_q)
    torch.testing.assert_close(dq.double(), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(dq.pow(2).sum() + out.pow(2).sum(), (q, k))
    with pytest.raises(RuntimeError, match=SECOND):
        (dq.pow(2).sum() + out.sum()).backward()


@pytest.mark.parametrize("backend, gated, raster_order", [("triton", False, False), ("torch", True, False),
                                                         ("triton", False, True)],
                         ids=["triton", "torch-gated", "triton-raster-order"])
def test_vsa_second_derivative_through_a_kernel_or_the_gate_is_refused(backend, gated, raster_order, trusted,
                                                                        fresh_vsa, monkeypatch):
    """Before: VSA's fine branch on the Triton kernels (cube order, or raster order's own training function), and
    the gated coarse branch on either backend, gave their gradients as constants to a second differentiation (the
    last two marked ``once_differentiable``, which tells only where an incoming gradient requires grad, and
    ``autograd.grad`` with respect to q skips its stand-in)."""
    from dit_accel.kernels.block_sparse import gather
    from dit_accel.kernels.vsa import raster

    monkeypatch.setenv(gather.ENV_GATHER, "1" if raster_order else "0")
    calls = []
    monkeypatch.setattr(raster, "raster_train", lambda *a, real=raster.raster_train: calls.append(1) or real(*a))
    grid, tile = ((4, 4, 8), (4, 4, 4)) if raster_order else ((2, 5, 6), (2, 4, 4))
    q, k, v = _leaves(_qkv(h=1, n=128 if raster_order else 60, m=128 if raster_order else 60, d=8))
    gate = torch.rand(q.shape, generator=torch.Generator().manual_seed(2)).requires_grad_(gated) if gated else None
    out = vsa_attention(q, k, v, grid, topk=1, tile=tile, gate=gate, backend=backend)
    assert len(calls) == raster_order
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(dq.pow(2).sum() + out.pow(2).sum(), (q, k))


def test_vsa_twin_without_a_gate_keeps_its_second_derivative(trusted, fresh_vsa):
    """The PyTorch twin's fine and coarse branches are plain torch ops: their second derivative still runs, and
    matches the fp64 brute force's."""
    grid, tile = (3, 5, 6), (2, 4, 4)
    q, k, v = _leaves(_qkv(n=90, m=90, d=8))
    out = vsa_attention(q, k, v, grid, topk=2, tile=tile, backend="torch")
    dq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    got = torch.autograd.grad(dq.pow(2).sum(), (q, k))
    rq, rk, rv = _leaves((q, k, v), dtype=torch.float64)
    ref, _, _ = vsa_reference(rq, rk, rv, grid, count_for(grid, tile, topk=2), tile)
    rdq, = torch.autograd.grad(ref.pow(2).sum(), rq, create_graph=True)
    want = torch.autograd.grad(rdq.pow(2).sum(), (rq, rk))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------ torch.func transforms
@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
def test_dense_attention_under_a_torch_func_transform_says_why_it_cannot_run(transform, trusted):
    """Before: ``torch.func.grad`` or ``vmap`` over ``dense_attention`` raised torch's "In order to use an
    autograd.Function with functorch transforms ..., it must override the setup_context staticmethod", a message
    about dit_accel's internals that says nothing a caller can do."""
    q, k, v = _qkv(n=24, m=24, d=8)
    run = {"grad": lambda: torch.func.grad(lambda a: dense_attention(a, k, v).sum())(q),
           "vmap": lambda: torch.vmap(dense_attention)(q[None], k[None], v[None]),
           "jacrev": lambda: torch.func.jacrev(lambda a: dense_attention(a, k, v))(q)}[transform]
    with pytest.raises(BackendUnavailable, match=r"torch.func transforms.*scaled_dot_product_attention"):
        run()
    torch.testing.assert_close(dense_attention(q, k, v), _brute(q, k, v).float(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ first-order corner cases, found right
@pytest.mark.parametrize("name", list(ENTRIES))
def test_gradients_of_only_q_or_only_v_match_the_brute_force(name, trusted):
    fn, mask = ENTRIES[name]
    for which in (0,), (2,):
        got_in, ref_in = _leaves(_qkv(), which), _leaves(_qkv(), which, torch.float64)
        got = torch.autograd.grad(fn(*got_in).pow(2).sum(), [got_in[i] for i in which])
        want = torch.autograd.grad(_brute(*ref_in, mask).pow(2).sum(), [ref_in[i] for i in which])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def _upstream(kind, shape):
    g = torch.Generator().manual_seed(7)
    if kind == "expanded":  # (B, H, N, D) from one row: stride 0 along every dim but the last
        return torch.randn(1, 1, 1, shape[-1], generator=g).expand(shape)
    return torch.randn(*shape[:2], shape[3], shape[2], generator=g).transpose(-1, -2)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_a_kept_graph_run_twice_with_a_transposed_upstream_gradient_matches_the_brute_force(name, trusted):
    fn, mask = ENTRIES[name]
    q, k, v = _leaves(_qkv())
    out = fn(q, k, v)
    do = _upstream("transposed", out.shape)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), do)
    rq, rk, rv = _leaves((q, k, v), dtype=torch.float64)
    want = torch.autograd.grad(_brute(rq, rk, rv, mask), (rq, rk, rv), do.double())
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_half_inputs_with_an_expanded_fp32_upstream_give_half_gradients_near_the_brute_force(name, trusted):
    fn, mask = ENTRIES[name]
    q, k, v = _leaves(_qkv(dtype=torch.float16))
    out = fn(q, k, v)
    do = _upstream("expanded", out.shape)  # fp32, stride 0: autograd casts it to fp16
    got = torch.autograd.grad(out.float(), (q, k, v), do)
    rq, rk, rv = _leaves((q, k, v), dtype=torch.float64)
    want = torch.autograd.grad(_brute(rq, rk, rv, mask), (rq, rk, rv), do.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.double(), w, atol=2e-2, rtol=2e-2)


def test_sla_triton_gradients_of_only_q_with_a_transposed_upstream_match_the_reference(trusted):
    method = SLAParams(topk=0.5, negligible=0.25, block_q=64, block_k=64)
    q, k, v = _qkv(n=70, m=70, d=8, seed=3)
    proj = make_proj(8)
    q.requires_grad_(True)
    out = sla_attention(q, k, v, method, proj, backend="triton")
    do = _upstream("transposed", out.shape)
    got, = torch.autograd.grad(out, q, do)
    rq = q.detach().clone().requires_grad_(True)
    ref = reference_sla(rq, k, v, brute_force_classes(rq.detach(), k, method), method, proj)[0]
    want, = torch.autograd.grad(ref, rq, do)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ VSA: cubes, top-k, gates, batches
@pytest.mark.parametrize("grid, tile, topk, gated", [((3, 5, 6), (2, 4, 4), 1, True), ((2, 5, 6), (2, 4, 4), 1000, False),
                                                     ((1, 3, 5), (4, 4, 4), 1, True)],
                         ids=["ragged-top1-gate", "ragged-all-no-gate", "one-partial-cube-gate"])
def test_vsa_triton_matches_the_brute_force_per_sample(grid, tile, topk, gated, trusted, fresh_vsa):
    """Two samples with their own selections (checked to differ on the 8-cube grid), on grids that are no
    whole number of cubes, top-k at 1 and above the cube count; forward, selection and every gradient."""
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, n, 8, generator=g).requires_grad_(True) for _ in range(3))
    gate = torch.rand(2, 1, n, 8, generator=g).requires_grad_(True) if gated else None
    out, sel = vsa_attention(q, k, v, grid, topk=topk, tile=tile, gate=gate, backend="triton", return_selection=True)
    inputs = (q, k, v) + ((gate,) if gated else ())
    leaves = _leaves(inputs, range(len(inputs)), torch.float64)
    count = count_for(grid, tile, topk=topk)
    ref, ref_sel, _ = vsa_reference(*leaves[:3], grid, count, tile, gate=leaves[3] if gated else None)
    assert torch.equal(sel, ref_sel)
    if grid == (3, 5, 6):  # (8 cubes, 1 kept: the two samples chose differently)
        assert not torch.equal(sel[0], sel[1])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    do = _upstream("transposed", out.shape)
    got = torch.autograd.grad(out, inputs, do)
    want = torch.autograd.grad(ref, leaves, do.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ merge_attention: rows empty on both sides
def test_merging_three_key_sets_gives_rows_empty_in_the_first_two_a_zero_lse_gradient():
    """Before: a row empty on both sides of a merge (lse -inf twice) gave ``lse_a`` and ``lse_b`` a NaN gradient as
    soon as the merged lse was used (merged again with a third key set, or in a loss): ``log(0)``'s infinite slope
    times the zero weights. Checked against the fp64 softmax over the three parts' stacked log-sum-exps."""
    from dit_accel.kernels import merge_attention

    g = torch.Generator().manual_seed(9)
    outs = [torch.randn(1, 2, 6, 5, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3)]
    lses = [torch.randn(1, 2, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    for lse in lses[:2]:
        lse[..., :2] = float("-inf")  # (rows 0 and 1 see no key of the first two sets)
    lses = [lse.requires_grad_(True) for lse in lses]
    o_ab, lse_ab = merge_attention(outs[0], lses[0], outs[1], lses[1])
    o, lse = merge_attention(o_ab, lse_ab, outs[2], lses[2])
    do, dlse = torch.randn(o.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                 dtype=torch.float64)
    got = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), outs + lses)
    weights = torch.softmax(torch.stack(lses), 0)
    ref_o = (weights[..., None] * torch.stack(outs)).sum(0)
    ref_lse = torch.logsumexp(torch.stack(lses), 0)
    want = torch.autograd.grad((ref_o * do).sum() + (ref_lse * dlse).sum(), outs + lses)
    torch.testing.assert_close(o, ref_o)
    for a, w in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a, w)
    assert torch.equal(got[3][..., :2], torch.zeros_like(got[3][..., :2]))
