"""Every shipped SLA kernel configuration compiles for sm_80, sm_89 and sm_90, fits, and is lean (no GPU needed).

``shipped_kernel_configs(arch, "sla")`` is what the launchers can pick on CUDA: the global linear sums,
forward, dQ, dK/dV and the linear-branch dK/dV x fp16 / bf16 x padded head dim 64 / 128 (other head dims run
zero-padded) x with / without the linear branch, per target (warps and stages come from the
compiled artefacts).
They run through ``dit_accel.kernels.sass.compile_shipped`` (2 spawned worker processes,
triton's and dit_accel's on-disk caches make warm runs fast). Fails on compile errors, shared
memory above the part's limit, spills, ptxas advisories (C7515) and kernels without tensor-core
instructions. Numbers are checked by the interpreter tests (test_sla_triton.py).
"""
import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels.compile import TARGET_ARCHS, shipped_kernel_configs  # noqa: E402
from dit_accel.kernels.sass import compile_shipped  # noqa: E402
from dit_accel.kernels.sla import SLABlocks, sla_classify  # noqa: E402
from dit_accel.kernels.sla.common import rounded_features  # noqa: E402
from dit_accel.kernels.sla import configs as sc  # noqa: E402
from dit_accel.kernels.sla import backward as sla_bwd_launcher  # noqa: E402
from dit_accel.kernels.sla import triton as st  # noqa: E402
from dit_accel.methods import SLA  # noqa: E402
from tests.utils import static_toolchain  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    return compile_shipped(TARGET_ARCHS, workers=2, configs={a: sc.shipped_configs(a) for a in TARGET_ARCHS})


