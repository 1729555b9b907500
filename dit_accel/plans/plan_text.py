"""Describing a :class:`~dit_accel.plans.sparse_plan.SparsePlan` to a person: method labels, step spans, gaps between
phases, and the cost basis its summary and table price methods on."""


from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .._util import is_int
from ..methods import Dense, Method
from .per_head import PerHead

__all__ = ["method_label"]


def _span(phase) -> str:  # a sparse_plan.Phase
    if phase.stop == phase.start + 1:
        return str(phase.start)
    return f"{phase.start}..{'end' if phase.stop is None else phase.stop - 1}"


def _grid_text(grid) -> str:
    return "x".join(str(int(g)) for g in grid)


def _gaps(phases: Sequence, steps: Optional[int]) -> List[str]:  # sparse_plan.Phase values
    """Step ranges no phase covers (within ``steps`` when known)."""
    out, at = [], 0
    for p in sorted(phases, key=lambda p: p.start):
        if p.start > at:
            out.append(f"{at}..{p.start - 1}")
        at = p.stop if p.stop is not None else None
        if at is None:
            return out
    if steps is None:
        out.append(f"{at}..end")
    elif at < steps:
        out.append(f"{at}..{steps - 1}")
    return out


def method_label(method: Method) -> str:
    """A method config in a few characters: its name and the options that differ from the defaults,
    tuples as ``1x4x4`` (``tile(tile=1x4x4, window=1x1x3)``, ``sla(topk=0.2)``, ``dense``)."""
    parts = []
    for f in dataclasses.fields(method):
        if not f.init:
            continue
        value = getattr(method, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        if value == default:
            continue
        if isinstance(value, tuple) and all(is_int(v) for v in value) and value:
            value = "x".join(map(str, value))
        parts.append(f"{f.name}={value}")
    return method.name + (f"({', '.join(parts)})" if parts else "")


def own_heads(method: Method) -> Optional[Tuple[Method, ...]]:
    """Each head's single-head config of a config holding its own per-head values (a Tile's windows, a GNA's kernel
    sizes), or None: ``tile(window=((1, 1, 3), (1, 3, 3)))`` is not one window that every head runs."""
    from ..patterns.checks import per_head

    for f in dataclasses.fields(method):
        values = per_head(getattr(method, f.name)) if f.init else None
        if values is not None:
            try:
                return tuple(dataclasses.replace(method, **{f.name: v}) for v in values)
            except (ValueError, TypeError):  # a head's value alone is not a valid config: the whole one stands
                return None
    return None


def _heads_text(method: Method, heads: int) -> str:
    """``"all heads sla(topk=0.2)"`` or ``"heads 0-5 sla(topk=0.2); head 6 dense"``."""
    if isinstance(method, PerHead):
        labels = [method_label(m) for m in method.methods]
    else:
        split = own_heads(method)
        if split is None:
            return f"all heads {method_label(method)}"
        labels = [method_label(m) for m in split]
    parts, start = [], 0
    while start < len(labels):
        stop = start
        while stop + 1 < len(labels) and labels[stop + 1] == labels[start]:
            stop += 1
        parts.append(f"{'head ' + str(start) if stop == start else f'heads {start}-{stop}'} {labels[start]}")
        start = stop + 1
    return "; ".join(parts)


class _CostBasis:
    """Modelled seconds and density of one head of a method config at one grid (see :meth:`SparsePlan.profile`)."""

    def __init__(self, provenance: Mapping, grid):
        from ..kernels import cost as kernel_cost

        self.cost, self.grid = kernel_cost, grid
        model = provenance.get("cost_model") if isinstance(provenance.get("cost_model"), Mapping) else {}
        arch, kernel = model.get("arch") or "h100", model.get("kernel") or "current"
        try:
            kernel_cost.constants(arch, kernel)
        except (ValueError, TypeError):  # a measured cost model, or constants this version does not have
            arch, kernel = "h100", "current"
        self.arch, self.kernel = arch, kernel
        self.terms = "tiles" if model.get("terms") == "tiles" else "no-launch"
        config = provenance.get("model_config") if isinstance(provenance.get("model_config"), Mapping) else {}
        # the calibrated model's head dim (its config's for plans that did not record it; before: 128 for every
        # plan, which under per-CTA terms put tiny-shapes' Tile share at 59% where calibrate priced it at 84%)
        head_dim = provenance.get("head_dim") or config.get("attention_head_dim")
        self.head_dim = head_dim if is_int(head_dim) and head_dim >= 1 else 128
        self._memo: Dict[Method, tuple] = {}

    def describe(self, unpriced: Optional[str] = None) -> str:
        if self.grid is None:
            return "(step, layer, head) slots counted: the plan records no token grid (provenance.grids)"
        if unpriced is not None:
            return (f"(step, layer, head) slots counted: {unpriced} does not run at the plan's grid "
                    f"{_grid_text(self.grid)} (provenance.grids), so it has no modelled time")
        return (f"modelled attention time per head (dit_accel.kernels.cost, {self.arch}"
                f"{'' if self.kernel == 'current' else '/' + self.kernel}, terms {self.terms}, head dim "
                f"{self.head_dim}) at grid {_grid_text(self.grid)}, weighted by steps")

    def head(self, method: Method) -> tuple:
        """``(label, seconds or None, density or None)`` of one head running ``method``."""
        if method not in self._memo:
            self._memo[method] = self._price(method)
        return self._memo[method]

    def _price(self, method: Method) -> tuple:
        name = method.name
        if self.grid is None:
            return name, None, 1.0 if isinstance(method, Dense) else None
        c, n, d = self.cost, math.prod(self.grid), self.head_dim
        dense = c.dense_time(n, n, 1, head_dim=d, arch=self.arch) - c.constants(self.arch).dense_per_call_s
        if isinstance(method, Dense):
            return name, dense, 1.0
        try:
            plan = method.plan(self.grid)
        except (ValueError, TypeError):  # does not fit the grid: priced as a slot, density unknown
            return name, None, None
        if plan.is_dense:
            return name, dense, 1.0
        if hasattr(plan, "params"):  # SLA: the critical blocks it visits
            from ..kernels.sla.common import sla_density

            counts = c.sla_counts(n, method, heads=1)
            if self.terms == "tiles":
                counts = dataclasses.replace(counts, ctas=0, heads=0)
            secs = c.sla_time(counts, head_dim=d, arch=self.arch) - c.constants(self.arch).sla_per_call_s
            return name, secs, sla_density(n, method)
        if hasattr(plan, "cubes"):  # VSA: k of C cube tiles per query cube, and its coarse branch (as calibrate)
            counts = c.vsa_counts(plan, heads=1)
            if self.terms == "tiles":  # the critical tiles only: the coarse branch is glue
                counts = dataclasses.replace(counts, ctas=0)
            secs = (c.block_sparse_time(counts, head_dim=d, arch=self.arch, kernel=self.kernel)
                    - c.constants(self.arch, self.kernel).per_call_s)
            if self.terms != "tiles":
                secs += c.vsa_coarse_time(n, plan.cubes.count, head_dim=d, arch=self.arch)
            return name, secs, plan.density
        layout = plan.layout
        counts = c.tile_counts(layout, heads=layout.num_heads)
        if self.terms == "tiles":
            counts = dataclasses.replace(counts, ctas=0)
        secs = (c.block_sparse_time(counts, head_dim=d, arch=self.arch, kernel=self.kernel)
                - c.constants(self.arch, self.kernel).per_call_s) / layout.num_heads
        return name, secs, plan.density


def plan_profile(plan) -> dict:
    """:meth:`SparsePlan.profile <dit_accel.plans.sparse_plan.SparsePlan.profile>`: every (step, layer, head) slot
    priced with :class:`_CostBasis`, or counted where a slot has no price. A slot without a price is never mixed
    with priced ones (before: it counted as one second against microseconds, so a method that does not run at the
    grid showed as 100% of the attention time, and dense as 0%)."""
    prov = plan.provenance
    steps = prov.get("steps")
    total = steps or max((p.stop if p.stop is not None else p.start + 1 for p in plan.phases), default=1)
    layers = plan.num_layers or (max(plan.layers_named(), default=-1) + 1) or 1
    heads = plan.num_heads or max((m.heads for m in plan.methods() if isinstance(m, PerHead)), default=1)
    grids = prov.get("grids") or ()
    grid = tuple(grids[0]) if grids else None
    basis = _CostBasis(prov, grid)
    seconds: Dict[str, float] = {}
    counts: Dict[str, float] = {}
    density_sum, slots, unknown, unpriced = 0.0, 0, False, None
    spans = [(p, max((p.stop if p.stop is not None else total) - p.start, 0)) for p in plan.phases]
    spans.append((None, max(total - sum(n for _, n in spans), 0)))  # steps no phase covers: dense
    for phase, n_steps in spans:
        for layer in range(layers if n_steps else 0):
            method = Dense() if phase is None else phase.method(layer)
            for m in method.methods if isinstance(method, PerHead) else (method,) * heads:
                label, secs, density = basis.head(m)
                counts[label] = counts.get(label, 0.0) + n_steps
                seconds[label] = seconds.get(label, 0.0) + n_steps * (secs or 0.0)
                if secs is None and grid is not None and unpriced is None:
                    unpriced = method_label(m)
                unknown = unknown or density is None
                density_sum += n_steps * (density or 0.0)
                slots += n_steps
    priced = grid is not None and unpriced is None
    if not priced:
        seconds = counts
    whole = sum(seconds.values()) or 1.0
    share = {k: v / whole for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    return {"seconds": seconds, "share": share, "mean_density": None if unknown or not slots else
            density_sum / slots, "steps": steps, "layers": layers, "heads": heads, "grid": grid,
            "priced": priced, "basis": basis.describe(unpriced)}
