"""Every shipped SLA kernel configuration compiles for sm_80, sm_89 and sm_90 and fits (no GPU needed).

``sla.configs.shipped_configs()`` is what the launchers can pick on CUDA: 3 kernels (forward, dQ,
dK/dV) x fp16 / bf16 x padded head dim 64 / 128 x linear-branch variant (none, direct,
subtract) = 36 per arch, 108 compiles. They run through ``dit_accel.kernels.compile.compile_shipped``
(2 spawned worker processes, each compiling many configs after one import; triton's on-disk
cache makes warm runs fast). Fails on compile errors, on shared memory above the part's
limit and on kernels without tensor-core instructions. Numbers are checked by the
interpreter tests (test_sla_triton.py).
"""
import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels.compile import TARGET_ARCHS, compile_shipped, shared_memory_limit  # noqa: E402
from dit_accel.kernels.sla import SLABlocks, sla_classify  # noqa: E402
from dit_accel.kernels.sla import configs as sc  # noqa: E402
from dit_accel.kernels.sla import triton as st  # noqa: E402
from dit_accel.methods import SLA  # noqa: E402

# (has_lin, sub_crit) the launchers can be asked for; (False, True) normalises to (False, False).
FLAG_REQUESTS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.fixture(scope="module")
def compiled():
    configs = sc.shipped_configs()
    return compile_shipped(TARGET_ARCHS, workers=2, configs={a: configs for a in TARGET_ARCHS})


@pytest.mark.parametrize("arch", TARGET_ARCHS, ids=lambda a: f"sm_{a}")
def test_every_shipped_sla_config_compiles_and_fits(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert sorted(r["name"] for r in rows) == sorted(c.name for c in sc.shipped_configs())
    failed = [f"{r['name']}: {r['error']}" for r in rows if r["error"] is not None]
    assert not failed, "SLA kernels that do not compile for sm_%d:\n%s" % (arch, "\n".join(failed))
    too_big = [f"{r['name']}: {r['shared']} B > {r['limit']} B" for r in rows if r["shared"] > r["limit"]]
    assert not too_big, "SLA kernels over the shared-memory limit of sm_%d:\n%s" % (arch, "\n".join(too_big))


def test_sla_kernels_use_tensor_cores(compiled):
    """Every SLA kernel's dots compile to mma.sync (sm_80/89) and Hopper wgmma (sm_90), not FMA loops."""
    rows = [r for r in compiled if r["error"] is None]
    assert rows
    no_mma = [f"sm_{r['arch']} {r['name']}" for r in rows if not r["mma"]]
    assert not no_mma, f"no mma in the PTX of: {no_mma}"
    no_wgmma = [r["name"] for r in rows if r["arch"] == 90 and not r["wgmma"]]
    assert not no_wgmma, f"no wgmma in the sm_90 PTX of: {no_wgmma}"


def test_shipped_list_covers_every_launch_choice():
    shipped = set(sc.shipped_configs())
    for kernel in sc.SLA_KERNELS:
        for dtype in sc.SLA_DTYPES:
            for d in (1, 8, 16, 32, 48, 64, 72, 80, 96, 112, 128):
                for has_lin, sub_crit in FLAG_REQUESTS:
                    assert sc.select_sla_config(kernel, dtype, d, has_lin, sub_crit) in shipped


def test_shipped_list_spans_dtypes_head_dims_kernels_and_variants():
    configs = sc.shipped_configs()
    assert len(configs) == 36 == len(set(configs))
    assert {c.dtype for c in configs} == {torch.float16, torch.bfloat16}
    assert {c.block_d for c in configs} == {64, 128}
    assert {c.kernel for c in configs} == {"fwd", "bwd_dq", "bwd_dkdv"}
    assert {(c.has_lin, c.sub_crit) for c in configs} == {(False, False), (True, False), (True, True)}


@pytest.mark.parametrize("path", ["none", "direct", "subtract"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_launchers_launch_only_shipped_configs(monkeypatch, dtype, path):
    """The forward and backward launchers pick their kernels through select_sla_config: record them."""
    launched = []
    monkeypatch.setattr(st, "_launch", lambda cfg, grid, *args: launched.append(cfg))
    method = SLA(topk=0.3, negligible=0.3, block_q=128)
    q, k, v = (torch.randn(1, 2, 200, 80, dtype=dtype) for _ in range(3))
    blocks: SLABlocks = sla_classify(q.float(), k.float(), method)
    lin = {"none": blocks.critical[..., :0], "direct": blocks.marginal.to(torch.int32),
           "subtract": blocks.negligible}[path]
    has_lin, sub, sign = path != "none", path == "subtract", -1 if path == "subtract" else 1
    o, lse, num, den = st.sla_forward(q, k, v, blocks.critical, lin, 0.1, 0, has_lin, sub, sign, 128)
    dnum = torch.zeros(q.shape) if has_lin else num
    den_grad = torch.zeros(lse.shape) if has_lin else den
    st.sla_backward(torch.zeros_like(q), torch.zeros_like(lse), dnum, den_grad, q, k, v, q, lse,
                    blocks.critical, lin, 0.1, 0, has_lin, sub, sign, 128)
    assert [c.kernel for c in launched] == ["fwd", "bwd_dq", "bwd_dkdv"]
    assert set(launched) <= set(sc.shipped_configs())
    assert {(c.has_lin, c.sub_crit, c.block_d, c.dtype) for c in launched} == {(has_lin, sub, 128, dtype)}


def test_shared_memory_limits():
    # Max dynamic shared memory per block, CUDA C programming guide (compute capabilities table).
    assert [shared_memory_limit(a) for a in TARGET_ARCHS] == [163 * 1024, 99 * 1024, 227 * 1024]
