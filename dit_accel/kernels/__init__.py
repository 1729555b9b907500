"""Attention kernels: block-sparse attention (Triton, PyTorch twin, FlexAttention) and SLA.

Importing this package does not import triton; the Triton backend loads on first use.
"""

from .attention import available_backends, block_sparse_attention
from .layout import BlockLayout
from .merge import merge_attention
from .reference import dense_attention_reference
from .sla import sla_attention, sla_classify, sla_density

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "merge_attention",
    "available_backends",
    "dense_attention_reference",
    "sla_attention",
    "sla_classify",
    "sla_density",
]
