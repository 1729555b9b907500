"""Launch configurations of the fused SLA kernels, and the list of every shipped one.

Compile-time variety is kept small so every shipped configuration can be compiled ahead of
time (:func:`shipped_configs`): the feature map is not a kernel parameter at all, the query
tiles per classification block (``SUB``) and the linear sign are runtime arguments, the
subtract plan is a list (negligible + critical blocks, sign -1) rather than a variant, and
head dims pad to 64 or 128 (the launchers pass zero-padded copies for other head dims, so the
kernels' head dim is a constexpr and they have no column masks). On sm_90 the forward loads through
TMA (:attr:`SLAKernelConfig.tma`); its pointer variant (:func:`pointer_fallback`) ships beside it for
inputs that are not 16-byte aligned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..dense.configs import ARG_TYPES, DIV16, aot_signature

__all__ = ["SLAKernelConfig", "select_sla_config", "shipped_configs", "SLA_KERNELS", "SLA_DTYPES", "SLA_BLOCK_DS",
           "SLA_MAX_HEAD_DIM", "BLOCK_M", "BLOCK_K", "GLOBAL_COLUMNS", "LAUNCH", "MEASURED_LAUNCH",
           "measured_configs", "pointer_fallback"]

BLOCK_M = 64  # query rows per program; a 128-row classification block is two tiles
from ..limits import SLA_BLOCK_DS, SLA_DTYPES, SLA_MAX_HEAD_DIM  # noqa: E402  (what the fused kernel takes)
from ..limits import config_target  # noqa: E402  (the compiled target a part runs)
from ..limits import SLA_BLOCK_K as BLOCK_K  # noqa: E402  (key rows per block, SLA's block_k)
GLOBAL_COLUMNS = 64  # columns of phi(K)^T V per program of the global-sums kernel
# global: the linear branch's sums over all keys; bwd_dkdv_lin: linear-branch dK/dV
SLA_KERNELS = ("global", "fwd", "bwd_dq", "bwd_dkdv", "bwd_dkdv_lin")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: (num_warps, num_stages) per (target, kernel, padded head dim, linear branch): the candidates
#: that compile without spills, without serialised wgmma and within the target's shared
#: memory, with the fewest modelled cycles per tile (``dit-accel bench sass --search sla``).
LAUNCH: Dict[Tuple[int, str, int, bool], Tuple[int, int]] = {
    (80, "fwd", 64, False): (4, 2), (80, "fwd", 64, True): (8, 2),
    (80, "fwd", 128, False): (4, 2), (80, "fwd", 128, True): (8, 2),
    (80, "bwd_dq", 64, False): (4, 3), (80, "bwd_dq", 64, True): (8, 3),
    (80, "bwd_dq", 128, False): (8, 3), (80, "bwd_dq", 128, True): (8, 2),
    (89, "fwd", 64, False): (8, 3), (89, "fwd", 64, True): (8, 3),
    (89, "fwd", 128, False): (8, 3), (89, "fwd", 128, True): (8, 3),
    (89, "bwd_dq", 64, False): (4, 3), (89, "bwd_dq", 64, True): (8, 3),
    (89, "bwd_dq", 128, False): (8, 2), (89, "bwd_dq", 128, True): (8, 2),
    # sm_90 forward (TMA): num_stages is the depth of the critical loop's K/V ring (its block indices
    # are read ahead into registers, so they take no stage). d128 without the linear branch: a 3-deep
    # ring (113 KB + TMA barriers) leaves one CTA of 4 warps per SM, a 2-deep one (82 KB) two, which
    # this keeps. d128 with it: 8 x 2 is within 1.2% of 8 x 3 in the model but gives the linear loop
    # no prefetch (a 1-deep ring); 8 x 3 keeps one.
    (90, "fwd", 64, False): (4, 2), (90, "fwd", 64, True): (4, 3),
    (90, "fwd", 128, False): (4, 2), (90, "fwd", 128, True): (8, 3),
    (90, "bwd_dq", 64, False): (4, 3), (90, "bwd_dq", 64, True): (4, 3),
    (90, "bwd_dq", 128, False): (4, 2), (90, "bwd_dq", 128, True): (8, 3),
    (80, "bwd_dkdv", 64, False): (8, 3), (80, "bwd_dkdv", 128, False): (8, 3),
    (89, "bwd_dkdv", 64, False): (8, 3), (89, "bwd_dkdv", 128, False): (8, 3),
    (90, "bwd_dkdv", 64, False): (4, 3), (90, "bwd_dkdv", 128, False): (8, 3),
    (80, "bwd_dkdv_lin", 64, True): (4, 3), (80, "bwd_dkdv_lin", 128, True): (8, 3),
    (89, "bwd_dkdv_lin", 64, True): (8, 3), (89, "bwd_dkdv_lin", 128, True): (8, 3),
    (90, "bwd_dkdv_lin", 64, True): (4, 1), (90, "bwd_dkdv_lin", 128, True): (8, 2),
    (80, "global", 64, True): (4, 2), (80, "global", 128, True): (8, 2),
    (89, "global", 64, True): (4, 2), (89, "global", 128, True): (8, 2),
    (90, "global", 64, True): (4, 2), (90, "global", 128, True): (8, 2),
}
#: sm_100 (B200 / GB200) runs sm_90's launches (:data:`LAUNCH`): none of them spills there
#: (``tests/kernels/test_compile_sla.py``).
#: Forwards whose linear ``a @ V`` is one product of twice the depth (``_dot_split``'s ``CHAIN=False``): at head
#: dim 128 on sm_90 the chained pair makes ptxas serialise the wgmma pipeline (C7515) and spill.
SPLIT_PRODUCT = {(90, "fwd", 128, True)}
#: Launches picked by timing on a GPU of that exact arch, over the static rule's :data:`LAUNCH` pick:
#: ``(arch, kernel, padded head dim, linear branch) -> (num_warps, num_stages, lin_chain)``. A forward's pointer
#: fallback keeps the static pick (the times are of TMA loads). On an H200 (N = 32,760, 12 heads, bf16, topk 0.05,
#: a random projection; ``docs/scripts/sla_gpu_parts.py --configs --bwd-configs``, BENCHMARKS.md section 10):
#: - sm_90 d128 forward with the linear branch: the chained pair at 4 warps x 2 stages spills about 100 B and draws
#:   C7515, yet ran in 3.73 ms against the static pick's 8.57 ms (8 x 3, one product of twice the depth);
#: - sm_90 d128 linear-branch dK/dV at 4 warps x 1 stage: forward + backward 28.9 ms against 31.1 ms (8 x 2), the
#:   same dK and dV to the bit.
MEASURED_LAUNCH: Dict[Tuple[int, str, int, bool], Tuple[int, int, bool]] = {
    (90, "fwd", 128, True): (4, 2, True), (90, "bwd_dkdv_lin", 128, True): (4, 1, True)}
#: Kernels that exist only with the linear branch (no ``HAS_LIN`` constexpr).
_LINEAR_ONLY = ("global", "bwd_dkdv_lin")


def _target(arch: int) -> int:
    """The configured target an arch runs: 90 (Hopper and data-centre Blackwell), 80 (A100-class shared memory)
    or 89 (99 KB a block: sm_86, sm_89 and consumer Blackwell, sm_120, whose sm_90 tiles needed up to 104 KB)."""
    return min(config_target(arch), 90)


@dataclass(frozen=True)
class SLAKernelConfig:
    """One compiled variant of an SLA kernel: its constexprs and launch options.

    ``has_lin``: the linear branch is on (forward and dQ; the linear-branch dK/dV is a kernel
    of its own).
    """

    kernel: str
    dtype: torch.dtype
    block_d: int
    has_lin: bool
    num_warps: int
    num_stages: int
    block_m: int = BLOCK_M
    block_n: int = BLOCK_K
    #: The forward's linear ``a @ V`` as two chained products (see ``_dot_split`` in :mod:`.triton`).
    lin_chain: bool = True
    #: The forward loads Q, K and V through TMA descriptors made in the kernel (sm_90; the launcher
    #: takes :func:`pointer_fallback` for inputs that are not 16-byte aligned).
    tma: bool = False

    @property
    def name(self) -> str:
        return (f"sla_{self.kernel}-{_DTYPE_NAMES[self.dtype]}-d{self.block_d}-{'lin' if self.has_lin else 'nolin'}"
                f"-w{self.num_warps}s{self.num_stages}{'' if self.lin_chain else '-split'}{'-tma' if self.tma else ''}")

    def constexprs(self) -> dict:
        """The kernel's constexpr arguments (the dK/dV kernels have no ``HAS_LIN``: it is in their types)."""
        out = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d}
        if self.kernel == "global":  # key tiles only, and column blocks of V (GLOBAL_COLUMNS in .triton)
            del out["BLOCK_M"]
            out["BLOCK_C"] = GLOBAL_COLUMNS
        if self.kernel in ("fwd", "bwd_dq"):
            out["HAS_LIN"] = self.has_lin
        if self.kernel == "fwd" and self.has_lin:
            out["LIN_CHAIN"] = self.lin_chain
        if self.kernel == "fwd":
            out["TMA"] = self.tma
        return out

    def launch_kwargs(self) -> dict:
        return dict(self.constexprs(), num_warps=self.num_warps, num_stages=self.num_stages)

    def dense(self):
        """The dense kernel with the same tile, warps, stages, dtype and load path (TMA or pointers)."""
        from ..dense.configs import DenseConfig

        if self.kernel in _LINEAR_ONLY:
            return None  # linear attention: no dense softmax counterpart
        return DenseConfig(self.kernel, self.dtype, self.block_d, self.block_m, self.block_n, self.num_warps,
                           self.num_stages, self.tma, not self.tma)

    def aot_source(self, kernels):
        """``(kernel, signature, constexprs, attrs)`` for ``triton.compile(ASTSource(...))``.

        Used by :func:`dit_accel.kernels.compile.compile_for_target`. Pointers and the token /
        batch / head strides get the divisibility-16 hint the JIT gives them in typical
        launches (contiguous half-precision tensors, head dims 64 / 128).
        """
        # dK / dV always leave in fp32 (the linear kernel may add to them; the launcher casts once).
        types = dict(ARG_TYPES, QF="*DT", KF="*DT", DNUM="*DT", DQ="*fp32" if self.has_lin else "*DT", DK="*fp32",
                     DV="*fp32", OL="*DT",
                     KV="*DT", **{n: "*fp32" for n in ("NUM", "DEN", "DDEN", "DSCALE", "INV_S", "DQF", "DKF",
                                                       "KV_SCALE", "KSUM", "KMAX", "KV_P", "KSUM_P", "KMAX_P")},
                     **{n: "*i32" for n in ("CRIT", "LIN", "CRIT_T", "CRIT_T_CNT", "LIN_T", "LIN_T_CNT")},
                     lin_sign="fp32", lin_eps="fp32")
        return aot_signature(kernels[self.kernel], types, self.constexprs(), DIV16 | {"D"}, self.dtype)


