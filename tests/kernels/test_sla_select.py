"""SLA's selection kernel (kernels/sla/select.py, TRITON_INTERPRET=1 on CPU): the pooled scores and both block sets
in one launch.

The sets are checked against a brute-force rank rule written here, applied to the kernel's own scores (so a
matmul's rounding cannot hide a selection bug): random rows, integer-valued rows full of ties, ragged key-block
counts, one critical block, all blocks critical, with and without negligible blocks. The selection's order
(``-0.0 == +0.0``, NaN above everything, infinities) is checked on given scores through the kernel's own
``_keys`` / ``_top`` helpers. The scores against fp32 torch, and on small-integer inputs (exact sums) the whole
SLABlocks against the twin's ``classify_pooled`` bit for bit; end to end ``sla_attention`` through the Triton
backend against the twin; the op under torch.compile and opcheck; and the twin's selection past the bound.
"""
import math
import os

import pytest
import torch
import triton
import triton.language as tl

from dit_accel.kernels.sla import sla_attention, sla_classify
from dit_accel.kernels.sla import select as sel
from dit_accel.kernels.sla.common import SLAParams, classify_pooled, sla_block_counts
from dit_accel.kernels.sla.ops import sla_triton_classify
from dit_accel.kernels.sla.select import select_blocks
from dit_accel.methods import SLA
from tests.kernels.sla_reference import make_proj, make_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton interpreter on CPU tensors"),
              pytest.mark.usefixtures("one_thread")]


