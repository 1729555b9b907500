"""Public block-sparse attention entry point and backend selection."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Dict, Optional

import torch

from .checks import check_qkv
from .layout import BlockLayout

__all__ = ["block_sparse_attention", "available_backends", "BACKENDS", "ENV_BACKEND"]

#: Backends in the order ``"auto"`` considers them.
BACKENDS = ("triton", "flex", "torch")
#: Environment variable that overrides ``backend="auto"``.
ENV_BACKEND = "DIT_ACCEL_BACKEND"
MAX_HEAD_DIM = 256


def _triton_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; `pip install triton` (Linux) or use backend='torch'."
    try:
        from .triton_attention import triton_unavailable_reason
    except Exception as exc:  # a broken install must not take the other backends down
        return f"dit_accel.kernels.triton_attention failed to import ({exc!r}); use backend='torch'."
    return triton_unavailable_reason(device)


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Which attention backends can run on ``device`` (default CPU).

    Returns:
        ``{name: None}`` for a usable backend, ``{name: "why not, and what to do"}`` otherwise,
        for every name in :data:`BACKENDS`.

    Example::

        >>> available_backends("cpu")["torch"] is None
        True
    """
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'") from None
    from .flex_backend import flex_unavailable_reason

    return {"triton": _triton_reason(device), "flex": flex_unavailable_reason(device), "torch": None}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_BACKEND}={env!r} is not a backend; allowed: "
                                 f"{', '.join(BACKENDS)} (or unset it to let dit_accel choose).")
            backend = env
        elif device.type == "cuda" and _triton_reason(device) is None:
            return "triton"
        else:
            return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}.")
    if backend != "torch" and not torch.compiler.is_compiling():
        reason = available_backends(device)[backend]
        if reason is not None:
            raise RuntimeError(f"attention backend {backend!r} cannot run on {device}: {reason}")
    return backend


def _validate(q, k, v, layout, scale) -> float:
    check_qkv(q, k, v)
    b, h, n, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}]; got {d}. Split larger heads.")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a dit_accel.kernels.BlockLayout; got {type(layout).__name__}. "
                        "Build one with BlockLayout.from_dense_mask(mask) or a dit_accel.patterns *_layout function.")
    if layout.q_len != n or layout.kv_len != k.shape[2]:
        raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}, but q has N={n} "
                         f"and k/v have M={k.shape[2]} tokens; build the layout for these lengths.")
    if layout.num_heads not in (1, h):
        raise ValueError(f"layout has {layout.num_heads} heads; it must have 1 (shared by all heads) or H={h}.")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite Python float (default 1/sqrt(D)); got {scale!r}.")
    return float(scale)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    """Softmax attention restricted to the blocks (and element masks) of ``layout``.

    Equals dense attention with the mask ``layout.to_dense_mask()``, but only the
    listed key blocks are visited (full blocks unmasked, partial blocks with their
    element mask).

    Args:
        q: ``(B, H, N, D)`` queries, like :func:`torch.nn.functional.scaled_dot_product_attention`.
        k, v: ``(B, H, M, D)``; q, k, v share dtype (fp16, bf16, fp32) and device; ``D <= 256``.
        layout: :class:`BlockLayout` with ``q_len == N``, ``kv_len == M``, 1 or H heads;
            moved to q's device automatically (cached).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the fp32 natural-log log-sum-exp ``(B, H, N)`` (for
            :func:`merge_attention`); ``-inf`` on rows that see no key.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere; ``$DIT_ACCEL_BACKEND``
            overrides), ``"triton"``, ``"torch"`` or ``"flex"``. A forced backend that
            cannot run raises RuntimeError saying why (see :func:`available_backends`).

    Returns:
        ``o`` ``(B, H, N, D)`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
        Rows with no allowed key give ``o = 0``. Differentiable w.r.t. q, k, v.

    Example::

        >>> layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)  # mask [N, N] bool
        >>> o = block_sparse_attention(q, k, v, layout)
    """
    scale = _validate(q, k, v, layout, scale)
    name = _resolve_backend(backend, q.device)
    layout = layout.to(q.device)
    if name == "torch":
        from .torch_backend import torch_block_sparse_attention

        lse_grad = return_lse and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        o, lse = torch_block_sparse_attention(q, k, v, layout, scale, lse_grad=lse_grad)
    elif name == "triton":
        from .ops import triton_block_sparse_attention

        o, lse = triton_block_sparse_attention(q, k, v, layout, scale)
    else:
        from .flex_backend import flex_block_sparse_attention

        o, lse = flex_block_sparse_attention(q, k, v, layout, scale)
    return (o, lse) if return_lse else o
