"""FlashAttention-4 (``pip install flash-attn-4``: the CuTe-DSL kernels, sm_90 and sm_100) behind a BlockLayout.

FA4 takes block sparsity as FlexAttention's BlockMask does: per query block the *partial* key blocks
(``mask_block_cnt`` / ``mask_block_idx``, on which it calls a ``mask_mod``) and the *full* ones
(``full_block_cnt`` / ``full_block_idx``, run unmasked), and for the backward the transposed lists per key
block. Its blocks must be multiples of its tiles (sm_90: 64-row query blocks, 64/128-key blocks forward and
128-key blocks backward; sm_100: 256 x 128 forward, 128 x 128 backward), so :func:`to_fa4` re-cuts the layout
to those blocks exactly (:func:`.common.block_states`): a new block is full only when every in-range pair is
allowed, else partial. The partial ones get the layout's own element masks through the ``mask_mod``, which
reads two int32 tables passed as FA4 ``aux_tensors`` (:func:`element_tables`): the table row of each *layout*
block (``ids[(h * nQ + q // bq) * nK + k // bk]``) and the rows (``table[(row * bq + q % bq) * bk + k % bk]``),
built so that the lookup is False past the sequence ends and never reads out of bounds. Every layout is
therefore served exactly; the conversion refuses (with a reason) only block sizes it cannot re-cut.

Nothing here imports ``flash_attn`` until a launch: a missing package is a reason, not an ImportError.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ...._util import cdiv
from ..._cache import LayoutCache
from ...layout import BlockLayout
from .common import FULL, MIXED, block_states, cuda_arch, cuda_reason, package_reason, packed_lists, vendor_import

__all__ = ["NAME", "Fa4Blocks", "to_fa4", "element_tables", "block_sizes", "reason", "plan", "run", "DTYPES"]

NAME = "fa4"
MODULE = "flash_attn.cute"
DTYPES = (torch.float16, torch.bfloat16)
ARCHS = (9, 10)  # compute-capability majors with block-sparse forward and backward
MAX_HEAD_DIM = 128
#: Largest re-cut factor per side (a 32-token layout block becomes at most a 256-token FA4 block).
MAX_FACTOR = 8
_PLANS = LayoutCache("block_sparse.fa4")


@dataclass(frozen=True)
class Fa4Blocks:
    """A layout in FA4's block-sparse form at ``block_q x block_k`` (one direction per pass).

    Forward lists (query-block major) ``[1, Hl, nQ']`` / ``[1, Hl, nQ', w]``; backward lists (key-block major)
    ``[1, Hl, nK']`` / ``[1, Hl, nK', w]``; ``ids`` int32 ``[Hl * nQ * nK]`` and ``table`` int32
    ``[4 * (P + 2) * bq * bk]`` on the *layout's* blocks (``layout_block``; ``layout_grid`` = (nQ, nK) covers
    every tile position), read by the mask_mod (:func:`element_tables`).
    """

    block_q: int
    block_k: int
    layout_block: Tuple[int, int]
    layout_grid: Tuple[int, int]  # (nQ, nK) of the layout
    heads: int  # Hl
    mask_cnt: torch.Tensor
    mask_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    bwd_mask_cnt: torch.Tensor
    bwd_mask_idx: torch.Tensor
    bwd_full_cnt: torch.Tensor
    bwd_full_idx: torch.Tensor
    ids: torch.Tensor
    table: torch.Tensor
    has_partial: bool  # read per call: a Python bool, so the launch has no host sync
    grid: Optional[torch.Tensor] = None  # int32 [nQ, nK] on the layout's device: the mask_mod's third aux tensor


def element_tables(layout: BlockLayout, cover: Tuple[int, int]):
    """``(ids, table, (nQ', nK'))``: the mask_mod's two int32 tables, flat, over a grid of layout blocks covering
    ``cover = (query tokens, key tokens)`` (every position a kernel tile may touch, so no read is out of bounds).

    ``table`` holds the element masks, a full block and an empty one, each in four versions: as is, cut to the
    real query rows of a ragged last query block, cut to the real keys of a ragged last key block, and both;
    ``ids`` points every layout block at its version, and blocks past the layout at the empty one. So the lookup
    itself is False for every padded query or key (FA4 masks the sequence ends only on some tiles).
    """
    bq, bk, dev = layout.block_q, layout.block_k, layout.device
    visited, mask_ids = layout.block_masks()
    p = layout.mask_table.shape[0]
    base = torch.cat([layout.mask_table.bool(), torch.ones(1, bq, bk, dtype=torch.bool, device=dev),
                      torch.zeros(1, bq, bk, dtype=torch.bool, device=dev)])  # rows 0..P-1, P full, P+1 empty
    q_rem = layout.q_len - (layout.num_q_blocks - 1) * bq
    k_rem = layout.kv_len - (layout.num_kv_blocks - 1) * bk
    rows_in = (torch.arange(bq, device=dev) < q_rem)[:, None]
    cols_in = (torch.arange(bk, device=dev) < k_rem)[None, :]
    table = torch.cat([base, base & rows_in, base & cols_in, base & rows_in & cols_in])  # version v: rows v*(P+2)+r
    case = torch.zeros(layout.num_q_blocks, layout.num_kv_blocks, dtype=torch.long, device=dev)
    case[-1, :] += 1
    case[:, -1] += 2
    ids = torch.where(visited, torch.where(mask_ids >= 0, mask_ids.long(), p), p + 1) + case * (p + 2)
    n_q, n_k = max(cdiv(cover[0], bq), layout.num_q_blocks), max(cdiv(cover[1], bk), layout.num_kv_blocks)
    padded = torch.full((layout.num_heads, n_q, n_k), p + 1, dtype=torch.long, device=dev)
    padded[:, :layout.num_q_blocks, :layout.num_kv_blocks] = ids
    return (padded.to(torch.int32).reshape(-1).contiguous(), table.to(torch.int32).reshape(-1).contiguous(),
            (n_q, n_k))


def to_fa4(layout: BlockLayout, block_q: int, block_k: int,
           cover: Optional[Tuple[int, int]] = None) -> Union[Fa4Blocks, str]:
    """``layout`` as :class:`Fa4Blocks` at ``block_q x block_k`` (each a multiple of the layout's block, at most
    :data:`MAX_FACTOR` times it), or a sentence saying why it cannot be converted. Pure tensor code (any device).
    ``cover``: the (query, key) token extents the element tables must cover (default: this block grid's)."""
    for name, new, old in (("block_q", block_q, layout.block_q), ("block_k", block_k, layout.block_k)):
        if new % old or new // old > MAX_FACTOR:
            return (f"FA4 needs {name} {new} here, which is not a multiple of the layout's {name}={old} within "
                    f"{MAX_FACTOR}x; rebuild the layout with blocks of 64 or 128")
    states = block_states(layout, block_q, block_k)  # [Hl, nQ', nK']
    partial, full = states == MIXED, states == FULL
    w_kv = max(int((partial | full).sum(-1).max()), 1)
    w_q = max(int((partial | full).sum(-2).max()), 1)
    m_cnt, m_idx = packed_lists(partial, w_kv)
    f_cnt, f_idx = packed_lists(full, w_kv)
    bm_cnt, bm_idx = packed_lists(partial.transpose(-1, -2), w_q)
    bf_cnt, bf_idx = packed_lists(full.transpose(-1, -2), w_q)
    ids, table, grid = element_tables(layout, cover or (cdiv(layout.q_len, block_q) * block_q,
                                                       cdiv(layout.kv_len, block_k) * block_k))
    bq, bk = layout.block_q, layout.block_k
    one = lambda t: t[None].contiguous()  # noqa: E731  (batch axis of 1, broadcast by FA4)
    return Fa4Blocks(block_q, block_k, (bq, bk), grid, layout.num_heads,
                     one(m_cnt), one(m_idx), one(f_cnt), one(f_idx), one(bm_cnt), one(bm_idx), one(bf_cnt), one(bf_idx),
                     ids.reshape(-1).contiguous(), table.reshape(-1).contiguous(), bool(partial.any()),
                     torch.tensor(grid, dtype=torch.int32, device=ids.device))


def _import(module: str):
    return vendor_import(module, "flash-attn-4", "fa4")


def _lcm_up(block: int, unit: int) -> int:
    return block * unit // math.gcd(block, unit)


def block_sizes(arch: int, head_dim: int, q_len: int,
                layout_block: Tuple[int, int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``((fwd_q, fwd_k), (bwd_q, bwd_k))``: the FA4 block sizes for ``layout_block`` on ``arch`` (90, 100, ...),
    read from FA4's tile choice (``interface._tile_size_fwd_sm90`` / ``_tile_size_bwd_sm90`` / sm_100 128 x 128
    tiles with two query stages)."""
    bq, bk = layout_block
    if arch // 10 == 9:
        fwd = (_lcm_up(bq, 64), bk if bk in (64, 128) else _lcm_up(bk, 128))
        bwd = (_lcm_up(bq, 128 if head_dim <= 64 else 64), _lcm_up(bk, 128))
    else:
        fwd = (_lcm_up(bq, 256 if q_len > 128 else 128), _lcm_up(bk, 128))
        bwd = (_lcm_up(bq, 128), _lcm_up(bk, 128))
    return fwd, bwd


def install_reason() -> Optional[str]:
    """Why FA4 cannot run any call here, whatever the device (None when it is installed)."""
    return package_reason(MODULE, "flash-attn-4", "fa4")


def reason(request) -> Optional[str]:
    """Why FA4 cannot run a call like ``request`` here (None when it can): the package, CUDA, the
    architecture, dtype, head dim. Layout-specific limits come from :func:`plan`."""
    why = install_reason() or cuda_reason(request.device, "FA4")
    if why is not None:
        return why
    major = torch.cuda.get_device_capability(request.device)[0]
    if major not in ARCHS:
        return (f"FA4's block-sparse kernels run on sm_90 and sm_100, not sm_{major}x; use backend='triton'.")
    if request.dtype not in DTYPES:
        return f"FA4 takes float16 or bfloat16, not {request.dtype}; cast the inputs or use backend='triton'."
    if request.head_dim > MAX_HEAD_DIM or request.head_dim % 8:
        return (f"head dim {request.head_dim} is not one FA4's block-sparse path serves here (multiples of 8 up "
                f"to {MAX_HEAD_DIM}); use backend='triton'.")
    return None


@dataclass(frozen=True)
class Fa4Plan:
    fwd: Fa4Blocks
    bwd: Fa4Blocks


def plan(layout: BlockLayout, head_dim: int, arch: Optional[int] = None) -> Union[Fa4Plan, str]:
    """The FA4 structures for ``layout`` (on its device), built once per (layout, head dim, arch); or a reason."""
    arch = cuda_arch(layout.device) if arch is None else arch

    def build():
        (fq, fk), (gq, gk) = block_sizes(arch, head_dim, layout.q_len, (layout.block_q, layout.block_k))
        if arch // 10 == 9 and (fk > 128 or gk != 128):
            # sm_90 has no key sub-tiles: a sparse key block is one tile (<= 128 forward, 128 backward).
            return (f"FA4 on sm_90 takes key blocks of at most 128 tokens, not {layout.block_k}; rebuild the "
                    "layout with block_k=64 or 128")
        # One pair of element tables serves both passes (FA4 hands the forward's aux tensors to the backward).
        cover = (max(cdiv(layout.q_len, b) * b for b in (fq, gq)), max(cdiv(layout.kv_len, b) * b for b in (fk, gk)))
        fwd = to_fa4(layout, fq, fk, cover)
        if isinstance(fwd, str):
            return fwd
        bwd = fwd if (gq, gk) == (fq, fk) else to_fa4(layout, gq, gk, cover)
        return bwd if isinstance(bwd, str) else Fa4Plan(fwd, bwd)

    return _PLANS.get(layout, ("plan", head_dim, arch), build)


@functools.lru_cache(maxsize=16)
def _mask_mod(bq: int, bk: int, shared: bool):
    """The CuTe-DSL mask_mod reading the layout's element masks from the aux tensors (see the module docstring).
    Its closure holds only the layout's block sizes, which FA4's compile cache hashes; the block grid (nQ, nK)
    is read from the third aux tensor at run time, so layouts of other lengths reuse the compiled kernel."""
    cutlass = _import("cutlass")
    cute = _import("cutlass.cute")
    utils = _import("flash_attn.cute.utils")

    if shared:
        @cute.jit
        def mask_mod(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            q, k = m_idx[0], n_idx[0]
            n_k = aux_tensors[2][1]
            row = aux_tensors[0][(q // bq) * n_k + k // bk]
            allowed = aux_tensors[1][(row * bq + q % bq) * bk + k % bk]
            return utils.scalar_to_ssa(allowed, cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)
    else:
        @cute.jit
        def mask_mod(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            q, k = m_idx[0], n_idx[0]
            n_q, n_k = aux_tensors[2][0], aux_tensors[2][1]
            row = aux_tensors[0][(head[0] * n_q + q // bq) * n_k + k // bk]
            allowed = aux_tensors[1][(row * bq + q % bq) * bk + k % bk]
            return utils.scalar_to_ssa(allowed, cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)
    return mask_mod


def _tensors(blocks: Fa4Blocks, backward: bool):
    BlockSparseTensorsTorch = _import("flash_attn.cute.block_sparsity").BlockSparseTensorsTorch

    if backward:
        return BlockSparseTensorsTorch(blocks.bwd_mask_cnt, blocks.bwd_mask_idx, blocks.bwd_full_cnt,
                                       blocks.bwd_full_idx, block_size=(blocks.block_q, blocks.block_k))
    return BlockSparseTensorsTorch(blocks.mask_cnt, blocks.mask_idx, blocks.full_cnt, blocks.full_idx,
                                   block_size=(blocks.block_q, blocks.block_k))


def run(p: Fa4Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool):
    """One FA4 call on ``(B, H, N, D)`` inputs; ``(o, lse or None)`` in dit_accel's layout. Differentiable
    through FA4's own backward (its block-sparse backward lists are ``p.bwd``'s)."""
    flash_attn_func = _import(MODULE).flash_attn_func

    fwd = p.fwd
    bq, bk = fwd.layout_block
    mask_mod = _mask_mod(bq, bk, fwd.heads == 1) if (fwd.has_partial or p.bwd.has_partial) else None
    aux = [fwd.ids, fwd.table, fwd.grid] if mask_mod is not None else None
    out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                               mask_mod=mask_mod, aux_tensors=aux, block_sparse_tensors=_tensors(fwd, False),
                               block_sparse_tensors_bwd=_tensors(p.bwd, True), return_lse=return_lse)
    out = out.transpose(1, 2)
    return out, (lse.float() if return_lse and lse is not None else None)

