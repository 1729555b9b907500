"""SLA's pooling kernel (kernels/sla/pool.py, TRITON_INTERPRET=1 on CPU) and the Triton backend's classification.

The pooled means are checked against a float64 reference written here (block by block over the real tokens);
the critical and negligible sets against a brute-force rank rule written here, on the very scores the
classification returns, with ties (duplicated blocks) and ragged lengths; and against the PyTorch twin
bit for bit on integer inputs, whose sums are exact (so both poolings give the same values).
"""
import os

import pytest
import torch

from dit_accel.kernels.sla import sla_classify
from dit_accel.kernels.sla.common import SLAParams, _pooled
from dit_accel.kernels.sla.ops import sla_triton_classify
from dit_accel.kernels.sla.pool import pool_blocks
from dit_accel.methods import SLA

# On CUDA where there is one (the cross-program centring then really runs concurrently), else the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter on CPU tensors")


def _reference_pool(x: torch.Tensor, block: int, centre: bool) -> torch.Tensor:
    """float64 means over the real tokens of each block of ``x`` (B, H, N, D); ``centre``: of x - mean(x)."""
    x = x.cpu().double()
    if centre:
        x = x - x.mean(dim=-2, keepdim=True)
    n = x.shape[-2]
    return torch.stack([x[:, :, s:min(s + block, n)].mean(-2) for s in range(0, n, block)], dim=-2)


def _inputs(b, h, nq, nk, d, dtype, layout, gen):
    if layout == "bnhd":  # (B, N, H, D) storage seen as (B, H, N, D), as Diffusers' processors pass it
        q = torch.randn(b, nq, h, d, generator=gen).transpose(1, 2)
        k = torch.randn(b, nk, h, d, generator=gen).transpose(1, 2)
    elif layout == "d-strided":  # every other column: no unit stride anywhere
        q = torch.randn(b, h, nq, 2 * d, generator=gen)[..., ::2]
        k = torch.randn(b, h, nk, 2 * d, generator=gen)[..., ::2]
    else:
        q, k = torch.randn(b, h, nq, d, generator=gen), torch.randn(b, h, nk, d, generator=gen)
    k = k + 0.75  # an offset for the centring to remove
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


