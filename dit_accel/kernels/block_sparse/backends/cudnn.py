"""cuDNN frontend's block-sparse attention (``pip install nvidia-cudnn-frontend``, >= 1.32: ``cudnn.BSA``).

cuDNN takes, per (batch, head, query block), a list of key blocks (``q2k_block_index`` int32
``[B, H, nQ, K_max]`` with per-row counts ``q2k_block_nums``) on a square grid of ``sparse_block_size`` tokens
(64 on sm_90, 128 on sm_100), and ``block_sizes``: the valid tokens of each key block (the ragged last one).
It has no element masks: a listed block is attended in full. :func:`to_cudnn` therefore re-cuts the layout to
that grid (:func:`.common.block_states`) and serves it only when every new block is empty or full; a block
that would need an element mask makes it return the reason (the call then runs on another backend). Its
backward (bf16, head dim 128 on sm_90; 64 or 128 on sm_100; no gradient through the log-sum-exp) is wired
through :class:`_CudnnBlockSparse`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ...._util import cdiv
from ..._cache import LayoutCache
from ...layout import BlockLayout
from ...request import kernel_backward
from .common import FULL, MIXED, block_states, cuda_arch, cuda_reason, package_reason, packed_lists, vendor_import

__all__ = ["NAME", "CudnnBlocks", "to_cudnn", "reason", "plan", "run", "block_size_for"]

NAME = "cudnn"
MODULE = "cudnn"
DTYPES = (torch.float16, torch.bfloat16)
ARCHS = (9, 10)
#: Exact compute capabilities with cuDNN's block-sparse backward (the forward: every ARCHS major).
BWD_ARCHS = (90, 100)
_PLANS = LayoutCache("block_sparse.cudnn")


@dataclass(frozen=True)
class CudnnBlocks:
    """A layout in cuDNN's form: ``index`` int32 ``[Hl, nQ', K_max]`` (ascending, valid prefix of ``nums``),
    ``nums`` int32 ``[Hl, nQ']``, ``block_sizes`` int32 ``[nK']`` (valid tokens per key block)."""

    block: int
    index: torch.Tensor
    nums: torch.Tensor
    block_sizes: torch.Tensor
    has_empty_rows: bool  # a Python bool (read per call without a host sync)


def block_size_for(arch: int) -> int:
    """cuDNN's default sparse block on ``arch`` (``api.block_sparse_attention_forward``): 64 on sm_90, else 128."""
    return 64 if arch // 10 in (9, 12) else 128


def to_cudnn(layout: BlockLayout, block: int) -> Union[CudnnBlocks, str]:
    """``layout`` on cuDNN's square ``block`` grid, or why it cannot be (a block needing an element mask, or a
    block size that is neither a multiple nor a divisor of the layout's). Pure tensor code."""
    try:
        states = block_states(layout, block, block)
    except ValueError as err:
        return f"cuDNN's {block}-token blocks do not fit this layout: {err}"
    mixed = states == MIXED
    if bool(mixed.any()):
        h, i, j = (int(x) for x in mixed.nonzero()[0])
        return (f"cuDNN attends listed blocks in full and has no element masks, but on its {block}-token grid "
                f"block (head {h}, query block {i}, key block {j}) is only partly allowed "
                f"({int(mixed.sum())} such blocks); the layout runs on another backend")
    nums, index = packed_lists(states == FULL)
    n_k = cdiv(layout.kv_len, block)
    sizes = torch.full((n_k,), block, dtype=torch.int32, device=layout.device)
    sizes[-1] = layout.kv_len - (n_k - 1) * block
    return CudnnBlocks(block, index, nums, sizes, bool((nums == 0).any()))


def install_reason() -> Optional[str]:
    """Why cuDNN's block-sparse attention cannot run any call here, whatever the device (None when installed)."""
    return package_reason(MODULE, "nvidia-cudnn-frontend", "cudnn")


