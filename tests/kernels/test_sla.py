"""SLA: classification, PyTorch twin and fused Triton kernel against an independent fp32 reference.

The reference (tests/kernels/sla_reference.py) is written from METHODS.md directly: dense token masks expanded from the
block classes, masked softmax attention, plain (quadratic) linear attention with the class mask.
The Triton cases run under TRITON_INTERPRET=1 on CPU (slow: small N, few heads).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import BackendUnavailable
from dit_accel.kernels.sla import (CRITICAL, MARGINAL, NEGLIGIBLE, sla_attention, sla_block_counts, sla_classify,
                                   sla_density)
from dit_accel.methods import SLA
from tests.kernels.sla_reference import brute_force_classes, make_proj, make_qkv, reference_sla
from tests.utils import largest_output


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("nq,nk,topk,negl,bq", [
    (63, 63, 0.3, 0.0, 64), (130, 257, 0.4, 0.2, 64), (257, 257, 0.2, 0.4, 128), (257, 130, 0.5, 0.5, 64),
    (256, 320, 0.4, 0.0, 64), (256, 256, 0.25, 0.5, 128),
], ids=["n63", "n130-k257-negl", "n257-bq128-negl", "n257-k130-half", "whole-blocks", "whole-blocks-negl"])
def test_classification_matches_brute_force(nq, nk, topk, negl, bq):
    method = SLA(topk=topk, negligible=negl, block_q=bq)
    q, k, _ = make_qkv(2, 2, nq, 16, nk=nk)
    if nq % bq == 0:  # as Diffusers lays them out: (B, S, H, D) memory seen as (B, H, S, D)
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    blocks = sla_classify(q, k, method)
    expect = brute_force_classes(q, k, method)
    assert torch.equal(blocks.classes, expect)
    n_kb, n_crit, n_neg, n_marg = sla_block_counts(nk, method)
    assert blocks.critical.shape[-1] == n_crit and blocks.negligible.shape[-1] == n_neg
    assert ((blocks.classes == CRITICAL).sum(-1) == n_crit).all()
    assert ((blocks.classes == NEGLIGIBLE).sum(-1) == n_neg).all()
    assert ((blocks.classes == MARGINAL).sum(-1) == n_marg).all()
    assert torch.equal(blocks.classes.gather(-1, blocks.critical.long()), torch.full_like(blocks.critical, 1,
                                                                                          dtype=torch.int8))
    assert (blocks.critical.diff(dim=-1) > 0).all()  # ascending, distinct
    assert torch.equal(torch.sort(blocks.marginal, -1).values, blocks.marginal)


@pytest.mark.parametrize("n", [320, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_classification_pools_in_fp32(dtype, n):
    """Half-precision q, k (head-major views of token-major memory, whole and ragged blocks) are pooled with
    fp32 accumulation, without fp32 copies: the same classes and scores as their fp32 values give."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, n, 3, 64, generator=g).transpose(1, 2).to(dtype)
    k = (torch.randn(2, n, 3, 64, generator=g) + 0.5 * torch.randn(2, 1, 3, 64, generator=g)).transpose(1, 2).to(dtype)
    method = SLA(topk=0.3, negligible=0.2)
    half, full = sla_classify(q, k, method), sla_classify(q.float(), k.float(), method)
    assert half.scores.dtype == torch.float32
    torch.testing.assert_close(half.scores, full.scores, atol=1e-6, rtol=1e-6)
    assert torch.equal(half.critical, full.critical) and torch.equal(half.negligible, full.negligible)


def test_classification_ties_are_deterministic():
    method = SLA(topk=0.25, negligible=0.25)
    q = torch.ones(1, 1, 64, 8)
    k = torch.ones(1, 1, 256, 8)  # every block scores the same
    blocks = sla_classify(q, k, method)
    assert blocks.critical.tolist() == [[[[0]]]]
    assert blocks.negligible.tolist() == [[[[3]]]]


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65])
def test_at_least_one_critical_block(n):
    method = SLA(topk=0.01)
    q, k, _ = make_qkv(1, 2, n, 8)
    blocks = sla_classify(q, k, method)
    assert blocks.critical.shape[-1] == 1
    assert ((blocks.classes == CRITICAL).sum(-1) == 1).all()
    assert sla_density(n, method) == 1 / math.ceil(n / 64)


