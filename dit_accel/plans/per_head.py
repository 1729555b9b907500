"""A method per attention head: :class:`PerHead` and the plan that runs it, :class:`PerHeadPlan`.

A calibrated :class:`~dit_accel.plans.sparse_plan.SparsePlan` gives each head of a layer its own method
(a Tile window here, a GNA kernel there, Radial, SLA or dense). Running each head on its own would
launch a kernel per head; instead the heads are grouped by what can share one launch:

- **block-sparse heads** (GNA, Tile, Radial and the dense heads among them): one per-head
  :class:`~dit_accel.kernels.layout.BlockLayout` (``Hl`` = number of these heads) over one token
  order, run by one block-sparse call. A GNA or Tile head laid out in another tiled order (a Tile
  (6, 8, 8) beside GNA heads of a default tile) is laid out again from its per-dimension relations;
  other heads in another order (Radial's raster band beside Tile's tiled order) are moved into the
  shared order through their token mask, which costs ``N x N`` bits once per plan (refused above
  :data:`MAX_CONVERTED_TOKENS`);
- **SLA heads**: one SLA call per distinct SLA config (a calibrated plan gives the SLA heads of a
  layer one config, so at most one);
- dense heads when no head is block-sparse: one dense call.

So a layer with block-sparse and SLA heads runs as two launches. The outputs, log-sum-exps and SLA's
projected linear branch are scattered back to their heads; text tokens are merged afterwards by
:meth:`Plan.run`, exactly as for a single method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels.layout import BlockLayout
from ..methods import Dense, Method
from .plan import DensePlan, LayoutPlan, Plan, SLAPlan, plan_grid
from .vsa import VSAPlan

__all__ = ["PerHead", "PerHeadPlan", "MAX_CONVERTED_TOKENS", "CONTEXT_PARALLEL_REFUSAL"]

#: Largest token count at which a head laid out in another token order is converted through its N x N mask.
MAX_CONVERTED_TOKENS = 8192

#: Why a per-head config is refused under context parallelism (ring shares or Ulysses head groups).
CONTEXT_PARALLEL_REFUSAL = ("dit_accel: a per-head method config (PerHead, or a calibrated plan's per-head entries) "
                            "runs every head of a layer in one process, so it does not run under context "
                            "parallelism, neither ring nor Ulysses: run it without context parallelism (no "
                            "enable_parallelism, no --cp), or use one method for every head (a Tile or GNA with "
                            "per-head windows runs under both)")


@dataclass(frozen=True)
class PerHead(Method):
    """One method config per attention head of a layer: ``PerHead((Tile(...), Dense(), SLA(topk=0.2), ...))``.

    Each entry is a single-head config of a registered method (``Dense``, ``GNA``, ``Tile``,
    ``Radial``, ``SLA``); the number of entries must equal the layer's head count. Heads with
    block-sparse patterns run in one kernel launch through a per-head layout, SLA heads in one
    more (see the module docstring). Not a CLI method: it is what :class:`~dit_accel.plans.sparse_plan.
    SparsePlan` entries hold when the heads of a layer differ.

    Example::

        mixed = PerHead((Tile(tile=(4, 4, 4), window=(1, 1, 3)),) * 6 + (Dense(),) * 6)
        dit_accel.apply(pipe, mixed)
    """

    methods: Tuple[Method, ...] = ()

    name = "per_head"

    def __post_init__(self):
        if not isinstance(self.methods, (list, tuple)):  # (one config: a raw "not iterable"; a name: one per letter)
            raise TypeError(f"PerHead.methods={self.methods!r} is invalid: expected a tuple or list of method configs, "
                            "one per attention head, e.g. PerHead((Tile(...), Dense())); for one method on every "
                            "head pass that config itself")
        methods = tuple(self.methods)
        if not methods:
            raise ValueError("PerHead.methods is empty: give one method config per attention head")
        for h, m in enumerate(methods):
            if not isinstance(m, Method) or isinstance(m, PerHead) or hasattr(m, "for_layer_step"):
                raise TypeError(f"PerHead.methods[{h}]={m!r} is invalid: each head takes one single-head method "
                                "config (Dense(), GNA(...), Tile(...), Radial(...) or SLA(...))")
            if getattr(m, "heads", None) is not None or _per_head_window(m):
                raise ValueError(f"PerHead.methods[{h}]={m!r} already holds per-head settings; give each head "
                                 "its own single-head config")
        object.__setattr__(self, "methods", methods)

    @property
    def heads(self) -> int:
        return len(self.methods)

    def to_dict(self) -> dict:
        return {"method": self.name, "heads": [m.to_dict() for m in self.methods]}

    def ran_dict(self) -> dict:
        return {"method": self.name, "heads": [m.ran_dict() for m in self.methods]}

    def runs_sla(self, layer: int) -> bool:
        return any(m.name == "sla" for m in self.methods)

    def plan(self, grid):
        return PerHeadPlan.build(self, plan_grid(self, grid))


def _per_head_window(method: Method) -> bool:
    from ..patterns.checks import per_head

    return method.name == "tile" and per_head(method.window) is not None


class _Group:
    """Heads that run as one call: their indices (as given and as a device tensor) and the plan."""

    def __init__(self, heads: Sequence[int], plan: Plan, kind: str):
        self.heads, self.plan, self.kind = tuple(heads), plan, kind
        self._index: Dict[torch.device, torch.Tensor] = {}

    def index(self, device) -> torch.Tensor:
        index = self._index.get(device)
        if index is None:
            index = self._index.setdefault(device, torch.tensor(self.heads, dtype=torch.long, device=device))
        return index


class PerHeadPlan(Plan):
    """The plan of a :class:`PerHead` config: groups of heads, each one call (see the module docstring).

    Attributes:
        groups: ``[(heads, plan, kind)]`` with ``kind`` one of ``"block_sparse"``, ``"sla"``, ``"dense"``.
        launches: the number of attention calls per layer call (``len(groups)``).
    """

    kind = "per_head"

    def __init__(self, method: PerHead, grid, groups: List[_Group], density: Optional[float]):
        super().__init__(method, grid, density=density)
        self._groups = groups

    @property
    def groups(self) -> List[Tuple[Tuple[int, ...], Plan, str]]:
        return [(g.heads, g.plan, g.kind) for g in self._groups]

    @property
    def launches(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, method: PerHead, grid: Tuple[int, ...]) -> Plan:
        plans = {m: m.plan(grid) for m in dict.fromkeys(method.methods)}
        if len(plans) == 1:  # every head runs the same method: its own plan, nothing to group
            plan = next(iter(plans.values()))
            plan.for_heads = len(method.methods)  # (before: it ran on any head count, silently; Plan.run checks it)
            return plan
        heads = {"layout": [], "dense": [], "sla": {}}
        for h, m in enumerate(method.methods):
            plan = plans[m]
            if plan.is_dense:
                heads["dense"].append(h)
            elif isinstance(plan, LayoutPlan):
                heads["layout"].append(h)
            elif isinstance(plan, (SLAPlan, VSAPlan)):  # chosen per call: one call per distinct config
                heads["sla"].setdefault(m, []).append(h)
            else:
                raise ValueError(f"PerHead head {h}: {m!r} makes a {type(plan).__name__}, which per-head plans do "
                                 "not combine (block-sparse layouts, SLA and dense only)")
        grid = next(iter(plans.values())).grid
        if not heads["layout"] and not heads["sla"]:
            return DensePlan(method, grid, "every head of the per-head config runs dense")
        groups: List[_Group] = []
        if heads["layout"]:
            block_heads = sorted(heads["layout"] + heads["dense"])
            layout, perm = _shared_layout([plans[method.methods[h]] for h in block_heads], grid)
            # 128-row query blocks on CUDA where every head's halves visit the same tiles (an exact test).
            groups.append(_Group(block_heads, LayoutPlan(method, grid, layout, perm, wide_q=True), "block_sparse"))
        elif heads["dense"]:
            groups.append(_Group(heads["dense"], DensePlan(Dense(), grid, "dense heads"), "dense"))
        for m, hs in heads["sla"].items():
            groups.append(_Group(hs, plans[m], "vsa" if isinstance(plans[m], VSAPlan) else "sla"))
        density = None
        if not heads["sla"]:
            density = sum(g.plan.density * len(g.heads) for g in groups) / len(method.methods)
        return cls(method, grid, groups, density)

    # ------------------------------------------------------------------ run
    def attend(self, q, k, v, *, scale, backend, proj=None, heads=None, lse: bool = True):
        if heads is not None:
            raise ValueError(CONTEXT_PARALLEL_REFUSAL)
        n_heads = len(self.method.methods)
        if q.shape[1] != n_heads:
            raise ValueError(f"{self.method.name} holds {n_heads} head methods but the layer has {q.shape[1]} heads; "
                             "calibrate the plan on this model")
        if len(self._groups) == 1 and len(self._groups[0].heads) == n_heads:
            return self._groups[0].plan.attend(q, k, v, scale=scale, backend=backend, proj=proj, lse=lse)
        want_lse = lse
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if want_lse else None
        extra = None
        density = 0.0
        for group in self._groups:
            index = group.index(q.device)
            qs, ks, vs = (x.index_select(1, index) for x in (q, k, v))
            o_g, lse_g, extra_g, d_g = group.plan.attend(qs, ks, vs, scale=scale, backend=backend,
                                                         proj=proj if group.kind == "sla" else None, lse=want_lse,
                                                         **({"heads": index} if group.kind == "vsa" else {}))
            o = o.index_copy(1, index, o_g.to(o.dtype))
            if want_lse:
                lse = lse.index_copy(1, index, lse_g.float())
            if extra_g is not None:
                if extra is None:
                    extra = torch.zeros(q.shape, dtype=extra_g.dtype, device=q.device)
                elif extra.dtype != extra_g.dtype:  # (VSA's extra is fp32 where the caller merges first, SLA's not)
                    extra = extra.to(torch.promote_types(extra.dtype, extra_g.dtype))
                extra = extra.index_copy(1, index, extra_g.to(extra.dtype))
            density = density + d_g * len(group.heads)
        return o, lse, extra, density / n_heads

    def check_part(self, rows) -> None:
        raise ValueError(CONTEXT_PARALLEL_REFUSAL)

    def backend_for(self, q, k, v, backend: str, lse: bool = True) -> str:
        names = []
        for group in self._groups:
            if group.kind == "dense":
                names.append("sdpa")
            else:
                index = group.index(q.device)
                names.append(group.plan.backend_for(*(x.index_select(1, index) for x in (q, k, v)), backend, lse))
        return "+".join(dict.fromkeys(names))

    def prepare(self, device, backend: str = "auto") -> None:
        for group in self._groups:
            group.plan.prepare(device, backend)
            group.index(torch.device(device))

    def describe(self) -> dict:
        out = super().describe()
        out["groups"] = [{"heads": list(g.heads), "kind": g.kind, "density": g.plan.density} for g in self._groups]
        return out


# ------------------------------------------------------------------ one token order for every block-sparse head
def _order_key(plan: Plan):
    if isinstance(plan, LayoutPlan):
        perm = plan.perm
        return (None if perm is None else (perm.grid, perm.tile), plan.layout.block_q, plan.layout.block_k)
    return None


def _shared_layout(plans: Sequence[Plan], grid) -> Tuple[BlockLayout, object]:
    """``(per-head layout, permutation)``: every plan's pattern in the token order most of them use."""
    from ..patterns.permutation import PackedTilePermutation
    from ..patterns.separable import separable_layout, stack_heads
    from ..patterns.tile import packed_tile_layout

    keys = [_order_key(p) for p in plans if isinstance(p, LayoutPlan)]
    ref_key = max(dict.fromkeys(keys), key=keys.count)
    ref = next(p for p in plans if _order_key(p) == ref_key)
    perm, block_q, block_k = ref.perm, ref.layout.block_q, ref.layout.block_k
    layouts, converted = [], {}
    full = None
    for plan in plans:
        if plan.is_dense:
            if full is None:
                if perm is None:
                    n_q, n_k = ref.layout.num_q_blocks, ref.layout.num_kv_blocks
                    full = BlockLayout.from_block_masks(torch.ones(n_q, n_k, dtype=torch.bool), q_len=ref.layout.q_len,
                                                        kv_len=ref.layout.kv_len, block_q=block_q, block_k=block_k)
                elif isinstance(perm, PackedTilePermutation):  # (a fit=True Tile's): a window over every tile
                    full = packed_tile_layout(perm.grid, perm.tile, perm.num_tiles, block=perm.block)[1]
                else:  # padded keys stay masked: the all-true relation on the real grid
                    full = separable_layout(perm, [torch.ones(g, g, dtype=torch.bool) for g in perm.grid], block_q,
                                            block_k)
            layouts.append(full)
        elif _order_key(plan) == ref_key:
            layouts.append(plan.layout)
        else:
            if id(plan) not in converted:
                converted[id(plan)] = _convert(plan, perm, block_q, block_k)
                _warn_converted(plan, ref, converted[id(plan)])
            layouts.append(converted[id(plan)])
    return stack_heads(layouts), perm


