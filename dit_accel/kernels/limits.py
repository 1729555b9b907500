"""What the Triton kernels take, as plain values: the floor that the backend table, the self-check and the
kernel folders all read (so the table never reaches up into a kernel's folder to learn them)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["GRID_AXIS_LIMIT", "grid_fits", "in_grid_slices", "GPU_LAYOUT_BLOCKS", "INTERPRETER_LAYOUT_BLOCKS",
           "SLA_BLOCK_K", "SLA_DTYPES", "SLA_BLOCK_DS",
           "SLA_MAX_HEAD_DIM", "SHARED_MEMORY_LIMITS", "shared_memory_limit", "large_shared_memory",
           "config_target", "listed_part"]

#: The most programs a CUDA launch grid holds on its second and third axes, where the Triton kernels put B*H.
GRID_AXIS_LIMIT = 65535


def grid_fits(t: torch.Tensor) -> bool:
    """Whether one launch over ``(B, H, ...)`` tensor ``t`` keeps B*H within :data:`GRID_AXIS_LIMIT`."""
    return t.shape[0] * t.shape[1] <= GRID_AXIS_LIMIT


def in_grid_slices(run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``(o, lse)`` of ``run(q, k, v, heads)`` (``heads``: the ``(start, stop)`` of the heads it is given) over slices
    of the batch, and of the heads past :data:`GRID_AXIS_LIMIT` of them, that keep each launch's B*H within the
    limit, concatenated (autograd flows through it); one call where the whole fits."""
    b, h = q.shape[:2]
    most = GRID_AXIS_LIMIT
    if b * h <= most:
        return run(q, k, v, (0, h))
    if h <= most:
        parts = [run(q[i:i + most // h], k[i:i + most // h], v[i:i + most // h], (0, h))
                 for i in range(0, b, most // h)]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    rows = [[run(q[i:i + 1, j:j + most], k[i:i + 1, j:j + most], v[i:i + 1, j:j + most], (j, min(j + most, h)))
             for j in range(0, h, most)] for i in range(b)]
    return (torch.cat([torch.cat([o for o, _ in row], 1) for row in rows]),
            torch.cat([torch.cat([lse for _, lse in row], 1) for row in rows]))


#: Layout block sizes the block-sparse Triton kernels take on a GPU (the compiled, checked tiles); the
#: interpreter also takes 16 and 32, which keeps CPU tests fast.
GPU_LAYOUT_BLOCKS = (64, 128, 256)
INTERPRETER_LAYOUT_BLOCKS = (16, 32) + GPU_LAYOUT_BLOCKS

#: The fused SLA kernel: key rows per block, dtypes on CUDA (the interpreter also runs float32), padded head dims.
SLA_BLOCK_K = 64
SLA_DTYPES = (torch.float16, torch.bfloat16)
SLA_BLOCK_DS = (64, 128)
SLA_MAX_HEAD_DIM = SLA_BLOCK_DS[-1]

#: Dynamic shared memory per block (bytes), from the CUDA programming guide's compute capability table:
#: sm_80/87 163 KB, sm_86/89/120 99 KB, sm_90/100 227 KB.
SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def listed_part(arch: int, listed) -> Optional[int]:
    """The compute capability of ``listed`` that stands for ``sm_<arch>``: itself, else the nearest lower one of its
    own major (sm_103, B300, of the sm_100 family: sm_100; sm_121: sm_120), else None. The rule of this module's
    per-block table and of the occupancy table's per-SM rows (:func:`~dit_accel.kernels.occupancy.sm_limits`)."""
    if arch in listed:
        return arch
    same = [a for a in listed if a // 10 == arch // 10 and a <= arch]
    return max(same) if same else None


def shared_memory_limit(arch: int) -> int:
    """Max dynamic shared memory per block for compute capability ``arch`` (e.g. 90). An unlisted part gets the
    figure of the part that stands for it (:func:`listed_part`: sm_103 sm_100's 227 KB, sm_121 sm_120's 99 KB); a
    part with no listed sibling gets the 99 KB of the smallest."""
    part = listed_part(arch, SHARED_MEMORY_LIMITS)
    return 101376 if part is None else SHARED_MEMORY_LIMITS[part]


def large_shared_memory(arch: int) -> bool:
    """Whether ``sm_<arch>`` has the 163-227 KB per block that the sm_80, sm_90 and sm_100 configurations are sized
    for (deeper pipelines, TMA rings). The 99 KB parts (sm_86, sm_89, and consumer Blackwell: sm_120) run sm_89's
    configurations, whatever their instruction set."""
    return shared_memory_limit(arch) >= 160 * 1024


def config_target(arch: int) -> int:
    """The compiled and checked target (80, 89, 90 or 100) whose launch configurations ``sm_<arch>`` runs: its
    shared memory decides. sm_86 and consumer Blackwell (sm_120, 99 KB) run sm_89's, sm_87 sm_80's, sm_103 (B300)
    sm_100's; a part with no listed sibling of its major runs sm_89's, which fit every part. The suite compiles every
    target's configurations, so a part runs none that was not compiled and checked (for sm_120 and sm_103 themselves
    too: tests/kernels/test_small_parts.py)."""
    if not large_shared_memory(arch):
        return 89
    return 100 if arch >= 100 else (90 if arch >= 90 else 80)