def test_density():
    assert sla_density(32760, SLA(topk=0.05)) == 26 / 512
    assert sla_density(64 * 30, SLA(topk=0.1)) == 3 / 30  # no float round-up to 4
    assert sla_density(100, SLA(topk=1.0)) == 1.0


# ----------------------------------------------------------------------------- twin vs reference
TWIN_CASES = [
    # (nq, nk, d, method kwargs)
    (63, 63, 64, dict(topk=0.5)),
    (130, 130, 80, dict(topk=0.4, negligible=0.3)),
    (257, 257, 64, dict(topk=0.2, negligible=0.4, block_q=128)),
    (130, 257, 64, dict(topk=0.3, feature_map="elu")),
    (257, 130, 80, dict(topk=0.3, feature_map="relu", negligible=0.3)),
    (257, 257, 64, dict(topk=0.3, negligible=0.3, linear_tokens="all")),
    (320, 320, 12, dict(topk=0.4)),  # whole blocks (no padding: views, one slice), the tiny Wan's head dim
]
TWIN_IDS = ["n63", "n130-d80-negl", "n257-bq128-negl", "q130-k257-elu", "q257-k130-d80-relu", "n257-all",
            "n320-whole-blocks"]


@pytest.mark.parametrize("nq,nk,d,kw", TWIN_CASES, ids=TWIN_IDS)
def test_twin_forward_backward_matches_reference(nq, nk, d, kw):
    method = SLA(**kw)
    q, k, v = make_qkv(1, 2, nq, d, nk=nk, requires_grad=True)
    proj = make_proj(d)
    o_s, lse, o_lp, info = sla_attention(q, k, v, method, proj, backend="torch", return_parts=True)
    ref, ref_s, ref_lse, ref_lp = reference_sla(q, k, v, info["blocks"].classes, method, proj)
    torch.testing.assert_close(o_s, ref_s, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(o_lp, ref_lp, atol=2e-5, rtol=1e-4)
    do = torch.randn_like(ref)
    params = [q, k, v, proj.weight, proj.bias]
    got = torch.autograd.grad(((o_s + o_lp) * do).sum() + lse.sum(), params)
    want = torch.autograd.grad((ref * do).sum() + ref_lse.sum(), params)
    for name, g, w in zip(["dq", "dk", "dv", "dW", "db"], got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("nq,nk,d,kw", TWIN_CASES, ids=TWIN_IDS)
def test_twin_fused_forward_matches_reference_and_simple_path(nq, nk, d, kw):
    """Without autograd the twin's sparse branch runs ATen's flash kernel on gathered blocks (in
    slices: a tiny slice budget forces several); it matches the reference and the simple path."""
    from dit_accel.kernels.sla import naive as sla_naive

    method = SLA(**kw)
    q, k, v = make_qkv(1, 2, nq, d, nk=nk)
    proj = make_proj(d)
    with torch.no_grad():
        o_s, lse, o_lp, info = sla_attention(q, k, v, method, proj, backend="torch", return_parts=True)
        ref, ref_s, ref_lse, ref_lp = reference_sla(q, k, v, info["blocks"].classes, method, proj)
        crit = info["blocks"].critical
        simple = sla_naive._sparse_branch_torch(q, k, v, crit, method.block_q, method.block_k, d ** -0.5)
        sliced = sla_naive._sparse_branch_fused(q, k, v, crit, method.block_q, method.block_k, d ** -0.5,
                                                chunk_bytes=1)
    torch.testing.assert_close(o_s, ref_s, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(o_lp, ref_lp, atol=2e-5, rtol=1e-4)
    for got, want in zip(sliced, simple):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["tokens-major", "contiguous"])
@pytest.mark.parametrize("nq,nk", [(320, 320), (128, 320)])
def test_twin_one_pass_on_whole_blocks_matches_simple_path(layout, nq, nk, batch, monkeypatch):
    """Whole blocks that fit one slice run in one flash call over (batch x query block, heads), gathering
    the critical blocks straight from q, k, v of any strides: batch 1 and 2, 3 heads, against the simple path
    (batch 1 with tokens-major inputs takes every single-view path, batch 2 with contiguous ones none).
    Inputs laid out as the processors make them ((B, N, H, D) memory) give the output in that layout."""
    from dit_accel.kernels.sla import naive as sla_naive

    method, d = SLA(topk=0.4), 12
    q, k, v = make_qkv(batch, 3, nq, d, nk=nk)
    if layout == "tokens-major":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    passes = []
    one_pass = sla_naive._one_pass
    monkeypatch.setattr(sla_naive, "_one_pass", lambda *a: passes.append(1) or one_pass(*a))
    with torch.no_grad():
        crit = sla_classify(q, k, method).critical
        o, lse = sla_naive._sparse_branch_fused(q, k, v, crit, 64, 64, d ** -0.5)
        o_ref, lse_ref = sla_naive._sparse_branch_torch(q, k, v, crit, 64, 64, d ** -0.5)
    assert passes == [1]
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=1e-4)
    assert o.shape == (batch, 3, nq, d) and lse.shape == (batch, 3, nq)
    if layout == "tokens-major":
        assert o.transpose(1, 2).is_contiguous()


def test_twin_fused_branch_shares_slices_between_threads():
    """With two torch threads and enough slices the fused sparse branch runs them in two threads:
    the same result as the simple path, and the caller's thread count is restored."""
    from dit_accel.kernels.block_sparse import naive as bs_naive
    from dit_accel.kernels.sla import naive as sla_naive

    method = SLA(topk=0.25)
    q, k, v = make_qkv(1, 2, 2048, 32)
    with torch.no_grad():
        info = sla_attention(q, k, v, method, make_proj(32), backend="torch", return_parts=True)[3]
        crit = info["blocks"].critical
        simple = sla_naive._sparse_branch_torch(q, k, v, crit, 64, 64, 32 ** -0.5)
        calls = []
        threads = torch.get_num_threads()
        original = bs_naive.in_threads
        sla_naive.in_threads = lambda run, groups: calls.append(len(groups)) or original(run, groups)
        torch.set_num_threads(2)
        try:
            shared = sla_naive._sparse_branch_fused(q, k, v, crit, 64, 64, 32 ** -0.5, chunk_bytes=1)
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(threads)
            sla_naive.in_threads = original
    assert calls == [2]
    for got, want in zip(shared, simple):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_twin_topk_one_zero_proj_is_dense_attention():
    q, k, v = make_qkv(2, 2, 130, 64)
    proj = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    o = sla_attention(q, k, v, SLA(topk=1.0), proj, backend="torch")
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)


