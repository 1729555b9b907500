"""Every shipped block-sparse configuration compiles for sm_80, sm_89 and sm_90, fits, and is lean.

No GPU needed: triton compiles ahead of time for a GPUTarget on this CPU machine, and the
artefact is read back (dit_accel.kernels.sass): shared memory, tensor-core instructions,
registers, spills (ptxas -v and cuobjdump -res-usage: STACK / LOCAL) and ptxas performance
advisories such as C7515 (serialised wgmma). Compiles run in 2 spawned processes and land in
triton's and dit_accel's on-disk caches, so only the first run on a machine pays the full cost.
The interpreter tests (test_block_sparse_triton.py) check the numbers; test_sass.py the SASS
per tile against the dense kernel.
"""
import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels.backends import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM  # noqa: E402
from dit_accel.kernels.block_sparse.configs import GPU_LAYOUT_BLOCKS  # noqa: E402
from dit_accel.kernels.block_sparse.configs import fused_config, fused_pointer, pointer_fallback, resume_config, select_config, ws_config  # noqa: E402,E501
from dit_accel.kernels.checks import SUPPORTED_DTYPES  # noqa: E402
from dit_accel.kernels.compile import TARGET_ARCHS, shared_memory_limit  # noqa: E402
from dit_accel.kernels.sass import compile_shipped  # noqa: E402
from dit_accel.kernels.compile import shipped_kernel_configs as _all_configs  # noqa: E402
from tests.utils import static_toolchain  # noqa: E402

HEAD_DIMS = (1, 8, 16, 32, 48, 64, 72, 80, 96, 112, 128, 160, 192, MAX_HEAD_DIM)


def shipped_kernel_configs(arch=None):
    return _all_configs(arch, family="block_sparse")


@pytest.fixture(scope="module")
def compiled():
    return compile_shipped(TARGET_ARCHS, workers=2, configs={a: shipped_kernel_configs(a) for a in TARGET_ARCHS})


def _offenders(rows, bad):
    return "\n".join(f"sm_{r['arch']} {r['name']}: {bad(r)}" for r in rows if r["error"] is None and bad(r))


