"""Launch configurations of the dense Triton kernels, and the AOT signature builder every family shares.

A dense configuration mirrors a sparse one field for field (tile, warps, stages, dtype,
padded head dim, TMA or pointer loads), so :mod:`dit_accel.kernels.sass` can compile the
dense kernel "with the same everything" beside each shipped sparse configuration
(:func:`dense_counterpart`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

from ..limits import large_shared_memory

__all__ = ["DenseConfig", "aot_signature", "ARG_TYPES", "DIV16", "tma_args", "tma_ok", "select_dense_config", "DTYPE_NAMES",
           "PTR_DTYPE", "tma_supported"]

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
PTR_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_signature(fn, types: Dict[str, str], constexprs: Dict[str, object], div16: Iterable[str] = (),
                  dtype: torch.dtype = torch.float16, tma_blocks: Optional[Dict[str, Tuple[int, ...]]] = None):
    """``(fn, signature, constexprs, attrs)`` for ``triton.compile(ASTSource(...))``.

    ``types`` maps argument names to triton type strings (``"*DT"`` is a pointer to the
    q/k/v dtype); unnamed arguments are ``i32``. Pointers and the names in ``div16`` get
    the divisibility-16 hint the JIT gives them in typical launches (contiguous tensors,
    head dims that are multiples of 16). ``tma_blocks`` names the arguments passed as host
    tensor descriptors, with their block shapes.
    """
    dt = PTR_DTYPE[dtype]
    signature, attrs = {}, {}
    div16 = set(div16)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if tma_blocks and name in tma_blocks:
            signature[name] = f"tensordesc<{dt}[{','.join(map(str, tma_blocks[name]))}]>"
            continue
        signature[name] = types.get(name, "i32").replace("DT", dt)
        if signature[name].startswith("*") or name in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, signature, dict(constexprs), attrs


def tma_supported(arch: int, dtype: torch.dtype, block_d: int) -> bool:
    """Whether the configuration for ``sm_<arch>`` loads K/V through TMA descriptors: Hopper and data-centre
    Blackwell (sm_90, sm_100). Consumer Blackwell (sm_120) has TMA but 99 KB of shared memory a block, and runs
    sm_89's pointer-load tiles: their TMA variants needed up to 139 KB there (the largest forward's length variant).

    The launcher still falls back to pointer loads when a tensor's base or strides are not
    16-byte aligned (:func:`tma_ok`).
    """
    return arch >= 90 and large_shared_memory(arch)


#: Argument types of the attention kernels by name ("DT": the q/k/v dtype); others are i32.
ARG_TYPES = {
    **{n: "*DT" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")},
    **{n: "*fp32" for n in ("LSE", "DELTA", "LSE2", "DLSE")},
    "qk_scale": "fp32", "sm_scale": "fp32",
}
#: Arguments that are multiples of 16 in typical launches (token / batch / head strides of
#: contiguous tensors with head dims 64/80/96/128): the JIT gives them the same hint.
DIV16 = {"sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "son", "sdb", "sdh", "sdn",
         "head_dim"}


@dataclass(frozen=True)
class DenseConfig:
    """One compiled variant of a dense kernel (``"fwd"``, ``"bwd_dkdv"``, ``"bwd_dq"``)."""

    kernel: str
    dtype: torch.dtype
    block_d: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    even_d: bool = True
    ws: bool = False  # fwd on sm_90: one warp-specialized loop over descriptors made in the kernel

    @property
    def dot_precision(self) -> str:
        return "tf32"  # fp32 inputs: tf32 tensor-core products, fp32 accumulation

    @property
    def name(self) -> str:
        return (f"dense_{self.kernel}-{DTYPE_NAMES[self.dtype]}-d{self.block_d}-m{self.block_m}n{self.block_n}"
                f"-w{self.num_warps}s{self.num_stages}{'-tma' if self.tma else ''}{'' if self.even_d else '-oddd'}"
                f"{'-ws' if self.ws else ''}")

    def constexprs(self) -> dict:
        out = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d, "EVEN_D": self.even_d,
               "TMA": self.tma, "DOT_PRECISION": self.dot_precision}
        if self.kernel == "fwd":
            out.update(WS=self.ws, EVEN_N=True)  # the twin of a sparse full-tile loop: no key mask
        return out

    def aot_source(self, kernels):
        """``(kernel, signature, constexprs, attrs)`` for ``triton.compile(ASTSource(...))``."""
        fn = kernels[self.kernel]
        consts = {k: v for k, v in self.constexprs().items() if k in fn.arg_names}
        tma = None
        if self.tma and not self.ws:
            rows = self.block_n if self.kernel != "bwd_dkdv" else self.block_m
            tma = {name: (1, 1, rows, self.block_d) for name in tma_args(self.kernel)}
        return aot_signature(fn, ARG_TYPES, consts, DIV16, self.dtype, tma)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these (B, H, N, D) tensors: 16-byte aligned base and strides, the
    last dim contiguous, and no stride 0 (an ``expand``-ed tensor: a descriptor walks memory by its strides,
    which must step forward)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((s * size) % 16 or s == 0 for s in t.stride()[:-1]):
            return False
    return True


def tma_args(kernel: str) -> Tuple[str, ...]:
    """The arguments a kernel takes as tensor descriptors when ``TMA`` is on: the streamed operands."""
    return ("Q", "DO") if kernel == "bwd_dkdv" else ("K", "V")


#: The block-sparse kernels' tile rules ``(select_config, ws_config, ws_enabled)``, which the dense kernel mirrors
#: (same tile for the same inputs): registered by :mod:`dit_accel.kernels.block_sparse.configs` when it loads, so
#: this folder never imports the one above it.
_TILE_RULES: list = []


def register_tile_rules(select_config, ws_config, ws_enabled) -> None:
    _TILE_RULES[:] = [(select_config, ws_config, ws_enabled)]


def tile_rules():
    """``(select_config, ws_config, ws_enabled)`` of the block-sparse kernels (registered when they load)."""
    if not _TILE_RULES:
        raise RuntimeError("dit_accel.kernels.block_sparse.configs was not loaded: import dit_accel.kernels first")
    return _TILE_RULES[0]


def select_dense_config(kernel: str, dtype: torch.dtype, block_d: int, block_m: int, block_n: int, num_warps: int,
                        num_stages: int, tma: bool = False, even_d: bool = True, ws: bool = False) -> DenseConfig:
    """The dense configuration with exactly these tile, warps, stages and load path."""
    return DenseConfig(kernel, dtype, block_d, block_m, block_n, num_warps, num_stages, tma, even_d, ws)
