"""Kernel entry points, round 14 (b): each fix test pins one fault found by calling the kernels the way a training
script does: inside ``torch.autocast``, after a preview under ``torch.inference_mode``, with
``torch.use_deterministic_algorithms(True)``."""

import os

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import BlockLayout, SLAParams, block_sparse_attention, dense_attention_reference, sla_attention
from dit_accel.kernels.backends import BackendUnavailable
from dit_accel.kernels.vsa import vsa_attention

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels through the interpreter on CPU")]

N, D = 128, 32
GRID = (2, 8, 8)  # N tokens


def _qkv(n=N, d=D, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, d, generator=g) * scale for _ in range(3)]


def _mask(n=N):
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) < 0.4
    return mask | torch.eye(n, dtype=torch.bool)


def _ref(q, k, v, mask):
    """fp32 masked attention, written here."""
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float()


def _region():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------ autocast: SDPA's casts at the entry points
def test_block_sparse_in_an_autocast_region_casts_like_sdpa():
    """Before: q bf16 with k, v fp32 (Diffusers' RMSNorm with fp32 weights on q and k, under autocast) was refused
    ("q, k, v must share one dtype"), and fp32 inputs ran and returned fp32 on the twin, bf16 on FlexAttention.
    SDPA in the same region casts all three to bf16 and returns bf16: so do the kernels now."""
    backend = "torch"
    q, k, v = _qkv()
    mask = _mask()
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    with _region():
        o, lse = block_sparse_attention(q.bfloat16(), k, v, layout, backend=backend, return_lse=True)
        o32 = block_sparse_attention(q, k, v, layout, backend=backend)
        sdpa = F.scaled_dot_product_attention(q.bfloat16(), k, v, attn_mask=mask)
    assert o.dtype == o32.dtype == sdpa.dtype == torch.bfloat16 and lse.dtype == torch.float32
    plain = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend=backend)
    assert torch.equal(o, plain) and torch.equal(o32, plain)
    assert (o.float() - _ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)).abs().max() < 0.05  # (bf16 output rounding)


def test_sla_and_vsa_in_an_autocast_region_cast_like_sdpa_and_keep_their_fp32_math():
    """Before: a mixed q, k, v was refused; and with one bf16 dtype, the region reached SLA's and VSA's own fp32
    math (pooled means, coarse scores, the twins' softmax): the same bf16 inputs gave outputs 0.03 apart in and out
    of the region. Now the region casts q, k, v as SDPA's and the rest runs as outside it, bit for bit."""
    q, k, v = _qkv(n=320)
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    proj = torch.nn.Linear(D, D)
    gate = torch.randn(1, 2, 320, D).bfloat16()
    params = SLAParams(topk=0.3)
    with _region():
        sla = sla_attention(q16, k, v, params, proj, backend="torch")
        vsa = vsa_attention(q, k16, v, (5, 8, 8), topk=2, gate=gate, backend="torch")
    assert sla.dtype == vsa.dtype == torch.bfloat16
    assert torch.equal(sla, sla_attention(q16, k16, v16, params, proj, backend="torch"))
    assert torch.equal(vsa, vsa_attention(q16, k16, v16, (5, 8, 8), topk=2, gate=gate, backend="torch"))


def test_the_text_branch_and_the_reference_stay_fp32_in_an_autocast_region():
    """Before: ``attend_with_lse`` (every plan's dense text branch, merged by its lse) and the fp32 oracle
    ``dense_attention_reference`` ran their matmuls in the region's bf16: o 0.26 and the lse 0.13 off at scores of
    about 9, against SDPA's 0.008 in the same region, and a bf16 lse."""
    from dit_accel.plans.plan import attend_with_lse

    q, k, v = (t.bfloat16() for t in _qkv(scale=3.0))
    k, v = k[:, :, :32], v[:, :, :32]
    scale = D ** -0.5
    o, lse = attend_with_lse(q, k, v, None, scale)
    ref_o, ref_lse = dense_attention_reference(q, k, v)
    with _region():
        o_in, lse_in = attend_with_lse(q, k, v, None, scale)
        ref_o_in, ref_lse_in = dense_attention_reference(q, k, v)
    assert lse_in.dtype == ref_lse_in.dtype == ref_o_in.dtype == torch.float32
    assert torch.equal(o_in, o) and torch.equal(lse_in, lse)
    assert torch.equal(ref_o_in, ref_o) and torch.equal(ref_lse_in, ref_lse)