@pytest.mark.parametrize("arch", TARGET_ARCHS, ids=lambda a: f"sm_{a}")
def test_every_shipped_config_compiles_and_fits(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert len(rows) == len(shipped_kernel_configs(arch)) > 0
    failed = [f"{r['name']}: {r['error']}" for r in rows if r["error"] is not None]
    assert not failed, "kernels that do not compile for sm_%d:\n%s" % (arch, "\n".join(failed))
    too_big = _offenders(rows, lambda r: r["shared"] > r["limit"] and f"{r['shared']} B > {r['limit']} B")
    assert not too_big, f"kernels over the shared-memory limit of sm_{arch}:\n{too_big}"


@static_toolchain
def test_no_shipped_config_spills(compiled):
    """A spill is local-memory traffic in the inner loop: every shipped configuration has none."""
    spills = _offenders(compiled, lambda r: (r["stack"] or r["local"] or r["spill_stores"] or r["spill_loads"])
                        and f"stack {r['stack']} B, local {r['local']} B, spill stores {r['spill_stores']} B, "
                            f"{r['registers']} registers")
    assert not spills, "configurations that spill:\n" + spills


def test_no_serialized_wgmma_or_other_ptxas_advisory(compiled):
    """C7515: ptxas serialised the wgmma pipeline (it waits after every MMA); any advisory fails."""
    advised = _offenders(compiled, lambda r: r["warnings"] and "; ".join(f"{w['code']} {w['message'][:120]}"
                                                                          for w in r["warnings"]))
    assert not advised, "ptxas performance advisories:\n" + advised


def test_matmul_kernels_use_tensor_cores(compiled):
    """bf16/fp16/fp32(tf32) attention kernels compile to mma instructions; on sm_90 to async wgmma
    wherever the tile allows it (64 MMA rows per warpgroup: the owned tile, keys for dK/dV)."""
    rows = [r for r in compiled if r["kernel"] != "bwd_preprocess" and r["error"] is None]
    assert rows
    no_mma = [f"sm_{r['arch']} {r['name']}" for r in rows if not r["mma"]]
    assert not no_mma, f"no mma in the PTX of: {no_mma}"

    def wgmma_tile(r):
        owned = r["tile"][1] if r["kernel"] == "bwd_dkdv" else r["tile"][0]
        return owned >= 64 * (r["num_warps"] // 4)

    no_wgmma = [r["name"] for r in rows if r["arch"] == 90 and wgmma_tile(r) and not r["wgmma"]]
    assert not no_wgmma, f"no wgmma on sm_90 in: {no_wgmma}"
    main = [r for r in rows if r["arch"] == 90 and r["name"].startswith(("fwd-bf16-d128-m128", "fwd-fp16-d64-m128"))]
    assert main and all(r["wgmma"] for r in main)


def test_shipped_list_covers_every_launch_choice():
    """Whatever select_config returns for a valid GPU launch is in the shipped (compiled) list,
    and so is the pointer fallback of every TMA configuration."""
    for arch in TARGET_ARCHS:
        shipped = set(shipped_kernel_configs(arch))
        for kernel in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"):
            for dtype in SUPPORTED_DTYPES:
                for d in HEAD_DIMS:
                    for bq in GPU_LAYOUT_BLOCKS:
                        for bk in GPU_LAYOUT_BLOCKS:
                            cfg = select_config(kernel, dtype, d, bq, bk, arch)
                            assert cfg in shipped, cfg
                            if cfg.tma:
                                assert pointer_fallback(cfg) in shipped, cfg
                            ws = ws_config(cfg, arch)
                            if ws is not None:  # the launcher's choice where ws_pays
                                assert ws in shipped and resume_config(ws, arch) in shipped, ws
                            fused = fused_config(dtype, d, bq, bk, arch)  # the one-pass backward
                            if fused is not None:
                                assert fused in shipped and fused_pointer(fused, arch) in shipped | {None}, fused


def test_sm90_ships_a_warp_specialized_forward(compiled):
    """sm_90's forward for 128-token query blocks at head dims <= 128 (fp16, bf16) has a
    warp-specialized configuration (4 warps: Triton 3.9 builds no partitions at 8) and its resume
    pass, and both compiled: ws partitions in the TTGIR, setmaxnreg in the PTX, 12 warps per CTA."""
    for dtype in (torch.float16, torch.bfloat16):
        for d in (80, 128):
            ws = ws_config(select_config("fwd", dtype, d, 128, 128, 90), 90)
            assert ws is not None and ws.ws and ws.num_warps == 4 and ws.block_m == 128, (dtype, d)
    assert ws_config(select_config("fwd", torch.float32, 128, 128, 128, 90), 90) is None
    assert all(ws_config(select_config("fwd", torch.bfloat16, 128, 128, 128, a), a) is None for a in (80, 89))
    rows = {r["name"]: r for r in compiled if r["arch"] == 90}
    ws_rows = [r for name, r in rows.items() if name.endswith("-ws")]
    assert len(ws_rows) == 2 and len([n for n in rows if n.endswith("-resume")]) == 2
    for r in ws_rows:
        assert r["warp_specialized"] and r["setmaxnreg"] and r["cta_warps"] == 12 and r["persistent"], r["name"]


def test_shipped_list_spans_dtypes_head_dims_kernels_and_load_paths():
    configs = shipped_kernel_configs(90)
    assert {c.dtype for c in configs} == {torch.float16, torch.bfloat16, torch.float32}
    assert {c.block_d for c in configs} == {64, 128, 256}
    assert {c.kernel for c in configs} == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "bwd_dkdv_dq"}
    # TMA kernels mask head-dim columns outside their loops; pointer kernels get padded inputs.
    assert {(c.tma, c.even_d) for c in configs if c.kernel == "fwd"} == {(True, False), (False, True)}
    assert not any(c.tma for c in shipped_kernel_configs(80) + shipped_kernel_configs(89))
    fwd = {(c.block_m, c.block_n) for c in configs if c.kernel == "fwd" and c.dtype == torch.bfloat16
           and c.block_d == 128}
    assert len(fwd) == 2 and all(bm <= 64 and bn <= 64 for bm, bn in [min(fwd)])  # one tile for 64-blocks


def test_configs_tile_the_layout_blocks():
    """Every kernel tile divides the layout block it serves (pure Python, no compile)."""
    for arch in TARGET_ARCHS:
        for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
            for dtype in SUPPORTED_DTYPES:
                for d in (32, 64, 80, 128, 256):
                    for bq in GPU_LAYOUT_BLOCKS:
                        for bk in GPU_LAYOUT_BLOCKS:
                            cfg = select_config(kernel, dtype, d, bq, bk, arch)
                            assert bq % cfg.block_m == 0 and bk % cfg.block_n == 0, cfg
                            assert cfg.block_d >= d and cfg.even_d == (not cfg.tma)


def test_shared_memory_limits():
    # Max dynamic shared memory per block, CUDA C programming guide (compute capabilities table).
    assert shared_memory_limit(80) == 163 * 1024
    assert shared_memory_limit(89) == 99 * 1024
    assert shared_memory_limit(90) == 227 * 1024


def test_compile_for_target_refuses_interpreter_process(monkeypatch):
    from dit_accel.kernels import compile_for_target

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = shipped_kernel_configs(90)[0]
    with pytest.raises(RuntimeError, match="compile_shipped"):
        compile_for_target(cfg, 90)
