"""Theoretical occupancy of a compiled kernel: how many CTAs an SM holds at once.

A leaf module: the static analysis (:mod:`dit_accel.kernels.sass`) and the persistent launcher
(:mod:`dit_accel.kernels.block_sparse.triton`, whose grid is SMs x CTAs per SM) both ask it.

The launcher reads a kernel's registers from its cubin (:func:`cubin_resources`), not from triton's
``CompiledKernel.n_regs``: that attribute exists only once the kernel's handles are loaded on a GPU
(triton 3.9 sets it in ``_init_handles``, which ``warmup`` does not call), and the cubin says the same
on every triton version without a GPU, so CPU tests drive the very code a GPU runs.
"""

from __future__ import annotations

import functools
import struct
from typing import Callable, Optional, TypeVar

from .limits import listed_part

__all__ = ["occupancy", "cubin_resources", "compiled_resources", "resident_ctas", "on_gpu", "on_inputs_device"]

F = TypeVar("F", bound=Callable)

# Per-SM limits from NVIDIA's CUDA occupancy tables (compute capability 8.0, 8.6, 8.7, 8.9, 9.0, 10.0, 12.0). A block
# may take all of an SM's shared memory but the 1 KB the driver keeps: kernels.limits' per-block table (its twin).
_SM = {
    80: dict(warps=64, ctas=32, smem=167936, regs=65536),
    86: dict(warps=48, ctas=16, smem=102400, regs=65536),
    87: dict(warps=48, ctas=16, smem=167936, regs=65536),  # Jetson Orin: sm_86's warps, sm_80's shared memory
    89: dict(warps=48, ctas=24, smem=102400, regs=65536),
    90: dict(warps=64, ctas=32, smem=233472, regs=65536),
    100: dict(warps=64, ctas=32, smem=233472, regs=65536),
    120: dict(warps=48, ctas=32, smem=102400, regs=65536),
}


def sm_limits(arch: int) -> dict:
    """The per-SM limits of ``sm_<arch>``: the row of the part that stands for it
    (:func:`~dit_accel.kernels.limits.listed_part`: sm_103 takes sm_100's), else the smallest part's (sm_86's)."""
    part = listed_part(arch, _SM)
    return _SM[86 if part is None else part]
