"""Blackwell (sm_100) host decisions (issue 46, item 5): its own occupancy row, its own block-sparse forward tiles where
sm_90's spill there (SLA's do not), and no warp-specialized forward. The compiled artefacts (no spill, fits) are checked for
sm_100 in test_compile_block_sparse.py and test_compile_sla.py."""

import pytest
import torch

from dit_accel.kernels import occupancy
from dit_accel.kernels.block_sparse.configs import TARGET_ARCHS, select_config, ws_config


def test_sm100_is_a_compile_target():
    assert 100 in TARGET_ARCHS


@pytest.mark.parametrize("arch,row", [(100, 100), (103, 100), (90, 90), (86, 86), (120, 120), (75, 86)])
def test_occupancy_rows(arch, row):
    assert occupancy.sm_limits(arch) is occupancy._SM[row]


def test_a_persistent_grid_on_sm100_is_sized_with_sm100_limits():
    # a 116 KB, 8-warp, 196-register kernel: sm_86's 100 KB would say none fits; sm_100 holds one per SM
    assert occupancy.occupancy(100, 196, 116320, 8)["ctas"] == 1
    assert occupancy.occupancy(86, 196, 116320, 8)["ctas"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_q", [64, 128])
def test_sm100_forward_d128_takes_its_own_tiles(dtype, block_q):
    cfg = select_config("fwd", dtype, 128, block_q, 64, 100)
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (64, 64, 8, 3)
    sm90 = select_config("fwd", dtype, 128, block_q, 64, 90)
    assert (sm90.block_m, sm90.num_warps) != (64, 8)  # sm_90 keeps its own


def test_sm100_keeps_sm90_tiles_elsewhere_and_has_no_ws():
    for kernel in ("bwd_dq", "bwd_dkdv"):
        a, b = select_config(kernel, torch.bfloat16, 128, 128, 128, 100), select_config(kernel, torch.bfloat16,
                                                                                      128, 128, 128, 90)
        assert (a.block_m, a.block_n, a.num_warps, a.num_stages) == (b.block_m, b.block_n, b.num_warps, b.num_stages)
    assert ws_config(select_config("fwd", torch.bfloat16, 128, 128, 128, 100), 100) is None
    assert ws_config(select_config("fwd", torch.bfloat16, 128, 128, 128, 90), 90) is not None


def test_a_99kb_blackwell_part_takes_sm89_tiles():
    cfg = select_config("fwd", torch.bfloat16, 128, 128, 128, 120)
    assert cfg.num_stages * cfg.block_n * 128 * 2 * 2 < 101376  # its K/V ring fits 99 KB


def test_sm100_sla_kernels_take_sm90_launches():
    """Every SLA kernel on sm_100 is sm_90's static launch (test_compile_sla.py compiles them for sm_100: no
    spill); a launch picked by timing on an sm_90 GPU (MEASURED_LAUNCH) stays on sm_90."""
    from dit_accel.kernels.sla.configs import LAUNCH, MEASURED_LAUNCH, SLA_KERNELS, select_sla_config

    measured = set()
    for kernel in SLA_KERNELS:
        for d in (64, 128):
            for has_lin in (False, True):
                for dtype in (torch.float16, torch.bfloat16):
                    on_100, on_90 = (select_sla_config(kernel, dtype, d, has_lin, a) for a in (100, 90))
                    assert (on_100.num_warps, on_100.num_stages) == LAUNCH[90, kernel, d, on_100.has_lin]
                    if (90, kernel, d, on_90.has_lin) in MEASURED_LAUNCH:
                        measured.add(on_90)
                        assert on_100 != on_90
                    else:
                        assert on_100 == on_90
    assert len(measured) == 2 * len(MEASURED_LAUNCH)  # fp16 and bf16 each
