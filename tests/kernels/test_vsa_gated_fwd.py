"""VSA's gated term added by the fine launch (kernels/vsa/raster.py, ``GATED`` in the gathered forward's epilogue).

An inference call reading raster order with a gate had the fine launch write ``fine`` and a PyTorch pass read it
back with the gate and the cube rows to write ``fine + gate * coarse``. The launch now adds the term before its one
rounding: the same sum but for that rounding (fine is no longer rounded first), so within one rounding of the
unfused path and of the float64 reference. Interpreter tests (fp32 / fp16: its bf16 dot is wrong); the launch's
static cost is in tests/kernels/test_sass_gather.py.
"""
from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.kernels import selfcheck
from dit_accel.kernels.block_sparse import gather
from dit_accel.kernels.vsa import api, fine
from tests.kernels.vsa_reference import reference

pytest.importorskip("triton")
from tests.utils import interpreter  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_vsa")  # (tests/kernels/conftest.py)


def _inputs(grid, batch, layout, dtype, d=64, seed=0):
    tokens = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    if layout == "bnhd":  # (a pipeline's: (B, N, H, D) viewed as (B, H, N, D); two batches do not fold)
        return [torch.randn(batch, tokens, 2, d, generator=g).to(dtype).transpose(1, 2) for _ in range(4)]
    return [torch.randn(batch, 2, tokens, d, generator=g).to(dtype) for _ in range(4)]


def _summed(monkeypatch) -> list:
    """Whether each fine launch was given the gated term to add (``_launch``'s ``gated``, its 8th argument)."""
    flags, real = [], fine._launch

    def launch(*args, **kw):
        flags.append((args[7] if len(args) > 7 else kw.get("gated")) is not None)
        return real(*args, **kw)

    monkeypatch.setattr(fine, "_launch", launch)
    return flags


@interpreter
@pytest.mark.parametrize("grid,dtype,batch,layout", [
    ((5, 6, 7), torch.float32, 1, "bnhd"),  # partial cubes in every dimension
    ((3, 9, 10), torch.float16, 2, "bnhd"),  # two videos, one launch each
    ((4, 8, 8), torch.float16, 2, "bhnd"),  # whole cubes, two videos folded into heads
], ids=["partial-fp32", "partial-b2-fp16", "whole-b2-folded-fp16"])
def test_the_fine_launch_adds_the_gated_term_within_one_rounding(monkeypatch, grid, dtype, batch, layout):
    """Twice (the second call runs the class's template): the launch adds the term, the output is the unfused
    path's within one rounding of the output dtype and the float64 reference's within the usual bound, and the
    selection is the same."""
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    flags = _summed(monkeypatch)
    for seed in (0, 1):
        q, k, v, gate = _inputs(grid, batch, layout, dtype, seed=seed)
        out, sel = dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate, backend="triton", return_selection=True)
        with monkeypatch.context() as m:
            m.setattr(api, "_fused_gate", lambda gate, q: False)
            apart, sel_apart = dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate, backend="triton",
                                                       return_selection=True)
        assert torch.equal(sel, sel_apart) and out.dtype == dtype and out.shape == q.shape
        ulp = torch.finfo(dtype).eps * apart.float().abs().clamp_min(1.0)
        assert bool(((out.float() - apart.float()).abs() <= ulp).all())
        ref = reference(*(x.double() for x in (q, k, v)), grid, 3, (4, 4, 4), gate.double())[0]
        tol = 2e-3 if dtype == torch.float16 else 1e-4
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    per_call = batch if layout == "bnhd" else 1
    assert flags == [True] * per_call + [False] * per_call + [True] * per_call + [False] * per_call
    assert any(key[-1] for key in fine._TEMPLATES)  # (the raster class's template: the second call ran it)


