"""Dense attention on the fastest dense kernel this machine has, with the log-sum-exp where a merge needs it.

The candidates (:data:`CANDIDATES`):

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`, PyTorch's own pick (no lse);
- ``"sdpa-flash"``: ``aten._scaled_dot_product_flash_attention`` (CUDA, fp16/bf16; on the CPU its
  ``_for_cpu`` twin), lse fp32 ``(B, H, N)``;
- ``"sdpa-cudnn"``: ``aten._scaled_dot_product_cudnn_attention`` (CUDA), lse fp32 ``(B, H, N, 1)``;
- ``"sdpa-efficient"``: ``aten._scaled_dot_product_efficient_attention`` (CUDA), lse fp32
  ``(B, H, ceil(N / 32) * 32)`` (padded rows dropped here);
- ``"triton"``: the in-repo dense Triton kernel (:func:`dit_accel.kernels.dense.dense_attention`).

Every lse is the natural-log log-sum-exp of the scaled scores (PyTorch's context-parallel attention
merges all three aten lse with one formula); :func:`run` hands back ``(B, H, N)`` fp32 in every case.
All of them have a backward through autograd for ``o``; :func:`run` gives the aten ops' lse its exact gradient
(two more SDPA calls in the backward, only where it is used; ``auto`` never asks for one: see
:func:`dit_accel.kernels.block_sparse.api.dense_reason`).

On CUDA with the autotuner on (``DIT_ACCEL_AUTOTUNE``), :func:`choose` times the candidates that can
run once per shape class (:func:`dit_accel.kernels.autotune.choose`, family ``"dense"``,
``"dense+lse"`` or ``"dense+bwd"``: forward + backward when autograd records), after checking each one's
output (and lse) on a slice of query rows against an fp32 reference computed here: a candidate that is
wrong there raises, so it is never chosen. Elsewhere, or with the autotuner off, the fixed order
:func:`default_choice` answers. The answer is kept per call signature, so a repeated call does one dict
lookup.

Example::

    >>> from dit_accel.kernels.dense import choice
    >>> o, lse = choice.run(q, k, v, scale=q.shape[-1] ** -0.5, return_lse=True)
    >>> choice.chosen(q, k, v, return_lse=True)   # e.g. "sdpa-flash"
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..request import in_functorch, in_graph, records_grad

__all__ = ["CANDIDATES", "candidates", "why_not", "run", "run_candidate", "choose", "chosen", "default_choice",
           "check_candidate", "normalise_lse", "CHECK_ROWS", "O_TOLERANCE", "LSE_TOLERANCE"]

CANDIDATES = ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "triton")
#: Query rows (of the first batch entry and head) checked against the fp32 reference before a candidate is timed.
CHECK_ROWS = 256
#: Relative error of ``o`` on those rows, and absolute error of the lse, above which a candidate is wrong.
O_TOLERANCE = 1e-2
LSE_TOLERANCE = 2e-2

_HALF = (torch.float16, torch.bfloat16)
# (device, dtypes, shapes, scale, return_lse, grad, autotune on) -> name; geometry-keyed, filled once per signature.
_CHOSEN: Dict[tuple, str] = {}


def why_not(name: str, q: torch.Tensor, k: torch.Tensor, return_lse: bool) -> Optional[str]:
    """Why candidate ``name`` cannot run these inputs (None when it can). The aten ops may still refuse
    a shape at run time (then the timing drops them)."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown dense candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    d, cuda = q.shape[-1], q.device.type == "cuda"
    if name == "sdpa":
        return "returns no log-sum-exp" if return_lse else None
    if name == "triton":
        from ..backends import triton_reason

        if in_functorch():  # (its autograd.Function and launches take plain tensors: dense_attention refuses)
            return "runs no torch.func transform (grad, vmap, jacrev)"
        return triton_reason(q.device) or (f"head dim {d} > 256" if d > 256 else None) or (
            "no keys" if k.shape[2] == 0 else None)
    if name == "sdpa-flash":
        if not cuda:
            return None if q.device.type == "cpu" else f"no flash kernel on {q.device.type}"
        return None if q.dtype in _HALF and d <= 256 else f"flash takes fp16/bf16 and D <= 256 (got {q.dtype}, {d})"
    if not cuda:
        return f"{name} runs on CUDA only"
    if name == "sdpa-cudnn":
        return None if q.dtype in _HALF and d <= 256 and d % 8 == 0 else \
            f"cuDNN takes fp16/bf16 and D <= 256, a multiple of 8 (got {q.dtype}, {d})"
    return None  # efficient: fp32 too


