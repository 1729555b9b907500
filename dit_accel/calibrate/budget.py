"""The budget a calibrated plan must meet, and the search for the cheapest verified plan that meets it."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..methods import Tile
from .search import COST_TIE, Assignment, BridgedAssignment, SearchSpace, UniformAssignment, uniform_options


_GROUNDTRUTH_CHECKS = ("colour", "shape", "motion", "consistency")


def passes_budget(psnr_videos: Sequence[float], min_psnr: Optional[float], rule: str = "worst") -> bool:
    """Whether per-video PSNRs meet ``min_psnr`` under ``rule`` (:data:`~.settings.BUDGET_RULES`); no budget passes."""
    if min_psnr is None:
        return True
    made = [p for p in psnr_videos if p is not None]  # (a run stopped early holds the videos it made)
    if len(made) < len(psnr_videos) and rule == "mean":
        return False
    value = min(made) if rule == "worst" else float(np.mean(made))
    return value >= min_psnr


_GROUNDTRUTH_KEYS = {"colour": "colour_ok", "shape": "shape_ok", "motion": "motion_ok", "consistency": "consistent"}


#: One-sided level of the sign test :func:`groundtruth_close` applies per check.
GROUNDTRUTH_LEVEL = 0.05


def groundtruth_scores(videos, prompts) -> dict:
    """:func:`~dit_accel.eval.groundtruth.score_many`'s accuracies of ``videos``, and ``per_video``: each video's
    pass (True) or fail of every check, for the paired test of :func:`groundtruth_close`."""
    from ..eval.groundtruth import score_video

    scores = [score_video(v, p) for v, p in zip(videos, prompts)]
    per_video = [{k: bool(s[key]) for k, key in _GROUNDTRUTH_KEYS.items()} for s in scores]
    out = {k: float(np.mean([v[k] for v in per_video])) for k in _GROUNDTRUTH_KEYS}
    out["all"] = float(np.mean([all(v.values()) for v in per_video]))
    return {**out, "n": len(per_video), "per_video": per_video}


def groundtruth_close(plan: dict, dense: dict, level: float = GROUNDTRUTH_LEVEL) -> bool:
    """Whether a plan's ground truth on the validation videos (:func:`groundtruth_scores`, the same videos as
    ``dense``'s) is no worse than dense's beyond chance on every check (colour, shape, motion, consistency).

    Per check the videos dense passes and the plan fails (losses) are weighed against the reverse (gains) by a
    one-sided exact sign test: the plan fails when it loses at least 2 more than it gains and
    ``P(Binomial(losses + gains, 1/2) >= losses) < level``. On a few videos the checks flip on a video or two
    even above 30 dB (BENCHMARKS.md section 11), so a rule of "within one video" rejected plans that did
    better on 24 held-out videos than the plan it let through."""
    for check in _GROUNDTRUTH_CHECKS:
        pairs = list(zip(dense["per_video"], plan["per_video"]))
        losses = sum(d[check] and not p[check] for d, p in pairs)
        gains = sum(p[check] and not d[check] for d, p in pairs)
        n = losses + gains
        tail = sum(math.comb(n, i) for i in range(losses, n + 1)) / 2.0 ** n if n else 1.0
        if losses - gains >= 2 and tail < level:
            return False
    return True


def groundtruth_kept(plan: dict, dense: dict) -> bool:
    """Whether a plan's ground-truth scores (:func:`~dit_accel.eval.groundtruth.score_many` on the calibration
    videos) are no worse than dense's on every check: colour, shape, motion and consistency."""
    return all(plan[k] >= dense[k] - 1e-9 for k in _GROUNDTRUTH_CHECKS)


class VerifiedRuns:
    """``run(assignment, lam)``: the record of ``verify`` with ``passes`` set, each plan verified once; ``trace``:
    every record in the order verified (given: a search's records, which are not rerun, and the list appended to)."""

    def __init__(self, verify: Callable[[Assignment, float], dict], min_psnr: Optional[float], rule: str,
                 trace: Optional[List[dict]] = None):
        self.verify, self.min_psnr, self.rule = verify, min_psnr, rule
        self.trace: List[dict] = [] if trace is None else trace
        self.known: Dict[tuple, dict] = {r["assignment"].key(): r for r in self.trace}

    def __call__(self, assignment: Assignment, lam: float) -> dict:
        if assignment.key() in self.known:  # verified already: no run, no new row
            return self.known[assignment.key()]
        record = self.verify(assignment, lam)
        record["passes"] = (passes_budget(record["psnr_videos"], self.min_psnr, self.rule)
                            and record.get("groundtruth_ok", True))
        self.trace.append(record)
        self.known[assignment.key()] = record
        return record