@interpreter
def test_the_plans_summed_call_takes_it(monkeypatch, tmp_path):
    """A gated model under ``apply(VSA)`` (FastVideo's to_gate_compress gates, Wan's self-attention: nothing merged
    after the fine branch; heads of 64): every layer's launch adds the term; the output is within rounding of the
    unfused one."""
    from dit_accel.models import tiny as T
    from tests.pipelines.test_vsa_gates import GRID, _gated_checkpoint, _load

    monkeypatch.setenv(gather.ENV_GATHER, "1")
    _gated_checkpoint(tmp_path, head_dim=64)
    model = _load(tmp_path)
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID, batch=1)
    flags = _summed(monkeypatch)

    def run():
        with dit_accel.apply(model, dit_accel.VSA(topk=2), backend="triton"), torch.no_grad():
            return model(**kwargs)[0]

    fused = run()
    assert flags and all(flags), flags
    monkeypatch.setattr(api, "_fused_gate", lambda gate, q: False)
    torch.testing.assert_close(fused, run(), atol=1e-5, rtol=1e-5)


@interpreter
def test_it_is_taken_only_where_the_launch_can_add_it(monkeypatch, tmp_path):
    """Not for a gate that records a gradient, another dtype's, a head dim the kernel pads (32 runs in 64 columns),
    or off the raster path (``DIT_ACCEL_GATHER=0``); each such call's output is still the gated sum."""
    grid = (4, 8, 8)
    flags = _summed(monkeypatch)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    q, k, v, gate = _inputs(grid, 1, "bhnd", torch.float32)
    want = dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate, backend="triton")
    assert flags == [True]
    assert not api._fused_gate(gate.clone().requires_grad_(), q) and not api._fused_gate(gate.half(), q)
    assert not api._fused_gate(gate[..., :32], q[..., :32])  # (no self-check asked for a head dim it cannot take)
    narrow = [x[..., :32].contiguous() for x in (q, k, v, gate)]
    got = dit_accel.vsa_attention(*narrow[:3], grid, topk=3, gate=narrow[3], backend="triton")
    torch.testing.assert_close(got.double(), reference(*(x.double() for x in narrow[:3]), grid, 3, (4, 4, 4),
                                                       narrow[3].double())[0], atol=1e-4, rtol=1e-4)
    assert flags == [True, False]  # (padded: the unfused launch, then the gated sum's pass)
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "1")  # (and no check asked for it: a forced call does not fail)
    dit_accel.vsa_attention(*narrow[:3], grid, topk=3, gate=narrow[3], backend="triton")
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    torch.testing.assert_close(dit_accel.vsa_attention(q, k, v, grid, topk=3, gate=gate, backend="triton"), want,
                               atol=1e-5, rtol=1e-5)
    assert flags[:2] == [True, False] and not any(flags[2:])  # (cube order: the term in its own pass)


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [(16, 28, 52), (21, 30, 52)], ids=["fastwan-whole", "wan480p-partial"])
def test_gpu_the_fine_launch_adds_the_gated_term(grid, monkeypatch, tmp_path):
    """FastWan's shape and Wan 480p's, 12 heads of 128 in bf16 laid out (B, N, H, D), sparsity 0.9, the raster path
    forced, its variants checked first: the launch adds the term (twice: a template's call), within bf16 rounding
    of the unfused path, with the same selection."""
    from tests.utils import DEVICE

    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    flags = _summed(monkeypatch)
    tokens = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(3)
    q, k, v, gate = (torch.randn(1, tokens, 12, 128, generator=g).to(DEVICE, torch.bfloat16).transpose(1, 2)
                     for _ in range(4))
    dit_accel.vsa_attention(q, k, v, grid, sparsity=0.9, gate=gate, backend="triton")  # (the self-checks run here)
    flags.clear()
    for _ in range(2):
        out, sel = dit_accel.vsa_attention(q, k, v, grid, sparsity=0.9, gate=gate, backend="triton",
                                           return_selection=True)
        with monkeypatch.context() as m:
            m.setattr(api, "_fused_gate", lambda gate, q: False)
            apart, sel_apart = dit_accel.vsa_attention(q, k, v, grid, sparsity=0.9, gate=gate, backend="triton",
                                                       return_selection=True)
        assert torch.equal(sel, sel_apart)
        torch.testing.assert_close(out.float(), apart.float(), atol=1e-2, rtol=1e-2)
    assert flags == [True, False, True, False], flags
