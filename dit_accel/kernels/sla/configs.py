"""Launch configurations of the fused SLA kernels, and the list of every shipped one.

Compile-time variety is kept small so every shipped configuration can be compiled ahead of
time (:func:`shipped_configs`): the feature map is not a kernel parameter at all, the query
tiles per classification block (``SUB``) and the linear sign are runtime arguments, and head
dims pad to 64 or 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

__all__ = ["SLAKernelConfig", "select_sla_config", "shipped_configs", "SLA_KERNELS", "SLA_DTYPES", "SLA_BLOCK_DS",
           "SLA_MAX_HEAD_DIM", "BLOCK_M", "BLOCK_K"]

BLOCK_M = 64  # query rows per program; a 128-row classification block is two tiles
BLOCK_K = 64  # key rows per block (SLA's block_k)
SLA_KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
SLA_DTYPES = (torch.float16, torch.bfloat16)  # on CUDA; the CPU interpreter also runs float32
SLA_BLOCK_DS = (64, 128)  # padded head dims; the fused kernel takes head dims <= 128
SLA_MAX_HEAD_DIM = SLA_BLOCK_DS[-1]
_LIN_VARIANTS = ((False, False), (True, False), (True, True))  # (HAS_LIN, SUB_CRIT) the launchers use
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class SLAKernelConfig:
    """One compiled variant of an SLA kernel: its constexprs and launch options.

    ``has_lin``: the linear branch is on; ``sub_crit``: the critical blocks are also removed
    from the linear branch's global sums (the "subtract" plan; implies ``has_lin``).
    """

    kernel: str
    dtype: torch.dtype
    block_d: int
    has_lin: bool
    sub_crit: bool
    num_warps: int
    num_stages: int
    block_m: int = BLOCK_M
    block_n: int = BLOCK_K

    @property
    def name(self) -> str:
        lin = "sub" if self.sub_crit else ("lin" if self.has_lin else "nolin")
        return f"sla_{self.kernel}-{_DTYPE_NAMES[self.dtype]}-d{self.block_d}-{lin}"

    def constexprs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d,
                "HAS_LIN": self.has_lin, "SUB_CRIT": self.sub_crit}

    def launch_kwargs(self) -> dict:
        return dict(self.constexprs(), num_warps=self.num_warps, num_stages=self.num_stages)

    def aot_source(self):
        """``(kernel, signature, constexprs, attrs)`` for ``triton.compile(ASTSource(...))``.

        Used by :func:`dit_accel.kernels.triton_compile.compile_for_target`. Pointers and the
        token / batch / head strides get the divisibility-16 hint the JIT gives them in
        typical launches (contiguous half-precision tensors, head dims 64 / 128).
        """
        from .triton import KERNELS

        kernel = KERNELS[self.kernel]
        consts = self.constexprs()
        ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[self.dtype]
        signature, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in consts:
                signature[name] = "constexpr"
                continue
            if name in ("Q", "K", "V", "O", "DO", "DV"):
                signature[name] = ptr
            elif name in ("QF", "KF"):  # phi(q), phi(k) in the linear branch's compute dtype
                signature[name] = ptr
            elif name in ("DQ", "DK"):  # fp32 when the phi backward is added on the host
                signature[name] = "*fp32" if self.has_lin else ptr
            elif name in ("LSE", "NUM", "DEN", "DELTA", "DNUM", "DDEN", "DSCALE", "DQF", "DKF"):
                signature[name] = "*fp32"
            elif name in ("CRIT", "LIN", "CRIT_T", "CRIT_T_CNT", "LIN_T", "LIN_T_CNT"):
                signature[name] = "*i32"
            elif name in ("scale", "lin_sign"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
            if signature[name].startswith("*") or name in _DIV16_ARGS:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return kernel, signature, consts, attrs


_DIV16_ARGS = {"sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "D"}


def _block_d(head_dim: int) -> int:
    return max(SLA_BLOCK_DS[0], 1 << (int(head_dim) - 1).bit_length())


def select_sla_config(kernel: str, dtype: torch.dtype, head_dim: int, has_lin: bool,
                      sub_crit: bool) -> SLAKernelConfig:
    """The configuration the launchers use for ``kernel`` on ``dtype`` inputs with ``head_dim``.

    Tiles are 64 x 64 for every head dim (padded to 64 or 128), 4 warps. The forward and dQ
    kernels double-buffer their loads (two stages) except where that exceeds sm_89's 99 KiB of
    shared memory: the dK/dV kernel (most operands) and, at head dim 128, the dQ kernel of the
    subtract plan (three tiles per step: 104 KiB with two stages, 72 KiB with one) run
    unpipelined. ``float32`` is accepted for the CPU interpreter only: its tiles need up to
    224 KiB (dK/dV at 128), so CUDA runs fp32 through the PyTorch twin.
    """
    if kernel not in SLA_KERNELS:
        raise ValueError(f"kernel must be one of {SLA_KERNELS}, got {kernel!r}")
    if dtype not in SLA_DTYPES + (torch.float32,):
        raise TypeError(f"dtype must be float16 or bfloat16 (float32 in the interpreter), got {dtype}")
    if not 1 <= head_dim <= SLA_BLOCK_DS[-1]:
        raise ValueError(f"head_dim must be in [1, {SLA_BLOCK_DS[-1]}] for the fused SLA kernel, got {head_dim}")
    block_d, sub_crit = _block_d(head_dim), bool(has_lin and sub_crit)
    one_stage = kernel == "bwd_dkdv" or (kernel == "bwd_dq" and sub_crit and block_d == 128)
    return SLAKernelConfig(kernel, dtype, block_d, bool(has_lin), sub_crit, num_warps=4,
                           num_stages=1 if one_stage or dtype == torch.float32 else 2)


def shipped_configs() -> List[SLAKernelConfig]:
    """Every configuration :func:`select_sla_config` returns for a CUDA launch (fp16 / bf16).

    Listed slowest-to-compile first (dK/dV, head dim 128, subtract plan), so a pool of
    compile workers finishes together.
    """
    seen = {}
    for kernel in SLA_KERNELS:
        for dtype in SLA_DTYPES:
            for head_dim in range(1, SLA_BLOCK_DS[-1] + 1):
                for has_lin, sub_crit in _LIN_VARIANTS:
                    cfg = select_sla_config(kernel, dtype, head_dim, has_lin, sub_crit)
                    seen.setdefault(cfg, cfg)
    return sorted(seen, key=lambda c: (-SLA_KERNELS.index(c.kernel), -c.block_d, -c.has_lin - c.sub_crit))