def _warn_converted(plan: LayoutPlan, ref: LayoutPlan, layout: BlockLayout) -> None:
    """Say it where a head laid out in the launch's shared token order visits more than a tenth more of the key blocks
    than in its own (before: unsaid; GNA (3, 5, 5) beside Tile (4, 4, 4) heads on (8, 8, 8) visited every block,
    against 0.38 in its own order)."""
    import warnings

    from .._util import DitAccelWarning

    shared, own = float(layout.density()), float(plan.layout.density())
    if shared > 1.1 * own:
        warnings.warn(f"dit_accel: PerHead on grid {tuple(plan.grid)}: {plan.method!r} runs in the token order of "
                      f"{ref.method!r}, the other heads', where it visits {shared:.2f} of the key blocks against "
                      f"{own:.2f} in its own: give the heads one token order (the same tile= for Tile and GNA, no "
                      "Radial beside them) for the work their patterns promise", DitAccelWarning, stacklevel=2)


def _raster_mask(plan: LayoutPlan) -> torch.Tensor:
    mask = plan.layout.to_dense_mask()[0]
    if plan.perm is not None:
        inverse = plan.perm.inverse
        mask = mask[inverse][:, inverse]
    return mask


def _separable_relations(plan: LayoutPlan):
    """The per-dimension relations of a single-window GNA or Tile ``plan`` (what its layout was built from), or None
    for other patterns."""
    import warnings

    from .._util import DitAccelWarning
    from ..patterns.checks import per_head
    from ..patterns.gna import gna_relations
    from ..patterns.tile import tile_relations

    method = plan.method
    if method.name == "tile" and per_head(method.window) is None:
        return tile_relations(plan.grid, method.tile, method.window)[2]
    if method.name == "gna" and per_head(method.kernel_size) is None:
        with warnings.catch_warnings():  # (the plan noted a clamped kernel already)
            warnings.simplefilter("ignore", DitAccelWarning)
            fitted = method._fitted_relations(plan.grid) if method.fit else None
        if fitted is not None:
            return fitted[1]
        return gna_relations(plan.grid, method.kernel_size, method.stride, method.dilation, method.is_causal)[1]
    return None