POOL_CASES = [  # b, h, nq, nk, d, block_q, layout
    (1, 2, 256, 256, 64, 64, "contiguous"),
    (2, 3, 130, 257, 40, 128, "bnhd"),
    (1, 2, 63, 500, 80, 64, "d-strided"),
    (1, 1, 700, 65, 128, 128, "contiguous"),
    (1, 1, 1, 1, 16, 64, "contiguous"),
]
POOL_IDS = ["n256-whole", "q130-k257-bq128-bnhd-d40", "q63-k500-dstrided-d80", "q700-k65-bq128-d128", "one-token"]
TOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}  # fp32 sums of the same rounded inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("b,h,nq,nk,d,block_q,layout", POOL_CASES, ids=POOL_IDS)
def test_pool_kernel_matches_float64_reference(b, h, nq, nk, d, block_q, layout, dtype):
    gen = torch.Generator().manual_seed(nq * 1000 + nk)
    q, k = _inputs(b, h, nq, nk, d, dtype, layout, gen)
    qb, kb = pool_blocks(q, k, block_q, 64)
    assert qb.dtype == kb.dtype == torch.float32
    assert qb.shape == (b, h, -(-nq // block_q), d) and kb.shape == (b, h, -(-nk // 64), d)
    torch.testing.assert_close(qb.cpu().double(), _reference_pool(q, block_q, False), atol=TOL[dtype], rtol=1e-5)
    torch.testing.assert_close(kb.cpu().double(), _reference_pool(k, 64, True), atol=TOL[dtype], rtol=1e-5)


def test_pool_kernel_refuses_block_sizes_it_would_not_cover():
    q = torch.randn(1, 1, 100, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiples of 64"):
        pool_blocks(q, q, 32, 64)


def test_pool_kernel_is_deterministic_and_leaves_no_state():
    """Two calls give the same bits (the centring adds the partial sums in program order; the tickets are
    fresh per call)."""
    gen = torch.Generator().manual_seed(1)
    q, k = _inputs(1, 2, 1100, 1100, 64, torch.float16, "contiguous", gen)  # 18 blocks: 5 programs per head
    first = pool_blocks(q, k, 64, 64)
    second = pool_blocks(q, k, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------ classification
def _brute_force_sets(scores: torch.Tensor, n_crit: int, n_neg: int):
    """Per row of ``scores`` [..., nK]: critical = the n_crit highest (a tie goes to the lower index),
    negligible = the n_neg lowest (a tie goes to the higher index), each ascending; by counting, per key
    block, the blocks that beat it."""
    rows = scores.reshape(-1, scores.shape[-1]).tolist()
    crit, neg = [], []
    for row in rows:
        n = len(row)
        beats_high = [sum(1 for i in range(n) if row[i] > row[j] or (row[i] == row[j] and i < j)) for j in range(n)]
        beats_low = [sum(1 for i in range(n) if row[i] < row[j] or (row[i] == row[j] and i > j)) for j in range(n)]
        crit.append([j for j in range(n) if beats_high[j] < n_crit])
        neg.append([j for j in range(n) if beats_low[j] < n_neg])
    shape = scores.shape[:-1]
    return (torch.tensor(crit, dtype=torch.int64).reshape(*shape, n_crit),
            torch.tensor(neg, dtype=torch.int64).reshape(*shape, n_neg))


def _with_ties(q, k, block_q):
    """Copies of whole query blocks and key blocks (the first onto the third, the second onto the last whole
    one): equal rows of pooled values, so equal scores, whatever the rounding."""
    q, k = q.clone(), k.clone()
    k[:, :, 2 * 64:3 * 64] = k[:, :, 0:64]
    last = (k.shape[-2] // 64 - 1) * 64
    k[:, :, last:last + 64] = k[:, :, 64:128]
    q[:, :, 2 * block_q:3 * block_q] = q[:, :, 0:block_q]
    return q, k


CLASSIFY_CASES = [  # nq, nk, method kwargs
    (512, 512, dict(topk=0.25, negligible=0.25)),
    (500, 707, dict(topk=0.3, negligible=0.2)),
    (640, 330, dict(topk=0.4, negligible=0.4, block_q=128)),
    (300, 300, dict(topk=0.05)),
    (300, 450, dict(topk=0.5, negligible=0.1, rounding="floor")),
]
CLASSIFY_IDS = ["n512", "q500-k707-ragged", "q640-k330-bq128", "topk-one-block", "floor"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("nq,nk,kw", CLASSIFY_CASES, ids=CLASSIFY_IDS)
def test_fused_classification_follows_the_rank_rule_with_ties(nq, nk, kw, dtype):
    method = SLAParams.of(SLA(**kw))
    gen = torch.Generator().manual_seed(nq + nk)
    q, k = _with_ties(*_inputs(2, 2, nq, nk, 64, dtype, "contiguous", gen), method.block_q)
    blocks = sla_triton_classify(q, k, method)
    n_k = -(-nk // 64)
    n_crit, n_neg = blocks.critical.shape[-1], blocks.negligible.shape[-1]
    crit, neg = _brute_force_sets(blocks.scores, n_crit, n_neg)
    assert blocks.critical.dtype == torch.int32  # the fused kernels' block lists
    assert torch.equal(blocks.critical.long().cpu(), crit)
    assert torch.equal(blocks.negligible.long().cpu(), neg)
    # The ties are there: the copied key block scores alike in every row (the copy onto the last whole block
    # may not: the matmul may round a trailing column differently).
    assert torch.equal(blocks.scores[..., 0], blocks.scores[..., 2])
    # ... and the scores are the pooled ones (float64 reference).
    ref = _reference_pool(q, method.block_q, False) @ _reference_pool(k, 64, True).transpose(-1, -2)
    torch.testing.assert_close(blocks.scores.cpu().double(), ref, atol=1e-5, rtol=1e-5)
    assert blocks.scores.shape[-1] == n_k


@pytest.mark.parametrize("nq,nk,kw", CLASSIFY_CASES, ids=CLASSIFY_IDS)
def test_fused_classification_equals_the_twin_bit_for_bit_on_exact_inputs(nq, nk, kw):
    """Integer inputs in [-2, 2]: every sum is exact and every mean one correctly rounded division, so the
    kernel's pooling and the twin's give the same bits. With whole blocks (n512) the pooled values are dyadic
    and every score an exact sum, so the selection kernel's scores (its own fp32 dot) and the sets equal the
    twin's too (plenty of ties); with a ragged block the means are rounded, the two matmuls may round a sum
    differently, and the sets follow the rank rule on the kernel's own scores."""
    method = SLA(**kw)
    params = SLAParams.of(method)
    gen = torch.Generator().manual_seed(nq * 7 + nk)
    q = torch.randint(-2, 3, (2, 2, nq, 64), generator=gen).float().to(DEVICE)
    k = torch.randint(-2, 3, (2, 2, nk, 64), generator=gen).float().to(DEVICE)
    pooled, twin_pooled = pool_blocks(q, k, params.block_q, params.block_k), _pooled(q, k, params)
    assert all(torch.equal(a, b) for a, b in zip(pooled, twin_pooled))
    fused = sla_triton_classify(q, k, params)
    twin = sla_classify(q, k, method)
    if nq % params.block_q == 0 and nk % params.block_k == 0:
        assert torch.equal(fused.scores, twin.scores)
        assert torch.equal(fused.critical.long(), twin.critical)
        assert torch.equal(fused.negligible.long(), twin.negligible)
        assert torch.equal(fused.classes, twin.classes)
    else:
        torch.testing.assert_close(fused.scores, twin.scores, atol=1e-6, rtol=1e-6)
        crit, neg = _brute_force_sets(fused.scores, fused.critical.shape[-1], fused.negligible.shape[-1])
        assert torch.equal(fused.critical.long().cpu(), crit)
        assert torch.equal(fused.negligible.long().cpu(), neg)


def test_fused_classification_reads_q_and_k_once():
    """Classification in one pass over q and k: under a dispatch mode (which takes the custom-op path) the only
    operator that receives q or k is the pooling op; everything after works on the pooled (nQ x D, nK x D)
    values."""
    from tests.utils import dispatched

    q, k = torch.randn(1, 2, 300, 64, device=DEVICE), torch.randn(1, 2, 300, 64, device=DEVICE)
    seen = []

    def record(func, args, kwargs, out):
        if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in (
                q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr()) for a in (*args, *kwargs.values())):
            seen.append(str(func))

    with dispatched(record):
        blocks = sla_triton_classify(q, k, SLAParams.of(SLA(topk=0.3, negligible=0.2)))
    assert seen == ["dit_accel.sla_pool.default"]
    assert torch.equal(blocks.critical.long(), sla_classify(q, k, SLA(topk=0.3, negligible=0.2)).critical)


def test_pool_op_fake_impl_and_schema():
    q, k = torch.randn(1, 2, 130, 64, device=DEVICE), torch.randn(1, 2, 257, 64, device=DEVICE)
    torch.library.opcheck(torch.ops.dit_accel.sla_pool.default, (q, k, 64, 64),
                          test_utils=("test_schema", "test_faketensor"))