def test_twin_without_proj_is_top_k_sparse_attention():
    q, k, v = make_qkv(1, 2, 257, 64)
    method = SLA(topk=0.4)
    o, o_s, _lse, o_lp, info = (sla_attention(q, k, v, method, backend="torch"),
                               *sla_attention(q, k, v, method, backend="torch", return_parts=True))
    torch.testing.assert_close(o, o_s)
    assert not o_lp.any()
    assert info["density"] == sla_density(257, method)


def test_zero_projection_skips_the_linear_branch_exactly():
    """A projection that is still zero adds exactly nothing, so inference does not compute the linear branch;
    a write through ``.data`` (no version bump) is seen at once, and training keeps the branch (its gradient)."""
    from dit_accel.kernels.sla import is_inert

    q, k, v = make_qkv(1, 2, 256, 32)
    method = SLA(topk=0.25)  # three marginal blocks per query block
    proj = torch.nn.Linear(32, 32)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    with torch.no_grad():
        assert is_inert(proj)
        o_s, _, o_lp, info = sla_attention(q, k, v, method, proj, backend="torch", return_parts=True)
        assert not info["linear"] and not o_lp.any()
        assert torch.equal(sla_attention(q, k, v, method, proj, backend="torch"),
                           sla_attention(q, k, v, method, None, backend="torch"))
        proj.weight.data.copy_(make_proj(32).weight)  # bypasses the version counter
        assert not is_inert(proj)
        o, ref_s, ref_lp = (sla_attention(q, k, v, method, proj, backend="torch"),
                            *reference_sla(q, k, v, info["blocks"].classes, method, proj)[1::2])
    torch.testing.assert_close(o, ref_s + ref_lp, atol=2e-5, rtol=1e-4)
    assert ref_lp.abs().max() > 1e-3  # the branch matters: skipping it now would fail above
    torch.nn.init.zeros_(proj.weight)
    assert is_inert(proj) is False  # grad enabled and the projection trains: O_l is needed for dW
    sla_attention(q, k, v, method, proj, backend="torch").sum().backward()
    assert proj.weight.grad.abs().max() > 0


