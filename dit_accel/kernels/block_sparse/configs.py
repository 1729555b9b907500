"""Launch configurations of the block-sparse Triton kernels, and the list of every shipped one.

:func:`select_config` is the one place a launch configuration is chosen;
:func:`shipped_configs` enumerates everything it can return for a GPU launch, so
the test suite can compile each ahead of time (:mod:`dit_accel.kernels.compile`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..checks import SUPPORTED_DTYPES
from ..dense.configs import ARG_TYPES, DIV16, tma_supported

__all__ = ["KernelConfig", "select_config", "shipped_configs", "pointer_fallback", "gather_config", "candidates",
           "shared_memory_limit", "ws_config", "resume_config", "length_config", "LENGTHS_SPILL", "GATHER_STAGES",
           "GATHER_VARIANT", "GATHER_BWD_VARIANT", "rows_fit", "ws_pays", "WS_TUNED", "kernel_reason",
           "block_d_for", "unpadded", "fused_config", "fused_pointer", "FUSED_TUNED",
           "SHARED_MEMORY_LIMITS", "TARGET_ARCHS", "BLOCK_DS", "KERNEL_NAMES"]

TARGET_ARCHS = (80, 89, 90, 100)
BLOCK_DS = (64, 128, 256)  # padded head dims (head dim <= 256)
KERNEL_NAMES = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
from ..limits import GPU_LAYOUT_BLOCKS, INTERPRETER_LAYOUT_BLOCKS  # noqa: E402,F401  (re-exported: the layout blocks)
from ..limits import SHARED_MEMORY_LIMITS, config_target, large_shared_memory, shared_memory_limit  # noqa: E402,F401,E501  (re-exported)
_MIN_BLOCK_D = 64  # smaller heads are padded: fewer kernel variants to ship
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of a kernel: its constexprs and launch options.

    ``block_m`` / ``block_n`` are the kernel's tile (they divide the layout's
    ``block_q`` / ``block_k``); ``block_d`` is the padded head dim, ``even_d`` says the
    head dim equals it (no column masks), ``tma`` that K/V (Q/dO for dK/dV) arrive as
    TMA tensor descriptors (sm_90).
    """

    kernel: str  # "fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"
    dtype: torch.dtype
    block_d: int
    block_m: int
    block_n: int  # unused (0) for bwd_preprocess
    num_warps: int
    num_stages: int
    tma: bool = False
    even_d: bool = True
    ws: bool = False  # fwd on sm_90: the full tiles in a warp-specialized kernel (see WS_TUNED)
    resume: bool = False  # fwd on sm_90: the partial tiles after a ws kernel, from its (O, LSE)
    lengths: bool = False  # fwd: column-prefix tiles run by a column count (block_sparse.lengths)
    gather: bool = False  # fwd, bwd_dkdv, bwd_dq, pointer loads: raster-order tensors through a row table (.gather)
    gated: bool = False  # fwd with gather: VSA's gated sum in the epilogue (vsa.raster); launches set it per call
    spread: bool = False  # bwd_dkdv, bwd_dq with gather: VSA's means' gradients added as rows are stored (per call)

    @property
    def dot_precision(self) -> str:
        # fp32 inputs use tf32 tensor-core products with fp32 accumulation (as torch
        # does with allow_tf32): "ieee"/"tf32x3" compile to kernels that are several
        # times slower to build and need more shared memory than sm_89 has at d=256.
        return "tf32"

    @property
    def name(self) -> str:
        return (f"{self.kernel}-{_DTYPE_NAMES[self.dtype]}-d{self.block_d}-m{self.block_m}n{self.block_n}"
                f"-w{self.num_warps}s{self.num_stages}{'-tma' if self.tma else ''}{'' if self.even_d else '-oddd'}"
                f"{'-ws' if self.ws else ''}{'-resume' if self.resume else ''}{'-len' if self.lengths else ''}"
                f"{'-gather' if self.gather else ''}{'-gated' if self.gated else ''}{'-spread' if self.spread else ''}")

    def constexprs(self) -> dict:
        out = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d, "EVEN_D": self.even_d,
               "TMA": self.tma, "DOT_PRECISION": self.dot_precision}
        if self.kernel == "fwd":
            out.update(WS=self.ws, RESUME=self.resume, LENGTHS=self.lengths, GATHER=self.gather, GATED=self.gated)
        elif self.kernel == "bwd_dkdv":
            out.update(GATHER=self.gather, ADD_K=self.spread, ADD_V=self.spread)
        elif self.kernel == "bwd_dq":
            out.update(GATHER=self.gather, ADD_Q=self.spread)
        return out

    def dense(self):
        """The dense kernel with the same tile, warps, stages, dtype and load path (None for bwd_preprocess and
        the one-pass backward, which the dense family does not have)."""
        from ..dense.configs import DenseConfig

        if self.kernel in ("bwd_preprocess", "bwd_dkdv_dq"):
            return None
        return DenseConfig(self.kernel, self.dtype, self.block_d, self.block_m, self.block_n, self.num_warps,
                           self.num_stages, self.tma, self.even_d, self.ws)

    def aot_source(self, kernels):
        """``(kernel, signature, constexprs, attrs)`` for ``triton.compile(ASTSource(...))`` (see compile.py)."""
        from ..dense.configs import aot_signature, tma_args
        fn = kernels[self.kernel]
        consts = {k: v for k, v in self.constexprs().items() if k in fn.arg_names}
        tma = None
        if self.tma and not self.ws:  # a ws kernel makes its descriptors itself, from pointers
            kv_owned = self.kernel.startswith("bwd_dkdv")  # (bwd_dkdv_dq too: it streams Q and dO)
            rows = self.block_m if kv_owned else self.block_n
            tma = {name: (1, 1, rows, self.block_d) for name in tma_args("bwd_dkdv" if kv_owned else self.kernel)}
        return aot_signature(fn, _ARG_TYPES, consts, _DIV16, self.dtype, tma)


