"""GPUs that are not one of the compiled targets (sm_80, sm_89, sm_90, sm_100) run a target's configurations, chosen
by their shared memory: sm_86 and consumer Blackwell (sm_120, RTX 50 series, 99 KB a block) sm_89's, sm_87
sm_80's. Before, sm_120 took sm_89's tiles with sm_90's TMA loads and SLA's sm_90 configurations: six kernels
needed 104-139 KB of its 99 and could not launch. The largest of sm_120's kernels compile for sm_120 itself here
and fit (no GPU needed); all 114 did (at most 91 KB), 10 of them with 12-52 B of spill stores (`compile_shipped([120],
configs={120: shipped_kernel_configs(120)})`, 2026-11-30). sm_103 (B300) runs sm_100's: all 154 compile for sm_103
and fit (at most 161 KB of its 227), none spills (`compile_shipped([103], configs={103: shipped_kernel_configs(100)})`,
2026-11-30)."""
import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels.block_sparse.configs import length_config, select_config  # noqa: E402
from dit_accel.kernels import occupancy  # noqa: E402
from dit_accel.kernels.compile import TARGET_ARCHS, shipped_kernel_configs  # noqa: E402
from dit_accel.kernels.limits import config_target, shared_memory_limit  # noqa: E402
from dit_accel.kernels.sass import compile_shipped  # noqa: E402
from dit_accel.kernels.sla.configs import select_sla_config  # noqa: E402
from tests.utils import static_toolchain  # noqa: E402

# compute capability -> the target it runs, from the CUDA programming guide's shared memory per block. The 99 KB
# parts (sm_86, sm_89, sm_120, sm_121) run sm_89's; sm_103 (B300) runs sm_100's, the nearest lower part of its major
# (its family), as in the occupancy table; a part with no listed sibling of its major (sm_110) runs sm_89's.
TARGETS = {80: 80, 86: 89, 87: 80, 89: 89, 90: 90, 100: 100, 103: 100, 110: 89, 120: 89, 121: 89}


def test_each_part_runs_the_configurations_of_a_compiled_target():
    assert {arch: config_target(arch) for arch in TARGETS} == TARGETS
    assert set(TARGETS.values()) == set(TARGET_ARCHS)
    for arch, target in TARGETS.items():
        for family in ("block_sparse", "sla"):
            assert set(shipped_kernel_configs(arch, family)) == set(shipped_kernel_configs(target, family)), \
                (arch, family)


def test_the_shared_memory_table_and_the_occupancy_table_agree_on_every_part():
    """Both read an unlisted part as its nearest lower sibling: before, the occupancy table sized sm_103's persistent
    grids with sm_100's 228 KB while the configuration table gave it sm_89's 99 KB tiles."""
    for arch in TARGETS:  # (a block may take all of an SM's shared memory but the 1 KB the driver reserves)
        assert occupancy.sm_limits(arch)["smem"] - 1024 == shared_memory_limit(arch), arch
    assert shared_memory_limit(103) == 227 * 1024 and shared_memory_limit(121) == shared_memory_limit(110) == 99 * 1024


def test_consumer_blackwell_loads_by_pointer_in_sm89_tiles():
    """sm_120 has TMA, but its TMA rings do not fit 99 KB: every kernel loads by pointer, as on sm_89."""
    configs = shipped_kernel_configs(120)
    assert configs and not [c.name for c in configs if c.tma]
    assert shared_memory_limit(120) == 99 * 1024


def _largest_of_sm120():
    """The kernels that needed most shared memory on sm_120 before (128 x 64 forwards at d128 with 3 stages, the
    length variant, SLA's linear-branch dQ and forward at d128), as sm_120 now runs them."""
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        fwd = select_config("fwd", dtype, 128, 128, 128, 120)
        out += [fwd, length_config(fwd, 120), select_sla_config("bwd_dq", dtype, 128, True, 120),
                select_sla_config("fwd", dtype, 128, True, 120)]
    return [c for c in out if c is not None]


#: Spills of sm_89's configurations compiled for sm_120 (triton 3.9; bytes of spill stores): no sm_120 GPU has timed
#: a retuned one, so sm_120 runs them as sm_89 does, launchable and right, with these few bytes of local traffic.
SM120_SPILL_STORES = {"fwd-fp16-d128-m128n64-w8s3": 12, "fwd-bf16-d128-m128n64-w8s3": 12,
                      "fwd-fp16-d128-m128n64-w8s3-len": 28, "fwd-bf16-d128-m128n64-w8s3-len": 28}


@static_toolchain
def test_the_largest_kernels_of_sm120_compile_for_it_and_fit():
    configs = _largest_of_sm120()
    assert len(configs) == 8
    rows = compile_shipped([120], workers=2, configs={120: configs})
    assert len(rows) == len(configs)
    for row in rows:
        assert row["error"] is None, (row["name"], row["error"])
        assert row["shared"] <= row["limit"] == 99 * 1024, (row["name"], row["shared"])
        assert row["mma"] and not row["warnings"], row
        assert row["spill_stores"] == SM120_SPILL_STORES.get(row["name"], 0), row


@static_toolchain
def test_b300_runs_sm100_configurations_that_compile_for_it_and_fit():
    """sm_103 (B300) took sm_89's 99 KB configurations; it now runs sm_100's. Its largest (the fp32 d256 dK/dV, 161
    KB) and the Wan forward (bf16 d128, TMA) compile for sm_103 itself: within 227 KB, tensor-core code, no spill."""
    configs = shipped_kernel_configs(103)
    assert {c.name for c in configs} == {c.name for c in shipped_kernel_configs(100)}
    largest = next(c for c in configs if c.name == "bwd_dkdv-fp32-d256-m32n32-w8s1")
    wan = select_config("fwd", torch.bfloat16, 128, 128, 64, 103)
    assert wan.tma
    rows = compile_shipped([103], workers=2, configs={103: [largest, wan]})
    assert {r["name"] for r in rows} == {largest.name, wan.name}
    for row in rows:
        assert row["error"] is None and row["limit"] == 227 * 1024 >= row["shared"], row
        assert row["mma"] and not row["warnings"] and row["spill_stores"] == 0, row
    assert max(r["shared"] for r in rows) > 160 * 1024  # more than any 99 KB or 163 KB part could hold