@pytest.mark.parametrize("arch", TARGET_ARCHS, ids=lambda a: f"sm_{a}")
def test_every_shipped_sla_config_compiles_and_fits(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert sorted(r["name"] for r in rows) == sorted(c.name for c in sc.shipped_configs(arch))
    failed = [f"{r['name']}: {r['error']}" for r in rows if r["error"] is not None]
    assert not failed, "SLA kernels that do not compile for sm_%d:\n%s" % (arch, "\n".join(failed))
    too_big = [f"{r['name']}: {r['shared']} B > {r['limit']} B" for r in rows if r["shared"] > r["limit"]]
    assert not too_big, "SLA kernels over the shared-memory limit of sm_%d:\n%s" % (arch, "\n".join(too_big))


@static_toolchain
def test_no_shipped_sla_config_spills_or_serializes(compiled):
    """The static rule holds for every shipped launch but those picked by timing on a GPU (MEASURED_LAUNCH)."""
    bad = [f"sm_{r['arch']} {r['name']}: stack {r['stack']} B, local {r['local']} B, spill stores "
           f"{r['spill_stores']} B, advisories {[w['code'] for w in r['warnings']]}"
           for r in compiled if r["error"] is None and r["name"] not in {c.name for c in sc.measured_configs(r["arch"])}
           and (r["stack"] or r["local"] or r["spill_stores"] or r["spill_loads"] or r["warnings"])]
    assert not bad, "SLA configurations that spill or draw ptxas advisories (C7515: serialised wgmma):\n" + \
        "\n".join(bad)


def test_sla_kernels_use_tensor_cores(compiled):
    """Every SLA kernel's dots compile to mma.sync (sm_80/89) and Hopper wgmma (sm_90), not FMA loops."""
    rows = [r for r in compiled if r["error"] is None]
    assert rows
    no_mma = [f"sm_{r['arch']} {r['name']}" for r in rows if not r["mma"]]
    assert not no_mma, f"no mma in the PTX of: {no_mma}"
    no_wgmma = [r["name"] for r in rows if r["arch"] == 90 and not r["wgmma"]]
    assert not no_wgmma, f"no wgmma in the sm_90 PTX of: {no_wgmma}"


def _sm90_forwards(compiled):
    """The compiled rows of the forwards select_sla_config picks on sm_90 (fp16 / bf16, d64 / d128, +- linear)."""
    names = {sc.select_sla_config("fwd", dtype, d, lin, 90).name for dtype in sc.SLA_DTYPES for d in sc.SLA_BLOCK_DS
             for lin in (False, True)}
    rows = [r for r in compiled if r["arch"] == 90 and r["name"] in names]
    assert len(rows) == len(names) == 8 and all(r["error"] is None for r in rows), [r["error"] for r in rows]
    return rows


def test_sm90_forward_k_v_rings_are_num_stages_deep(compiled):
    """The sm_90 forward's K / V rings (the pipeliner's multi-buffered 64-row tiles in the TTGIR: K and V of
    the critical loop, then of the ragged loop) are num_stages deep, not one less: the critical blocks'
    indices are read an iteration ahead into registers instead of taking a pipeline stage. With the linear
    branch the linear loop's phi(K) and V tiles come in rings of their own (64 rows too, read ahead the same
    way), at least num_stages - 1 deep."""
    rows = _sm90_forwards(compiled)
    for r in rows:
        kv = [ring for ring in r["rings"] if ring[1] == sc.BLOCK_K]  # [depth, rows, cols, dtype]
        assert all(depth == r["num_stages"] for depth, *_ in kv[:4]), f"{r['name']}: {r['rings']}"
        if "-lin-" in r["name"]:
            assert len(kv) == 6 and all(depth >= r["num_stages"] - 1 for depth, *_ in kv[4:]), r["rings"]
        else:
            assert len(kv) == 4, f"{r['name']}: {r['rings']}"
    assert any(r["num_stages"] == 3 for r in rows)  # some shipped forward has a 3-deep ring


@static_toolchain
def test_sm90_forward_loads_by_tma_without_losing_occupancy(compiled):
    """The sm_90 forward loads Q, K and V by TMA (the critical, ragged and linear loops' K and V, and Q); its
    pointer fallback (inputs that are not 16-byte aligned) by none. Shipped forwards keep at least 8 resident
    warps per SM (two CTAs of 4 warps, or one of 8): a 3-deep ring at d128 without the linear branch would
    leave one CTA of 4, which is why that one ships 2 stages."""
    for r in _sm90_forwards(compiled):
        assert r["name"].endswith("-tma") and r["tma_loads"] >= 2 * (3 if "-lin-" in r["name"] else 2) + 1, \
            f"{r['name']}: {r['tma_loads']} TMA loads"
        assert r["occupancy"]["warps"] >= 8, f"{r['name']}: {r['occupancy']}"
    fallback = [r for r in compiled if r["arch"] == 90 and r["kernel"] == "fwd" and not r["name"].endswith("-tma")]
    assert len(fallback) == 8 and all(r["error"] is None and r["tma_loads"] == 0 for r in fallback)


def test_shipped_list_covers_every_launch_choice():
    for arch in TARGET_ARCHS:
        shipped = set(sc.shipped_configs(arch))
        assert shipped == set(shipped_kernel_configs(arch, "sla"))
        for kernel in sc.SLA_KERNELS:
            for dtype in sc.SLA_DTYPES:
                for d in (1, 8, 16, 32, 48, 64, 72, 80, 96, 112, 128):
                    for has_lin in (False, True):
                        assert sc.select_sla_config(kernel, dtype, d, has_lin, arch) in shipped


def test_shipped_list_spans_dtypes_head_dims_kernels_and_variants():
    for arch in TARGET_ARCHS:
        configs = sc.shipped_configs(arch)
        assert len(configs) == len(set(configs))
        assert {c.dtype for c in configs} == {torch.float16, torch.bfloat16}
        assert {c.block_d for c in configs} == {64, 128}
        assert {c.kernel for c in configs} == set(sc.SLA_KERNELS)
        assert {c.has_lin for c in configs if c.kernel == "fwd"} == {False, True}
        assert all(c.has_lin for c in configs if c.kernel == "bwd_dkdv_lin")
        assert all(c.num_stages >= 2 for c in configs if c.kernel in ("fwd", "bwd_dq"))  # they prefetch


@pytest.mark.parametrize("path", ["none", "direct", "subtract"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_launchers_launch_only_shipped_configs(monkeypatch, dtype, path):
    """The forward and backward launchers pick their kernels through select_sla_config: record them."""
    launched = []
    for module in (st, sla_bwd_launcher):  # (the backward's launcher calls the same two helpers)
        monkeypatch.setattr(module, "_launch", lambda cfg, grid, *args: launched.append(cfg))
        monkeypatch.setattr(module, "_arch", lambda device: 90)
    method = SLA(topk=0.3, negligible=0.3, block_q=128)
    q, k, v = (torch.randn(1, 2, 200, 80, dtype=dtype) for _ in range(3))
    blocks: SLABlocks = sla_classify(q.float(), k.float(), method)
    lin = {"none": blocks.critical[..., :0], "direct": blocks.marginal.to(torch.int32),
           "subtract": torch.cat([blocks.negligible, blocks.critical], -1)}[path]
    has_lin, sign = path != "none", -1 if path == "subtract" else 1
    qf, kf = (rounded_features(t, "softmax") for t in (q, k)) if has_lin else (None, None)
    o, lse, o_l, den = st.sla_forward(q, k, v, blocks.critical, lin, 0.1, 0, has_lin, sign, path == "subtract", 1e-6,
                                      128)
    assert o_l.dtype == dtype and o_l.shape == (q.shape if has_lin else (0,))
    dnum = torch.zeros(q.shape) if has_lin else den
    den_grad = torch.zeros(lse.shape) if has_lin else den
    sla_bwd_launcher.sla_backward(torch.zeros_like(q), torch.zeros_like(lse), dnum, den_grad, q, k, v, qf, kf, q, lse,
                                  blocks.critical, lin, 0.1, 0, has_lin, sign, 128)
    glob = ["global"] if has_lin else []  # phi(K) for the linear loop (and the subtract plan's global sums)
    expect = glob + ["fwd", "bwd_dq", "bwd_dkdv"] + (["bwd_dkdv_lin"] if has_lin else [])
    assert [c.kernel for c in launched] == expect
    assert set(launched) <= set(sc.shipped_configs(90))
    assert {(c.block_d, c.dtype) for c in launched} == {(128, dtype)}
    assert [c.has_lin for c in launched] == [True] * len(glob) + [has_lin, has_lin, False] + ([True] if has_lin else [])


@static_toolchain
@pytest.mark.parametrize("d", [64, 128])
def test_sm90_linear_loop_reads_features_instead_of_making_them(d):
    """The forward's linear loop reads phi(K) (stored once by the global-sums kernel): no MUFU (exp) instruction
    per key block, and fewer than twice the critical loop's SASS instructions per key block. Making phi there took
    968 instructions per half block against the critical loop's 342 (d128, bf16), and the call 8x the time of the
    same call without the linear branch on an H200."""
    from dit_accel.kernels.sass import analyze_many

    row = analyze_many([(sc.select_sla_config("fwd", torch.bfloat16, d, True, 90), 90)], workers=1)[0]
    assert row["error"] is None, row["error"]
    linear, critical = row["loops"]["linear"], row["loops"]["critical"]
    assert linear["classes"].get("mufu", 0) == 0, linear
    assert linear["instructions"] < 2 * critical["instructions"], (linear["instructions"], critical["instructions"])