def block_d_for(head_dim: int) -> int:
    """Padded head dim the kernels use: next power of two, at least 64."""
    return max(_MIN_BLOCK_D, 1 << (int(head_dim) - 1).bit_length())


def unpadded(head_dim: int) -> bool:
    """Whether the pointer kernels run ``head_dim`` as it is (64, 128, 256), not on zero-padded copies: what VSA's
    epilogues need (the gated term, the means' gradients), whose extra operands are not padded."""
    return block_d_for(head_dim) == head_dim


#: fp16 / bf16 launch configurations ranked first by ``dit-accel bench sass --search block_sparse``
#: (:func:`dit_accel.kernels.sass.rank`: no spill, no serialised wgmma, fewest modelled cycles per
#: score element, then the tallest owned tile, occupancy and stages), per (target, kernel,
#: padded head dim): ``(for layout blocks of 128 and more, for 64-blocks)``, each
#: ``(block_m, block_n, warps, stages)``. sm_89 runs sm_80's unless it has its own (same mma.sync
#: code; the compile tests check them there). Other cases keep the rules of :func:`select_config`.
TUNED: Dict[Tuple[int, str, int], Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]] = {
    (80, "fwd", 64): ((128, 64, 8, 3), (64, 64, 4, 3)),
    (80, "fwd", 128): ((128, 64, 8, 3), (64, 64, 4, 3)),
    (80, "bwd_dq", 128): ((128, 32, 8, 2), (64, 64, 8, 2)),
    (80, "bwd_dkdv", 128): ((32, 64, 8, 2), (32, 64, 8, 2)),
    (89, "fwd", 128): ((128, 64, 8, 3), (64, 64, 8, 3)),  # sm_80's 64-block choice spills 8 B here
    (89, "bwd_dq", 64): ((128, 32, 8, 2), (64, 32, 4, 2)),  # 64 x 64: partial tiles 1.6x a full one
    (89, "bwd_dkdv", 64): ((32, 64, 4, 2), (32, 64, 4, 2)),
    (90, "fwd", 64): ((128, 128, 8, 3), (64, 64, 4, 3)),
    # sm_90 forward (TMA): num_stages is the depth of the K/V ring (the tile indices are read ahead
    # into registers, so they take no stage); at 64 x 64, d128 a 3-deep ring (113 KB) leaves one CTA
    # per SM, a 2-deep one (82 KB) two, which this keeps.
    (90, "fwd", 128): ((128, 64, 8, 3), (64, 64, 4, 2)),
    (90, "bwd_dq", 64): ((64, 32, 4, 2), (64, 32, 4, 2)),  # 64 x 64: partial tiles 1.6x a full one
    (90, "bwd_dq", 128): ((128, 32, 8, 2), (64, 32, 4, 2)),
    (90, "bwd_dkdv", 64): ((32, 64, 4, 2), (32, 64, 4, 2)),
    (90, "bwd_dkdv", 128): ((32, 128, 8, 2), (32, 64, 4, 1)),
    # sm_100 (B200 / GB200) runs sm_90's tiles except where they spill there: sm_90's d128 forward (128 x 64,
    # 8 warps; 64 x 64, 4 warps) spills 336 B and 104 B per thread on sm_100. 64 x 64 at 8 warps takes 196
    # registers and no spill, with a 3-deep ring (116 KB of sm_100's 227 KB). Compiled for sm_100 by the tests.
    (100, "fwd", 128): ((64, 64, 8, 3), (64, 64, 8, 3)),
}


