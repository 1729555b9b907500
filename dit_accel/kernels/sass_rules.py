"""The rules :mod:`dit_accel.kernels.sass` judges a compiled configuration by: which loop is the main one, an issue /
tensor / MUFU roofline per tile, what counts as clean, and the ranking of candidate configurations."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence


# ----------------------------------------------------------------------------- the main loop
#: The loop whose per-tile instruction count is compared with the dense kernel's ``full`` loop.
MAIN_LOOP = {"block_sparse": "full", "sla": "critical", "dense": "full"}
#: The loop of masked tiles, compared with the main loop (partial-block cost).
MASKED_LOOP = {"block_sparse": "partial", "sla": "ragged", "dense": "tail"}


def main_loop(row: dict) -> str:
    """The name of a row's main loop (SLA's linear-branch dK/dV kernel has only linear loops)."""
    return "linear" if row.get("kernel") == "bwd_dkdv_lin" else MAIN_LOOP.get(row.get("family"), "full")


# ----------------------------------------------------------------------------- cost model
#: Dense tensor-core FLOPs per clock per SM for fp16/bf16 inputs (fp32 accumulation), from the
#: parts' datasheets: A100 312 TFLOPS / 108 SMs / 1.41 GHz, L40S 362 / 142 / 2.52,
#: H100 SXM 989 / 132 / 1.83. tf32 (fp32 inputs) runs at half that.
TENSOR_FLOPS_PER_CLK = {80: 2048, 89: 1024, 90: 4096}


#: MUFU (exp2, rcp) results per clock per SM.
MUFU_PER_CLK = 16


#: Warp instructions an SM issues per clock (4 schedulers, one each).
ISSUE_PER_CLK = 4


_DOTS = {"fwd": 2, "bwd_dq": 3, "bwd_dkdv": 4, "bwd_dkdv_dq": 5, "bwd_dkdv_lin": 6}  # tensor-core products per tile


def loop_warps(row: dict) -> int:
    """Warps that run a row's tile loop: ``num_warps``, or in a warp-specialized kernel its consumer
    warp groups (the CTA's warps less the ``num_warps`` of the producer's default partition)."""
    if row.get("warp_specialized") and row.get("cta_warps", 0) > row["num_warps"]:
        return row["cta_warps"] - row["num_warps"]
    return row["num_warps"]


def tile_cycles(row: dict, loop: Optional[str] = None) -> Optional[dict]:
    """Modelled SM cycles per tile of a loop: the issue port, the tensor cores and the MUFU in parallel.

    ``issue = instructions * warps / 4``, ``tensor = 2 * dots * BM * BN * D / flops-per-clock``,
    ``mufu = MUFU instructions * warps * 32 / 16``; the tile costs the largest (a roofline of
    the three, assuming enough resident warps to overlap them). A model, not a measurement.
    """
    loop = loop or main_loop(row)
    lp = (row.get("loops") or {}).get(loop)
    if lp is None:
        return None
    arch = 90 if row["arch"] >= 90 else (80 if row["arch"] == 80 else 89)
    bm, bn = row["tile"]
    flops = 2 * _DOTS.get(row["kernel"], 2) * bm * bn * row["block_d"]
    rate = TENSOR_FLOPS_PER_CLK[arch] / (2 if "float32" in row["dtype"] else 1)
    warps = loop_warps(row)
    parts = {"issue": lp["instructions"] * warps / ISSUE_PER_CLK, "tensor": flops / rate,
             "mufu": lp["classes"].get("mufu", 0) * warps * 32 / MUFU_PER_CLK}
    bound = max(parts, key=parts.get)
    return {**parts, "cycles": parts[bound], "bound": bound, "per_pair": parts[bound] / (bm * bn)}


def clean(row: dict) -> bool:
    """Compiled, fits shared memory, no spill (stack / local / spill bytes) and no serialised wgmma."""
    return (row.get("error") is None and row["shared"] <= row["limit"] and not row["stack"] and not row["local"]
            and not row["spill_stores"] and not row["c7515"])


#: A masked (partial) tile may cost at most this many full tiles (the tests' bound).
PARTIAL_LIMIT = 1.5


def _partial_ok(row: dict) -> bool:
    loops = row.get("loops") or {}
    main, masked = loops.get(main_loop(row)), loops.get(MASKED_LOOP.get(row["family"], ""))
    return row["family"] != "block_sparse" or not (main and masked) or \
        masked["instructions"] <= PARTIAL_LIMIT * main["instructions"]


def rank(rows: Sequence[dict], loop: Optional[str] = None) -> List[dict]:
    """Clean candidates whose partial tiles cost at most :data:`PARTIAL_LIMIT` full ones first, by
    modelled cycles per score element of the main loop (within 2%),
    then by the owned tile's rows (each streamed K/V or Q/dO tile serves that many rows: fewer
    global loads per score element), by resident warps per SM and by stages (both hide memory
    latency, which the model does not see), then by registers."""
    def key(r):
        cyc = tile_cycles(r, loop) if r.get("error") is None else None
        if cyc is None:
            return (True, float("inf"), 0, 0, 0, 0)
        owned = r["tile"][1] if r["kernel"].startswith("bwd_dkdv") else r["tile"][0]
        return (not (clean(r) and _partial_ok(r)), round(math.log(cyc["per_pair"]) / math.log(1.02)), -owned,
                -r["occupancy"]["warps"], -min(r["num_stages"], 3), r["registers"])

    return sorted(rows, key=key)