def reason(request) -> Optional[str]:
    """Why cuDNN's block-sparse attention cannot run a call like ``request`` here (None when it can)."""
    why = install_reason() or cuda_reason(request.device, "cuDNN's block-sparse attention")
    if why is not None:
        return why
    from importlib import util

    if util.find_spec("cudnn.block_sparse_attention") is None:
        return ("this nvidia-cudnn-frontend has no block_sparse_attention (added in 1.32); "
                "`pip install -U \"nvidia-cudnn-frontend>=1.32\"`.")
    arch = cuda_arch(request.device)
    if arch // 10 not in ARCHS:
        return f"cuDNN's block-sparse kernels serve sm_90 and sm_100 here, not sm_{arch}; use backend='triton'."
    if request.dtype not in DTYPES:
        return f"cuDNN's block-sparse attention takes float16 or bfloat16, not {request.dtype}."
    if request.head_dim not in (64, 96, 128):
        return f"cuDNN's block-sparse forward takes head dims 64, 96 or 128, not {request.head_dim}."
    if request.needs_grad:
        if arch not in BWD_ARCHS:
            return (f"cuDNN's block-sparse backward serves sm_90 and sm_100 only, not sm_{arch} (sm_101 and the "
                    "other Blackwell variants have no kernel for it); use backend='triton' for gradients.")
        if request.dtype != torch.bfloat16:
            return "cuDNN's block-sparse backward takes bfloat16 only; cast, or use backend='triton' for gradients."
        if request.head_dim != 128 and (arch // 10 == 9 or request.head_dim != 64):
            return (f"cuDNN's block-sparse backward takes head dim 128 (or 64 on sm_100), not {request.head_dim}.")
    return None


def plan(layout: BlockLayout, arch: Optional[int] = None) -> Union[CudnnBlocks, str]:
    """The cuDNN structure of ``layout`` (on its device) at the block of ``arch``, once per layout; or a reason."""
    arch = cuda_arch(layout.device) if arch is None else arch
    return _PLANS.get(layout, ("plan", arch), lambda: to_cudnn(layout, block_size_for(arch)))


def _expanded(blocks: CudnnBlocks, batch: int, heads: int):
    index = blocks.index[None].expand(batch, heads, *blocks.index.shape[1:]).contiguous()
    nums = blocks.nums[None].expand(batch, heads, blocks.nums.shape[-1]).contiguous()
    return index, nums


class _CudnnBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks: CudnnBlocks, scale: float):
        BSA = vendor_import(MODULE, "nvidia-cudnn-frontend", "cudnn").BSA

        b, h, n, _ = q.shape
        index, nums = _expanded(blocks, b, h)
        pad = (-n) % blocks.block  # sm_90's forward wants whole query blocks: pad, then cut the rows off
        qp = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
        res = BSA.block_sparse_attention_forward(qp.contiguous(), k.contiguous(), v.contiguous(), index,
                                                 block_sizes=blocks.block_sizes, q2k_block_nums=nums,
                                                 sparse_block_size=blocks.block, softmax_scale=scale,
                                                 allow_empty_block_nums=blocks.has_empty_rows)
        o, lse = res["o_tensor"], res["lse_tensor"]
        ctx.save_for_backward(qp, k, v, o, lse, index, nums)
        ctx.blocks, ctx.scale, ctx.n = blocks, scale, n
        return o[:, :, :n], lse[:, :, :n].float()

    @staticmethod
    @kernel_backward("block-sparse attention's cuDNN kernel")
    def backward(ctx, do, dlse):
        BSA = vendor_import(MODULE, "nvidia-cudnn-frontend", "cudnn").BSA

        qp, k, v, o, lse, index, nums = ctx.saved_tensors
        pad = qp.shape[2] - ctx.n
        dop = torch.nn.functional.pad(do, (0, 0, 0, pad)) if pad else do
        res = BSA.block_sparse_attention_backward(dop.contiguous(), qp.contiguous(), k.contiguous(), v.contiguous(),
                                                  o, lse, index, block_sizes=ctx.blocks.block_sizes,
                                                  q2k_block_nums=nums, softmax_scale=ctx.scale,
                                                  sparse_block_size=ctx.blocks.block)
        return res["dq_tensor"][:, :, :ctx.n], res["dk_tensor"], res["dv_tensor"], None, None


def run(blocks: CudnnBlocks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool):
    """One cuDNN call on ``(B, H, N, D)`` inputs; ``(o, lse or None)``. The lse carries no gradient (cuDNN's
    backward takes none): a caller needing one is refused by the dispatcher before this runs."""
    o, lse = _CudnnBlockSparse.apply(q, k, v, blocks, scale)
    return o, (lse if return_lse else None)

