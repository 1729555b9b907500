"""Static: the one-pass backward compiles to 5 tensor-core products per tile, the two-pass one to 4 + 3.

Compiled ahead of time for sm_90 and sm_80 (no GPU: dit_accel.kernels.sass, spawned processes, triton's and
dit_accel's tool caches) with the SASS loops read. A product is a wgmma group on sm_90 (HGMMA instructions up
to the one that waits on the group barrier, gsb0) or, as mma.sync (sm_80, and sm_90 tiles under 64 rows), the
m16n8k16 HMMA instructions that one ``rows x cols x head dim`` product takes per warp. Registers and spills of
every shipped configuration, this one included, are checked in test_compile_block_sparse.py.
"""

import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels import sass  # noqa: E402
from dit_accel.kernels.block_sparse.configs import fused_config, select_config  # noqa: E402
from tests.utils import static_toolchain  # noqa: E402

# (arch, padded head dim, layout block): every shipped one-pass configuration, bf16.
CASES = [(90, 128, 128), (90, 64, 64), (80, 64, 64)]
HMMA_MACS = 16 * 8 * 16  # one m16n8k16 instruction, per warp


def _jobs():
    jobs = []
    for arch, d, block in CASES:
        jobs.append((fused_config(torch.bfloat16, d, block, block, arch), arch))
        jobs += [(select_config(k, torch.bfloat16, d, block, block, arch), arch) for k in ("bwd_dkdv", "bwd_dq")]
    return jobs


@pytest.fixture(scope="module")
def rows():
    return sass.analyze_many(_jobs(), workers=2, loops=True)


def products(row, loop):
    """Tensor-core products per iteration of ``loop`` (see the module docstring)."""
    lp = row["loops"][loop]
    bm, bn = row["tile"]
    hmma = lp["hmma"] * HMMA_MACS * row["num_warps"] / (bm * bn * row["block_d"])
    assert hmma == int(hmma), (row["name"], lp["hmma"])
    return lp["wgmma_groups"] + int(hmma)


@static_toolchain
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"sm_{a}-d{d}-b{b}" for a, d, b in CASES])
def test_one_pass_backward_has_five_products_per_tile(rows, case):
    fused, dkdv, dq = rows[3 * case: 3 * case + 3]
    for r in (fused, dkdv, dq):
        assert r["error"] is None, r["error"]
    assert fused["kernel"] == "bwd_dkdv_dq"
    for loop in ("full", "partial"):
        assert products(fused, loop) == 5, (fused["name"], loop, fused["loops"][loop])
        assert products(dkdv, loop) + products(dq, loop) == 4 + 3, (dkdv["name"], dq["name"], loop)
    assert not (fused["spill_stores"] or fused["stack"] or fused["local"]) and fused["registers"] <= 255
    print(f"\n{fused['name']}: {fused['registers']} registers, full tile {fused['loops']['full']['instructions']} "
          f"instructions, partial {fused['loops']['partial']['instructions']}; two-pass "
          f"{dkdv['name']} + {dq['name']}: {dkdv['registers']} / {dq['registers']} registers")