def test_a_self_check_asked_inside_an_autocast_region_checks_in_fp32(tmp_path, monkeypatch):
    """Before: a first-use self-check asked inside the caller's autocast region computed its fp32 reference (the
    PyTorch twin) in bf16: the sound VSA coarse kernel failed (0.0032 against a bound of 1e-4; SLA's forward
    0.0026), and the failure, stored in the cache, disabled the variant on that machine for every later run."""
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.ENV_SELFCHECK, raising=False)
    monkeypatch.delenv(selfcheck.ENV_FAULT, raising=False)
    shape = {"head_dim": 16, "block_q": 64, "block_k": 64}
    with _region():
        found = selfcheck.verdict("vsa.triton.coarse", torch.device("cpu"), torch.float32, shape, fresh=True)
    assert found["ok"], found["problem"]
    assert found["error"] < 1e-5


# ------------------------------------------------------------ inference_mode, then a training call
def test_vsa_records_a_backward_after_a_call_under_inference_mode(fresh_vsa, monkeypatch):
    """Before: a first VSA call under ``torch.inference_mode`` (a preview, ComfyUI) kept its cube permutation and
    per-cube sizes as inference tensors; the next call that records a backward (fine-tuning) failed deep inside
    with torch's "Inference tensors cannot be saved for backward"."""
    from dit_accel.kernels.vsa import naive

    naive._cubes.cache_clear()
    monkeypatch.setattr(naive, "_SIZES", {})
    q, k, v = _qkv()
    with torch.inference_mode():
        first = vsa_attention(q, k, v, GRID, topk=2, backend="torch")
    leaf = q.clone().requires_grad_(True)
    out = vsa_attention(leaf, k, v, GRID, topk=2, backend="torch")
    out.sum().backward()
    torch.testing.assert_close(out.detach(), first)  # (a training call's path: within rounding)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    naive._cubes.cache_clear()  # (no inference-free entries built with this test's patched sizes outlive it)


# ------------------------------------------------------------ torch.use_deterministic_algorithms
@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def test_a_forced_vendor_backward_is_refused_under_deterministic_algorithms(deterministic, monkeypatch):
    """Before: with ``torch.use_deterministic_algorithms(True)``, a training call ran a vendor kernel (here a
    stand-in for cuDNN's) whose backward sums dQ with atomic adds in no fixed order: gradients differed run to run
    with no word. Now it is refused naming the flag and the deterministic backends; forward-only calls still run."""
    from dit_accel.kernels import backends
    from dit_accel.kernels.block_sparse.backends import cudnn as vcudnn
    from dit_accel.kernels.block_sparse.naive import torch_block_sparse_attention

    table = dict(backends._TABLE)
    table["block_sparse"] = tuple((n, (lambda r: None) if n == "cudnn" else c, a) for n, c, a in table["block_sparse"])
    monkeypatch.setattr(backends, "_TABLE", table)
    monkeypatch.setattr(vcudnn, "cuda_arch", lambda device: 90)
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")
    layout = BlockLayout.from_block_masks(torch.rand(2, 2, generator=torch.Generator().manual_seed(0)) < 0.7,
                                          q_len=N, kv_len=N, block_q=64, block_k=64)
    monkeypatch.setattr(vcudnn, "run", lambda blocks, q, k, v, scale, lse: (
        torch_block_sparse_attention(q, k, v, layout, scale)[0], None))
    q, k, v = _qkv()
    with torch.no_grad():
        block_sparse_attention(q, k, v, layout, backend="cudnn")  # (no backward: runs)
    torch.use_deterministic_algorithms(False)
    block_sparse_attention(q.clone().requires_grad_(True), k, v, layout, backend="cudnn")  # (the flag off: runs)
    torch.use_deterministic_algorithms(True)  # (and the decision kept for that call is not this one's)
    leaf = q.clone().requires_grad_(True)
    with pytest.raises(BackendUnavailable, match=r"use_deterministic_algorithms\(True\).*backend='triton'"):
        block_sparse_attention(leaf, k, v, layout, backend="cudnn")


