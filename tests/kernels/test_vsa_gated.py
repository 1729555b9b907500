"""The gated term's backward in one Triton launch (dit_accel/kernels/vsa/gated.py), reading raster order through the
row table: the gate's gradient bit for bit the PyTorch product's, each cube's gradient within fp32 rounding of
float64 sums written here; a gated VSA training call taking it (against the operators' backward); its switch and
self-check; and its compiles for sm_80/90/100 without spills (no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dit_accel
from dit_accel.kernels import selfcheck
from dit_accel.kernels.block_sparse import gather
from dit_accel.kernels.vsa.naive import cubes_of

triton = pytest.importorskip("triton")
from dit_accel.kernels.vsa import gated  # noqa: E402
from tests.utils import interpreter, static_toolchain  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_vsa")  # (tests/kernels/conftest.py)


def _rows_of_cubes(cubes):
    """Each raster token's cube, read from the tiled order position by position (no permutation helper)."""
    order = cubes.perm.order.tolist()
    cube_of = [0] * cubes.perm.num_tokens
    for pos, token in enumerate(order):
        if token >= 0:
            cube_of[token] = pos // cubes.volume
    return torch.tensor(cube_of)


def _tensors(grid, tile, batch, heads, d, dtype, layout, seed=0):
    cubes = cubes_of(grid, tile)
    n = cubes.perm.num_tokens
    g = torch.Generator().manual_seed(seed)
    if layout == "bnhd":
        grad, gate = (torch.randn(batch, n, heads, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        grad, gate = (torch.randn(batch, heads, n, d, generator=g).to(dtype) for _ in range(2))
    return cubes, grad, gate, torch.randn(batch, heads, cubes.count, d, generator=g)


@interpreter
@pytest.mark.parametrize("grid,tile,batch,d,dtype,layout", [
    ((5, 6, 7), (2, 2, 4), 1, 64, torch.float32, "bnhd"),  # partial cubes in every dimension
    ((5, 6, 7), (4, 4, 4), 2, 48, torch.float16, "bhnd"),  # two videos; columns past the head dim masked
    ((4, 8, 8), (4, 4, 4), 1, 96, torch.float16, "bnhd"),  # whole cubes; a second, partial column block
    ((3, 9, 10), (1, 4, 8), 2, 32, torch.float32, "bnhd"),  # 32-token cubes, partial in h and w
], ids=["partial-fp32", "b2-d48-fp16", "whole-d96-fp16", "t148-fp32"])
def test_the_launch_gives_the_gate_products_and_the_cube_sums(grid, tile, batch, d, dtype, layout):
    cubes, grad, gate, coarse = _tensors(grid, tile, batch, 2, d, dtype, layout)
    d_gate, d_c = gated.gated_backward(grad, gate, coarse, cubes)
    cube_of = _rows_of_cubes(cubes)
    rows = coarse[:, :, cube_of]  # (B, H, N, D) fp32: each token's cube row
    expect_gate = torch.empty_like(gate)
    torch.mul(grad, rows, out=expect_gate)  # the product in fp32, rounded once: the operators' result
    assert d_gate.stride() == gate.stride() and d_gate.dtype == dtype and torch.equal(d_gate, expect_gate)
    sums = torch.zeros(coarse.shape, dtype=torch.float64)
    for c in range(cubes.count):
        sums[:, :, c] = (grad.double() * gate.double())[:, :, cube_of == c].sum(2)
    assert d_c.dtype == torch.float32 and d_c.is_contiguous()
    torch.testing.assert_close(d_c.double(), sums, atol=1e-5, rtol=1e-6)


@interpreter
def test_either_gradient_alone():
    cubes, grad, gate, coarse = _tensors((5, 6, 7), (2, 2, 4), 1, 2, 32, torch.float32, "bhnd")
    both = gated.gated_backward(grad, gate, coarse, cubes)
    only_gate = gated.gated_backward(grad, gate, coarse, cubes, with_dc=False)
    only_c = gated.gated_backward(grad, gate, coarse, cubes, with_dgate=False)
    assert only_gate[1] is None and only_c[0] is None
    assert torch.equal(only_gate[0], both[0]) and torch.equal(only_c[1], both[1])


def _train(monkeypatch, grid, gate_grad: bool, kernel: bool, seed=4):
    """``(out, [grads])`` of one gated VSA training call reading raster order, the gated backward in the kernel or
    in the operators."""
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    q, k, v, gate = (torch.randn(1, n, 2, 32, generator=g).transpose(1, 2) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)] + [gate.requires_grad_(gate_grad)]
    with monkeypatch.context() as m:
        m.setenv(gather.ENV_GATHER, "1")
        if not kernel:
            m.setattr(gated, "gated_kernel_runs", lambda gate: False)
        out = dit_accel.vsa_attention(*leaves[:3], grid, topk=3, gate=leaves[3], backend="triton")
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out.detach(), [x.grad for x in leaves]


@interpreter
@pytest.mark.parametrize("grid", [(5, 6, 7), (4, 8, 8)], ids=["partial", "whole"])
@pytest.mark.parametrize("gate_grad", [True, False], ids=["gate-trained", "gate-frozen"])
def test_a_gated_training_call_takes_it(monkeypatch, grid, gate_grad):
    """A gated VSA training call on the whole grid in raster order runs the launch once in its backward: the output
    and the gate's gradient are the operators' bit for bit, q, k and v's (through each cube's coarse row) within
    fp32 rounding."""
    calls = []
    real = gated.gated_backward
    want = _train(monkeypatch, grid, gate_grad, kernel=False)
    monkeypatch.setattr(gated, "gated_backward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    got = _train(monkeypatch, grid, gate_grad, kernel=True)
    assert calls == [dict(with_dgate=gate_grad, with_dc=True)]
    assert torch.equal(got[0], want[0])
    assert (got[1][3] is None) == (not gate_grad) and (not gate_grad or torch.equal(got[1][3], want[1][3]))
    for a, b in zip(got[1][:3], want[1][:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_switch(monkeypatch):
    """``DIT_ACCEL_GATHER`` decides as for the other raster-order kernels: 0 never, unset only on a GPU (never on
    this CPU), 1 anywhere after the self-check; a subclass of Tensor never."""
    gate = torch.randn(1, 2, 8, 16)
    monkeypatch.setenv(gather.ENV_GATHER, "0")
    assert not gated.gated_kernel_runs(gate)
    monkeypatch.delenv(gather.ENV_GATHER)
    assert not gated.gated_kernel_runs(gate)
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    assert gated.gated_kernel_runs(gate)
    assert not gated.gated_kernel_runs(torch.nn.Parameter(gate))
    assert not gated.gated_kernel_runs(gate.to(torch.int32))


@interpreter
@pytest.mark.parametrize("variant", [gated.VARIANT, gated.FWD_VARIANT, gated.SPREAD_VARIANT],
                         ids=["gated_bwd", "gated_fwd", "spread_bwd"])
def test_the_self_check_passes_and_catches_a_fault(tmp_path, monkeypatch, variant):
    """``vsa.triton.gated_bwd`` (this kernel), ``gated_fwd`` (the fine launch adding the gated term,
    tests/kernels/test_vsa_gated_fwd.py) and ``spread_bwd`` (the backward kernels adding the means' gradients,
    tests/kernels/test_vsa_spread.py) pass on their problems; with ``$DIT_ACCEL_FAULT`` naming one, the launch's
    results are corrupted and its check fails, and a call forcing it then raises, naming it."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    shape = {"head_dim": 64, "block_q": 64, "block_k": 64}
    good = selfcheck.verdict(variant, torch.device("cpu"), torch.float16, shape, fresh=True)
    assert good["ok"] and good["error"] < 1e-3, good
    monkeypatch.setenv(selfcheck.ENV_FAULT, variant)
    bad = selfcheck.verdict(variant, torch.device("cpu"), torch.float32, shape, fresh=True)
    assert not bad["ok"], bad
    monkeypatch.setenv(gather.ENV_GATHER, "1")
    with pytest.raises(selfcheck.VariantFailed, match=variant.split(".")[-1]):
        gated.gated_kernel_runs(torch.randn(1, 2, 8, 64), variant)


_SCRIPT = r"""
import json
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dit_accel.kernels.sass import ptxas_report, resource_usage
from dit_accel.kernels.vsa import gated

out = []
for arch in (80, 90, 100):
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for vol in (64, 256):
            fn, sig, cx, attrs = gated.aot_source(dt, vol)
            ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options={"num_warps": gated.NUM_WARPS})
            rep, res = ptxas_report(ck.asm["ptx"], arch), resource_usage(ck.asm["cubin"])
            out.append(dict(arch=arch, dtype=str(dt), vol=vol, registers=res["registers"], local=res["local"],
                            stack=rep["stack"], spills=rep["spill_stores"] + rep["spill_loads"],
                            warnings=rep["warnings"], ptx_local=ck.asm["ptx"].count(".local"),
                            nearest="cvt.rn.bf16.f32" in ck.asm["ptx"]))
print(json.dumps(out))
"""


@static_toolchain
def test_the_kernel_compiles_for_sm80_to_sm100_without_spills_rounding_to_nearest():
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 18
    # (the gate's bf16 gradient rounded to nearest, as PyTorch rounds it; the interpreter truncates, so the bitwise
    # bf16 comparison is the GPU test's)
    assert all(r["nearest"] for r in rows if r["dtype"] == "torch.bfloat16"), rows
    bad = [r for r in rows if r["stack"] or r["spills"] or r["local"] or r["ptx_local"] or r["warnings"]]
    assert not bad, bad


@interpreter
@pytest.mark.parametrize("grid", [(6, 16, 16), (8, 16, 16)], ids=["partial-t", "whole-cubes"])
def test_it_takes_the_token_sized_fp32_passes_off_a_training_call(monkeypatch, grid):
    """The traffic model (``python -m dit_accel.eval.traffic``): with the operators, the gated term's backward wrote
    ``g * gate`` as a token-sized fp32 tensor, summed it per cube and made the gate's product (about 9 q-sized units,
    and on a grid a cube does not divide, the cube rows' gathers and their backward); with the launch, what is left
    around the kernels drops by more than 7 units, and the launch itself reads and writes about 3 (the gradient, the
    gate and the gate's gradient)."""
    from dit_accel.eval.traffic import measure_traffic

    real = gated.gated_kernel_runs

    def units(kernel: bool):
        with monkeypatch.context() as m:
            if not kernel:  # (this kernel alone off: the fine launch's and the spread's variants ask too)
                m.setattr(gated, "gated_kernel_runs",
                          lambda gate, variant=gated.VARIANT: variant != gated.VARIANT and real(gate, variant))
            return measure_traffic(grid=grid, heads=1, cases=("vsa_train_raster",))["vsa_train_raster"]

    operators, launch = units(False), units(True)
    assert operators["units"] - launch["units"] > 7.0, (operators, launch)
    assert 2.9 < launch["kernel_units"] - operators["kernel_units"] < 3.5, (operators, launch)


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [(16, 28, 52), (21, 30, 52)], ids=["fastwan-whole", "wan480p-partial"])
def test_gpu_the_launch_at_wan_shapes(grid):
    """12 heads of 128 in bf16, the gradient and the gate laid out (B, N, H, D): the gate's gradient the PyTorch
    product's bit for bit, each cube's within fp32 rounding of float64 sums."""
    from dit_accel.kernels.vsa.selfchecks import gated_reference
    from tests.utils import DEVICE

    cubes, grad, gate, coarse = _tensors(grid, (4, 4, 4), 1, 12, 128, torch.bfloat16, "bnhd", seed=2)
    grad, gate, coarse = (x.to(DEVICE) for x in (grad, gate, coarse))
    d_gate, d_c = gated.gated_backward(grad, gate, coarse, cubes)
    rows = coarse[:, :, _rows_of_cubes(cubes).to(DEVICE)]
    expect = torch.empty_like(gate)
    torch.mul(grad, rows, out=expect)
    assert torch.equal(d_gate, expect)
    torch.testing.assert_close(d_c.double(), gated_reference(grad, gate, coarse, cubes)[1], atol=1e-4, rtol=1e-5)
