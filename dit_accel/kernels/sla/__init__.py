"""SLA (sparse-linear attention): :mod:`.api` (entry point), :mod:`.common` (parameters,
classification, feature maps), :mod:`.naive` (PyTorch twin), :mod:`.triton` + :mod:`.ops`
(fused kernels as custom ops), :mod:`.configs` (launch configurations)."""

from .api import inert_projections, is_inert, sla_attention, sla_parts, sla_parts_checked
from .common import (CRITICAL, MARGINAL, NEGLIGIBLE, SLABlocks, SLAParams, feature_map, sla_block_counts,
                     sla_classify, sla_density, sla_visited)

__all__ = ["sla_attention", "sla_parts", "sla_parts_checked", "is_inert", "inert_projections", "sla_classify", "sla_density", "sla_visited",
           "sla_block_counts", "SLABlocks", "SLAParams", "feature_map", "MARGINAL", "CRITICAL", "NEGLIGIBLE"]