_SMEM_RESERVED = 1024  # per CTA, reserved by the driver (sm_80+)
_MAX_REGISTERS = 255  # per thread: what an unreadable kernel is assumed to use (the fewest CTAs)


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> dict:
    """Theoretical occupancy: ``{"ctas", "warps", "limit"}`` per SM, ``limit`` the binding resource."""
    sm = sm_limits(arch)
    per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256 registers
    by = {
        "warps": sm["warps"] // num_warps,
        "ctas": sm["ctas"],
        "registers": (sm["regs"] // per_warp) // num_warps if per_warp else sm["ctas"],
        "shared": sm["smem"] // (shared + _SMEM_RESERVED),
    }
    limit = min(by, key=by.get)
    return {"ctas": by[limit], "warps": by[limit] * num_warps, "limit": limit}


def on_gpu(device) -> bool:
    """Whether launches on ``device`` run on a GPU rather than Triton's interpreter: the one question the
    launchers' GPU-only code (persistent grids from occupancy, scratch for in-kernel descriptors) asks,
    so a test can answer it and drive that code on CPU up to the launch."""
    return device.type == "cuda"


def on_inputs_device(launcher: F) -> F:
    """Run ``launcher`` with its first argument's GPU as the current device. Triton launches on the current
    device (and the scratch of in-kernel descriptors comes from there): a q on ``cuda:1`` while ``cuda:0`` is
    current, as when a pipeline spreads its layers over GPUs, would run on the wrong GPU. A decorator, so the
    launchers' bodies stay as they are; on the current device it costs one device query."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        device = args[0].device
        if on_gpu(device) and device.index is not None:
            import torch

            if device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return run  # type: ignore[return-value]


_EIATTR_REGCOUNT = 0x2F  # .nv.info attribute: (symbol index, registers per thread)
_EIFMT_SVAL = 0x04  # attribute with a 16-bit size and a payload; 0x03 a 2-byte value, 0x01/0x02 none


def _sections(elf: bytes) -> dict:
    """``{name: (offset, size)}`` of an ELF64 little-endian file's sections."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_at = struct.unpack_from("<HHH", elf, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names = heads[names_at][4]
    out = {}
    for h in heads:
        start = names + h[0]
        out[elf[start:elf.index(b"\0", start)].decode()] = (h[4], h[5])
    return out


def _symbol_index(elf: bytes, sections: dict, name: str) -> Optional[int]:
    if ".symtab" not in sections or ".strtab" not in sections:
        return None
    (at, size), strtab = sections[".symtab"], sections[".strtab"][0]
    for i in range(size // 24):
        st_name = struct.unpack_from("<I", elf, at + 24 * i)[0]
        start = strtab + st_name
        if elf[start:elf.index(b"\0", start)].decode() == name:
            return i
    return None


def cubin_resources(cubin: bytes, kernel: str) -> dict:
    """``{"registers", "shared_static"}`` of ``kernel`` in a CUDA cubin, read from the ELF itself (what
    ``cuobjdump -res-usage`` prints as REG and SHARED): registers from the ``EIATTR_REGCOUNT`` entry of
    ``.nv.info``, static shared memory from the size of ``.nv.shared.<kernel>``. ``registers`` is None
    when the cubin holds no count for the kernel."""
    if cubin[:4] != b"\x7fELF":
        raise ValueError("not a cubin (no ELF header)")
    sections = _sections(cubin)
    shared = sections.get(f".nv.shared.{kernel}", (0, 0))[1]
    counts = {}
    at, size = sections.get(".nv.info", (0, 0))
    i, end = at, at + size
    while i + 2 <= end:
        fmt, attr = cubin[i], cubin[i + 1]
        if fmt == _EIFMT_SVAL:
            length = struct.unpack_from("<H", cubin, i + 2)[0]
            if attr == _EIATTR_REGCOUNT and length >= 8:
                sym, regs = struct.unpack_from("<II", cubin, i + 4)
                counts[sym] = regs
            i += 4 + length
        else:
            i += 4 if fmt == 0x03 else 2
    sym = _symbol_index(cubin, sections, kernel)
    registers = counts.get(sym) if sym is not None else None
    if registers is None and len(counts) == 1:  # triton's cubins hold one kernel
        registers = next(iter(counts.values()))
    return {"registers": registers, "shared_static": shared}


def compiled_resources(compiled) -> dict:
    """``{"registers", "shared", "num_warps"}`` of a triton ``CompiledKernel`` whether or not its handles are
    loaded: registers from the cubin (else ``n_regs``, which only loaded handles carry, else loading them),
    shared memory dynamic (``metadata.shared``) plus static, and all of the CTA's warps (``metadata.num_warps``:
    a warp-specialized CTA runs more than the ``num_warps`` it was compiled with)."""
    meta = compiled.metadata
    try:
        res = cubin_resources(compiled.asm["cubin"], compiled.name)
    except (KeyError, ValueError, struct.error):
        res = {"registers": None, "shared_static": 0}
    registers = res["registers"]
    if registers is None:
        if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
            compiled._init_handles()  # on a GPU: sets n_regs (triton < 3.x set it at compile time)
        registers = getattr(compiled, "n_regs", None)
    if not registers:
        registers = _MAX_REGISTERS
    return {"registers": int(registers), "shared": int(meta.shared) + int(res["shared_static"]),
            "num_warps": int(meta.num_warps)}


def resident_ctas(arch: int, compiled) -> int:
    """CTAs of ``compiled`` one SM of ``sm_<arch>`` holds at once (at least 1): the persistent grid per SM.
    ``compiled`` None (a warmup that returned nothing) counts as one."""
    if compiled is None:
        return 1
    res = compiled_resources(compiled)
    return max(1, occupancy(arch, res["registers"], res["shared"], res["num_warps"])["ctas"])
