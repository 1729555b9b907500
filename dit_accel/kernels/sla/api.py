"""SLA: sparse-linear attention, the public entry point (semantics in :mod:`.common`).

Two implementations share the classification of :mod:`.common`: the PyTorch twin
(:mod:`.naive`, CPU path and test oracle) and the fused Triton kernel
(:mod:`.triton` + :mod:`.ops`, its pooling in one launch, :mod:`.pool`, and the linear branch's global
operands in another, :mod:`.operands`). :mod:`dit_accel.kernels.backends` picks one per call.
"""

from __future__ import annotations

import functools
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..backends import Request, check_backend_name, env_value, resolve
from ..checks import check_flag, check_qkv, check_scale, sdpa_autocast, unit_stride
from ..request import BackendUnavailable, forward_ad, in_functorch, in_vmap, records_grad, tracing
from .common import SLAParams, classify_checked, sla_block_counts
from .naive import sla_torch

__all__ = ["sla_attention", "sla_parts", "sla_parts_checked", "is_inert", "inert_projections"]


def _check(q, k, v, proj, scale) -> float:
    check_qkv(q, k, v)
    _check_proj(proj, q)
    return check_scale(scale, q.shape[-1])


def _check_proj(proj, q: torch.Tensor) -> None:
    d = q.shape[-1]
    if proj is not None and not callable(proj):
        raise TypeError(f"proj must be an nn.Module mapping (..., D) -> (..., D) or None, got {type(proj).__name__}")
    # (An nn.LazyLinear(D) has in_features 0 until its first call, which sets D: it was told it was "Linear(0, D)".
    # isinstance, not nn.parameter.is_lazy: torch.compile(fullgraph=True) traces the one, not the other.)
    lazy = isinstance(proj, nn.Linear) and isinstance(proj.weight, nn.parameter.UninitializedTensorMixin)
    if isinstance(proj, nn.Linear) and (proj.in_features if not lazy else d, proj.out_features) != (d, d):
        got = f"LazyLinear({proj.out_features})" if lazy else f"Linear({proj.in_features}, {proj.out_features})"
        raise ValueError(f"proj must be Linear({d}, {d}) acting on the head dim, got {got}")
    if isinstance(proj, nn.Linear) and proj.weight.device != q.device:  # (a meta one added garbage to the output)
        raise ValueError(f"proj's weight is on {proj.weight.device} but q on {q.device}: move proj to q's device "
                         "(proj.to(q.device))")
    if isinstance(proj, nn.Module) and not isinstance(proj, nn.Linear):
        # Any other module (an nn.Sequential) on another device, or not yet materialised (meta), failed inside
        # torch with "Tensor on device meta is not on the expected device cpu!".
        for name, t in _named_tensors(proj):
            if t.device != q.device and not isinstance(t, nn.parameter.UninitializedTensorMixin):
                raise ValueError(f"proj's {name} is on {t.device} but q on {q.device}: move proj to q's device "
                                 "(proj.to(q.device)); load its weights first if it is on the meta device")


def _named_tensors(proj: nn.Module):
    """``proj``'s parameters, then its buffers, with their names."""
    yield from proj.named_parameters()
    yield from proj.named_buffers()


def _param_dtype(proj: nn.Module):
    """The dtype of ``proj``'s first floating-point parameter (its weights), None for a module without any."""
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    if isinstance(proj, nn.Module):
        for t in proj.parameters():
            if t.is_floating_point() and not isinstance(t, nn.parameter.UninitializedTensorMixin):
                return t.dtype
    return None


