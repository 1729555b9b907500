"""``SLA.reference`` (and its options) against a transcription of the reference code, written here.

The transcription follows thu-ml/SLA (commit d973e55, sparse_linear_attention/core.py and
utils.py; TurboDiffusion vendors the same code in turbodiffusion/SLA): mean-pooled q and
smoothed k (``k - mean(k)``) per block, ``int(topk * K)`` key blocks per query block by
``torch.topk``, softmax attention over the selected blocks, and linear attention over
all tokens, ``phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum phi(k))`` with a softmax feature
map, added through ``proj_l``. It runs in fp64 with dense token masks; only the PyTorch
twin is compared (the fused kernel has its own tests).
"""

import math

import pytest
import torch

from dit_accel.kernels import BackendUnavailable
from dit_accel.kernels.sla import sla_attention, sla_block_counts, sla_density
from dit_accel.methods import SLA
from tests.kernels.sla_reference import make_proj, make_qkv


def _pool(x, block):
    n = math.ceil(x.shape[-2] / block)
    return torch.stack([x[..., i * block:(i + 1) * block, :].mean(-2) for i in range(n)], -2)


def reference_code_sla(q, k, v, topk, block_q, block_k, proj):
    q, k, v = q.double(), k.double(), v.double()
    length, d = q.shape[-2], q.shape[-1]
    score = _pool(q, block_q) @ _pool(k - k.mean(-2, keepdim=True), block_k).transpose(-1, -2)
    n_k = score.shape[-1]
    chosen = torch.topk(score, min(n_k, int(topk * n_k)), dim=-1).indices
    block_map = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, chosen, True)
    allowed = block_map.repeat_interleave(block_q, -2)[..., :length, :].repeat_interleave(block_k, -1)[..., :length]
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    o_s = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    phi_q, phi_k = torch.softmax(q, -1), torch.softmax(k, -1)
    o_l = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (1e-5 + (phi_q * phi_k.sum(-2, keepdim=True)).sum(-1, keepdim=True))
    return o_s + proj.double()(o_l)


@pytest.mark.parametrize("length,block_q,block_k,topk", [
    (300, 64, 64, 0.3), (300, 128, 64, 0.2), (520, 64, 128, 0.25), (257, 128, 128, 0.5), (200, 64, 64, 0.05),
], ids=["64x64", "128x64-turbo-sla", "64x128-sagesla-sm90", "128x128", "below-one-block"])
def test_reference_config_reproduces_the_reference_code(length, block_q, block_k, topk):
    q, k, v = make_qkv(2, 2, length, 32)
    proj = make_proj(32)
    method = SLA.reference(topk=topk, block_q=block_q, block_k=block_k)
    out = sla_attention(q, k, v, method, proj, backend="torch")
    if int(topk * math.ceil(length / block_k)) == 0:
        # The reference selects no block and yields NaN; dit_accel keeps one (documented).
        assert torch.isnan(reference_code_sla(q, k, v, topk, block_q, block_k, proj)).any()
        assert torch.isfinite(out).all() and sla_density(length, method) == 1 / math.ceil(length / block_k)
        return
    expected = reference_code_sla(q, k, v, topk, block_q, block_k, proj)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens,topk,floor,ceil", [
    (32760, 0.05, 25, 26),   # Wan 2.1 480p, 81 frames: 512 key blocks
    (75600, 0.05, 59, 60),   # Wan 2.1 720p, 81 frames: 1182 key blocks
    (6400, 0.29, 28, 29),    # int(0.29 * 100) is 28 in floating point
    (64 * 30, 0.1, 3, 3),
    (64 * 10, 0.05, 1, 1),   # 0.5 blocks: the reference has none (NaN), both rules keep one
])
def test_critical_block_counts(tokens, topk, floor, ceil):
    n_k = math.ceil(tokens / 64)
    assert floor == max(1, min(n_k, int(topk * n_k)))  # the reference formula, plus the >= 1 guard
    assert sla_block_counts(tokens, SLA(topk=topk, rounding="floor"))[1] == floor
    assert sla_block_counts(tokens, SLA(topk=topk))[1] == ceil


def test_reference_config_values():
    method = SLA.reference(topk=0.1)
    assert (method.linear_tokens, method.rounding, method.linear_eps, method.negligible) == ("all", "floor", 1e-5, 0.0)
    assert (method.block_q, method.block_k, method.feature_map) == (64, 64, "softmax")
    assert SLA.reference(0.2, block_q=128).block_q == 128
    assert SLA().rounding == "ceil" and SLA().linear_eps == 1e-6
    for kwargs, field in ((dict(rounding="round"), "SLA.rounding"), (dict(linear_eps=0.0), "SLA.linear_eps"),
                          (dict(block_k=32), "SLA.block_k"), (dict(linear_eps="1e-5"), "SLA.linear_eps")):
        with pytest.raises((ValueError, TypeError), match=field.replace(".", r"\.")):
            SLA(**kwargs)


def test_linear_eps_reaches_the_twin():
    """A tiny feature mass (relu features of small keys) makes the epsilon visible: O_l = num / (den + eps)."""
    q, k, v = make_qkv(1, 1, 64, 8)
    q, k = torch.full_like(q, 1e-3), k.abs() * 1e-4
    parts = {eps: sla_attention(q, k, v, SLA(topk=0.5, linear_tokens="all", feature_map="relu", linear_eps=eps),
                                torch.nn.Identity(), backend="torch", return_parts=True)[2] for eps in (1e-6, 1e-5)}
    phi_q, phi_k = q.relu().double(), k.relu().double()
    num, den = phi_q @ (phi_k.transpose(-1, -2) @ v.double()), (phi_q * phi_k.sum(-2, keepdim=True)).sum(-1, True)
    for eps, got in parts.items():
        torch.testing.assert_close(got.double(), num / (den + eps), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(parts[1e-6], parts[1e-5])


def test_block_k_128_runs_on_the_twin(monkeypatch):
    q, k, v = make_qkv(1, 1, 256, 16)
    method = SLA(topk=0.5, block_k=128)
    assert sla_attention(q, k, v, method, backend="auto", return_parts=True)[3]["backend"] == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs Triton on CPU: only the block rule refuses
    with pytest.raises(BackendUnavailable, match="64-key blocks, not block_k=128"):
        sla_attention(q, k, v, method, backend="triton")