def test_inert_projections_agrees_with_is_inert_one_by_one():
    """The hooks' one-pass read of every layer's projection gives what ``is_inert`` gives for each: zero weight and
    bias only, a NaN or a subnormal value counts, no bias is fine, and modules other than a CPU ``nn.Linear`` or
    ones whose gradient is wanted are never inert."""
    from dit_accel.kernels.sla import inert_projections, is_inert

    def linear(weight=0.0, bias=0.0, with_bias=True):
        proj = torch.nn.Linear(4, 4, bias=with_bias)
        with torch.no_grad():
            proj.weight.fill_(0.0)
            proj.weight[1, 2] = weight
            if with_bias:
                proj.bias.fill_(0.0)
                proj.bias[3] = bias
        return proj

    projs = [linear(), linear(weight=1.0), linear(bias=-2.0), linear(with_bias=False), linear(1e-42, with_bias=False),
             linear(bias=float("nan")), torch.nn.Sequential(linear()), linear(weight=3.0, with_bias=False), linear()]
    with torch.no_grad():
        want = [is_inert(p) for p in projs]
        assert want == [True, False, False, True, False, False, False, False, True]
        assert inert_projections(projs) == want
        assert inert_projections([]) == []
    assert inert_projections(projs) == [False] * len(projs)  # grad enabled and every weight trains


def test_gpu_projections_are_read_in_one_pass_with_the_cpu_read_s_answers(monkeypatch):
    """Pipelines on a GPU skip a still-zero projection's linear branch too (the H200 ran training-free SLA with the
    branch computed slower than dense attention): ``inert_projections`` reads every non-CPU projection with one
    reduction per tensor and one synchronisation (``_all_zero_on_device``), bit for bit as the CPU read (-0.0
    and NaN non-zero), and not at all while a CUDA graph is captured."""
    from dit_accel.kernels.sla import api, inert_projections

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            zero, neg_zero, nan, tiny = (torch.zeros(6, 6, dtype=dtype) for _ in range(4))
            neg_zero[1, 1], nan[2, 3], tiny[0, 5] = -0.0, float("nan"), 1e-3
            pairs = [(zero, torch.zeros(6, dtype=dtype)), (zero, None), (neg_zero, None), (zero, nan[2]),
                     (nan, None), (tiny, torch.zeros(6, dtype=dtype)), (zero, tiny[0])]
            want = [api._all_zero(w) and (b is None or api._all_zero(b)) for w, b in pairs]
            assert want == [True, True, False, False, False, False, False]
            assert api._all_zero_on_device(pairs) == want
        # Values that cannot be read (a meta tensor) are not inert: the branch runs.
        meta = torch.nn.Linear(4, 4, device="meta")
        assert api._all_zero_on_device([(meta.weight, meta.bias)]) == [False]
        # Routing: non-CPU projections go to the one-pass read (a meta projection stands in for a GPU one here).
        seen = []
        monkeypatch.setattr(api, "_all_zero_on_device", lambda pairs: seen.append(len(pairs)) or [True] * len(pairs))
        cpu = torch.nn.Linear(4, 4)
        torch.nn.init.zeros_(cpu.weight), torch.nn.init.zeros_(cpu.bias)
        assert inert_projections([cpu, meta, meta, torch.nn.Sequential()]) == [True, True, True, False]
        assert seen == [2]
        monkeypatch.setattr(api, "_capturing", lambda: True)
        assert inert_projections([cpu, meta]) == [True, False] and seen == [2]  # capturing: no read, the branch runs
    assert inert_projections([meta]) == [False]  # grad enabled and the projection trains


