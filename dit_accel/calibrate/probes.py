"""Sensitivity probes: how much the final output moves per unit of attention error, per step bucket and layer group."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple


from ..plans.sparse_plan import Phase, SparsePlan
from .search import LayerChoice, SearchSpace


def _probe_step(bucket: Tuple[int, int]) -> int:
    """The step a sensitivity probe perturbs in a bucket: its middle one."""
    start, stop = bucket
    return start + (stop - start) // 2


def _probe_plan(space: SearchSpace, picks: Dict[Tuple[int, int], LayerChoice]) -> SparsePlan:
    """A plan that runs ``picks[(layer, bucket)]`` at the probe step of each bucket and dense everywhere else."""
    phases = {}
    for (layer, bucket), choice in picks.items():
        if not choice.dense:
            phases.setdefault(_probe_step(space.buckets[bucket]), {})[layer] = space.method_of(choice)
    return SparsePlan(tuple(Phase(step, step + 1, layers) for step, layers in sorted(phases.items())),
                      space.layers, space.heads, {})


def _scaled(raw: List[Optional[float]]) -> List[float]:
    """Measured factors floored at 1e-3 of the largest and scaled to mean 1; unmeasured ones (None) get 1."""
    known = [f for f in raw if f is not None]
    if not known or max(known) <= 0:
        return [1.0] * len(raw)
    floor = 1e-3 * max(known)
    mean = sum(max(f, floor) for f in known) / len(known)
    return [1.0 if f is None else max(f, floor) / mean for f in raw]


def probe_step_weights(space: SearchSpace, run: Callable[[SparsePlan], float]) -> List[float]:
    """How much the final output moves per unit of attention error at a step of each bucket.

    For each bucket that has samples, ``run(plan)`` generates with the cheapest choice (``lam = 0``) in every
    layer at one step of that bucket (its middle one) and dense everywhere else, and returns the output's
    mean squared error against dense; the bucket's weight is that error over the summed attention error of
    those choices (:func:`_scaled`). One step, not the whole bucket, keeps the perturbation small enough to
    act linearly: sparse over whole buckets the output saturates and the weights flatten (measured on
    tiny-shapes: a ratio of about 2 between the first and the middle buckets' weights, against 14-26 one step
    at a time; BENCHMARKS.md section 11).
    """
    raw: List[Optional[float]] = []
    for b in range(len(space.buckets)):
        cheap = {(l, b): space.choose(l, b, 0.0) for l in range(space.layers)}
        error = sum(c.error for c in cheap.values())
        raw.append(max(float(run(_probe_plan(space, cheap))), 0.0) / error if error > 0 else None)
    return _scaled(raw)


def probe_layer_weights(space: SearchSpace, run: Callable[[SparsePlan], float], groups: int) -> List[float]:
    """How much the final output moves per unit of (step-weighted) attention error in each group of layers.

    The layers are cut into ``groups`` contiguous groups (at most one per layer). For each group, ``run``
    generates with the cheapest choice (``lam = 0``) in that group's layers at the probe step of every bucket
    and dense elsewhere; the group's factor is the output error over the error the step weights predict
    (``space.bucket_weights`` x the summed attention error), scaled by :func:`_scaled`. A layer's weight is
    its group's factor; ``groups = 0``: all 1.
    """
    layers = space.layers
    if groups <= 0 or layers == 0:
        return [1.0] * layers
    groups = min(groups, layers)
    bounds = [round(g * layers / groups) for g in range(groups + 1)]
    raw: List[Optional[float]] = []
    for g in range(groups):
        cheap = {(l, b): space.choose(l, b, 0.0) for l in range(bounds[g], bounds[g + 1])
                 for b in range(len(space.buckets))}
        predicted = sum(space.bucket_weights[b] * c.error for (_, b), c in cheap.items())
        raw.append(max(float(run(_probe_plan(space, cheap))), 0.0) / predicted if predicted > 0 else None)
    factors = _scaled(raw)
    return [factors[g] for g in range(groups) for _ in range(bounds[g], bounds[g + 1])]