#: sm_90 forward, warp-specialized (:attr:`KernelConfig.ws`), fp16 / bf16 per padded head dim:
#: ``(block_m, block_n, warps, stages)`` for layout blocks of at least ``block_m x block_n``. Triton
#: 3.9 warp-specializes only at 4 warps (8 give no partitions); the CTA then runs 12 warps (a
#: producer and two consumer warp groups of 64 rows, 232 registers each by setmaxnreg) and one CTA
#: per SM. 128 x 64 tiles take a 3-deep K/V ring (the persistent kernel's TTGIR holds four
#: 3 x 64 x 128 buffers, 210 KB at d128); 128 x 128 tiles fit 2 stages only (3 need 246 KB > 227 KB
#: in a single-item kernel already). The partial tiles run after it in the ``resume`` kernel (the
#: non-ws configuration with ``resume=True``). Read from the compiled artefacts (``dit-accel bench
#: sass``); a ws configuration is chosen only where :func:`ws_pays` says so for the layout.
WS_TUNED: Dict[Tuple[int, str, int], Tuple[int, int, int, int]] = {
    # (d64 has none: its resume pass at 128 x 64 tiles, 4 warps, spills 52 B; 8 warps would be one more
    # configuration to ship for a head dim the targets do not use.)
    (90, "fwd", 128): (128, 64, 4, 3),
}


#: Opt-in switch of the warp-specialized forwards (block-sparse and dense): ``DIT_ACCEL_WS=1``.
ENV_WS = "DIT_ACCEL_WS"
#: Why the warp-specialized forwards are off unless asked for (``dit-accel selftest`` prints it).
WS_OFF_REASON = ("the warp-specialized forward is off by default: on triton 3.6.0 (H100 and H200, 2026-11-25 and 27, "
                 "BENCHMARKS section 10) its 128-row tiles gave wrong rows, and its one correct tile (64 x 64, 2 stages) "
                 "ran at 0.55x the one-loop kernel; its loop over work items was software-pipelined then, and is not "
                 "since (not yet run on a GPU); set DIT_ACCEL_WS=1 to try it (still behind its self-check)")


#: Opt-in switch of the forward's length tiles (:mod:`.lengths`): ``DIT_ACCEL_LENGTHS=1``.
ENV_LENGTHS = "DIT_ACCEL_LENGTHS"
#: Why the length tiles are off unless asked for (``dit-accel selftest`` and ``dit-accel info`` print it).
LENGTHS_OFF_REASON = ("the forward's length tiles are off by default: on an H100 (2026-11-28, BENCHMARKS section 10) "
                      "the bit-mask path ran fitted Tile and VSA layouts faster (length tiles by the bias product "
                      "0.92-0.93x of its speed, by compare and select 0.96-1.00x), and fp32 does not compile on "
                      "triton 3.6; set DIT_ACCEL_LENGTHS=1 to try them (behind their self-check)")


def _switched_on(name: str, what: str) -> bool:
    """Whether the opt-in switch ``$name`` (turning on ``what``) is on: ``1`` (``true``, ``on``, ``yes``); off for
    ``0`` (``false``, ``off``, ``no``) or unset; ValueError naming the variable on any other value (a typo must not
    leave the user believing it is on). One environment lookup."""
    from ..request import env_switch

    return env_switch(name, f"use {what}", "off", "off, the default") is True