def test_inert_reads_the_values_of_every_call_whatever_wrote_them():
    """``is_inert`` reads values through a view kept per tensor: writes in place (through ``.data`` too), a swapped
    storage, a replaced parameter and half precision are all seen; a -0.0 counts as non-zero (the branch runs,
    which is exact); and the kept views leave with their tensors."""
    import gc

    from dit_accel.kernels.sla import api, inert_projections, is_inert

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            proj = torch.nn.Linear(8, 8).to(dtype)
            assert not is_inert(proj)
            proj.weight.zero_()
            proj.bias.data.zero_()  # no version bump
            assert is_inert(proj), dtype
            proj.weight.data[3, 5] = 1e-3  # no version bump either
            assert not is_inert(proj), dtype
            proj.weight.data = torch.zeros(8, 8, dtype=dtype)  # a new storage
            assert is_inert(proj), dtype
            proj.weight[0, 0] = -0.0
            assert not is_inert(proj), dtype
            proj.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=dtype))
            assert inert_projections([proj]) == [True]
            proj.bias.data[7] = float("nan")
            assert inert_projections([proj]) == [False]
        complex_zero = torch.zeros(4, dtype=torch.complex64)  # read by torch (numpy refuses conjugate views)
        assert api._all_zero(complex_zero) and api._all_zero(complex_zero.conj())
        complex_zero[2] = 1j
        assert not api._all_zero(complex_zero) and not api._all_zero(complex_zero.conj())
        held = len(api._BIT_VIEWS)
        del proj
        gc.collect()
        assert len(api._BIT_VIEWS) < held


# ----------------------------------------------------------------------------- validation
def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(1, 1, 64, 16)
    with pytest.raises(TypeError, match="SLA config"):
        sla_attention(q, k, v, "sla")
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        sla_attention(q[0], k[0], v[0], SLA())
    with pytest.raises(TypeError, match="share one dtype"):
        sla_attention(q, k.half(), v, SLA())
    with pytest.raises(ValueError, match="same shape"):
        sla_attention(q, k, v[:, :, :32], SLA())
    with pytest.raises(ValueError, match="Linear\\(16, 16\\)"):
        sla_attention(q, k, v, SLA(), torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match="backend"):
        sla_attention(q, k, v, SLA(), backend="cuda")
    with pytest.raises(TypeError, match="int64"):
        sla_attention(q.long(), k.long(), v.long(), SLA())


def test_backend_selection(monkeypatch):
    q, k, v = make_qkv(1, 1, 64, 16)
    method = SLA(topk=0.5)
    assert sla_attention(q, k, v, method, backend="auto", return_parts=True)[3]["backend"] == "torch"  # CPU
    assert sla_attention(q, k, v, method, backend="flex", return_parts=True)[3]["backend"] == "torch"
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "triton")
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU tensors reach Triton only through its interpreter
        assert sla_attention(q, k, v, method, backend="auto", return_parts=True)[3]["backend"] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="backend 'triton' cannot run.*backend='torch'"):
        sla_attention(q, k, v, method, backend="triton")
    q2, k2, v2 = make_qkv(1, 1, 64, 160)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match="head dim 160"):
        sla_attention(q2, k2, v2, method, backend="triton")


def test_twin_never_materialises_n_by_n():
    n, d = 8192, 16
    q, k, v = make_qkv(1, 1, n, d, requires_grad=True)
    largest = largest_output(lambda: sla_attention(q, k, v, SLA(topk=0.05, negligible=0.1), make_proj(d),
                                                   backend="torch").sum().backward())
    assert largest < n * n // 8, largest  # gathered blocks: ~ n * 7 * 64