def _greater(a: float, b: float) -> bool:
    """The descending sort's order: NaN above everything (NaNs equal), -0.0 == +0.0 (Python's ==)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and not math.isnan(b)
    return a > b


def _equal(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _brute_force_sets(scores: torch.Tensor, n_crit: int, n_neg: int):
    """Per row of ``scores`` [..., nK]: ``rank_j = #{i : s_i > s_j or (s_i == s_j and i < j)}``; critical iff
    ``rank_j < n_crit``, negligible iff ``rank_j >= nK - n_neg``; each ascending (int64)."""
    crit, neg = [], []
    for row in scores.reshape(-1, scores.shape[-1]).tolist():
        n = len(row)
        rank = [sum(1 for i in range(n) if _greater(row[i], row[j]) or (_equal(row[i], row[j]) and i < j))
                for j in range(n)]
        crit.append([j for j in range(n) if rank[j] < n_crit])
        neg.append([j for j in range(n) if rank[j] >= n - n_neg])
    shape = scores.shape[:-1]
    return (torch.tensor(crit, dtype=torch.int64).reshape(*shape, n_crit),
            torch.tensor(neg, dtype=torch.int64).reshape(*shape, n_neg))


def _pooled(b, h, nq, nk, d, kind, gen, layout="contiguous"):
    """fp32 ``(qb, kb)``: ``"random"`` normal values, ``"ties"`` integers in [-1, 1] (exact scores, many equal)."""
    if kind == "ties":
        qb = torch.randint(-1, 2, (b, h, nq, d), generator=gen).float()
        kb = torch.randint(-1, 2, (b, h, nk, d), generator=gen).float()
    else:
        qb, kb = torch.randn(b, h, nq, d, generator=gen), torch.randn(b, h, nk, d, generator=gen)
    if layout == "bnhd":  # (B, N, H, D) storage seen as (B, H, N, D); kb with every other column
        qb = qb.transpose(1, 2).contiguous().transpose(1, 2)
        kb = torch.stack([kb, torch.zeros_like(kb)], -1).flatten(-2)[..., ::2]
    return qb.to(DEVICE), kb.to(DEVICE)


SELECT_CASES = [  # b, h, nq, nk, d, n_crit, n_neg, kind, layout
    (1, 2, 37, 45, 64, 9, 11, "random", "contiguous"),
    (2, 1, 20, 33, 40, 5, 4, "ties", "contiguous"),
    (1, 1, 17, 100, 8, 1, 0, "ties", "bnhd"),
    (1, 2, 16, 7, 16, 7, 0, "random", "contiguous"),
    (1, 1, 5, 9, 4, 3, 6, "ties", "contiguous"),
    (1, 1, 33, 130, 128, 20, 30, "random", "bnhd"),
    (1, 1, 3, 1, 16, 1, 0, "random", "contiguous"),
]
SELECT_IDS = ["k45-random-neg", "k33-ties-neg", "k100-ties-one-crit-strided", "k7-all-critical", "k9-d4-ties-crit+neg-all",
              "k130-d128-random-strided", "k1-one-block"]


@pytest.mark.parametrize("b,h,nq,nk,d,n_crit,n_neg,kind,layout", SELECT_CASES, ids=SELECT_IDS)
def test_selection_follows_the_rank_rule_on_its_own_scores(b, h, nq, nk, d, n_crit, n_neg, kind, layout):
    gen = torch.Generator().manual_seed(nq * 131 + nk)
    qb, kb = _pooled(b, h, nq, nk, d, kind, gen, layout)
    scores, critical, negligible = select_blocks(qb, kb, n_crit, n_neg)
    assert scores.shape == (b, h, nq, nk) and scores.dtype == torch.float32
    assert critical.shape == (b, h, nq, n_crit) and critical.dtype == torch.int32
    crit, neg = _brute_force_sets(scores.cpu(), n_crit, n_neg)
    assert torch.equal(critical.long().cpu(), crit)
    if n_neg:
        assert negligible.dtype == torch.int32 and torch.equal(negligible.long().cpu(), neg)
    else:
        assert negligible is None
    ref = torch.matmul(qb.double(), kb.double().transpose(-1, -2))
    torch.testing.assert_close(scores.double(), ref, atol=1e-5, rtol=1e-5)
    if kind == "ties":  # integer scores: exact, and ties in every row
        assert torch.equal(scores.double(), ref)
        assert all(len(set(row)) < len(row) for row in scores.reshape(-1, nk).tolist()) or nk < 3


def _rank_rule_sets(scores: torch.Tensor, n_crit: int, n_neg: int):
    """The same rank rule as :func:`_brute_force_sets`, by broadcasting (long rows, finite scores): ``beats[j, i]``
    says that i ranks before j."""
    s = scores.reshape(-1, scores.shape[-1]).double()
    n = s.shape[-1]
    idx = torch.arange(n)
    before = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None]) & (idx[None, :] < idx[:, None]))
    rank = before.sum(-1)
    crit = [torch.nonzero(r < n_crit).flatten() for r in rank]
    neg = [torch.nonzero(r >= n - n_neg).flatten() for r in rank]
    shape = scores.shape[:-1]
    return torch.stack(crit).reshape(*shape, n_crit), torch.stack(neg).reshape(*shape, n_neg)


@pytest.mark.parametrize("nk,n_crit,n_neg,kind", [(1182, 60, 300, "random"), (2048, 103, 512, "ties")],
                         ids=["k1182-wan720p", "k2048-bound-ties"])
def test_selection_at_long_rows(nk, n_crit, n_neg, kind):
    """The longest rows: Wan 720p's 1182 key blocks and the bound (two rows per register group)."""
    assert sel.supported(nk, 16)
    gen = torch.Generator().manual_seed(nk)
    qb, kb = _pooled(1, 1, 3, nk, 16, kind, gen)
    scores, critical, negligible = select_blocks(qb, kb, n_crit, n_neg)
    crit, neg = _rank_rule_sets(scores.cpu(), n_crit, n_neg)
    assert torch.equal(critical.long().cpu(), crit) and torch.equal(negligible.long().cpu(), neg)
    torch.testing.assert_close(scores, qb @ kb.transpose(-1, -2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nk,kw", [(12, dict(topk=0.25, negligible=0.25)), (37, dict(topk=0.3, negligible=0.2)),
                                   (5, dict(topk=0.05)), (64, dict(topk=0.5, negligible=0.1, rounding="floor"))],
                         ids=["k12", "k37-ragged", "k5-one-crit", "k64-floor"])
