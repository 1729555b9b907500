"""SLA's pooling, selection and operand kernels compile for sm_80, sm_89 and sm_90 (no GPU needed), and the PTX holds what
the interpreter cannot show: the pooling kernel's ticket is a gpu-scope acquire-release atomic behind a barrier
(every thread's stores published before it), the centring program reads the other programs' sums past L1
(``ld.global.cg``), its means are correctly rounded divisions (``div.rn``), and the operands' hi / lo split
rounds to nearest (``cvt.rn``; the interpreter truncates to bf16). The selection kernel compiles without spills,
stack frame or local memory up to its largest key-block count (``select.NK_MAX``) at head dim 128, and so do the
backward's glue kernels (``glue``) in every form the launchers take, their fp32 products on the tensor cores."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from dit_accel.kernels.compile import TARGET_ARCHS  # noqa: E402
from tests.utils import static_toolchain  # noqa: E402

_SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dit_accel.kernels.sla import operands, pool

out = []
for arch in %(archs)r:
    for dtype in (torch.float16, torch.bfloat16):
        for block in (64, 128):
            for name, src, warps in (("pool", pool.aot_source(dtype, block, block), 4),
                                     ("operands", operands.aot_source(dtype, block), 4 if block == 64 else 8)):
                fn, sig, cx, attrs = src
                ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                                    target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                ptx = ck.asm["ptx"]
                lines = ptx.splitlines()
                atom = [i for i, l in enumerate(lines) if "atom.global" in l]
                bar_before = bool(atom) and any("bar.sync" in l for l in lines[max(0, atom[0] - 12):atom[0]])
                out.append(dict(name=name, arch=arch, dtype=str(dtype), block=block, shared=ck.metadata.shared,
                                atom=[lines[i].strip() for i in atom], bar_before=bar_before,
                                cg=ptx.count("ld.global.cg"), div_rn=ptx.count("div.rn.f32"),
                                cvt_rn=ptx.count("cvt.rn.bf16.f32") + ptx.count("cvt.rn.f16.f32")))
print(json.dumps(out))
"""


def _compile_rows(script: str, **env_extra) -> list:
    """The JSON rows ``script`` prints, run in a process without TRITON_INTERPRET (real compiles)."""
    env = dict(os.environ, TRITON_INTERPRET="0", **env_extra)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", script % {"archs": tuple(TARGET_ARCHS)}], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    return _compile_rows(_SCRIPT)


def test_both_kernels_compile_for_every_target(compiled):
    assert {(r["name"], r["arch"]) for r in compiled} == {(n, a) for n in ("pool", "operands") for a in TARGET_ARCHS}
    assert all(r["shared"] <= 48 * 1024 for r in compiled)


def test_pool_ticket_is_an_acquire_release_atomic_behind_a_barrier(compiled):
    for r in (r for r in compiled if r["name"] == "pool"):
        assert len(r["atom"]) == 1 and "atom.global.gpu.acq_rel.add" in r["atom"][0], r
        assert r["bar_before"], r
        assert r["cg"] > 0 and r["div_rn"] > 0, r


def test_operands_round_to_nearest(compiled):
    for r in (r for r in compiled if r["name"] == "operands"):
        assert r["cvt_rn"] > 0 and not r["atom"], r


_SELECT_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dit_accel.kernels.sass import ptxas_report, resource_usage
from dit_accel.kernels.sla import select

out = []
for arch in %(archs)r:
    for n_k, d, neg in ((select.NK_MAX, 128, True), (1182, 128, True), (512, 64, True), (64, 128, False)):
        fn, sig, cx, attrs = select.aot_source(n_k, d, neg)
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": select.NUM_WARPS})
        rep, res = ptxas_report(ck.asm["ptx"], arch), resource_usage(ck.asm["cubin"])
        out.append(dict(arch=arch, n_k=n_k, d=d, neg=neg, shared=ck.metadata.shared, local=res["local"],
                        stack=rep["stack"], spill_stores=rep["spill_stores"], spill_loads=rep["spill_loads"],
                        registers=res["registers"], warnings=rep["warnings"],
                        ptx_local=ck.asm["ptx"].count(".local")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_select():
    return _compile_rows(_SELECT_SCRIPT, TRITON_DEFAULT_FP_FUSION="1")


def test_select_kernel_compiles_for_every_target_up_to_its_bound(compiled_select):
    assert {r["arch"] for r in compiled_select} == set(TARGET_ARCHS)
    assert all(r["shared"] <= 48 * 1024 for r in compiled_select), compiled_select


@static_toolchain
def test_select_kernel_does_not_spill(compiled_select):
    """No spill, no stack frame, no local memory (the counts are fp32 sums: an integer sum of predicates
    became a popcount of predicates packed through a 16-byte stack frame on sm_90)."""
    bad = [r for r in compiled_select
           if r["stack"] or r["spill_stores"] or r["spill_loads"] or r["local"] or r["ptx_local"] or r["warnings"]]
    assert not bad, bad


_GLUE_SCRIPT = r"""
import json
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dit_accel.kernels.sass import ptxas_report, resource_usage
from dit_accel.kernels.sla import glue

out = []
for arch in %(archs)r:
    for dtype in (torch.float16, torch.bfloat16):
        for block in (64, 128):
            for name in glue.KERNELS:
                for form in glue.FORMS[name]:
                    fn, sig, cx, attrs = glue.aot_source(name, dtype, block, form)
                    sums = bool(form.get("WITH_SUMS") or form.get("WITH_GLOBAL"))
                    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                                        target=GPUTarget("cuda", arch, 32), options=glue.launch_options(name, block))
                    rep, res = ptxas_report(ck.asm["ptx"], arch), resource_usage(ck.asm["cubin"])
                    out.append(dict(name=name, arch=arch, dtype=str(dtype), block=block, sums=sums,
                                    shared=ck.metadata.shared, local=res["local"], stack=rep["stack"],
                                    spill_stores=rep["spill_stores"], spill_loads=rep["spill_loads"],
                                    registers=res["registers"], warnings=rep["warnings"],
                                    mma=ck.asm["ptx"].count("mma.sync") + ck.asm["ptx"].count("wgmma.mma_async")
                                    + ck.asm["ptx"].count("tcgen05.mma")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_glue():
    return _compile_rows(_GLUE_SCRIPT, TRITON_DEFAULT_FP_FUSION="1")


def test_glue_kernels_compile_for_every_target_and_form(compiled_glue):
    """Every kernel in every form its launchers take (``glue.FORMS``) x fp16 / bf16 x head dims 64 / 128 on every
    target; the products with the ``D x D`` sums (tf32x3) on the tensor cores, within sm_89's shared memory."""
    from dit_accel.kernels.sla import glue

    assert len(compiled_glue) == sum(map(len, glue.FORMS.values())) * 2 * 2 * len(TARGET_ARCHS)
    assert all(r["shared"] <= 99 * 1024 for r in compiled_glue), compiled_glue
    assert all(r["mma"] > 0 for r in compiled_glue if r["sums"]), [r for r in compiled_glue if r["sums"]]


@static_toolchain
def test_glue_kernels_do_not_spill(compiled_glue):
    bad = [r for r in compiled_glue
           if r["stack"] or r["spill_stores"] or r["spill_loads"] or r["local"] or r["warnings"]]
    assert not bad, bad