def lengths_enabled() -> bool:
    """Whether ``$DIT_ACCEL_LENGTHS`` asks for the forward's length tiles."""
    return _switched_on(ENV_LENGTHS, "the forward's length tiles, behind their self-check")


def ws_enabled() -> bool:
    """Whether ``$DIT_ACCEL_WS`` asks for the warp-specialized forwards."""
    return _switched_on(ENV_WS, "the warp-specialized forwards, behind their self-check")


def ws_config(cfg: KernelConfig, arch: int) -> Optional[KernelConfig]:
    """The warp-specialized variant of forward configuration ``cfg`` on ``sm_<arch>`` (None where there
    is none: not sm_90 (its tiles and warp roles are Hopper's; sm_100 has no row), fp32, head dim 256,
    pointer loads, or a tile smaller than the ws tile). Whether it runs is the launchers' question
    (:func:`ws_enabled`)."""
    arch = config_target(arch)  # (the compiled target whose configurations this part runs)
    if cfg.kernel != "fwd" or not cfg.tma or cfg.ws or cfg.resume or arch != 90:
        return None
    tuned = WS_TUNED.get((90, "fwd", cfg.block_d)) if cfg.dtype != torch.float32 else None
    if tuned is None or tuned[0] > cfg.block_m or tuned[1] > cfg.block_n:
        return None
    bm, bn, warps, stages = tuned
    return dataclasses.replace(cfg, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, ws=True)


def resume_config(ws: KernelConfig, arch: int = 90) -> KernelConfig:
    """The kernel that runs the partial tiles after warp-specialized configuration ``ws``: the
    non-ws TMA forward with the same tile (so the same plan), started from ws's ``(O, LSE)``."""
    base = select_config("fwd", ws.dtype, ws.block_d, ws.block_m, ws.block_n, arch)
    return dataclasses.replace(base, block_m=ws.block_m, block_n=ws.block_n, resume=True)


def ws_pays(full_tiles: float, partial_tiles: float, resumed_rows: float, block_m: int, block_n: int,
            arch: str = "h100") -> bool:
    """Whether the warp-specialized forward plus its resume pass is modelled faster than the one-loop
    kernel for a layout with these tile counts (``block_m x block_n`` tiles; ``resumed_rows``: query
    tiles with partial tiles). The cost model (:mod:`dit_accel.kernels.cost`): full tiles at the
    ``"ws"`` variant's rate instead of ``"ring3"``'s, against one more pass over the resumed query
    tiles (their O / LSE read back and a pipeline fill) at the per-CTA cost. A model, not a timing."""
    from ..cost import constants

    ws, base = constants(arch, "ws"), constants(arch, "ring3")
    scale = block_m * block_n / (64 * 64)
    gain = full_tiles * (base.per_tile_s - ws.per_tile_s) * scale
    return gain > resumed_rows * ws.per_cta_s * block_m / 64


def _tuned(kernel: str, dtype: torch.dtype, bd: int, block_q: int, block_k: int, arch: int):
    """The searched ``(block_m, block_n, warps, stages)`` for these layout blocks, or None."""
    if dtype == torch.float32:
        return None
    target = config_target(arch)  # (sm_120, consumer Blackwell: 99 KB, sm_89's tiles)
    choices = next((TUNED[key] for key in ((target, kernel, bd), (min(target, 90), kernel, bd),
                                           (min(target, 80), kernel, bd)) if key in TUNED), None)
    if choices is None:
        return None
    big = choices[0]
    return big if big[0] <= block_q and big[1] <= block_k else choices[1]