@sdpa_autocast  # SDPA's casts, then SLA's own math (and proj, in its dtype) outside the region
def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method,
                  proj: Optional[nn.Module] = None, *, scale: Optional[float] = None,
                  backend: str = "auto", return_parts: bool = False):
    """Sparse-linear attention: ``O = O_sparse + proj(O_linear)`` (METHODS.md, section SLA).

    Per ``(batch, head)`` key blocks are classified per query block from pooled scores
    (:func:`sla_classify`): *critical* blocks get exact softmax attention, *marginal* blocks
    go through linear attention (``phi`` = ``method.feature_map``), *negligible* blocks are
    skipped. With ``proj`` still zero (its initialisation), **SLA is training-free top-k
    block-sparse attention**; fine-tuning ``proj`` (and LoRA) recovers the marginal mass.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, H, Nk, D)`` (like SDPA), float16 / bfloat16 / float32.
            Any lengths (ragged last blocks are masked); the Triton kernel needs ``D <= 128``.
        method: :class:`SLAParams` or a :class:`dit_accel.SLA` config (topk, negligible, block
            sizes, feature map, linear token set).
        proj: module applied to the linear branch on the head dim, normally a zero-initialised
            ``nn.Linear(D, D)`` per layer. ``None`` drops the linear branch (not computed), and so
            does, on the CPU, a projection that is still exactly zero while no gradient is asked of
            it (:func:`is_inert`): its output would be exactly zero.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, else the PyTorch twin; env
            ``DIT_ACCEL_BACKEND`` overrides), ``"triton"`` (on CPU only under
            ``TRITON_INTERPRET=1``) or ``"torch"``; ``"flex"`` (accepted for pipeline-wide
            settings) runs the PyTorch twin.
        return_parts: also return the parts, for log-sum-exp merging with other keys.

    Returns:
        ``o`` ``(B, H, Nq, D)`` in q's dtype (inside ``torch.autocast``: q, k, v cast as SDPA's are, and ``o``
        in the region's dtype); with ``return_parts=True`` the tuple
        ``(o_sparse, lse_sparse, o_linear_projected, info)``: ``o_sparse`` in q's dtype,
        ``lse_sparse`` fp32 ``(B, H, Nq)`` (natural log), ``o_linear_projected`` in q's dtype
        (zeros when ``proj`` is None or inert, see :func:`is_inert`) and ``info`` a dict with ``density``
        (visited critical block fraction), ``blocks`` (:class:`SLABlocks`), ``backend`` and ``linear``
        (whether a projected linear branch was computed).
        All outputs are differentiable w.r.t. q, k, v and proj's parameters.

    Example::

        proj = torch.nn.Linear(64, 64); torch.nn.init.zeros_(proj.weight); torch.nn.init.zeros_(proj.bias)
        o = sla_attention(q, k, v, dit_accel.SLA(topk=0.05), proj)
    """
    check_flag("return_parts", return_parts)
    if not return_parts:
        method, scale, backend = _prepare(q, k, v, method, proj, scale, backend)
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # (checked tensors; the twin needs it)
            q, k, v = unit_stride(q, k, v)
        o_s, _, o_l, proj, _ = _branches(q, k, v, method, proj, scale, backend)
        return o_s if proj is None else _project(proj, o_l, o_s)
    o_s, lse, o_lp, info = sla_parts(q, k, v, method, proj, scale=scale, backend=backend)
    return o_s, lse, (o_lp if o_lp is not None else torch.zeros_like(o_s)), info


@sdpa_autocast
def sla_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method, proj: Optional[nn.Module] = None, *,
              scale: Optional[float] = None, backend: str = "auto"):
    """:func:`sla_attention`'s parts ``(o_sparse, lse_sparse, o_linear_projected or None, info)``: None, not
    zeros, when no projected linear branch was computed (``info["linear"]`` False). Same arguments."""
    method, scale, backend = _prepare(q, k, v, method, proj, scale, backend)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # (checked tensors; the twin needs it)
        q, k, v = unit_stride(q, k, v)
    return sla_parts_checked(q, k, v, method, proj, scale, backend)