def _block_d(head_dim: int) -> int:
    return max(SLA_BLOCK_DS[0], 1 << (int(head_dim) - 1).bit_length())


def select_sla_config(kernel: str, dtype: torch.dtype, head_dim: int, has_lin: bool,
                      arch: int = 80) -> SLAKernelConfig:
    """The configuration the launchers use for ``kernel`` on ``dtype`` inputs with ``head_dim`` on ``sm_<arch>``.

    Tiles are 64 x 64 for every head dim (padded to 64 or 128); warps and stages come from
    :data:`LAUNCH`. ``float32`` is accepted for the CPU interpreter only (CUDA runs fp32
    through the PyTorch twin).
    """
    if kernel not in SLA_KERNELS:
        raise ValueError(f"kernel must be one of {SLA_KERNELS}, got {kernel!r}")
    if dtype not in SLA_DTYPES + (torch.float32,):
        raise TypeError(f"dtype must be float16 or bfloat16 (float32 in the interpreter), got {dtype}")
    if not 1 <= head_dim <= SLA_BLOCK_DS[-1]:
        raise ValueError(f"head_dim must be in [1, {SLA_BLOCK_DS[-1]}] for the fused SLA kernel, got {head_dim}")
    # Only the forward and dQ kernels have a linear-branch variant; the linear dK/dV kernel is one.
    block_d = _block_d(head_dim)
    has_lin = bool(has_lin) if kernel in ("fwd", "bwd_dq") else kernel in _LINEAR_ONLY
    key = (_target(arch), kernel, block_d, has_lin)
    if (arch, kernel, block_d, has_lin) in MEASURED_LAUNCH:
        warps, stages, chain = MEASURED_LAUNCH[arch, kernel, block_d, has_lin]
        return SLAKernelConfig(kernel, dtype, block_d, has_lin, warps, stages, lin_chain=chain, tma=kernel == "fwd")
    return _static_config(kernel, dtype, block_d, has_lin, key)


