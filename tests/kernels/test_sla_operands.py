"""The forward's global-sum operands in one Triton launch (kernels/sla/operands.py, TRITON_INTERPRET=1 on CPU)
against their PyTorch twin (``triton._global_operands``) and against float64 sums of the chunk partials."""
import os

import pytest
import torch

from dit_accel.kernels.sla import triton as st
from dit_accel.kernels.sla.operands import global_operands

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter on CPU tensors")


def _partials(bh, chunks, bd, gen, scale=1000.0):
    kv = torch.randn(bh, chunks, bd, bd, generator=gen) * scale
    kv[1] = 0  # a head whose sums are all zero: power 1, zero operands
    return (kv.to(DEVICE), torch.rand(bh, chunks, bd, generator=gen).to(DEVICE),
            torch.rand(bh, chunks, generator=gen).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bd,chunks", [(64, 1), (64, 3), (128, 2)], ids=["d64-one-chunk", "d64-3-chunks", "d128-2"])
def test_operands_match_the_twin_and_reconstruct_the_sums(bd, chunks, dtype):
    gen = torch.Generator().manual_seed(bd * 10 + chunks)
    kv_p, ksum_p, kmax_p = _partials(3, chunks, bd, gen)
    total = kv_p.double().sum(1)
    kv, power, ksum, kmax = global_operands(kv_p.clone(), ksum_p, kmax_p, chunks, True, True, 3, bd, dtype, DEVICE)
    ref_kv, ref_power, ref_ksum = st._global_operands(kv_p.sum(1), ksum_p.sum(1), 3, bd, dtype, DEVICE)
    assert kv.shape == ref_kv.shape and kv.dtype == dtype
    assert torch.equal(power, ref_power)  # the same power of two per head
    torch.testing.assert_close(ksum, ref_ksum, atol=1e-6, rtol=1e-6)
    assert torch.equal(kmax, kmax_p.amax(1))
    # hi + lo times the power give the fp32 sums back, about as closely as the twin's pair (bf16: 16 bits of
    # each value; the interpreter's bf16 conversion may truncate where the GPU's rounds to nearest)
    peak = total.abs().amax((-1, -2), keepdim=True).clamp_min(1.0)

    def error(pair, p):
        return (((pair[:, :bd].double() + pair[:, bd:].double()) * p.double()[:, None, None] - total).abs() / peak).max()

    # (the interpreter truncates fp32 -> bf16: hi up to twice as far off, lo with twice the error: about 4x the
    # error of torch's rounding to nearest, which the GPU does)
    assert error(kv, power) <= max((5 if dtype == torch.bfloat16 else 1.01) * error(ref_kv, ref_power), 2 ** -20)
    assert error(kv, power) < (2 ** -15 if dtype == torch.bfloat16 else 2 ** -20)
    assert (kv[:, :bd].float().abs().amax() <= 2 ** 14) and torch.equal(kv[1], torch.zeros_like(kv[1]))
    if dtype == torch.float16:  # fp16 conversions round alike in the interpreter and torch: the same bits
        assert torch.equal(kv, ref_kv)


@pytest.mark.parametrize("with_kv,with_kmax", [(False, True), (True, False), (False, False)],
                         ids=["kmax-only", "kv-only", "neither"])
def test_operands_without_global_sums_or_kmax_are_neutral(with_kv, with_kmax):
    gen = torch.Generator().manual_seed(5)
    kv_p, ksum_p, kmax_p = _partials(2, 2, 64, gen)
    kv, power, ksum, kmax = global_operands(kv_p.clone(), ksum_p, kmax_p, 2, with_kv, with_kmax, 2, 64,
                                            torch.float16, DEVICE)
    if not with_kv:
        assert not kv.any() and torch.equal(power, torch.ones(2, device=DEVICE)) and not ksum.any()
    assert torch.equal(kmax, kmax_p.amax(1) if with_kmax else torch.zeros(2, device=DEVICE))
    # No chunks at all (the softmax direct plan): nothing is read, everything is neutral.
    kv, power, ksum, kmax = global_operands(kv_p, kv_p, kv_p, 0, True, True, 2, 64, torch.float16, DEVICE)
    assert not kv.any() and torch.equal(power, torch.ones(2, device=DEVICE)) and not ksum.any() and not kmax.any()