def _prepare(q, k, v, method, proj, scale, backend):
    """The checked ``(SLAParams, scale, resolved backend)`` of a public call.

    Eager calls on plain tensors decide once per call signature and keep the answer (:data:`_PREPARED`): a
    repeated call skips the input checks, the config conversion and the backend table (about 20 us of a
    stubbed call, ``dit_accel.eval.host_path``). The signature holds everything those steps read: the
    method, ``scale``, ``backend``, ``$DIT_ACCEL_BACKEND``, whether autograd records, and q, k, v's shapes,
    dtypes and devices (frozen configs only). ``proj`` is checked on every call (it is not part of the signature)."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor \
            or tracing() or not _frozen(method):
        return _decide(q, k, v, method, proj, scale, backend)
    grad = records_grad(q, k, v)
    # (a torch.func gradient, or a forward-mode tangent, does not take an eager gradient's backend)
    grad = grad and (3 if forward_ad(q, k, v) else 2 if in_functorch() else 1)
    key = (method, scale, type(scale), backend, env_value(), grad, q.shape, q.dtype, q.device, k.shape, k.dtype, k.device,
           v.shape, v.dtype, v.device)
    try:
        hit = _PREPARED.get(key)
    except TypeError:  # an unhashable method or scale: the checks say what is wrong with it
        return _decide(q, k, v, method, proj, scale, backend)
    if hit is None:
        hit = _decide(q, k, v, method, proj, scale, backend)
        if len(_PREPARED) >= _MAX_PREPARED:  # bounded: a long run with ever new shapes does not grow it
            _PREPARED.clear()
        _PREPARED[key] = hit
    else:
        _check_proj(proj, q)
    return hit


def _decide(q, k, v, method, proj, scale, backend):
    method = SLAParams.of(method)
    scale = _check(q, k, v, proj, scale)
    if q.device.type == "meta":  # (shape inference runs the twin's ops, as auto does: a forced "triton" was refused
        # here, where block_sparse_attention and vsa_attention shape-infer under it)
        check_backend_name(backend)
        backend = "torch"
    # SLA has no FlexAttention variant: a pipeline-wide backend="flex" runs the PyTorch twin. The twin
    # runs anything, so an explicit "torch" needs no resolving (the plans pass what they resolved).
    if backend != "torch":
        backend = resolve("sla", backend, Request.of(q, k, v, method.block_q, method.block_k))
    return method, scale, backend


def _frozen(method) -> bool:
    """Whether ``method`` is a frozen dataclass (``SLAParams``, ``dit_accel.SLA``): a value that may key a cache.
    Other objects with SLA's attributes could change them between calls."""
    params = getattr(type(method), "__dataclass_params__", None)
    return params is not None and params.frozen


#: Call signature -> checked ``(SLAParams, scale, backend)`` (see :func:`_prepare`); plain values only, so an
#: entry holds no tensor and no module.
_PREPARED: Dict[tuple, tuple] = {}
_MAX_PREPARED = 1024


@sdpa_autocast  # (the plans' entry: SLA's own math outside a caller's autocast region, as sla_attention's)
def sla_parts_checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: SLAParams,
                      proj: Optional[nn.Module], scale: float, backend: str):
    """:func:`sla_parts` for inputs already checked (the pipelines' plans, on every layer call): ``method`` an
    :class:`SLAParams`, ``scale`` a float, ``backend`` resolved (``"torch"`` or ``"triton"``)."""
    o_s, lse, o_l, proj, blocks = _branches(q, k, v, method, proj, scale, backend)
    o_lp = None if proj is None else _project(proj, o_l, None, q.dtype)
    return o_s, lse, o_lp, {"density": blocks.density(), "blocks": blocks, "backend": backend,
                            "linear": o_lp is not None}


def _branches(q, k, v, method: SLAParams, proj, scale: float, backend: str):
    """``(o_sparse, lse, o_linear, proj, blocks)``: ``proj`` None when no projected linear branch is computed
    (None given, or inert), else ``o_linear`` before the projection (q's dtype from the fused kernel, fp32
    from the twin)."""
    if backend == "torch":
        blocks = classify_checked(q, k, method)
    else:
        blocks = _fused()[0](q, k, method)
    if proj is not None and is_inert(proj):  # proj(anything) is exactly 0: the linear branch adds nothing
        proj = None
    with_linear = proj is not None and (method.linear_tokens == "all" or sla_block_counts(k.shape[-2], method)[3] > 0)
    if in_vmap():
        _check_vmap(k, method, backend, with_linear)

    if backend == "torch":
        o_s, lse, o_l = sla_torch(q, k, v, blocks, method, scale, with_linear)
    else:
        o_s, lse, o_l = _fused()[1](q, k, v, blocks, method, scale, with_linear)
    if proj is not None and o_l is None:  # no marginal blocks: O_l is exactly zero, proj(0) is still its bias
        o_l = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return o_s, lse, o_l, proj, blocks


def _check_vmap(k, method: SLAParams, backend: str, with_linear: bool) -> None:
    """BackendUnavailable for the calls under ``torch.vmap`` whose steps write in place into tensors of their own,
    which vmap cannot batch: torch's "vmap: inplace arithmetic(self, *extra_args) is not possible" (or "aten::scatter_
    ... is not possible") from inside the twin, naming neither the function nor a way out. Others map (as before)."""
    nk, why = k.shape[-2], None
    if backend == "torch" and nk % method.block_k:
        why = f"the PyTorch twin masks a ragged last key block (M={nk}, blocks of {method.block_k}) in place"
    elif with_linear and method.linear_tokens == "marginal":
        from .ops import linear_plan

        if backend == "torch" or linear_plan(nk, method, True) == "direct":
            why = "the projected linear branch lists the marginal blocks in place"
    if why is not None:
        raise BackendUnavailable(
            f"sla_attention cannot run these inputs under torch.vmap on backend {backend!r}: {why}, which vmap cannot "
            "batch. Fold the mapped dim into q, k and v's batch dim (x.flatten(0, 1)) and call it once, or loop over "
            "it")