def test_selection_equals_the_twin_bit_for_bit_on_exact_inputs(nk, kw):
    """Small integers: every product and sum exact, so the scores, both sets and the classes equal the twin's
    ``classify_pooled`` (torch matmul and stable sort) bit for bit, ties included."""
    method = SLAParams.of(SLA(**kw))
    gen = torch.Generator().manual_seed(nk)
    qb, kb = _pooled(2, 2, 19, nk, 24, "ties", gen)
    _, n_crit, n_neg, _ = sla_block_counts(nk * 64, method)
    twin = classify_pooled(qb, kb, nk * 64, method, torch.int32)
    scores, critical, negligible = select_blocks(qb, kb, n_crit, n_neg)
    assert torch.equal(scores, twin.scores)
    assert torch.equal(critical, twin.critical)
    if n_neg:
        assert torch.equal(negligible, twin.negligible)
    from dit_accel.kernels.sla.common import SLABlocks

    assert torch.equal(SLABlocks(critical, negligible, scores=scores).classes, twin.classes)


@triton.jit
def _top_kernel(S, CRIT, NEG, N, M_CRIT, M_TOP, BLOCK_N: tl.constexpr):
    """The kernel's selection on given scores: one row per program."""
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    valid = (n < N)[None, :]
    s = tl.load(S + row * N + n[None, :], mask=valid, other=0.0)
    key = sel._keys(s, valid)
    crit = valid & sel._top(key, tl.zeros([1], dtype=tl.int32) + M_CRIT)
    neg = valid & ~sel._top(key, tl.zeros([1], dtype=tl.int32) + M_TOP)
    tl.store(CRIT + row * N + n[None, :], tl.where(crit, 1, 0), mask=valid)
    tl.store(NEG + row * N + n[None, :], tl.where(neg, 1, 0), mask=valid)


ORDER_ROWS = {
    "signed-zeros": [0.0, -0.0, 1.0, -0.0, 0.0, -1.0, -0.0, 2.0, 0.0],
    "nan-first": [1.0, float("nan"), 3.0, float("-nan"), float("inf"), -1.0, float("nan"), 0.5, -float("inf")],
    "infinities": [-float("inf"), 5.0, float("inf"), -float("inf"), float("inf"), -3.0, 1e-45, -1e-45, 0.0],
    "extremes": [3.4e38, -3.4e38, 1.17e-38, -1.17e-38, 3.4e38, -0.0, 1e-45, -3.4e38, 7.0],
}


@pytest.mark.parametrize("m_crit,n_neg", [(1, 1), (2, 3), (4, 4), (9, 0), (5, 4)], ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(ORDER_ROWS))
def test_selection_order_signed_zeros_nan_infinities(name, m_crit, n_neg):
    """The order the sort uses: -0.0 ties with +0.0 (lower index first), NaN above +inf (NaNs tie),
    -inf below everything but padding; on scores given to the kernel's own helpers."""
    row = torch.tensor(ORDER_ROWS[name], dtype=torch.float32)
    nk = row.numel()
    crit = torch.empty(1, nk, dtype=torch.int32)
    neg = torch.empty(1, nk, dtype=torch.int32)
    _top_kernel[(1,)](row[None], crit, neg, nk, m_crit, nk - n_neg, BLOCK_N=16)
    want_crit, want_neg = _brute_force_sets(row[None], m_crit, n_neg)
    assert torch.nonzero(crit[0]).flatten().tolist() == want_crit[0].tolist()
    assert torch.nonzero(neg[0]).flatten().tolist() == want_neg[0].tolist()
    if name != "signed-zeros":  # and where it matters, torch's own stable sort agrees (it orders NaN first)
        order = torch.sort(row, descending=True, stable=True).indices
        assert sorted(order[:m_crit].tolist()) == want_crit[0].tolist()


E2E = [  # nq, nk, d, method kwargs, inputs
    (257, 257, 64, dict(topk=0.2, negligible=0.2), "random"),
    (130, 257, 64, dict(topk=0.3, feature_map="relu"), "random"),
    (256, 512, 64, dict(topk=0.4, negligible=0.4, block_q=128), "integers"),
]


