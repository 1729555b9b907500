"""Block-sparse attention over a :class:`~dit_accel.kernels.BlockLayout`.

:mod:`.api` (the entry point), :mod:`.naive` (the PyTorch twin: CPU backend and
test oracle), :mod:`.triton` + :mod:`.ops` (the fused GPU kernels as custom ops),
:mod:`.flex` (FlexAttention), :mod:`.configs` (Triton launch configurations).
"""

from .api import block_sparse_attention

__all__ = ["block_sparse_attention"]