@functools.cache
def _fused():
    """``(sla_triton_classify, sla_triton_attention)``, imported on first use (that registers the custom ops)
    and then bound: an import statement in the call path costs a microsecond per call."""
    from .ops import sla_triton_attention, sla_triton_classify

    return sla_triton_classify, sla_triton_attention


def _project(proj: nn.Module, o_l: torch.Tensor, o_s: Optional[torch.Tensor], dtype=None) -> torch.Tensor:
    """``o_s + proj(o_l)`` (``proj(o_l)`` when ``o_s`` is None), in ``o_s``'s dtype (else ``dtype``).

    A plain ``nn.Linear`` on an ``o_l`` of the output dtype (the fused kernel's) runs as one GEMM whose
    epilogue adds ``o_s`` (``addmm``, beta 1): the projection and the sum of the branches make one output
    and no other ``(B, H, N, D)`` tensor. Any other module, or the twin's fp32 ``o_l``, runs as it is."""
    dtype = o_s.dtype if o_s is not None else dtype
    weight = getattr(proj, "weight", None)
    if (type(proj) is nn.Linear and o_l.dtype == dtype and not (proj._forward_hooks or proj._forward_pre_hooks)
            and (o_s is None or o_s.is_contiguous()) and o_l.is_contiguous()):
        w, bias = weight.to(dtype), None if proj.bias is None else proj.bias.to(dtype)
        if o_s is None:
            return F.linear(o_l, w, bias)
        d = o_l.shape[-1]
        out = torch.addmm(o_s.view(-1, d), o_l.view(-1, d), w.t())
        if bias is not None:
            out = out.add_(bias)  # in place: AddmmBackward keeps no output
        return out.view(o_s.shape)
    # In the module's own dtype (a bf16 nn.Sequential refused the twin's fp32 O_l: "mat1 and mat2 must have the
    # same dtype").
    proj_dtype = _param_dtype(proj)
    try:
        o_lp = proj(o_l if proj_dtype is None else o_l.to(proj_dtype))
    except RuntimeError as err:  # (an nn.Sequential(Linear(16, 16)) on D = 32: torch's "mat1 and mat2 shapes cannot
        # be multiplied (128x32 and 16x16)", naming neither proj nor D; out of memory and the like pass as they are)
        if type(err) is not RuntimeError or not any(w in str(err) for w in ("shape", "size", "dimension")):
            raise
        got = f"it failed: {str(err).splitlines()[0]}"
    else:
        got = None if isinstance(o_lp, torch.Tensor) and o_lp.shape == o_l.shape else \
            f"it returned shape {tuple(o_lp.shape)}" if isinstance(o_lp, torch.Tensor) else \
            f"it returned {type(o_lp).__name__}"  # (it failed in the sum, or broadcast into it)
    if got is not None:
        raise ValueError(f"proj must map the linear branch (..., D) to (..., D), shape {tuple(o_l.shape)}; {got}. Use "
                         f"a Linear(D, D) per layer (D = {o_l.shape[-1]}, the head dim)")
    return o_lp.to(dtype) if o_s is None else o_s + o_lp.to(dtype)


def is_inert(proj: nn.Module) -> bool:
    """Whether ``proj`` is an ``nn.Linear`` on the CPU whose weight and bias are exactly zero, and nothing asks
    for its gradient: then ``proj(O_l)`` is exactly zero, and SLA is top-k block-sparse attention (every
    projection's state before fine-tuning), so the linear branch is not computed.

    Read on every call (:func:`_all_zero`: the values themselves, so a write through ``.data``, which leaves
    the version counter alone, is seen at once). Not on GPUs, where reading the answer would synchronise the
    host on every layer call (the pipelines read every layer's at once, once per transformer call:
    :func:`inert_projections`); not under ``torch.compile``, which would specialise on the values."""
    return _zero_on_cpu(*_candidate(proj))


