"""What the Triton kernels take, as plain values: the floor that the backend table, the self-check and the
kernel folders all read (so the table never reaches up into a kernel's folder to learn them)."""

from __future__ import annotations

import torch

__all__ = ["GPU_LAYOUT_BLOCKS", "INTERPRETER_LAYOUT_BLOCKS", "SLA_BLOCK_K", "SLA_DTYPES", "SLA_BLOCK_DS",
           "SLA_MAX_HEAD_DIM"]

#: Layout block sizes the block-sparse Triton kernels take on a GPU (the compiled, checked tiles); the
#: interpreter also takes 16 and 32, which keeps CPU tests fast.
GPU_LAYOUT_BLOCKS = (64, 128, 256)
INTERPRETER_LAYOUT_BLOCKS = (16, 32) + GPU_LAYOUT_BLOCKS

#: The fused SLA kernel: key rows per block, dtypes on CUDA (the interpreter also runs float32), padded head dims.
SLA_BLOCK_K = 64
SLA_DTYPES = (torch.float16, torch.bfloat16)
SLA_BLOCK_DS = (64, 128)
SLA_MAX_HEAD_DIM = SLA_BLOCK_DS[-1]
