"""Attention kernels: block-sparse attention (Triton, PyTorch twin, FlexAttention) and SLA."""

from .layout import BlockLayout

__all__ = ["BlockLayout"]
