"""Which backend runs an attention call, and why the others cannot: one table, consulted once per call.

Each kernel family (``"block_sparse"``, ``"sla"``) lists its backends in the order
``backend="auto"`` considers them. A backend answers ``can_run(request)`` with
``None`` or a sentence saying why not and what to do; :func:`resolve` asks once
per call. ``$DIT_ACCEL_BACKEND`` overrides ``auto`` (parsed in one place,
:func:`env_backend`), and a forced backend that cannot run raises
:class:`BackendUnavailable` with that sentence.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import limits
from .limits import GPU_LAYOUT_BLOCKS, INTERPRETER_LAYOUT_BLOCKS, SLA_BLOCK_K, SLA_DTYPES, SLA_MAX_HEAD_DIM
from .request import (ENV_BACKEND, BackendUnavailable, Request, env_get, env_value, in_functorch, in_graph, in_vmap,
                      interpreting)

__all__ = ["BACKENDS", "ENV_BACKEND", "BackendUnavailable", "Request", "available_backends", "env_backend",
           "resolve", "triton_reason", "interpreting", "TUNED", "Backend", "backend_peers", "backend_reasons",
           "VENDOR_BACKENDS", "env_get", "env_value", "forced_backend", "runs_twin"]

#: The vendor block-sparse backends (optional packages; :mod:`dit_accel.kernels.block_sparse.backends`).
VENDOR_BACKENDS = ("fa4", "cudnn", "natten")
#: Every backend name, in the order ``auto`` considers them for block-sparse attention.
BACKENDS = ("triton", "flex", "torch") + VENDOR_BACKENDS
#: Largest head dim of the Triton kernels (block-sparse); the PyTorch twin takes any.
TRITON_MAX_HEAD_DIM = 256


def env_backend() -> Optional[str]:
    """The backend ``$DIT_ACCEL_BACKEND`` forces, or None (unset or ``auto``); ValueError for another word."""
    value = (env_value() or "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"environment variable {ENV_BACKEND}={value!r} is not a backend; allowed: "
                         f"{', '.join(BACKENDS)} (or unset it to let dit_accel choose).")
    return value


def forced_backend(backend: str) -> Optional[str]:
    """The backend a call asking for ``backend`` is forced to: ``backend`` itself, or for ``auto`` the one
    ``$DIT_ACCEL_BACKEND`` names; None when ``auto`` chooses."""
    return backend if backend != "auto" else env_backend()


def runs_twin(backend: str, device) -> bool:
    """Whether a block-sparse call with ``backend`` on ``device`` runs the PyTorch twin: forced, by ``backend`` or
    ``$DIT_ACCEL_BACKEND``, or ``auto`` off CUDA (where ``auto`` never takes Triton's interpreter)."""
    forced = forced_backend(backend)
    return forced == "torch" or (forced is None and torch.device(device).type != "cuda")


#: The oldest triton release the kernels run under: the release their first GPU run used (H100, triton 3.6.0,
#: 2026-11-25: every non-warp-specialized variant passed its self-check; BENCHMARKS section 10). The
#: compile-time checks (registers, spills, SASS) are pinned to :data:`TRITON_CHECKED` (CI's release).
TRITON_FLOOR = (3, 6)
TRITON_CHECKED = "3.9.0"


def triton_version() -> Optional[str]:
    """The installed triton's version, read from its distribution metadata (no import), or None."""
    from importlib import metadata

    for dist in ("triton", "pytorch-triton"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def triton_version_reason() -> Optional[str]:
    """Why the installed triton is too old for the kernels, or None (unknown versions pass: a source build)."""
    found = triton_version()
    if found is None:
        return None
    try:
        parts = tuple(int(x) for x in found.split("+")[0].split(".")[:2])
    except ValueError:
        return None
    if parts >= TRITON_FLOOR:
        return None
    floor = ".".join(map(str, TRITON_FLOOR))
    return (f"triton {found} is older than {floor}, the oldest release dit_accel's kernels have run and passed their "
            f"self-checks on a GPU with; `pip install -U \"triton>={floor}\"` (with a matching torch), or use "
            "backend='torch'.")


def triton_reason(device) -> Optional[str]:
    """``None`` when the Triton kernels can run on ``device``, else why not (without importing triton).

    Usable: a CUDA device of compute capability >= 8.0 with triton >= :data:`TRITON_FLOOR` installed, or a
    CPU device when ``TRITON_INTERPRET=1`` was set before triton was imported.
    """
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; `pip install triton` (Linux) or use backend='torch'."
    old = _triton_too_old()
    if old is not None:
        return old
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch; use backend='torch' on this machine."
        if interpreting():
            return ("TRITON_INTERPRET=1 is set, so triton runs kernels on the CPU; unset it to run "
                    "the triton backend on CUDA tensors.")
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"the triton kernels need compute capability >= 8.0 (sm_80); this GPU is sm_{major}x. "
                    "Use backend='torch'.")
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        raw = os.environ.get("TRITON_INTERPRET")
        read = f" (TRITON_INTERPRET={raw!r} is off: triton reads only 1, true, on or yes as on)" if raw else ""
        return (f"triton needs a CUDA device; on CPU it only runs through its interpreter{read}: set "
                "TRITON_INTERPRET=1 before anything imports triton (slow, for tests), or use backend='torch'.")
    return f"triton kernels support CUDA (or CPU under TRITON_INTERPRET=1), not {device.type!r}; use backend='torch'."


@functools.cache
def _triton_too_old() -> Optional[str]:
    return triton_version_reason()  # (metadata is read once per process)


def _flex_reason(device: torch.device) -> Optional[str]:
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        module = None
    if module is None or not hasattr(module, "BlockMask"):
        return (f"torch.nn.attention.flex_attention is not available in torch {torch.__version__}; "
                "upgrade to torch >= 2.5 or use backend='torch'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available to torch; use backend='torch' on this machine."
    return None


# -------------------------------------------------------------- the table
#: Why the Triton interpreter refuses bfloat16 (its bf16 ``tl.dot`` returns values off by about 1e8).
INTERPRETER_BF16 = ("the Triton interpreter's bfloat16 dot is wrong (values off by about 1e8), so the triton "
                    "backend refuses bfloat16 on the CPU; use float16 or float32 there, or backend='torch'.")


def _triton_dtype_reason(r: Request) -> Optional[str]:
    reason = triton_reason(r.device)
    if reason is None and r.device.type == "cpu" and r.dtype == torch.bfloat16:
        return INTERPRETER_BF16
    return reason


def _block_sparse_triton(r: Request) -> Optional[str]:
    reason = _triton_dtype_reason(r)
    if reason is not None:
        return reason
    if r.head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {r.head_dim} > {TRITON_MAX_HEAD_DIM} is not supported by the Triton kernels; use backend='torch'."
    allowed = GPU_LAYOUT_BLOCKS if r.device.type == "cuda" else INTERPRETER_LAYOUT_BLOCKS
    for name, size in (("block_q", r.block_q), ("block_k", r.block_k)):
        if size not in allowed:
            return (f"layout.{name}={size} is not one of {allowed} that the triton kernels take on "
                    f"{r.device.type}; rebuild the layout with blocks of 64 or 128, or use backend='torch'.")
    return None


def _block_sparse_flex(r: Request) -> Optional[str]:
    reason = _flex_reason(r.device)
    if reason is None and r.needs_grad and r.device.type == "cpu":
        reason = ("backend='flex' has no backward on CPU (FlexAttention limitation); use backend='torch' for "
                  "gradients on CPU, or run under torch.no_grad().")
    if reason is None and r.device.type == "cuda":
        # Its Triton kernels tile by the layout's blocks: a block of a whole 144-token frame does not compile.
        odd = [f"{name}={size}" for name, size in (("block_q", r.block_q), ("block_k", r.block_k))
               if size < 16 or size & (size - 1)]
        if odd:
            reason = (f"layout {', '.join(odd)} is not a power of two from 16, which FlexAttention's GPU kernels "
                      "need; use backend='torch', or a tile that holds whole 64-token blocks.")
    return reason


def _sla_triton(r: Request) -> Optional[str]:
    reason = _triton_dtype_reason(r)
    if reason is not None:
        return reason
    if r.head_dim > SLA_MAX_HEAD_DIM:
        return f"head dim {r.head_dim} > {SLA_MAX_HEAD_DIM} is not supported by the Triton SLA kernel; use backend='torch'."
    if r.block_k != SLA_BLOCK_K:
        return (f"the fused SLA kernel has {SLA_BLOCK_K}-key blocks, not block_k={r.block_k}; SLA(block_k={r.block_k}) "
                "runs on the PyTorch twin (backend='torch').")
    if r.block_q % SLA_BLOCK_K:  # (its pooling launch reads 64 rows at a time: a forced call said its self-check failed)
        return (f"the fused SLA kernel takes query blocks that are multiples of {SLA_BLOCK_K} (SLA's 64 and 128), not "
                f"block_q={r.block_q}; it runs on the PyTorch twin (backend='torch').")
    if r.device.type == "cuda" and r.batch_heads > limits.GRID_AXIS_LIMIT:  # (its launches put B*H on grid axis 1)
        return (f"the fused SLA kernel launches at most {limits.GRID_AXIS_LIMIT} (batch, head) pairs at once, not "
                f"B*H={r.batch_heads}; split the batch into smaller calls or use backend='torch'.")
    if r.device.type == "cuda" and r.dtype not in SLA_DTYPES:
        return (f"the fused SLA kernel takes float16 or bfloat16 on CUDA, not {r.dtype} (fp32 tiles do not fit "
                "sm_89's shared memory); cast the inputs or use backend='torch'.")
    return None


def _always(_: Request) -> Optional[str]:
    return None


# ------------------------------------------------------------ backends as peers
_HALF = (torch.float16, torch.bfloat16)
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    """One block-sparse (or SLA) backend: what it declares it serves, and ``can_run(request) -> None | reason``.

    The declarations (``dtypes``, ``head_dims`` as ``(min, max)``, ``blocks`` (layout block sizes, None for any),
    ``archs`` (CUDA compute-capability majors, None for any device), ``lse``, ``backward``) describe the backend
    for ``dit-accel info`` and for callers that filter before asking; ``can_run`` is the authority and also
    knows what the declarations cannot say (a package that is missing, the Triton interpreter, a flag).
    Layout-specific limits (cuDNN has no element masks, NATTEN needs a window) come from the vendor module's
    ``plan`` at call time. ``auto``: the fixed order may pick it; ``tuned``: ``auto`` times it on CUDA.
    """

    name: str
    family: str
    can_run: Callable[[Request], Optional[str]]
    auto: bool = True
    tuned: bool = False
    dtypes: Tuple[torch.dtype, ...] = _ALL_DTYPES
    head_dims: Optional[Tuple[int, int]] = None
    blocks: Optional[Tuple[int, ...]] = None
    archs: Optional[Tuple[int, ...]] = None
    lse: bool = True
    backward: bool = True
    vendor: bool = False

    def declared(self) -> dict:
        """The declarations as plain values (for ``dit-accel info`` and JSON)."""
        return {"dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
                "head_dims": list(self.head_dims) if self.head_dims else "any",
                "blocks": list(self.blocks) if self.blocks else "any",
                "archs": [f"sm_{a}x" for a in self.archs] if self.archs else "any device",
                "lse": self.lse, "backward": self.backward}


#: ``{name: reason(request)}`` of the vendor backends, registered by :mod:`.block_sparse.backends` when the kernels
#: package loads it (this table never imports the folders above it).
_VENDOR_REASONS: Dict[str, Callable[[Request], Optional[str]]] = {}


def register_vendor_reason(name: str, reason: Callable[[Request], Optional[str]]) -> None:
    """Called by a vendor backend's module: how the table asks it whether it can run a call."""
    _VENDOR_REASONS[name] = reason


def _vendor_can_run(name: str) -> Callable[[Request], Optional[str]]:
    def can_run(r: Request) -> Optional[str]:
        reason = _VENDOR_REASONS.get(name)
        if reason is None:
            return f"the {name} backend did not register (dit_accel.kernels.block_sparse.backends was not loaded)"
        return reason(r)

    can_run.__name__ = f"_block_sparse_{name}"
    return can_run


_PEERS: Dict[str, Tuple[Backend, ...]] = {
    "block_sparse": (
        Backend("triton", "block_sparse", _block_sparse_triton, auto=True, tuned=True,
                head_dims=(1, TRITON_MAX_HEAD_DIM), blocks=(64, 128, 256), archs=(8, 9, 10, 12)),
        Backend("flex", "block_sparse", _block_sparse_flex, auto=False, tuned=True),
        Backend("torch", "block_sparse", _always, auto=True),
        # Vendor kernels: never in the fixed order (an optional package is not a default); `auto` times them.
        Backend("fa4", "block_sparse", _vendor_can_run("fa4"), auto=False, tuned=True, dtypes=_HALF,
                head_dims=(8, 128), blocks=(16, 32, 64, 128, 256), archs=(9, 10), vendor=True),
        Backend("cudnn", "block_sparse", _vendor_can_run("cudnn"), auto=False, tuned=True, dtypes=_HALF,
                head_dims=(64, 128), blocks=(32, 64, 128, 256), archs=(9, 10), vendor=True),
        Backend("natten", "block_sparse", _vendor_can_run("natten"), auto=False, tuned=True, head_dims=(8, 256),
                archs=(8, 9, 10), vendor=True),
    ),
    "sla": (Backend("triton", "sla", _sla_triton, auto=True), Backend("torch", "sla", _always, auto=True)),
}

# family -> ((name, can_run, auto picks it), ...) in priority order: the peers as :func:`resolve` reads them.
# Flex is never picked by `auto`'s fixed order: uncompiled FlexAttention materialises the scores, compiled it
# takes minutes to build on CPU.
_TABLE: Dict[str, Tuple[Tuple[str, Callable[[Request], Optional[str]], bool], ...]] = {
    family: tuple((b.name, b.can_run, b.auto) for b in peers) for family, peers in _PEERS.items()
}


def backend_peers(family: str = "block_sparse") -> Tuple[Backend, ...]:
    """The :class:`Backend` peers of ``family``, in table order."""
    return _PEERS[family]


def backend_reasons(device=None, request: Optional[Request] = None) -> Dict[str, Optional[str]]:
    """Every block-sparse backend, in-repo and vendor, with None (usable) or why not on ``device``
    (default CPU), judged for ``request`` (default: bfloat16 on CUDA, float32 elsewhere, head dim 128,
    64-token blocks, forward only). For ``dit-accel info``."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'") from None
    if request is None:
        request = Request(device, torch.bfloat16 if device.type == "cuda" else torch.float32, 128)
    out = dict(available_backends(device))
    for peer in _PEERS["block_sparse"]:
        if peer.vendor:
            try:
                out[peer.name] = peer.can_run(request)
            except Exception as err:  # a broken install is a reason too
                out[peer.name] = f"probing it failed ({type(err).__name__}: {err})"
    return out


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Which in-repo block-sparse attention backends can run on ``device`` (default CPU).

    Returns:
        ``{name: None}`` for a usable backend, ``{name: "why not, and what to do"}`` otherwise,
        for ``triton``, ``flex`` and ``torch`` (:func:`backend_reasons` adds the vendor backends).

    Example::

        >>> available_backends("cpu")["torch"] is None
        True
    """
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'") from None
    return {"triton": triton_reason(device), "flex": _flex_reason(device), "torch": None}


#: Backends ``auto`` times against each other on CUDA (:mod:`.autotune`), per family.
TUNED = {family: tuple(b.name for b in peers if b.tuned) for family, peers in _PEERS.items() if
         any(b.tuned for b in peers)}


def _tuned(family: str, request: Request, tuner) -> Optional[str]:
    """The autotuned backend for ``request`` on CUDA: the stored choice of its shape class, else
    ``tuner(contenders, request)`` (which times them); None when there is nothing to choose."""
    if request.device.type != "cuda":
        return None
    from . import autotune

    if not autotune.enabled() or in_graph():  # no timing in a traced or captured call (its caller reuses the
        return None                           # eager decision stored for this shape)
    contenders = [name for name, can_run, _ in _TABLE[family] if name in TUNED.get(family, ()) and can_run(request) is None
                  and _transform_reason(name, request) is None and _verified(family, name, request)]
    if len(contenders) < 2:
        return None
    stored = autotune.cached_choice(autotune.ShapeClass.of(family, request, request.density))
    if stored in contenders:
        return stored
    return tuner(contenders, request) if tuner is not None else None  # None: the table order decides


def check_backend_name(backend) -> None:
    """``backend`` is ``"auto"`` or one of :data:`BACKENDS` (TypeError or ValueError saying which are)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}.")


def resolve(family: str, backend: str, request: Request, tuner=None) -> str:
    """The backend that runs this call: ``backend`` itself when it can, else BackendUnavailable saying why.

    ``"auto"`` takes ``$DIT_ACCEL_BACKEND`` when set; on CUDA, the autotuned choice among
    :data:`TUNED` (:mod:`.autotune`: the stored choice for this shape class, else
    ``tuner(contenders, request)``, e.g. :func:`dit_accel.kernels.block_sparse.api.block_sparse_tuner`,
    times them; ``DIT_ACCEL_AUTOTUNE=0`` turns it off); else the first backend of the family
    that ``auto`` may pick and that can run ``request`` (the CPU interpreter never counts for
    ``auto``: it is for tests). A backend a family does not have (``"flex"`` for SLA) runs the
    family's PyTorch twin.
    """
    check_backend_name(backend)
    table = _TABLE[family]
    names = [name for name, _, _ in table]
    forced = forced_backend(backend)
    if forced is None:
        tuned = _tuned(family, request, tuner)
        if tuned is not None:
            return tuned
        for name, can_run, auto in table:
            if auto and (name != "triton" or request.device.type == "cuda") and can_run(request) is None \
                    and _transform_reason(name, request) is None and _verified(family, name, request):
                return name
        return "torch"
    if forced not in names:
        return "torch"
    if in_graph():  # checked when the graph was first traced; no host work in the graph
        return forced
    reason = dict((n, c) for n, c, _ in table)[forced](request) or _transform_reason(forced, request)
    if reason is not None:
        if backend == "auto":  # (forced by the environment: "use backend='torch'" alone named an argument not given)
            reason += (f" It was forced by the environment, {ENV_BACKEND}={env_value()!r}: unset it to let "
                       "dit_accel choose.")
        raise BackendUnavailable(f"attention backend {forced!r} cannot run on {request.device}: {reason}")
    _verified(family, forced, request, forced=True)
    return forced


def _transform_reason(name: str, request: Request) -> Optional[str]:
    """Why backend ``name`` cannot record this call's backward under a torch.func transform (None where it can):
    the kernels' hand-written backward is an ``autograd.Function`` without ``setup_context``, which torch.func
    refuses with a message about that internal (``torch.func.grad`` over a forced ``backend="triton"``)."""
    if request.forward_ad and name != "torch":
        return ("it has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad): "
                "its tangent would be dropped. Use backend='torch' (the PyTorch twin follows tangents), or take the "
                "gradient in reverse mode (torch.func.grad, torch.autograd.grad).")
    if request.deterministic and name in VENDOR_BACKENDS:
        return ("torch.use_deterministic_algorithms(True) is on, and its backward is not deterministic (the vendor "
                "kernels' backwards sum dQ with atomic adds in no fixed order by default): use backend='triton' (its "
                "two-pass backward is deterministic) or 'torch', or turn the flag off for this call.")
    if name == "flex" and in_vmap():  # (torch's own error comes from deep in its FlexAttention trace)
        return ("FlexAttention cannot run under torch.vmap; use backend='torch' under torch.vmap, or "
                "put the batch in the leading dimension of q, k and v instead of mapping over it.")
    if name in ("torch", "flex") or not request.needs_grad or not in_functorch():
        return None
    return ("its kernels' hand-written backward takes plain tensors, not those of torch.func transforms (grad, "
            "jacrev, vjp); use backend='torch' under torch.func, or take the gradient with torch.autograd.grad.")


def _check_names(family: str, name: str, needs_grad: bool) -> Tuple[str, ...]:
    """The self-checked variants a call of ``family`` on backend ``name`` runs: its forward (and the
    classification, for SLA), and its backward when gradients are needed. The warp-specialized forward is
    asked for by its launcher, where it is chosen."""
    from . import selfcheck

    parts = ("classify", "fwd", "bwd") if needs_grad else ("classify", "fwd")
    found = {v.name.rsplit(".", 1)[-1]: v.name for v in selfcheck.variants()
             if v.family == family and v.backend == name and v.name.rsplit(".", 1)[-1] in parts}
    return tuple(found[p] for p in parts if p in found)


def _verified(family: str, name: str, request: Request, forced: bool = False) -> bool:
    """Whether backend ``name``'s variants for ``request`` passed their first-use self-check
    (:mod:`.selfcheck`): False lets ``auto`` fall back; a forced backend raises
    :class:`~.selfcheck.VariantFailed` instead. Backends without checked variants (the PyTorch twin,
    FlexAttention) pass."""
    if name in ("torch", "flex"):
        return True
    from . import selfcheck

    names = _check_names(family, name, request.needs_grad)
    shape = {"head_dim": request.head_dim, "block_q": request.block_q, "block_k": request.block_k}
    return selfcheck.gate(names, request.device, request.dtype, shape, forced)