def _static_config(kernel: str, dtype: torch.dtype, block_d: int, has_lin: bool, key) -> SLAKernelConfig:
    """The static rule's pick (:data:`LAUNCH`, :data:`SPLIT_PRODUCT`) for ``key = (target, kernel, block_d,
    has_lin)``."""
    warps, stages = LAUNCH[key]
    return SLAKernelConfig(kernel, dtype, block_d, has_lin, warps, stages, lin_chain=key not in SPLIT_PRODUCT,
                           tma=kernel == "fwd" and key[0] == 90)


def measured_configs(arch: int) -> List[SLAKernelConfig]:
    """The configurations ``sm_<arch>`` runs by GPU timing (:data:`MEASURED_LAUNCH`) rather than by the static rule
    (no spill, no serialised wgmma): what the static tests exempt from that rule."""
    return [select_sla_config(kernel, dtype, d, lin, arch) for (a, kernel, d, lin) in MEASURED_LAUNCH if a == arch
            for dtype in SLA_DTYPES]


def pointer_fallback(cfg: SLAKernelConfig) -> SLAKernelConfig:
    """The pointer-load variant of a TMA configuration: the forward launcher's choice for inputs whose base or
    strides are not 16-byte aligned. Same warps and stages, except for a :data:`MEASURED_LAUNCH` (timed with TMA
    loads only), whose fallback is the static rule's pick."""
    key = (90, cfg.kernel, cfg.block_d, cfg.has_lin)
    if cfg.tma and key in MEASURED_LAUNCH and (cfg.num_warps, cfg.num_stages, cfg.lin_chain) == MEASURED_LAUNCH[key]:
        cfg = _static_config(cfg.kernel, cfg.dtype, cfg.block_d, cfg.has_lin, key)
    return dataclasses.replace(cfg, tma=False)


