"""Scoring: each candidate's attention on the sampled q/k/v against dense, per layer, step bucket and head.

One run of a candidate over all heads of a layer gives every head's error at once. The error of a
head is its share of the layer's squared error relative to the layer's dense output,
``||o_h - o*_h||^2 / ||o*||^2`` summed over the samples: summed over heads it is the layer's squared
relative L2 error, which is what the search allocates.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..plans import attend_with_lse

__all__ = ["score_candidates"]


def score_candidates(sampler, candidates: Sequence, layers: int, *, backend: str = "auto",
                     progress: Optional[Callable[[int], None]] = None) -> Dict[Tuple[int, int], torch.Tensor]:
    """``{(layer, bucket): errors [candidates, heads]}`` (fp64) for every (layer, bucket) the sampler kept.

    ``candidates[i].method`` runs through its own plan (the execution path the pipelines use), with
    SLA's projection absent (training-free); ``progress(n)`` is called after each candidate.
    """
    grid = sampler.grid
    plans = {}
    out = {}
    for layer in range(layers):
        for bucket in range(len(sampler.buckets)):
            sample = sampler.bucket_samples(layer, bucket)
            if sample is None:
                if progress is not None:
                    progress(len(candidates))
                continue
            q, k, v = sample
            scale = 1.0 / q.shape[-1] ** 0.5
            with torch.no_grad():
                ref, _ = attend_with_lse(q, k, v, None, scale)
                norm = ref.double().pow(2).sum()
                errors = torch.zeros(len(candidates), q.shape[1], dtype=torch.float64)
                for i, cand in enumerate(candidates):
                    if cand.kind != "dense":
                        plan = plans.get(cand.method)
                        if plan is None:
                            plan = plans[cand.method] = cand.method.plan(grid)
                        o, _ = plan.run(q, k, v, backend=backend)
                        errors[i] = (o.double() - ref.double()).pow(2).sum(dim=(0, 2, 3)) / norm
                    if progress is not None:
                        progress(1)
            out[(layer, bucket)] = errors
    return out
