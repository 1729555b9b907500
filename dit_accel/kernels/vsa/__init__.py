"""VSA (video sparse attention, FastVideo semantics): :mod:`.api` (the entry point; fine branch on the
block-sparse backends), :mod:`.naive` (the PyTorch twin, float64-checkable), :mod:`.triton` (cube pooling +
coarse attention in two launches, forward only) and :mod:`.selfchecks` (its first-use self-check)."""

from . import selfchecks as _selfchecks  # noqa: F401  (registers vsa.triton.coarse; triton loads on first use)
from .api import check_vsa_config, check_vsa_grid, vsa_attention, vsa_layout, vsa_parts
from .naive import cubes_of, selected_count, vsa_naive, vsa_parts_naive

__all__ = ["vsa_attention", "vsa_parts", "vsa_layout", "check_vsa_config", "check_vsa_grid", "vsa_naive",
           "vsa_parts_naive", "cubes_of", "selected_count"]
