"""Vendor block-sparse kernels behind dit_accel's layouts: FlashAttention-4 (:mod:`.fa4`), cuDNN (:mod:`.cudnn`)
and NATTEN (:mod:`.natten`), each an optional package, each a peer in :mod:`dit_accel.kernels.backends`.

Every vendor module has the same four parts: ``reason(request)`` (None, or why it cannot run here: the
package, CUDA, the architecture, dtype, head dim), ``plan(layout, ...)`` (the layout converted, exactly, to the
vendor's structure; or why that layout cannot be served), ``run(plan, q, k, v, scale, return_lse)`` (the
launch) and its conversion function, which the CPU tests expand back to a token mask. Importing this package
imports no vendor package. :func:`call` is what ``block_sparse_attention(..., backend="fa4")`` runs;
:func:`vendor_contenders` gives ``bench gpu`` one callable per vendor backend that can run a layout.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from ..._cache import LayoutCache
from ...request import BackendUnavailable, Request, records_grad
from ...layout import BlockLayout

__all__ = ["NAMES", "PACKAGES", "versions", "module", "plan", "plan_seconds", "call", "vendor_contenders", "vendor_reasons", "layout_reason"]

NAMES = ("fa4", "cudnn", "natten")
#: The distribution behind each vendor backend (what ``pip install`` takes).
PACKAGES = {"fa4": "flash-attn-4", "cudnn": "nvidia-cudnn-frontend", "natten": "natten"}


def versions() -> Dict[str, Optional[str]]:
    """``{backend: installed version of its package, or None}``: what a self-check verdict of a vendor variant
    is valid for (a library update can break exactness)."""
    from importlib import metadata

    out = {}
    for name, dist in PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out

_PLAN_TIME = LayoutCache("block_sparse.backends.plan_seconds")


def module(name: str):
    """The vendor module ``name`` (``"fa4"``, ``"cudnn"``, ``"natten"``); imports no vendor package."""
    if name not in NAMES:
        raise ValueError(f"{name!r} is not a vendor backend; choose from {', '.join(NAMES)}")
    return importlib.import_module(f".{name}", __name__)


def install_reason(name: str) -> Optional[str]:
    """Why vendor backend ``name`` cannot run any call in this environment, whatever the device: its package is
    not installed (None when it is; the device, dtype and layout are judged per call)."""
    return module(name).install_reason()


def plan(name: str, layout: BlockLayout, head_dim: int, source: Optional[BlockLayout] = None):
    """Backend ``name``'s structure for ``layout`` (on the device it runs on), built once per layout, or the
    sentence saying why this layout cannot be served exactly. ``source``: the layout the caller passed, when
    ``layout`` is its device copy (NATTEN's window is attached there)."""
    if name == "fa4":
        return module(name).plan(layout, head_dim)
    if name == "cudnn":
        return module(name).plan(layout)
    return module(name).plan(layout, source)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_seconds(name: str, layout: BlockLayout, head_dim: int, source: Optional[BlockLayout] = None) -> float:
    """Seconds building backend ``name``'s structure for ``layout`` took: timed once per layout, on first ask
    (the autotuner prices a backend at run time + this / expected reuses). Builds the plan if needed."""
    def measure() -> float:
        _sync(layout.device)
        start = time.perf_counter()
        plan(name, layout, head_dim, source)
        _sync(layout.device)
        return time.perf_counter() - start

    return _PLAN_TIME.get(layout, (name, head_dim), measure)


#: Vendor backwards that drop the gradient through the log-sum-exp (a plan's text merge and SLA differentiate
#: through it): a call that needs it is refused, and ``auto`` takes the next backend.
LSE_GRAD_DROPPED = {
    "cudnn": "cuDNN's block-sparse backward takes no gradient through the log-sum-exp; use backend='triton'",
    "natten": ("NATTEN's fused backward (0.21) takes the log-sum-exp's gradient and ignores it (dQ, dK off by "
               "about 9% on a joint text+video GNA case); use backend='triton'"),
}


def layout_reason(name: str, layout: BlockLayout, head_dim: int, needs_grad: bool = False, return_lse: bool = False,
                  source: Optional[BlockLayout] = None) -> Optional[str]:
    """Why backend ``name`` cannot serve this layout and call exactly (None when it can)."""
    if name in LSE_GRAD_DROPPED and return_lse and needs_grad:
        return LSE_GRAD_DROPPED[name]
    p = plan(name, layout, head_dim, source)
    return p if isinstance(p, str) else None


def call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float,
         return_lse: bool, source: Optional[BlockLayout] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run ``layout`` on vendor backend ``name`` (inputs already checked, ``layout`` on q's device).
    BackendUnavailable with the reason when this layout or call cannot be served exactly."""
    grad = records_grad(q, k, v)
    why = layout_reason(name, layout, q.shape[-1], grad, return_lse, source)
    if why is not None:
        raise BackendUnavailable(f"attention backend {name!r} cannot run this layout: {why}.")
    from ... import selfcheck

    if grad and selfcheck.faulted(f"block_sparse.{name}.bwd"):  # DIT_ACCEL_FAULT: corrupt the gradients
        q, k, v = _CorruptGrads.apply(f"block_sparse.{name}.bwd", q, k, v)
    o, lse = module(name).run(plan(name, layout, q.shape[-1], source), q, k, v, scale, return_lse)
    return selfcheck.corrupt(f"block_sparse.{name}.fwd", o), lse


class _CorruptGrads(torch.autograd.Function):
    """Identity forward; the backward hands the vendor kernel's dq, dk, dv through ``selfcheck.corrupt``."""

    @staticmethod
    def forward(ctx, name, q, k, v):
        ctx.name = name
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        from ... import selfcheck

        return (None,) + tuple(None if g is None else selfcheck.corrupt(ctx.name, g.clone()) for g in (dq, dk, dv))


def vendor_contenders(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: Optional[float] = None) -> Dict[str, Callable[[], torch.Tensor]]:
    """``{name: fn}`` for every vendor backend that can run ``layout`` on these inputs here (``fn()`` returns the
    output, no autograd); ``{}`` on a machine without them. For ``bench gpu``'s side-by-side rows: time ``fn``
    beside the in-repo kernels on the same layout. :func:`vendor_reasons` says why the others are missing."""
    return {name: fn for name, fn in _contenders(layout, q, k, v, scale).items() if callable(fn)}


def vendor_reasons(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Dict[str, str]:
    """``{name: why}`` for each vendor backend :func:`vendor_contenders` leaves out."""
    return {name: fn for name, fn in _contenders(layout, q, k, v, None).items() if isinstance(fn, str)}


def _contenders(layout, q, k, v, scale):
    from ..._cache import layout_on

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    device_layout = layout_on(layout, q.device)
    request = Request.of(q, k, v, layout.block_q, layout.block_k)
    out = {}
    for name in NAMES:
        why = module(name).reason(request) or layout_reason(name, device_layout, q.shape[-1], source=layout)
        if why is not None:
            out[name] = why
            continue
        p = plan(name, device_layout, q.shape[-1], layout)
        run = module(name).run
        qd, kd, vd = q.detach(), k.detach(), v.detach()

        def fn(run=run, p=p, qd=qd, kd=kd, vd=vd):
            with torch.no_grad():
                return run(p, qd, kd, vd, scale, False)[0]

        out[name] = fn
    return out



def _register() -> None:
    """Tell the backend table how to ask each vendor backend (it imports nothing from this folder)."""
    from ...backends import register_vendor_reason

    for name in NAMES:
        register_vendor_reason(name, lambda request, name=name: module(name).reason(request))


_register()
