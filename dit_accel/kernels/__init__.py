"""How fast: attention kernels. Block-sparse attention (Triton, PyTorch twin, FlexAttention) and SLA.

Importing this package does not import triton; a Triton backend loads on first use.
Layout: :mod:`.block_sparse` and :mod:`.sla` (one folder per algorithm, twin beside
the fused kernels), :mod:`.backends` (which backend runs a call), :mod:`.layout`,
:mod:`.reference` (the dense fp32 oracle), :mod:`.merge`, :mod:`.compile` (AOT
compilation of every shipped configuration).
"""

from .backends import BackendUnavailable, available_backends
from .block_sparse import block_sparse_attention
from .block_sparse import configs as _block_sparse_configs  # noqa: F401  (registers the tile rules dense mirrors)
from .compile import compile_for_target, shipped_kernel_configs
from .layout import BlockLayout
from .merge import merge_attention
from .reference import dense_attention_reference
from .sla import SLAParams, sla_attention, sla_classify, sla_density
from . import _selfchecks  # noqa: F401,E402  (registers the in-repo kernel variants with the self-check)
from .block_sparse.backends import checks as _vendor_checks  # noqa: F401,E402  (and the vendor backends')
from .vsa import selfchecks as _vsa_selfchecks  # noqa: F401,E402  (and VSA's: a spawned self-check worker knows it)

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "merge_attention",
    "available_backends",
    "BackendUnavailable",
    "dense_attention_reference",
    "sla_attention",
    "sla_classify",
    "sla_density",
    "SLAParams",
    "shipped_kernel_configs",
    "compile_for_target",
]