def candidates(q: torch.Tensor, k: torch.Tensor, return_lse: bool) -> Tuple[str, ...]:
    """The candidates that can run these inputs, in :data:`CANDIDATES` order."""
    return tuple(name for name in CANDIDATES if why_not(name, q, k, return_lse) is None)


def normalise_lse(name: str, lse: torch.Tensor, n: int) -> torch.Tensor:
    """A candidate's raw lse as fp32 ``(B, H, N)``: cuDNN's trailing unit dim and the efficient kernel's
    rows padded to a multiple of 32 are dropped."""
    if lse.dim() == 4:  # cuDNN: (B, H, N, 1)
        lse = lse[..., 0]
    if lse.shape[-1] != n:  # efficient: (B, H, ceil(N / 32) * 32)
        lse = lse[..., :n]
    return lse.float()


def run_candidate(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(o, lse or None)`` of one candidate, lse as fp32 natural log ``(B, H, N)``."""
    aten = torch.ops.aten
    n = q.shape[2]
    grad = records_grad(q, k, v)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    if name == "triton":
        from . import dense_attention

        o, lse = dense_attention(q, k, v, scale, return_lse=True)
        return o, lse if return_lse else None
    if name == "sdpa-flash":
        if q.device.type == "cpu":
            o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        else:
            o, lse = aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    elif name == "sdpa-cudnn":
        o, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, return_lse or grad, scale=scale)[:2]
    elif name == "sdpa-efficient":
        o, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, return_lse or grad, scale=scale)[:2]
    else:
        raise ValueError(f"unknown dense candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    return o, normalise_lse(name, lse, n) if return_lse else None


def default_choice(q: torch.Tensor, k: torch.Tensor, return_lse: bool) -> str:
    """The fixed order where nothing is timed: SDPA without lse; with it, SDPA's flash kernel, else the
    efficient one, else cuDNN, else the in-repo Triton kernel (the slowest when last measured)."""
    order = ("sdpa",) if not return_lse else ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "triton")
    for name in order:
        if why_not(name, q, k, return_lse) is None:
            return name
    raise ValueError(f"no dense kernel returns the log-sum-exp for {q.dtype} inputs on {q.device} with head dim "
                     f"{q.shape[-1]}; pass return_lse=False or move the inputs to CUDA / the CPU")


def check_candidate(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool,
                    rows: int = CHECK_ROWS) -> Tuple[float, Optional[float]]:
    """``(relative error of o, max abs error of lse or None)`` of candidate ``name`` on the first ``rows``
    query rows of the first batch entry and head, against an fp32 reference written here (scores in
    fp32, ``torch.logsumexp``). Raises ValueError when either is beyond :data:`O_TOLERANCE` /
    :data:`LSE_TOLERANCE` or not finite."""
    qs, ks, vs = q[:1, :1, :rows].detach(), k[:1, :1].detach(), v[:1, :1].detach()
    with torch.no_grad():
        o, lse = run_candidate(name, qs, ks, vs, scale, return_lse)
        s = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scale
        ref_lse = torch.logsumexp(s, dim=-1)
        ref_o = torch.matmul(torch.softmax(s, dim=-1), vs.float())
        err = float((o.float() - ref_o).norm() / ref_o.norm().clamp_min(1e-30))
        lse_err = None if lse is None else float((lse - ref_lse).abs().max())
    if not math.isfinite(err) or err > O_TOLERANCE:
        raise ValueError(f"dense candidate {name}: relative error {err:.3g} of o > {O_TOLERANCE:g}")
    if lse_err is not None and (not math.isfinite(lse_err) or lse_err > LSE_TOLERANCE):
        raise ValueError(f"dense candidate {name}: lse off by {lse_err:.3g} > {LSE_TOLERANCE:g}")
    return err, lse_err


def _key(q, k, v, scale, return_lse: bool, grad: bool, tuned: bool) -> tuple:
    return (q.device, q.dtype, k.dtype, v.dtype, q.shape, k.shape, v.shape, scale, return_lse, grad, tuned)


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool, *,
           timer: Optional[Callable] = None, tune: Optional[bool] = None) -> str:
    """The candidate that serves these inputs (see the module docstring), decided once per call signature.

    ``timer``: autotune's ``(fn, warmup, repeats) -> ms`` (default CUDA events); ``tune``: time the
    candidates (default: on CUDA when the autotuner is on, and not while ``torch.compile`` traces; never under a
    torch.func transform, whose calls take the fixed order less the Triton kernel)."""
    from .. import autotune

    grad = records_grad(q, k, v)
    if in_functorch():  # (not the eager call's choice, which may be the Triton kernel; nothing timed or stored)
        grad, tune = ("functorch", grad), False
    if tune is None:
        live = q.device.type == "cuda" and autotune.enabled()
        tune = live and not in_graph()
        if live and not tune:  # traced or captured: no timing; the eager call's measured choice, if there was one
            hit = _CHOSEN.get(_key(q, k, v, scale, return_lse, grad, True))
            if hit is not None:
                return hit
    key = _key(q, k, v, scale, return_lse, grad, tune)
    hit = _CHOSEN.get(key)
    if hit is not None:
        return hit
    names = candidates(q, k, return_lse)
    if not tune or len(names) < 2:
        return _CHOSEN.setdefault(key, names[0] if tune and names else default_choice(q, k, return_lse))
    from ..backends import Request

    family = "dense+bwd" if grad else ("dense+lse" if return_lse else "dense")
    shape = autotune.ShapeClass.of(family, Request.of(q, k, v))
    do = torch.randn_like(q) if grad else None
    contenders = {name: _contender(name, q, k, v, scale, return_lse, do) for name in names}
    picked = autotune.choose(shape, contenders, timer or autotune.timer_on(q.device))
    # None: no candidate ran and passed its check here (nothing stored): the fixed order answers.
    return _CHOSEN.setdefault(key, picked or default_choice(q, k, return_lse))


def _contender(name, q, k, v, scale, return_lse, do) -> Callable[[], object]:
    """What the timer runs for ``name``: checked first (a wrong candidate raises, so it is never chosen),
    then the forward, or forward + backward (``do`` given) when the call records autograd."""
    state = {"checked": False}
    grad = do is not None
    if grad:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def call():
        if not state["checked"]:
            check_candidate(name, q, k, v, scale, return_lse)
            state["checked"] = True
        if grad:
            with torch.enable_grad():
                o, _ = run_candidate(name, qg, kg, vg, scale, return_lse)
                o.backward(do)
            return None
        with torch.no_grad():
            return run_candidate(name, q.detach(), k.detach(), v.detach(), scale, return_lse)

    return call


def chosen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
           return_lse: bool = False) -> str:
    """The candidate :func:`run` uses for these arguments (deciding it now if no call has: for reports)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return choose(q, k, v, scale, return_lse)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, return_lse: bool = False
        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dense attention on the chosen candidate: ``(o, lse)`` with ``lse`` fp32 natural log ``(B, H, N)``, or
    ``(o, None)`` when ``return_lse`` is False. Both are differentiable w.r.t. q, k, v."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = choose(q, k, v, scale, return_lse)
    o, lse = run_candidate(name, q, k, v, scale, return_lse)
    if lse is not None and name != "triton" and records_grad(q, k, v):
        # aten's attention ops give their lse no gradient: an lse merged with other keys (merge_attention) trained
        # on dq and dk without its terms, silently (0.99 off at 65 x 3 tokens). The in-repo kernel's has one.
        lse = _LseGrad.apply(lse.detach(), q, k, scale)
    return o, lse


class _LseGrad(torch.autograd.Function):
    """``lse`` (of attention over q, k at ``scale``) as it is, with its exact gradient: ``lse_i`` gives
    ``dq_i = scale g_i (P K)_i`` (attention of q over k with k as values) and ``dk = scale P^T (g q)`` (attention's
    gradient for its values, by ``torch.func.vjp``); none for v. Both by SDPA, which keeps no score matrix, as
    differentiable ops: a gradient penalty differentiates them again, through SDPA's math kernel (the fused ones
    have no second derivative). ``setup_context`` and a generated vmap rule so that ``torch.func.grad`` and
    ``vmap(grad(...))`` (per-sample gradients) take it too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(lse, q, k, scale):
        return lse.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, q, k, scale = inputs
        ctx.save_for_backward(q, k)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k = ctx.saved_tensors
        create = torch.is_grad_enabled()  # (create_graph=True: these gradients are differentiated again)
        if not create:
            q, k = q.detach(), k.detach()
        weight = (grad.float() * ctx.scale)[..., None]
        dq = dk = None
        with sdpa_kernel(SDPBackend.MATH) if create else contextlib.nullcontext():
            if ctx.needs_input_grad[1]:
                dq = (weight * F.scaled_dot_product_attention(q, k, k, scale=ctx.scale).float()).to(q.dtype)
            if ctx.needs_input_grad[2]:
                _, pull = torch.func.vjp(lambda values: F.scaled_dot_product_attention(q, k, values, scale=ctx.scale),
                                         torch.zeros_like(k))
                (dk,) = pull((weight * q.float()).to(q.dtype))
        return None, dq, dk, None
