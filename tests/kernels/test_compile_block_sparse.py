"""Every shipped Triton kernel configuration compiles for sm_80, sm_89 and sm_90 and fits.

No GPU needed: triton compiles ahead of time for a GPUTarget on this CPU machine.
The interpreter tests (test_triton_kernels.py) check numbers; this checks that the
configurations the launchers pick are real GPU kernels within each part's shared
memory. Compiles run in 2 spawned processes and land in triton's on-disk cache,
so only the first run on a machine pays the full cost.
"""
import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels.backends import GPU_LAYOUT_BLOCKS, TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM  # noqa: E402
from dit_accel.kernels.block_sparse.configs import select_config  # noqa: E402
from dit_accel.kernels.checks import SUPPORTED_DTYPES  # noqa: E402
from dit_accel.kernels.compile import TARGET_ARCHS, compile_shipped, shared_memory_limit  # noqa: E402
from dit_accel.kernels.compile import shipped_kernel_configs as _all_configs  # noqa: E402


def shipped_kernel_configs(arch=None):
    return _all_configs(arch, family="block_sparse")


@pytest.fixture(scope="module")
def compiled():
    return compile_shipped(TARGET_ARCHS, workers=2, configs={a: shipped_kernel_configs(a) for a in TARGET_ARCHS})


@pytest.mark.parametrize("arch", TARGET_ARCHS, ids=lambda a: f"sm_{a}")
def test_every_shipped_config_compiles_and_fits(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert len(rows) == len(shipped_kernel_configs(arch)) > 0
    failed = [f"{r['name']}: {r['error']}" for r in rows if r["error"] is not None]
    assert not failed, "kernels that do not compile for sm_%d:\n%s" % (arch, "\n".join(failed))
    too_big = [f"{r['name']}: {r['shared']} B > {r['limit']} B" for r in rows if r["shared"] > r["limit"]]
    assert not too_big, "kernels over the shared-memory limit of sm_%d:\n%s" % (arch, "\n".join(too_big))


def test_matmul_kernels_use_tensor_cores(compiled):
    """bf16/fp16/fp32(tf32) attention kernels must compile to mma instructions, not FMA loops."""
    rows = [r for r in compiled if r["kernel"] != "bwd_preprocess"]
    assert rows
    no_mma = [f"sm_{r['arch']} {r['name']}" for r in rows if not r["mma"]]
    assert not no_mma, f"no mma in the PTX of: {no_mma}"
    bf16_fwd = [r for r in rows if r["arch"] == 90 and r["name"].startswith("fwd-bf16-d128-m128")]
    assert bf16_fwd and all(r["wgmma"] for r in bf16_fwd), "sm_90 bf16 forward should use wgmma"


def test_shipped_list_covers_every_launch_choice():
    """Whatever select_config returns for a valid GPU launch is in the shipped (compiled) list."""
    shipped = set(shipped_kernel_configs())
    for arch in TARGET_ARCHS:
        for kernel in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"):
            for dtype in SUPPORTED_DTYPES:
                for d in (1, 8, 16, 32, 48, 64, 72, 80, 96, 112, 128, 160, 192, MAX_HEAD_DIM):
                    for bq in GPU_LAYOUT_BLOCKS:
                        for bk in GPU_LAYOUT_BLOCKS:
                            cfg = select_config(kernel, dtype, d, bq, bk, arch)
                            assert cfg in shipped, cfg


def test_shipped_list_spans_dtypes_head_dims_and_kernels():
    configs = shipped_kernel_configs(90)
    assert {c.dtype for c in configs} == {torch.float16, torch.bfloat16, torch.float32}
    assert {c.block_d for c in configs} == {64, 128, 256}
    assert {c.kernel for c in configs} == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}
    fwd = {(c.block_m, c.block_n) for c in configs
           if c.kernel == "fwd" and c.dtype == torch.bfloat16 and c.block_d == 128}
    assert fwd == {(64, 64), (128, 64)}  # one tile per layout block size 64 / >= 128


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
