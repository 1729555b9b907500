"""``auto`` on CUDA: time the verified block-sparse contenders, planning cost included, and keep the cheapest.

The contenders are the backends of :data:`dit_accel.kernels.backends.TUNED` that can run the request: the
in-repo Triton kernel, FlexAttention, and the vendor kernels (FlashAttention-4, cuDNN, NATTEN) where
installed. Before timing, each one must

- serve *this layout* exactly (a vendor's ``plan``: cuDNN refuses element masks, NATTEN needs a window); the
  reason of one that cannot is recorded;
- have passed its first-use self-check (:mod:`dit_accel.kernels.selfcheck`): one that failed is left out.

Each is then priced ``run time + planning time / expected reuses``: the planning time (building the vendor
structures, or FlexAttention's BlockMask) is timed separately, once per layout, and a layout that changes
every step is reused once (:data:`DEFAULT_REUSES`) so it pays that cost every step; a builder that keeps its
layout for many calls says so with :func:`expect_reuses`. The decision itself is
:func:`dit_accel.kernels.autotune.choose` (stored per shape class) called with a timer built here, so it is
tested on CPU with scripted timers and fake backends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .. import autotune, backends
from .._cache import LayoutCache, layout_on
from ..backends import VENDOR_BACKENDS, Request
from ..layout import BlockLayout

__all__ = ["DEFAULT_REUSES", "Contender", "Decision", "expect_reuses", "expected_reuses", "priced_timer", "select",
           "measured_tuner", "layout_fallback", "decisions", "memory_skips", "free_memory", "VERIFY_TOL",
           "MATERIALISED"]

#: Calls a layout is assumed to serve when its builder did not say (:func:`expect_reuses`): one, so a layout
#: that is rebuilt every step (SLA's critical blocks) pays its planning cost in full.
DEFAULT_REUSES = 1
_REUSES = ("block_sparse.select", "reuses")
_FLEX_PLAN = LayoutCache("block_sparse.select.flex_plan_seconds")
_DECISIONS: List["Decision"] = []


def expect_reuses(layout: BlockLayout, calls: int) -> BlockLayout:
    """Say that ``layout`` will serve about ``calls`` attention calls (e.g. layers x steps for a plan's layout):
    the selection then charges each backend's planning time divided by ``calls``. Returns ``layout``."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls={calls!r} must be a positive int (attention calls this layout will serve)")
    layout.derived[_REUSES] = calls
    return layout


def expected_reuses(layout: BlockLayout) -> int:
    """The calls ``layout`` is expected to serve (:func:`expect_reuses`, default :data:`DEFAULT_REUSES`)."""
    return int(layout.derived.get(_REUSES, DEFAULT_REUSES))


@dataclass
class Contender:
    """One backend to time: ``run()`` executes the call as the dispatcher would; ``plan_ms`` is the one-time
    cost of building its structures for this layout."""

    name: str
    run: Callable[[], object]
    plan_ms: float = 0.0

    def __call__(self):
        return self.run()


@dataclass
class Decision:
    """What one selection saw: the prices timed (None: raised), the planning costs, who was left out and why."""

    shape: str
    chosen: str
    plan_ms: Dict[str, float]
    reuses: int
    skipped: Dict[str, str] = field(default_factory=dict)


def decisions() -> List[Decision]:
    """The selections made in this process (newest last), for inspection and ``bench gpu``."""
    return list(_DECISIONS)


def priced_timer(timer: autotune.Timer, reuses: int) -> autotune.Timer:
    """``timer`` plus each contender's planning time spread over ``reuses`` calls (milliseconds)."""
    def priced(fn, warmup: int, repeats: int) -> float:
        return float(timer(fn, warmup, repeats)) + getattr(fn, "plan_ms", 0.0) / max(reuses, 1)

    return priced


def select(shape: autotune.ShapeClass, contenders: Sequence[Contender], timer: autotune.Timer, *, reuses: int = 1,
           verified: Callable[[str], bool] = lambda name: True, skipped: Optional[Mapping[str, str]] = None,
           verify: Optional[Callable[[str], bool]] = None, warmup: int = 3, repeats: int = 10) -> Optional[str]:
    """The cheapest verified contender for ``shape`` (the stored choice when there is one), or None.

    Contenders whose self-check failed (``verified(name)`` False) are left out, and so are those in
    ``skipped`` (``{name: reason}``: a layout it cannot serve, scores that would not fit in memory); one that
    raises while timed, or whose output on the call fails ``verify(name)``, is out (:func:`autotune.choose`);
    ties go to the earlier contender. None (nothing stored) when no contender is left: ``resolve`` then takes
    the fixed order.
    """
    if not contenders:
        raise ValueError("select() needs at least one contender")
    skipped = dict(skipped or {})
    ok = []
    for c in contenders:
        if c.name in skipped:
            continue
        if verified(c.name):
            ok.append(c)
        else:
            skipped[c.name] = "failed its self-check on this machine"
    if not ok:
        chosen = None
    else:
        chosen = autotune.choose(shape, {c.name: c for c in ok}, priced_timer(timer, reuses), warmup, repeats,
                                 verify=verify)
    _DECISIONS.append(Decision(shape.key(), chosen, {c.name: c.plan_ms for c in contenders}, reuses, skipped))
    del _DECISIONS[:-64]
    return chosen


# ----------------------------------------------------------------------------- the real contenders
def _flex_plan_ms(layout: BlockLayout) -> float:
    def measure() -> float:
        from .flex import layout_to_block_mask

        start = time.perf_counter()
        layout_to_block_mask(layout)
        if layout.device.type == "cuda":
            torch.cuda.synchronize(layout.device)
        return (time.perf_counter() - start) * 1e3

    return _FLEX_PLAN.get(layout, "ms", measure)


#: Bytes per score element a contender materialises where it runs eagerly: eager FlexAttention holds the fp32
#: scores and probabilities of the whole (B, H, N, M) problem at once (compiled, on CUDA, it does not:
#: :func:`.flex.materialises`).
MATERIALISED = {"flex": 8}
#: Relative error (against the PyTorch twin on the call's inputs) a timed contender must stay within before
#: its choice is stored.
VERIFY_TOL = 1e-2


def free_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def memory_skips(names: Sequence[str], q, k, free: Optional[int]) -> Dict[str, str]:
    """``{name: reason}`` for contenders whose materialised scores (:data:`MATERIALISED`) would not fit in
    ``free`` bytes (with a quarter kept back): they are not tried at all."""
    if free is None:
        return {}
    from .flex import materialises

    out = {}
    for name in names:
        if name == "flex" and not materialises(q.device):
            continue
        need = MATERIALISED.get(name, 0) * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        if need > 0.75 * free:
            out[name] = (f"would materialise {need / 2 ** 30:.1f} GiB of scores, {free / 2 ** 30:.1f} GiB free "
                         f"(N={q.shape[2]}, M={k.shape[2]}, {q.shape[0]}x{q.shape[1]} heads)")
    return out


def measured_tuner(q, k, v, layout: BlockLayout, scale: float, density: Optional[float] = None, *,
                   attention: Callable, return_lse: bool = False, timer: Optional[autotune.Timer] = None,
                   reuses: Optional[int] = None, verified: Optional[Callable[[str], bool]] = None,
                   verify: Optional[Callable[[str], bool]] = None, free: Optional[Callable] = None):
    """A tuner for :func:`dit_accel.kernels.backends.resolve`: ``tune(names, request)`` builds the contenders
    among ``names`` that serve this layout, prices them (run + planning / reuses) and returns the cheapest
    verified one, stored per shape class; None when none is left (``resolve`` then takes the fixed order).

    ``attention(q, k, v, layout, scale=..., backend=name)`` runs one backend (the public entry point, passed
    in by it). A contender whose scores would not fit in free memory (``free(device)``, default
    :func:`free_memory`) is not tried, and the choice is stored only after its output on this call matched the
    PyTorch twin (``verify(name)``, default :data:`VERIFY_TOL` relative error). ``verified(name)``: the
    first-use self-check, which ``resolve`` already applied to ``names`` (default: all pass)."""
    from . import backends as vendor

    def tune(names: Sequence[str], request: Request) -> Optional[str]:
        d = layout.density() if density is None else density
        shape = autotune.ShapeClass.of("block_sparse", request, d)
        device_layout = layout_on(layout, q.device)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        contenders, skipped = [], {}
        for name in names:
            plan_ms = 0.0
            if name in VENDOR_BACKENDS:
                why = vendor.layout_reason(name, device_layout, request.head_dim, request.needs_grad, return_lse,
                                           source=layout)
                if why is not None:
                    skipped[name] = why
                    continue
                plan_ms = vendor.plan_seconds(name, device_layout, request.head_dim, layout) * 1e3
            elif name == "flex":
                plan_ms = _flex_plan_ms(device_layout)

            def run(name=name):
                with torch.no_grad():
                    return attention(qd, kd, vd, layout, scale=scale, backend=name)

            contenders.append(Contender(name, run, plan_ms))
        if not contenders:
            return None
        skipped.update(memory_skips([c.name for c in contenders], q, k, (free or free_memory)(q.device)))
        reference = []

        def matches_twin(name: str) -> bool:
            from ..selfcheck import relative_error

            with torch.no_grad():
                if not reference:
                    reference.append(attention(qd, kd, vd, layout, scale=scale, backend="torch"))
                got = attention(qd, kd, vd, layout, scale=scale, backend=name)
            return relative_error(got, reference[0]) <= VERIFY_TOL

        return select(shape, contenders, timer or autotune.timer_on(q.device),
                      reuses=expected_reuses(layout) if reuses is None else reuses,
                      verified=verified or (lambda name: True), skipped=skipped,
                      verify=verify or matches_twin)

    return tune


def layout_fallback(name: str, layout: BlockLayout, request: Request, return_lse: bool,
                    source: Optional[BlockLayout] = None) -> str:
    """``name`` when vendor backend ``name`` serves this layout, else the first backend of the fixed order that
    can run ``request`` (the stored choice of a shape class can be a vendor that this layout does not fit)."""
    from . import backends as vendor

    if vendor.layout_reason(name, layout, request.head_dim, request.needs_grad, return_lse, source) is None:
        return name
    for other, can_run, auto in backends._TABLE["block_sparse"]:
        if auto and (other != "triton" or request.device.type == "cuda") and can_run(request) is None \
                and backends._verified("block_sparse", other, request):  # the fallback passed its own self-check
            return other
    return "torch"
