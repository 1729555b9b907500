"""What a candidate costs, in modelled GPU seconds, from the kernels' one cost model (:mod:`dit_accel.kernels.cost`).

The calibration search adds costs per head and per launch, so each modelled call time is split
into its per-call term (paid once per launch: a layer that mixes block-sparse and SLA heads pays two)
and its body (linear in the number of heads). Which terms count is ``terms``:

- ``"full"``: everything the model has: per call, per CTA (per query block), per visited tile (and
  SLA's per-token glue). The honest GPU time; at small grids the per-call and per-CTA terms dominate
  and dense attention is the cheapest choice (tiny-shapes: 576 tokens, head dim 32).
- ``"no-launch"``: without the per-call terms (CUDA graphs, or one persistent launch for all layers).
- ``"tiles"``: only the visited tiles, at the model's per-tile rates (dense, block-sparse, SLA): the
  work a plan removes, which is what dominates at the large grids sparse attention is for. The
  functions of :mod:`dit_accel.kernels.cost` are asked for calls with no CTAs and no glue, so no
  constant is copied here.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

from ..kernels import cost as kernel_cost
from ..plans.plan import LayoutPlan

__all__ = ["CostModel", "MeasuredCostModel", "COST_SOURCES"]

#: ``--costs``: what prices a candidate: the kernels' cost model (``model``) or timings on this device (``measured``).
COST_SOURCES = ("model", "measured")


class CostModel:
    """Modelled seconds per head (body) and per launch on one token grid, for one attention call of batch 1.

    Args:
        grid: the token grid; head_dim: the model's head dimension.
        arch, kernel: :func:`dit_accel.kernels.cost.constants` (``kernel`` one of its modelled variants).
        terms: ``"full"``, ``"no-launch"`` or ``"tiles"`` (see the module docstring).
    """

    TERMS = ("full", "no-launch", "tiles")

    def __init__(self, grid, head_dim: int, *, arch: str = "h100", kernel: str = "current", terms: str = "full"):
        from ..patterns.checks import as_grid, positive_int

        if terms not in self.TERMS:
            raise ValueError(f"terms={terms!r} is invalid: choose one of {', '.join(self.TERMS)}")
        # (before: int() of the head dimension, so 0 priced every head as free and 32.7 as 32)
        self.grid, self.head_dim = as_grid(grid), positive_int("head_dim", head_dim)
        self.arch, self.kernel = arch, kernel
        self.terms = terms
        self.launch_overhead = terms == "full"
        self.constants = kernel_cost.constants(arch, kernel)
        self.num_tokens = math.prod(self.grid)
        self._heads: Dict[object, float] = {}

    # ---------------------------------------------------------------- per launch
    def launch(self, kind: str) -> float:
        """The per-call term of one launch of ``kind`` (``"dense"``, ``"block_sparse"``, ``"sla"``, ``"vsa"``: a
        block-sparse launch and its coarse branch's :data:`~dit_accel.kernels.cost.VSA_COARSE_LAUNCHES`)."""
        if not self.launch_overhead:
            return 0.0
        c = self.constants
        return {"dense": c.dense_per_call_s, "block_sparse": c.per_call_s, "sla": c.sla_per_call_s,
                "vsa": c.per_call_s + kernel_cost.VSA_COARSE_LAUNCHES * c.dense_per_call_s}[kind]

    # ---------------------------------------------------------------- per head
    def dense_head(self) -> float:
        """One head of a dense (SDPA) call, without the per-call term."""
        n = self.num_tokens
        return kernel_cost.dense_time(n, n, 1, head_dim=self.head_dim, arch=self.arch) - \
            kernel_cost.constants(self.arch).dense_per_call_s

    def full_head(self, layout_like: LayoutPlan) -> float:
        """A dense head inside a block-sparse launch: every block of ``layout_like``'s token order visited."""
        lay = layout_like.layout
        counts = kernel_cost.TileCounts(ctas=lay.num_q_blocks, full_tiles=float(lay.num_q_blocks * lay.num_kv_blocks),
                                        partial_tiles=0.0, block_q=lay.block_q, block_k=lay.block_k, q_len=lay.q_len,
                                        kv_len=lay.kv_len, heads=1)
        return self._block(counts)

    def head(self, candidate) -> float:
        """One head of ``candidate`` (a :class:`~.candidates.Candidate`), without the per-call term."""
        key = candidate.method
        if key not in self._heads:
            if candidate.kind == "dense":
                value = self.dense_head()
            elif candidate.kind == "sla":
                counts = kernel_cost.sla_counts(self.num_tokens, candidate.method, heads=1)
                if self.terms == "tiles":  # the critical tiles only: no CTAs, no per-token glue
                    counts = dataclasses.replace(counts, ctas=0, heads=0)
                # (the kernel's per-call term, as launch("sla") charges: before, the current kernel's was taken
                # off here, so a variant's SLA head cost 500 - 50 us more than kernels.cost.sla_time of it)
                value = kernel_cost.sla_time(counts, head_dim=self.head_dim, arch=self.arch, kernel=self.kernel) - \
                    self.constants.sla_per_call_s
            elif candidate.kind == "vsa":  # k of C cube tiles per query cube, and the coarse branch's C x C work
                plan = candidate.method.plan(self.grid)
                value = self._block(kernel_cost.vsa_counts(plan, heads=1))
                if self.terms != "tiles":  # the critical tiles only: the coarse branch is glue
                    value += kernel_cost.vsa_coarse_time(self.num_tokens, plan.cubes.count, head_dim=self.head_dim,
                                                         arch=self.arch)
            else:
                lay = candidate.method.plan(self.grid).layout
                value = self._block(kernel_cost.tile_counts(lay, heads=1))
            self._heads[key] = value
        return self._heads[key]

    def _block(self, counts) -> float:
        if self.terms == "tiles":
            counts = dataclasses.replace(counts, ctas=0)
        return kernel_cost.block_sparse_time(counts, head_dim=self.head_dim, arch=self.arch, kernel=self.kernel) - \
            kernel_cost.constants(self.arch, self.kernel).per_call_s

    def describe(self) -> dict:
        return {"arch": self.arch, "kernel": self.kernel, "terms": self.terms,
                "constants": self.constants.name, "modelled_kernel": self.constants.modelled_kernel,
                "source": self.constants.source}


def _wall_ms(fn: Callable[[], object], device, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call: CUDA events on a GPU
    (:func:`~dit_accel.kernels.autotune.cuda_event_timer`), the wall clock elsewhere."""
    import torch

    if torch.device(device).type == "cuda":
        from ..kernels.autotune import cuda_event_timer

        return cuda_event_timer(fn, warmup=1, repeats=repeats, device=device)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class MeasuredCostModel(CostModel):
    """Seconds per head and per launch **measured on this device**: each candidate (and dense SDPA) is timed on
    random ``(1, heads, N, head_dim)`` inputs of the grid's tokens with all heads and with one head; the
    difference over ``heads - 1`` is the per-head body, the rest of the one-head call the per-call term
    (``heads == 1``: all of it is the body). A dense head inside a block-sparse launch is priced as a dense
    SDPA head. Same interface as :class:`CostModel`, so the search and the evidence price plans the same way.

    Args:
        grid, head_dim: as :class:`CostModel`; candidates: the :class:`~.candidates.Candidate` list to time;
        heads: the model's heads per layer; device, dtype: where and in what the pipeline runs;
        backend: the attention backend the plans run with; timer: ``timer(fn) -> ms`` (tests replace it).
    """

    def __init__(self, grid, head_dim: int, candidates: Sequence, heads: int, *, device="cpu", dtype=None,
                 backend: str = "auto", timer: Optional[Callable[[Callable[[], object]], float]] = None):
        super().__init__(grid, head_dim, terms="full")
        import torch
        import torch.nn.functional as F

        self.device, self.backend, self.heads_per_layer = str(device), backend, int(heads)
        dtype = dtype or torch.float32
        timer = timer or (lambda fn: _wall_ms(fn, device))
        gen = torch.Generator().manual_seed(0)
        n = self.num_tokens
        full = [torch.randn((1, self.heads_per_layer, n, self.head_dim), generator=gen).to(device=device, dtype=dtype)
                for _ in range(3)]
        one = [t[:, :1].contiguous() for t in full]

        def split(call) -> tuple:
            """(per-call seconds, per-head seconds) of ``call(q, k, v)``."""
            with torch.no_grad():
                t_all = timer(lambda: call(*full)) / 1e3
                if self.heads_per_layer == 1:
                    return 0.0, t_all
                t_one = timer(lambda: call(*one)) / 1e3
            body = max(t_all - t_one, 0.0) / (self.heads_per_layer - 1)
            return max(t_one - body, 0.0), body

        launch, body = split(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
        self._launches: Dict[str, list] = {"dense": [launch]}
        self._dense_body = body
        for cand in candidates:
            if cand.kind == "dense":
                self._heads[cand.method] = body
                continue
            plan = cand.method.plan(self.grid)
            launch, body = split(lambda q, k, v, plan=plan: plan.run(q, k, v, backend=backend))
            self._heads[cand.method] = body
            self._launches.setdefault(cand.kind, []).append(launch)
        self._launch = {kind: statistics.median(values) for kind, values in self._launches.items()}

    def launch(self, kind: str) -> float:
        return self._launch.get(kind, self._launch["dense"])

    def dense_head(self) -> float:
        return self._dense_body

    def full_head(self, layout_like) -> float:
        return self._dense_body

    def head(self, candidate) -> float:
        if candidate.method not in self._heads:
            raise KeyError(f"{candidate.label}: not timed; pass it among the candidates")
        return self._heads[candidate.method]

    def dense_wins_note(self, backend: str) -> str:
        """The note of a search in which no sparse candidate was timed faster than dense attention here: its plan
        is dense whatever the budget (before: said only as "chosen: dense (exact)", as if the budget had
        allowed no sparsity)."""
        return (f"--costs measured: on {self.device} (backend {backend}) no sparse candidate was timed faster than "
                f"dense attention at token grid {tuple(self.grid)} ({self.num_tokens} tokens), so the plan is dense "
                "whatever the budget; time the candidates on the GPU the plan is for (--device cuda), or price them "
                "with the cost model (--costs model)")

    def describe(self) -> dict:
        return {"arch": None, "kernel": None, "terms": "measured", "constants": f"measured on {self.device}",
                "modelled_kernel": False, "backend": self.backend,
                "source": f"median wall time of each candidate on random (1, {self.heads_per_layer}, "
                          f"{self.num_tokens}, {self.head_dim}) inputs on {self.device}, with all heads and one"}