def select_config(kernel: str, dtype: torch.dtype, head_dim: int, block_q: int, block_k: int,
                  arch: int = 80) -> KernelConfig:
    """Launch configuration for ``kernel`` given dtype, head dim, layout block sizes and GPU arch.

    fp16 / bf16 at padded head dims 64 and 128 take :data:`TUNED` (chosen from the compiled
    artefacts). The other cases keep hand-set rules, checked by the same compile tests:

    - forward: 128 x 64 tiles (64 x 32 at d=256); fp32 64x64 (d=64), 64x32 (d=128), 32x32 (d=256);
      8 warps for the larger fp32 accumulators.
    - dK/dV: 64 x 64 at d=64, else 32 query rows per step over a 64-key tile; dQ the mirror
      image; 32x32 at d=256, 16x16 for fp32 d=256 on 99 KB parts.
    - ``num_stages`` 3 on parts with >= 160 KB shared memory (sm_80, sm_90), 2 on 99 KB parts
      (sm_86, sm_89, sm_120), fewer for the widest tiles.

    Tiles never exceed the layout block (``min(tile, block)``). On sm_90 K/V (Q/dO for dK/dV)
    load through TMA descriptors. Every result is listed by :func:`shipped_configs` and compiled
    for sm_80/89/90/100 by the test suite; another part runs its :func:`~dit_accel.kernels.limits.config_target`'s
    (sm_120, consumer Blackwell, sm_89's: their TMA variants would need up to 139 KB of its 99).
    """
    arch = config_target(arch)  # (the compiled target whose configurations this part runs)
    bd = block_d_for(head_dim)
    big_smem = large_shared_memory(arch)
    wide = dtype == torch.float32  # 4-byte elements: smaller tiles
    stages = 3 if big_smem else 2
    if kernel == "bwd_preprocess":  # one variant per dtype: masked loads serve every head dim
        return KernelConfig(kernel, dtype, max(BLOCK_DS), 32, 0, 4, 1, False, True)
    if kernel not in ("fwd", "bwd_dkdv", "bwd_dq"):
        raise ValueError(f"kernel must be one of 'fwd', 'bwd_preprocess', 'bwd_dkdv', 'bwd_dq'; got {kernel!r}")
    tuned = _tuned(kernel, dtype, bd, block_q, block_k, arch)
    if tuned is not None:
        bm, bn, warps, stages = tuned
    elif kernel == "fwd":
        # FA2-style: a tall query tile kept in registers, 64-wide key tiles streamed.
        bm, bn = (128, 64) if bd <= 128 else (64, 32)
        if wide:
            bm, bn = (64, 64) if bd <= 64 else ((64, 32) if bd <= 128 else (32, 32))
        # 8 warps once a warp's share of the fp32 accumulator would crowd 255 registers.
        warps = 8 if bm * bd * (4 if wide else 2) >= 2 ** 14 else 4
        if bd >= 256 or (wide and bd >= 128):
            stages = 2 if big_smem and not (wide and bd >= 256) else 1
    else:
        # The owned tile (keys for dK/dV, queries for dQ) is the larger one.
        bm = bn = 64
        if bd >= 128 or wide:
            bm, bn = (32, 64) if kernel == "bwd_dkdv" else (64, 32)
        if bd >= 256 or (wide and bd >= 128):
            bm = bn = 32
        if wide and bd >= 256 and not big_smem:
            bm = bn = 16  # fp32 d=256 operands alone fill 99 KB at 32x32
        warps = 8 if bd >= 128 and bm * bn >= 2048 else 4
        # Where 4 warps spill (the compile tests): dK/dV at d=256 and fp32 d=64, fp32 dQ at d=256.
        if (kernel == "bwd_dkdv" and (bd >= 256 or (wide and bd <= 64))) or (wide and bd >= 256):
            warps = 8
        stages = 2 if bd <= 64 else 1
    # The sm_90 TMA variant of the fp32 dQ at d=128 spills (16 B stack, 12 B spill stores at 4 or 8 warps) since
    # the plan rows carry the full and partial tile lists together; its pointer variant does not.
    tma = tma_supported(arch, dtype, bd) and not (wide and kernel == "bwd_dq" and bd >= 128)
    # TMA zero-fills head-dim columns past D, so the TMA variant serves every head dim (it masks
    # only the Q / O accesses outside the loops); pointer kernels read whole BLOCK_D columns and
    # the launchers give them zero-padded copies for other head dims.
    return KernelConfig(kernel, dtype, bd, min(bm, block_q), min(bn, block_k), warps, stages, tma=tma, even_d=not tma)


