"""Launch configurations of the block-sparse Triton kernels, and the list of every shipped one.

:func:`select_config` is the one place a launch configuration is chosen;
:func:`shipped_configs` enumerates everything it can return for a GPU launch, so
the test suite can compile each ahead of time (:mod:`dit_accel.kernels.compile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..backends import GPU_LAYOUT_BLOCKS
from ..checks import SUPPORTED_DTYPES

__all__ = ["KernelConfig", "select_config", "shipped_configs", "shared_memory_limit", "block_d_for",
           "SHARED_MEMORY_LIMITS", "TARGET_ARCHS", "BLOCK_DS", "KERNEL_NAMES"]

TARGET_ARCHS = (80, 89, 90)
BLOCK_DS = (64, 128, 256)  # padded head dims (head dim <= 256)
KERNEL_NAMES = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
_MIN_BLOCK_D = 64  # smaller heads are padded: fewer kernel variants to ship
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of a kernel: its constexprs and launch options.

    ``block_m`` / ``block_n`` are the kernel's tile (they divide the layout's
    ``block_q`` / ``block_k``); ``block_d`` is the padded head dim.
    """

    kernel: str  # "fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"
    dtype: torch.dtype
    block_d: int
    block_m: int
    block_n: int  # unused (0) for bwd_preprocess
    num_warps: int
    num_stages: int

    @property
    def dot_precision(self) -> str:
        # fp32 inputs use tf32 tensor-core products with fp32 accumulation (as torch
        # does with allow_tf32): "ieee"/"tf32x3" compile to kernels that are several
        # times slower to build and need more shared memory than sm_89 has at d=256.
        return "tf32"

    @property
    def name(self) -> str:
        return (f"{self.kernel}-{_DTYPE_NAMES[self.dtype]}-d{self.block_d}-m{self.block_m}n{self.block_n}"
                f"-w{self.num_warps}s{self.num_stages}")

    def aot_source(self):
        """``(kernel, signature, constexprs, attrs)`` for ``triton.compile(ASTSource(...))`` (see compile.py)."""
        from .triton import KERNELS

        fn = KERNELS[self.kernel]
        constexprs = {"BLOCK_M": self.block_m, "BLOCK_D": self.block_d}
        if "BLOCK_N" in fn.arg_names:
            constexprs["BLOCK_N"] = self.block_n
        if "DOT_PRECISION" in fn.arg_names:
            constexprs["DOT_PRECISION"] = self.dot_precision
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            if name in _UNIT_STRIDES:
                constexprs[name] = 1
                signature[name] = "constexpr"
                continue
            signature[name] = _ARG_TYPES.get(name, "i32").replace("DT", _PTR_DTYPE[self.dtype])
            if signature[name].startswith("*") or name in _DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return fn, signature, constexprs, attrs


# Dynamic shared memory per block (bytes), from the CUDA programming guide's
# compute capability table: sm_80/87 163 KB, sm_86/89/120 99 KB, sm_90/100 227 KB.
SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def shared_memory_limit(arch: int) -> int:
    """Max dynamic shared memory per block for compute capability ``arch`` (e.g. 90)."""
    if arch in SHARED_MEMORY_LIMITS:
        return SHARED_MEMORY_LIMITS[arch]
    return 101376  # conservative default for unknown parts


def block_d_for(head_dim: int) -> int:
    """Padded head dim the kernels use: next power of two, at least 64."""
    return max(_MIN_BLOCK_D, 1 << (int(head_dim) - 1).bit_length())


