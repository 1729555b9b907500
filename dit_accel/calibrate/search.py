"""The search: a method per (step bucket, layer, head) that minimises modelled attention time under a budget.

For a Lagrange multiplier ``lam`` every (layer, bucket) independently takes the assignment that
minimises ``cost + lam * error`` (error: the layer's squared relative L2 error, summed over heads),
over these launch structures, each with its per-launch cost:

- the whole layer dense (one dense call);
- block-sparse heads only (one launch; a head may be dense inside it, at the block-sparse rate);
- for each SLA config: every head SLA (one SLA launch), or SLA and block-sparse heads (two launches).

Errors are weighted per bucket and per layer (``bucket_weights`` x ``layer_weights``): a unit of
attention error changes the final output by different amounts at different steps (measured on
tiny-shapes, 12 steps: the first two move it about 10 times more than steps 4-10, the last about 300
times less) and in different layers; the calibration measures both (``calibrate.probes.probe_step_weights``,
``probe_layer_weights``). With no weights every step and layer counts the same.

Small ``lam`` gives the cheapest plan, large ``lam`` the dense model. A per-layer error budget
(``max_layer_error``: relative L2) removes the assignments above it: where the heads' own choices break it, the
heads move towards exact ones (dense inside the launch, a wider candidate) at the least cost per unit of error
first, then take back what the slack allows (:func:`_within_bound`; every assignment is not enumerated, so a few
knapsack corners cost a little more than the best); a layer where no candidate meets it on any head runs dense
(:meth:`SearchSpace.bound_note` says which). The end-to-end budget (a minimum
PSNR of the final output against dense) is met by bisecting ``lam`` on verified runs. A bucket in
which every layer runs dense at the start is the chosen dense warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..methods import Dense, Method
from ..plans.per_head import PerHead
from ..plans.sparse_plan import Phase, SparsePlan

__all__ = ["COST_TIE", "LayerChoice", "Assignment", "UniformAssignment", "BridgedAssignment", "assign", "to_plan",
           "SearchSpace", "uniform_options"]

#: Modelled costs this close (relative: a head or two of a large layer) are a tie in the search's final choice
#: (``calibrate.budget.search_budget``), where the wider worst-video margin wins.
COST_TIE = 0.005


@dataclass(frozen=True)
class LayerChoice:
    """What one layer runs in one bucket: a candidate index per head (``-1``: dense inside a block-sparse
    launch), the launches, the modelled cost per call and the squared relative error."""

    heads: Tuple[int, ...]
    launches: Tuple[str, ...]
    cost: float
    error: float

    @property
    def dense(self) -> bool:
        return self.launches == ("dense",)


class SearchSpace:
    """Per-head costs and per-(layer, bucket) errors of the candidates, and the assignments they allow."""

    def __init__(self, candidates: Sequence, errors: Dict[Tuple[int, int], torch.Tensor], costs, layers: int,
                 buckets: Sequence[Tuple[int, int]], heads: int, full_head_cost: float):
        self.candidates = list(candidates)
        self.errors = errors
        self.costs = costs  # CostModel
        self.layers, self.buckets, self.heads = layers, list(buckets), heads
        self.head_cost = torch.tensor([costs.head(c) for c in self.candidates], dtype=torch.float64)
        self.full_head_cost = float(full_head_cost)
        kinds = [c.kind for c in self.candidates]
        self.block = [i for i, k in enumerate(kinds) if k == "block_sparse"]
        self.block_groups = _order_groups(self.candidates, self.block, getattr(costs, "grid", None))
        self.sla = [i for i, k in enumerate(kinds) if k in ("sla", "vsa")]  # chosen per call: a launch per config
        self.dense_layer_cost = costs.launch("dense") + heads * costs.dense_head()
        self.bucket_weights = [1.0] * len(self.buckets)
        self.layer_weights = [1.0] * layers

    def choose(self, layer: int, bucket: int, lam: float, max_error: Optional[float] = None) -> LayerChoice:
        """The assignment of ``layer`` in ``bucket`` minimising ``cost + lam * error`` (see the module docstring)."""
        best = LayerChoice((-2,) * self.heads, ("dense",), self.dense_layer_cost, 0.0)
        errors = self.errors.get((layer, bucket))
        if errors is None:
            return best
        best_value = best.cost
        weight = self.bucket_weights[bucket] * self.layer_weights[layer]
        # one block-sparse launch runs its heads in one token order: the candidates of one order at a time
        options = [(("block_sparse",), group, None) for group in self.block_groups]
        kinds_of = {s: self.candidates[s].kind for s in self.sla}
        for s in self.sla:
            options += [((kinds_of[s],), [], s)] + [(("block_sparse", kinds_of[s]), group, s)
                                                    for group in self.block_groups]
        for launches, block, sla in options:
            if not block and sla is None:
                continue
            cost = sum(self.costs.launch(kind) for kind in launches)
            heads, error, sparse = [], 0.0, []
            bound = None if max_error is None else max_error ** 2

            def score(o):
                return o[1] + lam * weight * o[2]

            per_head = []
            for h in range(self.heads):
                # (index, cost, error) of every head option allowed under these launches
                opts = []
                if "block_sparse" in launches:
                    opts.append((-1, self.full_head_cost, 0.0))
                    opts += [(i, float(self.head_cost[i]), float(errors[i, h])) for i in block]
                if sla is not None:
                    opts.append((sla, float(self.head_cost[sla]), float(errors[sla, h])))
                per_head.append(opts)
                # (a head's sparse options within the bound, for below)
                sparse += [(score(o), h, o) for o in opts if o[0] != -1 and (max_error is None or o[2] <= bound)]
            picks = [min(opts, key=score) for opts in per_head]
            if max_error is not None and sum(o[2] for o in picks) > bound:
                # (before: the structure was dropped, and a layer whose every-head-cheapest choice broke the bound
                # ran dense, where some heads dense or wider met it at less cost)
                picks = _within_bound(per_head, score, bound)
                if picks is None:
                    continue
            for i, c, e in picks:
                heads.append(i)
                cost += c
                error += e
            if sla is not None and sla not in heads:
                continue  # that structure without an SLA head is the block-only one
            if all(i == -1 for i in heads):
                # Every head dense inside the launch is the dense layer, whose plan runs one dense call (Dense):
                # priced as a launch it undercut the dense layer (before: a block-sparse launch timed cheaper than
                # SDPA's, --costs measured, made exact plans cheaper than dense, with no warm-up). The structure's
                # own option is its best with one sparse head.
                if not sparse:
                    continue
                _, h, (i, c, e) = min(sparse, key=lambda t: t[0])
                heads[h], cost, error = i, cost - self.full_head_cost + c, error + e
            if "block_sparse" in launches and sla is not None and all(i == sla for i in heads):
                continue
            if max_error is not None and error > bound * (1 + 1e-12):
                continue
            value = cost + lam * weight * error
            if value < best_value:
                best, best_value = LayerChoice(tuple(heads), launches, cost, error), value
        return best

    def bound_note(self, max_error: Optional[float], log: Optional[Callable[[str], None]] = None) -> Optional[str]:
        """The note of the (layer, bucket) pairs where no candidate meets ``max_error`` (relative L2) on any head, so
        every assignment breaks it and they run dense whatever the budget (also handed to ``log``); None where there
        are none or no bound (before: said by nothing but the dense cells of the report's table)."""
        sparse = self.block + self.sla
        over = [] if max_error is None or not sparse else sorted(
            k for k, e in self.errors.items() if not bool((e[sparse] <= max_error ** 2).any()))
        if not over:
            return None
        layer, bucket = over[0]
        start, stop = self.buckets[bucket]
        note = (f"--max-layer-error {max_error:g}: in {len(over)} of {len(self.errors)} sampled (layer, step bucket) "
                f"pairs no candidate meets it on any head (e.g. layer {layer}, steps {start}-{stop - 1}), so they run "
                "dense; a larger --max-layer-error or --candidates large gives them sparse options")
        if log is not None:
            log(f"note: {note}")
        return note

    def method_of(self, choice: LayerChoice) -> Method:
        """The method config a layer runs under ``choice`` (a :class:`~dit_accel.PerHead` where heads differ)."""
        if choice.dense:
            return Dense()
        methods = tuple(Dense() if i < 0 else self.candidates[i].method for i in choice.heads)
        return methods[0] if len(set(methods)) == 1 else PerHead(methods)

    def assign(self, lam: float, max_error: Optional[float] = None) -> "Assignment":
        return Assignment({(l, b): self.choose(l, b, lam, max_error) for l in range(self.layers)
                           for b in range(len(self.buckets))}, self)

    def layer_cost(self, candidate: int) -> float:
        """Modelled cost of one call of a layer that runs ``candidate`` on every head (one launch)."""
        return self.costs.launch(self.candidates[candidate].kind) + self.heads * float(self.head_cost[candidate])

    def cheaper_than_dense(self) -> List[int]:
        """The sparse candidates whose layer call (:meth:`layer_cost`) costs less than dense, cheapest first."""
        return sorted((i for i in self.block + self.sla if self.layer_cost(i) < self.dense_layer_cost),
                      key=self.layer_cost)

    def sparse_pays(self) -> bool:
        """Whether some assignment is cheaper than dense (without errors: some candidate on every head is)."""
        if self.errors:
            return not all(choice.dense for choice in self.assign(0.0).choices.values())
        return bool(self.cheaper_than_dense())

    def scale(self) -> float:
        """A typical cost / error ratio: where the bisection of ``lam`` is centred."""
        ratios = []
        for (layer, bucket), errors in self.errors.items():
            for i in self.block + self.sla:
                gain = self.costs.dense_head() - float(self.head_cost[i])
                e = float(errors[i].mean()) * self.bucket_weights[bucket] * self.layer_weights[layer]
                if e > 0:
                    ratios.append(abs(gain) / e + 1e-30)
        return float(torch.tensor(ratios).median()) if ratios else 1.0


def _order_groups(candidates: Sequence, block: List[int], grid) -> List[List[int]]:
    """The block-sparse candidates ``block`` grouped by the token order their plans run in on ``grid`` (all in one
    group without a grid). One launch lays every head out in one order (:class:`~dit_accel.plans.per_head.PerHead`
    takes the order most heads use), and a head of another order costs there what its pattern visits in that
    order, not its own layout's density, which the search prices: a Radial head beside Tile heads ran 1.0 of the
    blocks where it was priced at 0.67, and a Tile head beside Radial ones 0.25 against 0.08 (a (16, 12, 12) grid)."""
    if grid is None or len(block) < 2:
        return [block] if block else []
    from ..plans.per_head import _order_key

    groups: Dict[object, List[int]] = {}
    for i in block:
        groups.setdefault(_order_key(candidates[i].method.plan(grid)), []).append(i)
    return list(groups.values())


def _within_bound(per_head: List[list], score, bound: float) -> Optional[list]:
    """Per head one option ``(index, cost, error)`` of ``per_head`` with errors summing to at most ``bound``, at a
    least summed ``score`` (the structure's ``cost + lam * error``), or None when none fits.

    The bound's own multiplier: each head moves down the lower convex hull of its options (score against error)
    while the sum exceeds the bound, the move that buys the most error per unit of score first; then, while some
    head can take an option of lower score within the slack, the best such swap is made."""
    picks = [min(opts, key=lambda o: (score(o), o[2])) for opts in per_head]
    moves = []
    for h, opts in enumerate(per_head):
        at = picks[h]
        while True:
            lower = [o for o in opts if o[2] < at[2]]
            if not lower:
                break
            nxt = min(lower, key=lambda o: ((score(o) - score(at)) / (at[2] - o[2]), o[2]))
            moves.append(((score(nxt) - score(at)) / (at[2] - nxt[2]), h, nxt))
            at = nxt
    total = sum(o[2] for o in picks)
    for _, h, option in sorted(moves, key=lambda m: m[0]):
        if total <= bound:
            break
        if option[2] < picks[h][2]:  # (a head's hull moves come in order: each one lowers its error)
            total += option[2] - picks[h][2]
            picks[h] = option
    if total > bound:
        return None
    for _ in range(len(per_head) * max(len(opts) for opts in per_head)):  # swaps into the slack
        gains = [(score(o) - score(picks[h]), h, o) for h, opts in enumerate(per_head) for o in opts
                 if total - picks[h][2] + o[2] <= bound and score(o) < score(picks[h])]
        if not gains:
            break
        _, h, option = min(gains, key=lambda g: g[0])
        total += option[2] - picks[h][2]
        picks[h] = option
    return picks


class Assignment:
    """A :class:`LayerChoice` per (layer, bucket), its modelled cost and its plan."""

    def __init__(self, choices: Dict[Tuple[int, int], LayerChoice], space: SearchSpace):
        self.choices, self.space = choices, space

    def key(self) -> tuple:
        return tuple(sorted((k, c.heads, c.launches) for k, c in self.choices.items()))

    def cost_per_sample(self, calls_per_step: int) -> float:
        """Modelled attention seconds of one generation (every step, ``calls_per_step`` transformer calls)."""
        total = 0.0
        for (layer, bucket), choice in self.choices.items():
            start, stop = self.space.buckets[bucket]
            total += choice.cost * (stop - start) * calls_per_step
        return total

    def dense_cost_per_sample(self, calls_per_step: int) -> float:
        steps = self.space.buckets[-1][1]
        return self.space.dense_layer_cost * self.space.layers * steps * calls_per_step

    def warmup_steps(self) -> int:
        """Leading steps in which every layer runs dense."""
        warm = 0
        for b, (start, stop) in enumerate(self.space.buckets):
            if all(self.choices[(l, b)].dense for l in range(self.space.layers)):
                warm = stop
            else:
                break
        return warm

    def method(self, layer: int, bucket: int) -> Method:
        return self.space.method_of(self.choices[(layer, bucket)])

    def to_plan(self, provenance: dict) -> SparsePlan:
        phases: List[Phase] = []
        last_bucket = len(self.space.buckets) - 1
        for b, (start, stop) in enumerate(self.space.buckets):
            layers = {l: m for l in range(self.space.layers) for m in [self.method(l, b)] if not isinstance(m, Dense)}
            stop = None if b == last_bucket else stop
            if phases and phases[-1].layers == layers:
                phases[-1] = Phase(phases[-1].start, stop, layers)
            else:
                phases.append(Phase(start, stop, layers))
        return SparsePlan(tuple(phases), self.space.layers, self.space.heads, provenance)

    def table(self) -> Dict[Tuple[int, int], List[str]]:
        """``{(layer, bucket): [candidate label per head]}`` (for the report and the heatmap)."""
        cands = self.space.candidates
        return {k: (["dense"] * self.space.heads if c.dense else
                    ["dense*" if i < 0 else cands[i].label for i in c.heads]) for k, c in self.choices.items()}

    def phase_tables(self) -> List[dict]:
        """``[{"steps": [start, stop], "labels": [[label per head] per layer]}]`` per step phase (the report)."""
        table = self.table()
        return [{"steps": list(b), "labels": [table[(l, i)] for l in range(self.space.layers)]}
                for i, b in enumerate(self.space.buckets)]

    def max_layer_error(self) -> float:
        """The largest relative L2 attention error of a layer in a step (sampled steps only)."""
        return max((c.error for c in self.choices.values()), default=0.0) ** 0.5


class UniformAssignment(Assignment):
    """A step-structured plan: ``warmup`` dense steps, then one candidate on every layer and head.

    The per-(layer, bucket) allocation adds up each layer's and step's error as if errors did not interact; a
    plan that keeps every early step exact and is sparse everywhere late is where that sum is least reliable
    (on tiny-shapes with 4 calibration prompts, Tile (1, 1, 1) after 9 dense steps: 30.6 dB on the search
    videos at less modelled cost than the allocated plan's 28.0 dB). :func:`uniform_options` prices these plans
    exactly and the search verifies the most promising ones beside its own. ``warmup`` need not fall on a bucket
    boundary; errors are read from the bucket each step falls in.
    """

    def __init__(self, space: SearchSpace, candidate: int, warmup: int):
        self.space, self.candidate, self.warmup = space, int(candidate), int(warmup)
        self.steps = space.buckets[-1][1]
        cand = space.candidates[self.candidate]
        per_call = space.layer_cost(self.candidate)
        self.choices = {}
        for l in range(space.layers):
            for b, (start, stop) in enumerate(space.buckets):
                error = self._error(l, b, self.candidate)
                if stop <= self.warmup:
                    self.choices[(l, b)] = LayerChoice((-2,) * space.heads, ("dense",), space.dense_layer_cost, 0.0)
                else:  # a bucket the warm-up ends inside is priced per step in cost_per_sample
                    self.choices[(l, b)] = LayerChoice((self.candidate,) * space.heads, (cand.kind,), per_call, error)

    def key(self) -> tuple:
        return ("uniform", self.candidate, self.warmup)

    def spans(self) -> List[Tuple[int, int, Optional[int]]]:
        """``(start, stop, candidate)`` per run of steps, in order, empty runs left out; ``None``: dense."""
        return [(a, min(b, self.steps), c) for a, b, c in self._runs() if min(b, self.steps) > a]

    def _runs(self) -> List[Tuple[int, int, Optional[int]]]:
        """The runs of steps as the plan names them (:meth:`spans` drops the empty ones)."""
        return [(0, self.warmup, None), (self.warmup, self.steps, self.candidate)]

    def _error(self, layer: int, bucket: int, candidate: int) -> float:
        errors = self.space.errors.get((layer, bucket))
        return 0.0 if errors is None else float(errors[candidate].sum())

    def cost_per_sample(self, calls_per_step: int) -> float:
        per_step = [self.space.dense_layer_cost if c is None else self.space.layer_cost(c)
                    for start, stop, c in self.spans() for _ in range(start, stop)]
        return sum(per_step) * self.space.layers * calls_per_step

    def predicted_error(self) -> float:
        """The weighted attention error the search's additive model predicts (step by step)."""
        total = 0.0
        for start, stop, c in self.spans():
            if c is None:
                continue
            for s in range(start, stop):
                b = next(i for i, (first, end) in enumerate(self.space.buckets) if first <= s < end)
                for l in range(self.space.layers):
                    total += self.space.bucket_weights[b] * self.space.layer_weights[l] * self._error(l, b, c)
        return total

    def warmup_steps(self) -> int:
        return self.warmup

    def method(self, layer: int, bucket: int) -> Method:
        return self.space.candidates[self.candidate].method

    def to_plan(self, provenance: dict) -> SparsePlan:
        sparse = [(start, stop, c) for start, stop, c in self.spans() if c is not None]
        phases = tuple(Phase(start, None if stop == self.steps else stop,
                             {l: self.space.candidates[c].method for l in range(self.space.layers)})
                       for start, stop, c in sparse)
        return SparsePlan(phases, self.space.layers, self.space.heads, provenance)

    def phase_tables(self) -> List[dict]:
        heads, layers = self.space.heads, self.space.layers
        return [{"steps": [start, stop],
                 "labels": [["dense" if c is None else self.space.candidates[c].label] * heads for _ in range(layers)]}
                for start, stop, c in self.spans()]

    def max_layer_error(self) -> Optional[float]:
        """The largest relative L2 attention error of a layer in a bucket where a step runs sparse; None where no
        error was scored (``--search warmup`` scores none: before, a sparse plan's report said 0.0000)."""
        if not self.space.errors and any(c is not None for _, _, c in self.spans()):
            return None
        worst = 0.0
        for (l, b), errors in self.space.errors.items():
            first, end = self.space.buckets[b]
            for start, stop, c in self.spans():
                if c is not None and start < end and first < stop:
                    worst = max(worst, float(errors[c].sum()))
        return worst ** 0.5


class BridgedAssignment(UniformAssignment):
    """A warm-up plan with a bridge: ``warmup`` dense steps, one step of the wider candidate ``bridge``, then
    ``candidate`` on every layer and head to the end.

    It is the step-structured plan ``UniformAssignment(space, candidate, warmup + 1)`` with its last dense step
    relaxed to ``bridge`` (a candidate of the same method that visits more keys per call, cheaper than dense):
    the early steps that fix a video's layout need attention wider than the late ones, not all of it dense.
    """

    def __init__(self, space: SearchSpace, candidate: int, warmup: int, bridge: int):
        super().__init__(space, candidate, warmup + 1)
        self.warmup, self.bridge = int(warmup), int(bridge)
        bridge_cost, kind = space.layer_cost(self.bridge), space.candidates[self.bridge].kind
        for l in range(space.layers):
            for b, (start, stop) in enumerate(space.buckets):
                if start <= self.warmup < stop:  # the bucket of the bridge step (priced per step: spans)
                    self.choices[(l, b)] = LayerChoice((self.bridge,) * space.heads, (kind,), bridge_cost,
                                                       self._error(l, b, self.bridge))

    def key(self) -> tuple:
        return ("bridged", self.candidate, self.warmup, self.bridge)

    def _runs(self) -> List[Tuple[int, int, Optional[int]]]:
        return [(0, self.warmup, None), (self.warmup, self.warmup + 1, self.bridge),
                (self.warmup + 1, self.steps, self.candidate)]


def uniform_options(space: SearchSpace, max_ms: float, calls_per_step: int, count: int,
                    max_error: Optional[float] = None, kinds: Sequence[str] = ("block_sparse", "sla"),
                    side: str = "below") -> List[UniformAssignment]:
    """Up to ``count`` step-structured plans (:class:`UniformAssignment`), one per sparse candidate, priced next to
    ``max_ms`` modelled ms per sample and ranked by the error the additive model predicts, least first.

    ``side="below"``: each candidate's dense warm-up whose cost is the highest within ``max_ms`` (the most exact
    plan it affords); ``"above"``: the one whose cost is the lowest at or above ``max_ms`` (a baseline given at
    least the plan's cost). Candidates above ``max_error`` (relative L2, per layer and step) in any sparse step
    are left out; ``kinds``: the candidate kinds considered.
    """
    if side not in ("below", "above"):
        raise ValueError(f"side={side!r}: choose 'below' or 'above'")
    steps = space.buckets[-1][1]
    options = []
    for i in [i for i in space.block + space.sla if space.candidates[i].kind in kinds]:
        priced = [(UniformAssignment(space, i, w).cost_per_sample(calls_per_step) * 1e3, w) for w in range(steps)]
        if side == "below":
            fits = [(ms, w) for ms, w in priced if ms <= max_ms * (1 + 1e-9)]
            pick = max(fits, default=None)
        else:
            fits = [(ms, -w) for ms, w in priced if ms >= max_ms * (1 - 1e-9)]
            pick = min(fits, default=None)
            pick = None if pick is None else (pick[0], -pick[1])
        if pick is None:
            continue
        option = UniformAssignment(space, i, pick[1])
        error = option.max_layer_error()  # (None: not scored, so not known to be within max_error)
        if max_error is not None and (error is None or error > max_error):
            continue
        options.append(option)
    options.sort(key=lambda o: (o.predicted_error(), o.cost_per_sample(calls_per_step)))
    return options[:count]


def assign(space: SearchSpace, lam: float, max_error: Optional[float] = None) -> Assignment:
    return space.assign(lam, max_error)


def to_plan(assignment: Assignment, provenance: dict) -> SparsePlan:
    return assignment.to_plan(provenance)