#: The one-pass backward (``bwd_dkdv_dq``, :mod:`.bwd_fused`), fp16 / bf16 per (target, padded head dim):
#: ``(block_m, block_n, warps, stages)``, query rows streamed x key rows owned. Targets without an entry run
#: the two-pass backward. Chosen from the compiled artefacts (``dit-accel bench sass``: registers, spills).
#: Every other tile searched spills (bf16, 2026-11-27, triton 3.9: sm_90 d128 64x64 w4 824 B, 64x128 w8 640 B,
#: 32x64 w4 200 B, 32x128 w8 s2 20 B; sm_80 d128 32x64 w4 304 B, 32x128 w8 100 B, 64x64 w8 48 B; d64 64x64 w4
#: 88-108 B): sm_80 keeps the two-pass backward at d128, and a tile must fit the layout blocks whole.
FUSED_TUNED: Dict[Tuple[int, int], Tuple[int, int, int, int]] = {
    (80, 64): (32, 64, 4, 2),  # 254 registers, no spill
    (90, 64): (32, 64, 4, 2),  # 210 registers, no spill, 2 CTAs per SM
    (90, 128): (32, 128, 8, 1),  # 250 registers, no spill; 128-token key blocks only
}


#: Where the one-pass backward's pointer variant (inputs not TMA-aligned) spills: sm_90 d128's 32 x 128 tile at
#: 8 warps takes 255 registers and 28 B of spill stores without TMA. Those calls take the two-pass backward.
FUSED_POINTER_SPILLS = {(90, 128)}


def fused_pointer(cfg: KernelConfig, arch: int) -> Optional[KernelConfig]:
    """The pointer-load variant of one-pass configuration ``cfg``, or None where it spills (the two-pass
    backward serves those inputs)."""
    arch = config_target(arch)  # (the compiled target whose configurations this part runs)
    return None if (arch, cfg.block_d) in FUSED_POINTER_SPILLS else pointer_fallback(cfg)


def fused_config(dtype: torch.dtype, head_dim: int, block_q: int, block_k: int, arch: int = 80,
                 gpu: bool = True) -> Optional[KernelConfig]:
    """The one-pass backward's configuration, or None where only the two-pass backward ships: head dims past
    128, fp32 on a GPU (its tf32 tiles would be one more family to compile), targets without a
    :data:`FUSED_TUNED` entry (sm_89's 99 KB, sm_100, sm_80 at d128) and layout blocks smaller than the tile
    (a smaller tile is another kernel to compile and check). ``gpu=False`` (the interpreter, which runs sm_80's
    tiles, at every head dim) takes fp32 too, so the kernel is checked in fp32 on the CPU."""
    arch = config_target(arch)  # (the compiled target whose configurations this part runs)
    bd = block_d_for(head_dim)
    tuned = FUSED_TUNED.get((arch, bd)) or (None if gpu else FUSED_TUNED[(80, 64)])
    if tuned is None or (gpu and (dtype == torch.float32 or tuned[0] > block_q or tuned[1] > block_k)):
        return None
    bm, bn, warps, stages = tuned
    tma = tma_supported(arch, dtype, bd)
    return KernelConfig("bwd_dkdv_dq", dtype, bd, min(bm, block_q), min(bn, block_k), warps, stages, tma=tma,
                        even_d=not tma)


# Argument types and divisibility hints: the dense kernels' plus the plan's.
_ARG_TYPES = {**ARG_TYPES, "PLAN": "*i32", "BITS": "*i64", "LEN_BIAS": "*DT", "ITEMS": "*i32", "RIDX": "*i32",
              "DQ32": "*fp32", "GATE": "*DT", "CROWS": "*fp32", "ADDQ": "*fp32", "ADDK": "*fp32", "ADDV": "*fp32"}
# layout block sizes (64, 128, 256); dQ's fp32 buffer (contiguous); VSA's gate and cube rows (head dims of 16s)
_DIV16 = DIV16 | {"bits_w", "sgb", "sgh", "sgn", "scb", "sch", "scc", "sab", "sah", "sac"}


def candidates(kernel: str, dtype: torch.dtype, block_d: int, arch: int) -> List[KernelConfig]:
    """Launch configurations worth compiling for ``kernel`` on ``sm_<arch>`` (the search space of
    ``dit-accel bench sass --search``): the FlashAttention-2 tiles (a tall owned tile, the streamed
    side 32 to 128), 4 or 8 warps, 1 to 4 stages."""
    tiles = {"fwd": [(64, 64), (128, 64), (128, 128)], "bwd_dkdv": [(32, 64), (64, 64), (32, 128)],
             "bwd_dq": [(64, 32), (64, 64), (128, 32)]}[kernel]
    stages = {"fwd": (2, 3, 4), "bwd_dkdv": (1, 2), "bwd_dq": (1, 2)}[kernel]
    if not large_shared_memory(arch):
        stages = stages[:-1]
    tma = tma_supported(arch, dtype, block_d)
    return [KernelConfig(kernel, dtype, block_d, bm, bn, w, st, tma, not tma)
            for bm, bn in tiles for w in (4, 8) for st in stages]


