"""The host-path benchmark (dit_accel.eval.host_path): it runs, stubs the launches and puts them back.
A benchmark, not a timed test: no bound on the numbers here (BENCHMARKS.md records them)."""

import pytest

from dit_accel.kernels.backends import triton_reason

pytestmark = pytest.mark.skipif(triton_reason("cpu") is not None, reason="needs the Triton interpreter on the CPU")


def test_measure_host_path_runs_every_stage_and_restores_the_kernels():
    from dit_accel.eval.host_path import measure_host_path, stub_launches
    from dit_accel.kernels.block_sparse import triton as bs
    from dit_accel.kernels.sla import triton as sla

    before = (bs._fwd_kernel, dict(sla.KERNELS))
    result = measure_host_path(tokens=256, calls=3, repeats=1)
    assert set(result) == {"api", "api_lse", "api_grad", "custom_op", "launcher", "plan", "plan_tiled",
                           "plan_tiled_text", "sla", "sla_proj"}
    assert all(us > 0 for us in result.values())
    assert (bs._fwd_kernel, dict(sla.KERNELS)) == before
    with stub_launches():
        assert bs._fwd_kernel is not before[0]
    assert bs._fwd_kernel is before[0]