def _convert(plan: LayoutPlan, perm, block_q: int, block_k: int) -> BlockLayout:
    """``plan``'s pattern laid out in ``perm``'s token order (raster when None): a GNA or Tile window from its
    relations on any tiled order (no ``N x N``), other patterns through their token mask."""
    from ..patterns.permutation import PackedTilePermutation
    from ..patterns.separable import separable_layout

    if perm is not None and not isinstance(perm, PackedTilePermutation):
        relations = _separable_relations(plan)
        if relations is not None:  # (a Tile(6, 8, 8) head beside GNA heads of another tile: refused above 8192)
            return separable_layout(perm, relations, block_q, block_k)
    n = math.prod(plan.grid)
    if n > MAX_CONVERTED_TOKENS:
        raise ValueError(f"{plan.method!r} lays its heads out in another token order than the other block-sparse "
                         f"heads of this layer, and at {n} tokens (> {MAX_CONVERTED_TOKENS}) moving it through its "
                         "token mask is too large; give the heads of a layer methods of one token order (e.g. "
                         "Radial(spatial='window') beside Tile/GNA)")
    mask = _raster_mask(plan)
    if perm is not None:
        real = perm.order >= 0
        rows = perm.order[real]
        tiled = torch.zeros(perm.num_padded, perm.num_padded, dtype=torch.bool)
        tiled[real.nonzero().flatten()[:, None], real.nonzero().flatten()[None, :]] = mask[rows][:, rows]
        mask = tiled
    return BlockLayout.from_dense_mask(mask, block_q, block_k)
