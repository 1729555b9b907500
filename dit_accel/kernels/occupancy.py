"""Theoretical occupancy of a compiled kernel: how many CTAs an SM holds at once.

A leaf module: the static analysis (:mod:`dit_accel.kernels.sass`) and the persistent launcher
(:mod:`dit_accel.kernels.block_sparse.triton`, whose grid is SMs x CTAs per SM) both ask it.
"""

from __future__ import annotations

__all__ = ["occupancy"]

# Per-SM limits from NVIDIA's CUDA occupancy tables (compute capability 8.0, 8.6, 8.9, 9.0).
_SM = {
    80: dict(warps=64, ctas=32, smem=167936, regs=65536),
    86: dict(warps=48, ctas=16, smem=102400, regs=65536),
    89: dict(warps=48, ctas=24, smem=102400, regs=65536),
    90: dict(warps=64, ctas=32, smem=233472, regs=65536),
}
_SMEM_RESERVED = 1024  # per CTA, reserved by the driver (sm_80+)


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> dict:
    """Theoretical occupancy: ``{"ctas", "warps", "limit"}`` per SM, ``limit`` the binding resource."""
    sm = _SM.get(arch, _SM[86])
    per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256 registers
    by = {
        "warps": sm["warps"] // num_warps,
        "ctas": sm["ctas"],
        "registers": (sm["regs"] // per_warp) // num_warps if per_warp else sm["ctas"],
        "shared": sm["smem"] // (shared + _SMEM_RESERVED),
    }
    limit = min(by, key=by.get)
    return {"ctas": by[limit], "warps": by[limit] * num_warps, "limit": limit}