@pytest.mark.parametrize("nq,nk,d,kw,inputs", E2E, ids=["n257-neg", "q130-k257-relu", "q256-k512-bq128-integers"])
def test_sla_attention_triton_backend_matches_the_twin(nq, nk, d, kw, inputs):
    method = SLA(**kw)
    if inputs == "integers":  # whole blocks of integers: exact scores, many ties; the sets must be the twin's
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randint(-2, 3, (1, 2, n, d), generator=gen).float() for n in (nq, nk, nk))
    else:
        q, k, v = make_qkv(1, 2, nq, d, nk=nk)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    proj = make_proj(d).to(DEVICE)
    o_t, _, _, info_t = sla_attention(q, k, v, method, proj, backend="triton", return_parts=True)
    o_c, _, _, info_c = sla_attention(q, k, v, method, proj, backend="torch", return_parts=True)
    assert torch.equal(info_t["blocks"].critical.long(), info_c["blocks"].critical)
    assert torch.equal(info_t["blocks"].negligible.long(), info_c["blocks"].negligible)
    torch.testing.assert_close(info_t["blocks"].scores, info_c["blocks"].scores, atol=1e-5, rtol=1e-5)
    o_t = sla_attention(q, k, v, method, proj, backend="triton")
    o_c = sla_attention(q, k, v, method, proj, backend="torch")
    torch.testing.assert_close(o_t, o_c, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(topk=0.3, negligible=0.3), dict(topk=0.3)], ids=["neg", "no-neg"])
def test_classification_compiles_fullgraph_through_the_ops(kw):
    params = SLAParams.of(SLA(**kw))
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 200, 64, generator=gen).to(DEVICE) for _ in range(2))

    def f(q, k):
        blocks = sla_triton_classify(q, k, params)
        return blocks.scores, blocks.critical, blocks.negligible

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k)
    want = f(q, k)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[1].dtype == torch.int32 and got[2].shape[-1] == sla_block_counts(200, params)[2]


@pytest.mark.parametrize("n_neg", [0, 2], ids=["no-neg", "neg"])
def test_select_op_fake_impl_and_schema(n_neg):
    gen = torch.Generator().manual_seed(6)
    qb, kb = _pooled(1, 2, 9, 7, 16, "random", gen)
    torch.library.opcheck(torch.ops.dit_accel.sla_select.default, (qb, kb, 3, n_neg),
                          test_utils=("test_schema", "test_faketensor"))


def test_selection_bound():
    assert sel.supported(sel.NK_MAX, 128) and sel.supported(1182, 128) and sel.supported(1024, 128)
    assert not sel.supported(sel.NK_MAX + 1, 128) and not sel.supported(64, sel.D_MAX + 1)


def test_classification_past_the_bound_selects_with_the_twin(monkeypatch):
    """Above ``NK_MAX`` key blocks the selection kernel is not launched: the twin's ``classify_pooled`` selects
    from the kernel's pooled values (the bound lowered here so that the interpreter stays fast)."""
    params = SLAParams.of(SLA(topk=0.25, negligible=0.25))
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(1, 2, 300, 64, generator=gen).to(DEVICE) for _ in range(2))  # 5 key blocks
    launches = []
    real = sel.KERNELS["select"]

    class _Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setitem(sel.KERNELS, "select", _Spy())
    inside = sla_triton_classify(q, k, params)
    assert len(launches) == 1
    monkeypatch.setattr(sel, "NK_MAX", 4)
    past = sla_triton_classify(q, k, params)
    assert len(launches) == 1  # not launched past the bound
    twin = sla_classify(q, k, params)
    for blocks in (inside, past):
        assert blocks.critical.dtype == torch.int32
        assert torch.equal(blocks.critical.long(), twin.critical)
        assert torch.equal(blocks.negligible.long(), twin.negligible)
        torch.testing.assert_close(blocks.scores, twin.scores, atol=1e-6, rtol=1e-6)


def test_launch_arguments_are_cached_per_signature():
    gen = torch.Generator().manual_seed(8)
    qb, kb = _pooled(1, 1, 5, 6, 16, "random", gen)
    sel._LAUNCHES.clear()
    first = select_blocks(qb, kb, 2, 1)
    second = select_blocks(qb, kb, 3, 0)  # other set sizes: another entry, not the first one's
    assert len(sel._LAUNCHES) == 2
    assert first[1].shape[-1] == 2 and second[1].shape[-1] == 3 and second[2] is None
    assert torch.equal(select_blocks(qb, kb, 2, 1)[1], first[1]) and len(sel._LAUNCHES) == 2