def shipped_configs(arch: Optional[int] = None) -> List[KernelConfig]:
    """Every configuration :func:`select_config` can return for a GPU launch on ``sm_<arch>`` (all targets
    when None): each kernel, dtype, padded head dim and layout block size and, on TMA targets, the
    pointer fallback for tensors that are not 16-byte aligned, and each forward's length variant; duplicates
    removed."""
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
                            if kernel == "fwd" and length_config(cfg, a) is not None:  # block_sparse.lengths
                                seen.setdefault(length_config(cfg, a), None)
                            ws = ws_config(cfg, a)
                            if ws is not None:  # where ws_pays: the ws kernel and its resume pass
                                seen.setdefault(ws, ws)
                                seen.setdefault(resume_config(ws, a), resume_config(ws, a))
                            if kernel in ("fwd", "bwd_dkdv", "bwd_dq"):  # raster-order calls (block_sparse.gather)
                                seen.setdefault(gather_config(cfg, a), None)
                            if cfg.tma:  # the launcher's fallback when a tensor is not TMA-aligned
                                cfg = pointer_fallback(cfg)
                                seen.setdefault(cfg, cfg)
                                if kernel == "fwd" and length_config(cfg, a) is not None:
                                    seen.setdefault(length_config(cfg, a), None)
                    if kernel == "bwd_dkdv":  # and the one-pass backward beside it, with its fallback
                        for bq in GPU_LAYOUT_BLOCKS:
                            for bk in GPU_LAYOUT_BLOCKS:
                                fused = fused_config(dtype, bd, bq, bk, a)
                                for cfg in (fused, fused_pointer(fused, a) if fused else None):
                                    if cfg is not None:
                                        seen.setdefault(cfg, cfg)
    return list(seen)


#: ``(arch, block_d, block_m, block_n, tma)`` of the forward configurations whose length variant spills
#: (``tests/kernels/test_compile_block_sparse.py``, triton 3.9: 104 B at sm_100 d64 128 x 128, 12 B at sm_100
#: d256 64 x 32, 255 registers): there column-prefix tiles keep their bit masks.
LENGTHS_SPILL = {(100, 64, 128, 128, True), (100, 256, 64, 32, True)}


def length_config(cfg: KernelConfig, arch: int) -> Optional[KernelConfig]:
    """The length variant of forward configuration ``cfg`` on ``sm_<arch>`` (:mod:`.lengths`), None where it
    spills (:data:`LENGTHS_SPILL`) or ``cfg`` is a ws, resume or gathered kernel."""
    arch = config_target(arch)  # (the compiled target whose configurations this part runs)
    if cfg.kernel != "fwd" or cfg.ws or cfg.resume or cfg.gather or \
            (arch, cfg.block_d, cfg.block_m, cfg.block_n, cfg.tma) in LENGTHS_SPILL:
        return None
    return dataclasses.replace(cfg, lengths=True)


def pointer_fallback(cfg: KernelConfig) -> KernelConfig:
    """The pointer-load variant of a TMA configuration (same tiles, warps and stages)."""
    return dataclasses.replace(cfg, tma=False, even_d=True, ws=False, resume=False)


#: The self-check's name of the gathered forward (:mod:`.gather`; here so the launchers name it without importing it).
GATHER_VARIANT = "block_sparse.triton.fwd_gather"
#: The self-check's name of the two-pass backward reading and writing raster order through a row table.
GATHER_BWD_VARIANT = "block_sparse.triton.bwd_gather"