def search_budget(space: SearchSpace, verify: Callable[[Assignment, float], dict], *, min_psnr: Optional[float],
                  max_layer_error: Optional[float] = None, rule: str = "worst", iters: int = 6, uniform: int = 3,
                  calls_per_step: int = 1) -> Tuple[dict, List[dict]]:
    """The verified plan to keep: ``(best record, every verified record)``.

    ``verify(assignment, lam)`` runs a plan end to end and returns a record with ``psnr_videos`` (per
    calibration video; a run stopped early under the budget holds the videos it made) and ``modelled_ms``, and
    ``groundtruth_ok`` False where the plan loses a ground-truth check (it then fails whatever its PSNR).

    1. The allocation: the cheapest assignment (``lam = 0``) first; if it fails, ``lam`` is bisected
       geometrically for ``iters`` verified runs between the largest ``lam`` that still gives the cheapest plan
       and the least that gives an exact one (both found without running a plan; a ``lam`` whose plan was
       verified already does not count); the cheapest passing one.
    2. The ``uniform`` most promising step-structured plans (:func:`~.search.uniform_options`: a dense warm-up,
       then one candidate everywhere) that cost no more than it, verified too.
    3. The cheapest passing plan, where plans within :data:`COST_TIE` of it count as equally cheap and the one
       whose margin holds best across the videos wins among them: the highest worst-video PSNR (``rule="mean"``:
       the highest mean), the cheaper on a tie. A plan tuned to just clear the budget on its search videos is
       the one that misses it on new ones; at a cost the model cannot tell apart the wider margin is the safer
       plan. The dense plan when nothing passed.
    """
    run = VerifiedRuns(verify, min_psnr, rule)
    trace = run.trace
    cheapest = space.assign(0.0, max_layer_error)
    best = run(cheapest, 0.0)
    if not best["passes"]:
        # The bracket, found without running anything: hi, the least lam (x4 steps) whose plan has no attention
        # error (dense layers, dense heads in block-sparse launches: exact, so it passes), and lo, the largest
        # below it whose plan is still the cheapest one (which failed). Verified runs go only where the plan
        # changes.
        scale = space.scale()
        hi = scale
        while hi < scale * 1e8 and any(c.error > 0 for c in space.assign(hi, max_layer_error).choices.values()):
            hi *= 4.0
        lo = hi
        while lo > scale * 1e-8 and space.assign(lo, max_layer_error).key() != cheapest.key():
            lo /= 4.0
        best = None
        tries = 0
        while len(trace) < 1 + iters and tries < 4 * iters and hi > lo * 1.0001:
            tries += 1  # (a lam whose plan was verified already costs no run)
            mid = math.sqrt(lo * hi)
            record = run(space.assign(mid, max_layer_error), mid)
            if record["passes"]:
                hi = mid
                if best is None or record["modelled_ms"] < best["modelled_ms"]:
                    best = record
            else:
                lo = mid
    ceiling = best["modelled_ms"] if best is not None else space.assign(math.inf).cost_per_sample(calls_per_step) * 1e3
    for option in uniform_options(space, ceiling, calls_per_step, uniform, max_layer_error) if uniform else []:
        run(option, math.nan)  # (one verified already is not rerun)
    passing = [r for r in trace if r["passes"] and r["modelled_ms"] <= ceiling * (1 + 1e-9)]
    if not passing:  # nothing sparse passed: the dense plan (lam = infinity) does, exactly
        return run(space.assign(math.inf), math.inf), trace
    least = min(r["modelled_ms"] for r in passing)
    cheapest = [r for r in passing if r["modelled_ms"] <= least * (1 + COST_TIE)]

    def margin(record: dict) -> float:
        videos = [p for p in record["psnr_videos"] if p is not None]
        return min(videos) if rule == "worst" else float(np.mean(videos))

    return max(cheapest, key=lambda r: (margin(r), -r["modelled_ms"])), trace


