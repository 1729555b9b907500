"""The vendor backends' self-check variants: registered under their names, not applicable without the package
(the reason says so), and their synthetic problems are sound: with the PyTorch twin standing in for the vendor
launch the check passes, and with a wrong launch it fails. CPU only (the real launches: test_backends_gpu.py)."""

from __future__ import annotations

import pytest
import torch

selfcheck = pytest.importorskip("dit_accel.kernels.selfcheck")

from dit_accel.kernels import block_sparse_attention  # noqa: E402
from dit_accel.kernels.block_sparse import backends as vendor  # noqa: E402
from dit_accel.kernels.block_sparse.backends import checks  # noqa: E402

NAMES = [f"block_sparse.{b}.{p}" for b in ("fa4", "cudnn", "natten") for p in ("fwd", "bwd")]
SHAPE = {"head_dim": 32, "block_q": 32, "block_k": 32}


def test_every_vendor_variant_is_registered_and_says_why_it_does_not_apply_here():
    registered = {v.name: v for v in selfcheck.variants()}
    for name in NAMES:
        v = registered[name]
        assert v.family == "block_sparse" and v.backend == name.split(".")[1]
        why = v.applies(torch.device("cpu"))
        assert why and ("not installed" in why or "CUDA" in why)
    assert registered["block_sparse.cudnn.bwd"].dtypes(torch.device("cuda")) == (torch.bfloat16,)


def _twin_call(name, q, k, v, layout, scale, return_lse, source=None):
    out = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend="torch")
    return out if return_lse else (out[0], None)


@pytest.mark.parametrize("name", NAMES)
def test_the_check_passes_a_right_launch_and_fails_a_wrong_one(name, monkeypatch):
    check = selfcheck.variant(name).check
    monkeypatch.setattr(vendor, "call", _twin_call)
    res = check(torch.device("cpu"), torch.float32, SHAPE)
    assert res.ok, res
    assert "2x2 heads" in res.problem

    def wrong(*args, **kwargs):  # drops the last key block of every row
        o, lse = _twin_call(*args, **kwargs)
        return o * 0.98, lse

    monkeypatch.setattr(vendor, "call", wrong)
    assert not check(torch.device("cpu"), torch.float32, SHAPE).ok


def test_tolerances_are_per_dtype():
    assert checks.FWD_TOL[torch.bfloat16] == 1e-2 and checks.BWD_TOL[torch.bfloat16] == 2e-2


@pytest.mark.parametrize("part", ["fwd", "bwd"])
def test_the_fault_switch_corrupts_a_vendor_launch_and_its_check_fails(part, monkeypatch):
    """DIT_ACCEL_FAULT=block_sparse.cudnn.<part> corrupts what the launch path hands back (the output, or
    the gradients), and the variant's own check then fails: the self-check can catch a broken vendor kernel."""
    from dit_accel.kernels.block_sparse.backends import cudnn as vcudnn

    def twin_run(blocks, q, k, v, scale, return_lse):  # stands in for cuDNN: the twin on the same layout
        return block_sparse_attention(q, k, v, twin_run.layout, scale=scale, return_lse=True, backend="torch")

    real_plan = vcudnn.plan

    def plan(layout, arch=None):
        twin_run.layout = layout
        return real_plan(layout, 90)

    monkeypatch.setattr(vcudnn, "run", twin_run)
    monkeypatch.setattr(vcudnn, "plan", plan)
    check = selfcheck.variant(f"block_sparse.cudnn.{part}").check
    assert check(torch.device("cpu"), torch.float32, SHAPE).ok
    monkeypatch.setenv(selfcheck.ENV_FAULT, f"block_sparse.cudnn.{part}")
    assert not check(torch.device("cpu"), torch.float32, SHAPE).ok