def shipped_configs(arch: Optional[int] = None) -> List[SLAKernelConfig]:
    """Every configuration :func:`select_sla_config` returns for a CUDA launch (fp16 / bf16) on ``sm_<arch>``
    (all targets when None).

    Listed slowest-to-compile first (linear-branch dK/dV, head dim 128), so a pool of compile
    workers finishes together.
    """
    from ..block_sparse.configs import TARGET_ARCHS

    seen = {}
    for a in (TARGET_ARCHS if arch is None else (arch,)):
        for kernel in SLA_KERNELS:
            for dtype in SLA_DTYPES:
                for head_dim in SLA_BLOCK_DS:
                    for has_lin in (False, True):  # normalised per kernel: duplicates drop out
                        cfg = select_sla_config(kernel, dtype, head_dim, has_lin, a)
                        seen.setdefault((a, cfg), cfg)
                        if cfg.tma:  # the launcher's fallback for inputs that are not TMA-aligned
                            seen.setdefault((a, pointer_fallback(cfg)), pointer_fallback(cfg))
    return sorted(seen.values(), key=lambda c: (-SLA_KERNELS.index(c.kernel), -c.block_d, -c.has_lin, -c.tma))


def candidates(kernel: str, dtype: torch.dtype, block_d: int, has_lin: bool, arch: int) -> List[SLAKernelConfig]:
    """Warps and stages worth compiling for an SLA kernel (the search space of ``dit-accel bench sass --search``):
    the streaming kernels keep at least two stages (a prefetch); the dK/dV kernels, with the most
    operands, may do without."""
    stages = (1, 2, 3) if kernel.startswith("bwd_dkdv") else (2, 3)
    lin = has_lin if kernel in ("fwd", "bwd_dq") else kernel in _LINEAR_ONLY
    key = (_target(arch), kernel, block_d, lin)
    return [SLAKernelConfig(kernel, dtype, block_d, lin, w, st, lin_chain=key not in SPLIT_PRODUCT,
                            tma=kernel == "fwd" and key[0] == 90) for w in (4, 8) for st in stages]
