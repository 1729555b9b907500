"""The host-path benchmark (dit_accel.eval.host_path): it runs, stubs the launches and puts them back.
A benchmark, not a timed test: no bound on the numbers here (BENCHMARKS.md records them)."""

import pytest

from dit_accel.kernels.backends import triton_reason

pytestmark = pytest.mark.skipif(triton_reason("cpu") is not None, reason="needs the Triton interpreter on the CPU")


def test_measure_host_path_runs_every_stage_and_restores_the_kernels(monkeypatch):
    from dit_accel.eval.host_path import measure_host_path, stub_launches
    from dit_accel.kernels.vsa import fine

    monkeypatch.setattr(fine, "_TEMPLATES", {})  # (the VSA stages' templates stay in this test)
    from dit_accel.kernels.block_sparse import triton as bs
    from dit_accel.kernels.sla import operands, pool, select
    from dit_accel.kernels.sla import triton as sla
    from dit_accel.kernels.dense import triton as dense
    from dit_accel.kernels.vsa import triton as vsa

    before = (bs._fwd_kernel, dict(sla.KERNELS), dict(pool.KERNELS), dict(operands.KERNELS), dict(select.KERNELS),
              dict(vsa.KERNELS), vsa.coarse_triton, dense._bwd_preprocess_kernel)
    result = measure_host_path(tokens=256, calls=3, repeats=1)
    assert set(result) == {"api", "api_lse", "api_grad", "custom_op", "launcher", "backward_launcher", "plan",
                           "plan_tiled", "plan_tiled_text", "sla", "sla_proj", "sla_small", "sla_small_proj",
                           "vsa_fine", "vsa_fine_partial", "vsa_fine_layout", "vsa", "vsa_raster", "vsa_partial",
                           "vsa_partial_raster"}
    assert all(us > 0 for us in result.values())
    assert (bs._fwd_kernel, dict(sla.KERNELS), dict(pool.KERNELS), dict(operands.KERNELS),
            dict(select.KERNELS), dict(vsa.KERNELS), vsa.coarse_triton, dense._bwd_preprocess_kernel) == before
    with stub_launches():
        assert bs._fwd_kernel is not before[0] and pool.KERNELS["pool"] is not before[2]["pool"]
        assert dense._bwd_preprocess_kernel is not before[7]  # (SLA's backward launches the dense module's)
        assert select.KERNELS["select"] is not before[4]["select"]
    assert bs._fwd_kernel is before[0]


def test_device_ops_are_counted_per_stage():
    """The detail mode counts each stage's device work: the block-sparse launcher is one Triton launch and no
    torch kernel, its backward three; SLA without projection is its pooling, selection and forward launches plus one
    torch kernel (the pooling's ticket zero-fill): no matmul, sort or cast between the classification's launches."""
    from dit_accel.eval.host_path import measure_host_path

    result = measure_host_path(tokens=256, calls=2, repeats=1, stages=("launcher", "backward_launcher", "sla_small"),
                               detail=True)
    assert result["launcher"]["ops"] == {"torch": 0, "triton": 1, "kernels": 1, "allocations": 2}
    # the backward: preprocess, dK/dV, dQ; delta, lse2 and the three gradients allocated
    assert result["backward_launcher"]["ops"] == {"torch": 0, "triton": 3, "kernels": 3, "allocations": 5}
    sla = result["sla_small"]["ops"]
    assert sla["triton"] == 3 and sla["torch"] == 1 and sla["kernels"] == 4


def test_count_device_ops_counts_kernels_not_views_or_allocations():
    import torch

    from dit_accel.eval.host_path import count_device_ops, stub_launches

    x = torch.randn(4, 8)
    with stub_launches() as launches:
        ops = count_device_ops(lambda: (x.view(8, 4).t() + 1).sum() + torch.empty(3).sum(), launches)
    assert ops == {"torch": 4, "triton": 0, "kernels": 4, "allocations": 1}  # add, sum, sum, add


def test_vsa_fine_stages_count_the_per_call_plan_against_the_general_path(monkeypatch):
    """VSA's fine branch on a class's later call: the plan's cast and concatenation, the kernel and the way back
    (whole cubes), one sort and its bookkeeping more (partial ones); the general path (a layout per call) about 5x
    the launches. The general-path stage puts the template path back when it ends."""
    from dit_accel.eval.host_path import measure_host_path
    from dit_accel.kernels.vsa import fine

    monkeypatch.setattr(fine, "_TEMPLATES", {})  # (the stages' templates stay in this test)
    result = measure_host_path(calls=2, repeats=1, stages=("vsa_fine", "vsa_fine_partial", "vsa_fine_layout"),
                               detail=True)
    whole, partial, general = (result[n]["ops"] for n in ("vsa_fine", "vsa_fine_partial", "vsa_fine_layout"))
    assert whole == {"torch": 4, "triton": 1, "kernels": 5, "allocations": 2}  # cast, cat, 2 gathers back
    assert partial["triton"] == 1 and partial["torch"] == 12
    assert general["triton"] == 1 and general["torch"] >= 5 * whole["torch"]
    assert fine.remember.__name__ == "remember" and fine.has_template((8, 16, 16), (1, 2, 2048, 64))


def test_vsa_stages_read_raster_order_with_fewer_kernels(monkeypatch):
    """A whole gated VSA call on a class's later call, its coarse launches stubbed too: reading raster order drops
    the three copies into cube order and the fine output's way back (two gathers of the lse and the output where
    cubes are whole; with partial cubes the copies' padding fills too) and, the fine launch adding the gated term,
    the gated sum's pass; the launches stay two coarse + one fine."""
    from dit_accel.eval.host_path import measure_host_path
    from dit_accel.kernels.vsa import api, fine

    monkeypatch.setattr(fine, "_TEMPLATES", {})
    monkeypatch.setattr(api, "_RASTER_CHOICES", {})
    result = measure_host_path(calls=2, repeats=1, stages=("vsa", "vsa_raster", "vsa_partial", "vsa_partial_raster"),
                               detail=True)
    ops = {name: r["ops"] for name, r in result.items()}
    assert all(o["triton"] == 3 for o in ops.values()), ops
    # 3 copies in, 1 of the fine output back, and the gated sum's pass, which the fine launch takes over
    assert ops["vsa"]["torch"] - ops["vsa_raster"]["torch"] == 5, ops
    assert ops["vsa_partial"]["torch"] - ops["vsa_partial_raster"]["torch"] >= 6, ops
    assert list(api._RASTER_CHOICES.values()) == [True, True]  # (decided per grid where switched on; off: no choice)