def select_config(kernel: str, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int,
                  arch: int = 80) -> KernelConfig:
    """Launch configuration for ``kernel`` given dtype, head dim, layout block sizes and GPU arch.

    Hand-set rules (not autotuned: no GPU was available while writing them):

    - forward, fp16/bf16: query tile 128 x key tile 64 for padded head dims 64 and
      128 (8 warps at d=128), the FlashAttention-2 / Triton-tutorial choice on
      A100/H100; 64 x 32 at d=256. fp32: 64x64 (d=64), 64x32 (d=128), 32x32 (d=256).
    - dK/dV: 64 x 64 at d=64, else 32 query rows per step over a 64-key tile; dQ the
      mirror image (64 queries, 32 keys per step); 32x32 at d=256, 16x16 for fp32
      d=256 on 99 KB parts.
    - ``num_stages`` 3 on parts with >= 160 KB shared memory (sm_80, sm_90), 2 on
      99 KB parts (sm_86, sm_89, sm_120), fewer for the widest tiles.
    - Tiles never exceed the layout block (``min(tile, block)``), so a 64-block
      layout runs 64-row forward tiles.

    Every result is listed by :func:`shipped_configs`
    and compiled for sm_80/89/90 by the test suite (shared memory within limits).
    """
    bd = block_d_for(head_dim)
    big_smem = shared_memory_limit(arch) >= 160 * 1024
    wide = dtype == torch.float32  # 4-byte elements: smaller tiles
    stages = 3 if big_smem else 2
    if kernel == "bwd_preprocess":
        return KernelConfig(kernel, dtype, bd, 64 if bd <= 128 else 32, 0, 4, 1)
    if kernel == "fwd":
        # FA2-style: a tall query tile kept in registers, 64-wide key tiles streamed.
        bm, bn = (128, 64) if bd <= 128 else (64, 32)
        if wide:
            bm, bn = (64, 64) if bd <= 64 else ((64, 32) if bd <= 128 else (32, 32))
        warps = 8 if bm * bd >= 128 * 128 else 4
        if bd >= 256 or (wide and bd >= 128):
            stages = 2 if big_smem and not (wide and bd >= 256) else 1
    elif kernel in ("bwd_dkdv", "bwd_dq"):
        # The owned tile (keys for dK/dV, queries for dQ) is the larger one.
        bm = bn = 64
        if bd >= 128 or wide:
            bm, bn = (32, 64) if kernel == "bwd_dkdv" else (64, 32)
        if bd >= 256 or (wide and bd >= 128):
            bm = bn = 32
        if wide and bd >= 256 and not big_smem:
            bm = bn = 16  # fp32 d=256 operands alone fill 99 KB at 32x32
        warps = 8 if bd >= 128 and bm * bn >= 2048 else 4
        stages = 2 if bd <= 64 else 1
    else:
        raise ValueError(f"kernel must be one of 'fwd', 'bwd_preprocess', 'bwd_dkdv', 'bwd_dq'; got {kernel!r}")
    return KernelConfig(kernel, dtype, bd, min(bm, block_q), min(bn, block_k), warps, stages)


_PTR_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Argument types of the kernels by name ("DT" = the q/k/v dtype); every other argument is an i32.
_ARG_TYPES = {
    **{name: "*DT" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")},
    **{name: "*fp32" for name in ("LSE", "DELTA")},
    **{name: "*i32" for name in ("KV_COUNTS", "KV_INDICES", "KV_MASK_IDS", "Q_COUNTS", "Q_INDICES", "Q_MASK_IDS")},
    "MASK_TABLE": "*u8", "qk_scale": "fp32", "sm_scale": "fp32",
}
# The JIT specialises integer arguments equal to 1 into constants: the head-dim
# strides of contiguous-last-dim tensors are 1 in every launch we make.
_UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdd"}
# Arguments that are multiples of 16 in typical launches (pointers, token strides,
# head dims 64/80/96/128): the JIT would give them the same divisibility hint.
_DIV16 = {"sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "son",
          "sdb", "sdh", "sdn", "head_dim"}


def shipped_configs(arch: Optional[int] = None) -> List[KernelConfig]:
    """Every configuration :func:`select_config` can return for a GPU launch on ``sm_<arch>`` (all targets
    when None): each kernel, dtype, padded head dim and layout block size, duplicates removed."""
    archs = TARGET_ARCHS if arch is None else (arch,)
    seen: Dict[Tuple, KernelConfig] = {}
    for a in archs:
        for kernel in KERNEL_NAMES:
            for dtype in SUPPORTED_DTYPES:
                for bd in BLOCK_DS:
                    for bq in GPU_LAYOUT_BLOCKS:
                        for bk in GPU_LAYOUT_BLOCKS:
                            cfg = select_config(kernel, dtype, bd, bq, bk, a)
                            seen.setdefault(cfg, cfg)
    return list(seen)