def test_auto_passes_over_vendor_backends_under_deterministic_algorithms(deterministic, monkeypatch):
    """``auto`` takes the next backend in line for a backward under the flag, and the vendor one without it."""
    from dit_accel.kernels import backends
    from dit_accel.kernels.request import Request

    monkeypatch.setattr(backends, "_TABLE", {"block_sparse": [("fa4", lambda r: None, True),
                                                               ("torch", lambda r: None, True)]})
    monkeypatch.setattr(backends, "_verified", lambda family, name, request, forced=False: True)
    q, k, v = _qkv()
    leaf = q.clone().requires_grad_(True)
    assert Request.of(leaf, k, v).deterministic and not Request.of(q, k, v).deterministic
    assert backends.resolve("block_sparse", "auto", Request.of(leaf, k, v)) == "torch"
    assert backends.resolve("block_sparse", "auto", Request.of(q, k, v)) == "fa4"


# ------------------------------------------------------------ merge_attention: a NaN in an ignored side
def test_merge_gives_finite_lse_gradients_where_the_empty_side_holds_nan():
    """Before: a side with lse -inf is ignored in the forward even if its output holds NaN (as SDPA gives for a
    fully masked row), but the backward of the product gave that row's lse_a and lse_b the gradient 0 * NaN = NaN,
    which an optimiser step spreads to every weight. Gradients against the one-sided answer, written here."""
    from dit_accel.kernels import merge_attention

    g = torch.Generator().manual_seed(3)
    o_a, o_b = torch.randn(1, 1, 3, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)
    o_b[0, 0, 1] = float("nan")  # row 1: b saw no key (lse -inf) and its output is NaN
    lse_a = torch.tensor([[[0.5, 1.0, float("-inf")]]])
    lse_b = torch.tensor([[[0.25, float("-inf"), 2.0]]])
    leaves = [t.clone().requires_grad_(True) for t in (o_a, lse_a, o_b, lse_b)]
    o, lse = merge_attention(*leaves)
    assert torch.equal(o[0, 0, 1], o_a[0, 0, 1]) and lse[0, 0, 1] == 1.0
    (o.sum() + lse.sum()).backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    # row 1 is side a alone: lse = lse_a, o = o_a, so d/d lse_a = 1 and nothing reaches side b
    assert leaves[1].grad[0, 0, 1] == 1.0 and leaves[3].grad[0, 0, 1] == 0.0
    assert torch.equal(leaves[0].grad[0, 0, 1], torch.ones(4)) and torch.equal(leaves[2].grad[0, 0, 1], torch.zeros(4))


def test_an_sla_plan_runs_the_same_in_an_autocast_region():
    """Before: the plans' SLA entry (``sla_parts_checked``, what the pipelines' hooks run) let a caller's autocast
    region reach SLA's fp32 math: the same bf16 inputs gave a plan's output 0.016 apart (0.031 with text tokens) in
    and out of a CPU bf16 region."""
    from dit_accel.methods import SLA

    plan = SLA(topk=0.3).plan((5, 8, 8))
    proj = torch.nn.Linear(D, D).bfloat16()
    q, k, v = (t.bfloat16() for t in _qkv(n=320 + 16))
    outside, _ = plan.run(q, k, v, num_text=16, proj=proj, backend="torch")
    with _region():
        inside, _ = plan.run(q, k, v, num_text=16, proj=proj, backend="torch")
    assert torch.equal(inside, outside)