def warmup_search(space: SearchSpace, verify: Callable[[Assignment, float], dict], *, min_psnr: float,
                  rule: str = "worst", calls_per_step: int = 1) -> Tuple[dict, List[dict]]:
    """``--search warmup``: the cheapest verified plan of the form "a dense warm-up, then one candidate on every
    layer and head" (:class:`~.search.UniformAssignment`), and every verified record.

    It needs no scored errors and no sensitivity probes, only verified runs, and those cheap ones: a plan's warm-up
    is read back from the dense run (:mod:`.replay`), and a run under a worst-video budget stops at the first video
    under it. Candidates are tried cheapest per call first, and each one's least passing warm-up is bisected,
    assuming a longer warm-up (more exact steps) does not pass less:

    - the first candidate between no warm-up and the dense plan (exact: it passes without a run);
    - every later one only at warm-ups that would make it cheaper than the best plan so far by more than
      :data:`COST_TIE`: its longest such warm-up first (a failure there ends that candidate), then one step
      shorter (a failure there ends it too: one dense step moves a video by a few dB, so a later candidate's
      least passing warm-up is most often its longest affordable one), then down by bisection.

    Then the chosen plan's last dense step is bridged (:class:`~.search.BridgedAssignment`): run under a wider
    candidate of the same method (:func:`bridges`), the widest first and narrower ones while they pass; the last
    that passes is kept. One step of wide attention where the plan had dense costs a fraction of the dense step
    (tiny-shapes-63: Tile 17 of 32 frames instead of all 32), and only bridges that pass are kept. A bridge whose
    own uniform plan after the same dense steps failed, and whose keys hold the candidate's (a wider Tile window), is
    not run: that plan is more exact at every step than the bridged one.

    The dense plan, verified, when no candidate passes at any warm-up."""
    run = VerifiedRuns(verify, min_psnr, rule)
    steps = space.buckets[-1][1]
    best: Optional[dict] = None
    for candidate in space.cheaper_than_dense():
        options = [UniformAssignment(space, candidate, w) for w in range(steps)]
        lo, hi = -1, steps  # lo: fails (no warm-up below 0); hi: passes (the dense plan at `steps`)
        if best is not None:
            limit = best["modelled_ms"] / (1.0 + COST_TIE)
            fits = [w for w in range(steps) if options[w].cost_per_sample(calls_per_step) * 1e3 < limit]
            if not fits:
                continue
            record = run(options[fits[-1]], math.nan)
            if not record["passes"]:
                continue
            best, hi = record, fits[-1]
            if hi > 0:  # one step shorter before bisecting below it
                record = run(options[hi - 1], math.nan)
                if not record["passes"]:
                    continue
                best, hi = record, hi - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            record = run(options[mid], math.nan)
            if record["passes"]:
                best, hi = record, mid
            else:
                lo = mid
    if best is None:
        return run(space.assign(math.inf), math.inf), run.trace
    chosen = best["assignment"]
    if isinstance(chosen, UniformAssignment) and chosen.warmup > 0:
        limit = best["modelled_ms"] / (1.0 + COST_TIE)
        for bridge in bridges(space, chosen.candidate):
            option = BridgedAssignment(space, chosen.candidate, chosen.warmup - 1, bridge)
            if option.cost_per_sample(calls_per_step) * 1e3 >= limit:
                continue
            wider = run.known.get(UniformAssignment(space, bridge, chosen.warmup - 1).key())
            if wider is not None and not wider["passes"] and _nests(space, bridge, chosen.candidate):
                break  # the bridge everywhere after the same dense steps failed: this plan, narrower, would too
            record = run(option, math.nan)
            if not record["passes"]:
                break
            best = record
    return best, run.trace


def _nests(space: SearchSpace, outer: int, inner: int) -> bool:
    """Whether candidate ``outer`` visits every key ``inner`` does (Tile windows over one tile, each dimension at
    least as wide; other methods: not known, False)."""
    a, b = space.candidates[outer].method, space.candidates[inner].method
    return (isinstance(a, Tile) and isinstance(b, Tile) and tuple(a.tile) == tuple(b.tile)
            and all(x >= y for x, y in zip(a.window, b.window)))


def bridges(space: SearchSpace, candidate: int) -> List[int]:
    """The candidates that may bridge a warm-up into ``candidate``: the same method (its class, and for
    block-sparse ones the same kind of launch) visiting more per call than it and cheaper than dense, the costliest
    (the closest to dense) first."""
    method = space.candidates[candidate].method
    own = space.layer_cost(candidate)
    wider = [i for i in space.cheaper_than_dense() if type(space.candidates[i].method) is type(method)
             and space.candidates[i].kind == space.candidates[candidate].kind and space.layer_cost(i) > own]
    return sorted(wider, key=space.layer_cost, reverse=True)


def _describe(assignment: Assignment, lam: float) -> str:
    """A verified plan in a few words: ``allocation, lambda 4.4e-06`` or ``uniform tile w1x1x1 after 9 dense steps``."""
    if isinstance(assignment, UniformAssignment):
        cands = assignment.space.candidates
        text = (f"uniform {cands[assignment.candidate].label} after {assignment.warmup} dense "
                f"step{'s' if assignment.warmup != 1 else ''}")
        if isinstance(assignment, BridgedAssignment):
            text += f" and a bridge step of {cands[assignment.bridge].label}"
        return text
    if math.isinf(lam):
        return "dense (exact)"
    return f"allocation, lambda {lam:.3g}"