def gather_config(cfg: KernelConfig, arch: int) -> KernelConfig:
    """The forward (or two-pass backward) configuration ``cfg`` reading raster-order tensors through a row table (:mod:`.gather`) on
    ``sm_<arch>``: its pointer-load variant (a TMA box is consecutive rows), without length tiles, and with the
    pipeline depth of :data:`GATHER_STAGES` where the row offsets would spill at ``cfg``'s."""
    arch = config_target(arch)  # (the compiled target whose configurations this part runs)
    cfg = dataclasses.replace(pointer_fallback(cfg) if cfg.tma else cfg, lengths=False, gather=True)
    if cfg.kernel != "fwd":  # the backward's two-pass kernels (bwd_kernels.py)
        shape = GATHER_BWD_SHAPES.get((arch, cfg.kernel, cfg.dtype, cfg.block_d, cfg.block_m, cfg.block_n,
                                       cfg.num_warps, cfg.num_stages))
        return cfg if shape is None else dataclasses.replace(cfg, num_warps=shape[0], num_stages=shape[1])
    stages = GATHER_STAGES.get((arch, cfg.block_d, cfg.block_m, cfg.block_n, cfg.num_warps))
    return cfg if stages is None else dataclasses.replace(cfg, num_stages=stages)


def rows_fit(x: torch.Tensor) -> bool:
    """Whether every row offset inside a (batch, head) slice of ``(B, H, N, D)`` ``x`` fits the 32 bits the gathered
    kernels form them in (:func:`.gather.gather_fits` asks it of q, k, v and the output; the backward of the
    incoming gradient, which arrives after)."""
    return x.stride(-2) * x.shape[-2] + x.shape[-1] < 2 ** 31


#: ``(arch, block_d, block_m, block_n, num_warps) -> num_stages`` of the gathered forwards that spill at their
#: configuration's depth (triton 3.9, bf16 / fp16: sm_80 and sm_89 d128 128 x 64 with 8 warps, 255 registers and
#: 52 B of spill stores at 3 stages, none at 2; ``tests/kernels/test_compile_block_sparse.py``).
GATHER_STAGES = {(80, 128, 128, 64, 8): 2, (89, 128, 128, 64, 8): 2}

#: ``(arch, kernel, dtype, block_d, block_m, block_n, num_warps, num_stages) -> (num_warps, num_stages)`` of the
#: gathered two-pass backward kernels that spill at their configuration's (triton 3.9; every row table address is
#: one more live register per row): 12-16 B of spill stores at these, none at the replacements
#: (``tests/kernels/test_compile_block_sparse.py``).
GATHER_BWD_SHAPES = {
    (90, "bwd_dkdv", torch.float16, 128, 32, 128, 8, 2): (8, 1),
    (90, "bwd_dkdv", torch.bfloat16, 128, 32, 128, 8, 2): (8, 1),
    (100, "bwd_dkdv", torch.float16, 128, 32, 64, 4, 1): (8, 1),
    (100, "bwd_dkdv", torch.bfloat16, 128, 32, 64, 4, 1): (8, 1),
    (89, "bwd_dkdv", torch.float32, 128, 32, 32, 4, 1): (8, 1),
}


#: The compute capability each constants entry models (its kernels' configurations are that target's).
_SM = {"h100": 90}


def kernel_reason(kernel: str, block_q: int, block_k: int, head_dim: int = 128, arch: str = "h100",
                  dtype=None) -> Optional[str]:
    """None if a layout of ``block_q x block_k`` blocks at ``head_dim`` can run modelled variant ``kernel`` on
    ``arch`` (bf16 unless ``dtype``), else why not: a table prints no variant its layout cannot run.

    ``"ws"`` needs a warp-specialized configuration for the launch
    (:func:`ws_config`: a 128 x 64 tile inside the layout's blocks, so
    128-row query blocks, and a padded head dim of 128, fp16 / bf16, sm_90). The other variants are the
    one-loop kernel, which every layout runs."""
    from ..cost import constants

    constants(arch, kernel)  # a clear error for an unknown variant or arch
    if kernel != "ws":
        return None
    sm = _SM.get(arch, 90)
    cfg = select_config("fwd", dtype or torch.bfloat16, head_dim, block_q, block_k, sm)
    if ws_config(cfg, sm) is None:
        return (f"no warp-specialized forward for {block_q} x {block_k} blocks at head dim {head_dim} "
                f"({cfg.dtype}, sm_{sm}): it needs 128-row query blocks and a head dim of 65-128 in fp16 / bf16")
    return None


def _register() -> None:
    from ..dense.configs import register_tile_rules

    register_tile_rules(select_config, ws_config, ws_enabled)


_register()