def inert_projections(projs: Sequence[nn.Module]) -> List[bool]:
    """Whether each projection is inert, by :func:`is_inert`'s rule, GPU projections included: the pipelines'
    hooks ask once per transformer call for every SLA layer. The GPU ones are read in one reduction per tensor
    and one synchronisation per call (none while a CUDA graph is being captured: then the branch runs).
    Skipping the branch matters there: computed for a zero projection, it made training-free SLA slower than
    dense attention on an H200 (BENCHMARKS.md section 10)."""
    out: List[bool] = []
    gpu: Dict[int, tuple] = {}  # index -> (weight, bias), read together below
    for i, proj in enumerate(projs):
        weight, bias = _candidate(proj)
        if weight is not None and not weight.is_cpu:
            gpu[i] = (weight, bias)
        out.append(_zero_on_cpu(weight, bias))
    if gpu and not _capturing():
        for i, zero in zip(gpu, _all_zero_on_device(list(gpu.values()))):
            out[i] = zero
    return out


def _zero_on_cpu(weight, bias) -> bool:
    """Whether a :func:`_candidate`'s weight (None: no candidate) is on the CPU and it and its bias are all zero
    bits (:func:`_all_zero`)."""
    return weight is not None and weight.is_cpu and _all_zero(weight) and (bias is None or _all_zero(bias))


def _all_zero_on_device(pairs) -> List[bool]:
    """Whether each ``(weight, bias)`` (bias may be None) is all zero bits, read with one reduction per tensor
    and one host synchronisation for them all (on any device; the pipelines use it for GPU projections)."""
    try:
        nonzero = [torch.stack([_bits(t).ne(0).any() for t in pair if t is not None]).any() for pair in pairs]
        return [not flag for flag in torch.stack(nonzero).tolist()]  # the one synchronisation
    except (RuntimeError, NotImplementedError):  # values that cannot be read (a meta tensor): the branch runs
        return [False] * len(pairs)


def _candidate(proj: nn.Module):
    """``(weight, bias)`` of a projection that may be inert (an ``nn.Linear`` whose gradient nobody asks for,
    outside ``torch.compile``), else ``(None, None)``."""
    if type(proj) is not nn.Linear or tracing():
        return None, None
    params = proj._parameters  # (the module's attribute lookup costs about a microsecond a name)
    weight, bias = params.get("weight"), params.get("bias")
    # Not a plain Linear's output (weight @ x + bias): a hook or an instance forward may change it (a zero
    # projection with a forward hook lost the hook's term, silently), and weight_norm / spectral_norm keep the
    # weight elsewhere (weight_g and weight_v: a raw KeyError 'weight').
    if weight is None or proj._forward_hooks or proj._forward_pre_hooks or "forward" in proj.__dict__:
        return None, None
    # Training the projection: its gradient needs O_l.
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None, None
    return weight, bias


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s words as integers (a -0.0 or a NaN reads as non-zero, as on the CPU: :func:`_all_zero`)."""
    bits = _BITS.get(t.element_size())
    plain = bits is not None and type(t) in (torch.Tensor, nn.Parameter) and not t.is_complex()
    return t.detach().view(bits) if plain else t.detach()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# id(tensor) -> (data_ptr, nbytes, numpy view of its bits); an entry leaves with its tensor (weakref.finalize).
_BIT_VIEWS: Dict[int, tuple] = {}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _all_zero(t: torch.Tensor) -> bool:
    """Whether every value of the CPU tensor ``t`` is zero.

    A plain tensor is read through a numpy view of its bits, made once per tensor and again when its storage
    moves (``param.data = ...``, ``module.to``): a count of non-zero words, under a microsecond for a
    projection, where torch reductions cost about 100 us per transformer call inside a small model (their
    dispatch, on caches the model's kernels have just flushed). Bits, so a -0.0 counts as non-zero (the
    linear branch then runs, which is exact); a NaN or a subnormal does too. Tensor subclasses (DTensor) and
    complex tensors, whose conjugate views numpy refuses, are read by ``torch.any``."""
    key, ptr, nbytes = id(t), t.data_ptr(), t.nbytes
    entry = _BIT_VIEWS.get(key)
    if entry is None or entry[0] != ptr or entry[1] != nbytes:
        bits = _BITS.get(t.element_size())
        plain = bits is not None and type(t) in (torch.Tensor, nn.Parameter) and not t.is_complex()
        if entry is None:
            weakref.finalize(t, _BIT_VIEWS.pop, key, None)
        entry = _BIT_VIEWS[key] = (ptr, nbytes, t.detach().view(bits).numpy() if plain else None)
    return not (np.count_nonzero(entry[2]) if entry[2] is not None else bool(t.any()))
