"""Public block-sparse attention entry point: check the inputs once, choose the backend once, run it."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import autotune
from .._cache import LayoutCache
from ..backends import Request, env_backend, resolve
from ..checks import check_qkv, check_scale
from ..layout import BlockLayout

__all__ = ["block_sparse_attention", "layout_on", "prepare_layout", "block_sparse_tuner"]

# Per-device copies of layouts, so a CPU-built layout moves to the GPU once, not per call.
_ON_DEVICE = LayoutCache("block_sparse.device")
_DENSITY = LayoutCache("block_sparse.density")  # visited block fraction per layout (one host sync, once)


def layout_on(layout: BlockLayout, device: torch.device) -> BlockLayout:
    """``layout`` on ``device``; the copy is made once per (layout, device) and kept while the layout lives."""
    if layout.device == device:
        return layout
    return _ON_DEVICE.get(layout, device, lambda: layout.to(device))


def prepare_layout(layout: BlockLayout, device, backend: str = "auto") -> BlockLayout:
    """``layout`` on ``device`` with what the backend that will run it derives from it built now
    (the PyTorch twin's chunk plan, FlexAttention's block mask), so a later call, traced by
    ``torch.compile`` or not, only reads them. Returns the device copy."""
    device = torch.device(device)
    layout = layout_on(layout, device)
    forced = backend if backend != "auto" else env_backend()
    if forced == "flex":
        from .flex import prepare

        prepare(layout)
    elif forced == "torch" or (forced is None and device.type != "cuda"):
        from .naive import prepare

        prepare(layout)
    return layout


def _check(q, k, v, layout, scale) -> float:
    check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a dit_accel.kernels.BlockLayout; got {type(layout).__name__}. "
                        "Build one with BlockLayout.from_dense_mask(mask) or a dit_accel.patterns *_layout function.")
    n, m, h = q.shape[2], k.shape[2], q.shape[1]
    if layout.q_len != n or layout.kv_len != m:
        raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}, but q has N={n} "
                         f"and k/v have M={m} tokens; build the layout for these lengths.")
    if layout.num_heads not in (1, h):
        raise ValueError(f"layout has {layout.num_heads} heads; it must have 1 (shared by all heads) or H={h}.")
    return check_scale(scale, q.shape[-1])


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    """Softmax attention restricted to the blocks (and element masks) of ``layout``.

    Equals dense attention with the mask ``layout.to_dense_mask()``, but only the
    listed key blocks are visited (full blocks unmasked, partial blocks with their
    element mask).

    Args:
        q: ``(B, H, N, D)`` queries, like :func:`torch.nn.functional.scaled_dot_product_attention`.
        k, v: ``(B, H, M, D)``; q, k, v share dtype (fp16, bf16, fp32) and device. The Triton
            kernels take ``D <= 256``; the PyTorch backend any ``D``.
        layout: :class:`BlockLayout` with ``q_len == N``, ``kv_len == M``, 1 or H heads;
            moved to q's device automatically (once per device).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the fp32 natural-log log-sum-exp ``(B, H, N)`` (for
            :func:`merge_attention`); ``-inf`` on rows that see no key.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere; ``$DIT_ACCEL_BACKEND``
            overrides), ``"triton"``, ``"torch"`` or ``"flex"``. A forced backend that
            cannot run raises :class:`~dit_accel.kernels.backends.BackendUnavailable`
            saying why (see :func:`available_backends`).

    Returns:
        ``o`` ``(B, H, N, D)`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
        Rows with no allowed key give ``o = 0``. Differentiable w.r.t. q, k, v.

    Example::

        >>> layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)  # mask [N, N] bool
        >>> o = block_sparse_attention(q, k, v, layout)
    """
    scale = _check(q, k, v, layout, scale)
    tuner = density = None
    if backend == "auto" and q.device.type == "cuda" and not torch.compiler.is_compiling():
        # On CUDA, auto times Triton against FlexAttention once per shape class (kernels/autotune.py);
        # the density bucket is part of the class, read once per layout.
        density = _DENSITY.get(layout, "visited", lambda: float(layout.density()))
        tuner = block_sparse_tuner(q, k, v, layout, scale, density)
    request = Request.of(q, k, v, layout.block_q, layout.block_k, density=density)
    name = resolve("block_sparse", backend, request, tuner)
    layout = layout_on(layout, q.device)
    if name == "torch":
        from .naive import torch_block_sparse_attention

        o, lse = torch_block_sparse_attention(q, k, v, layout, scale, lse_grad=return_lse and request.needs_grad)
    elif name == "triton":
        from .ops import triton_block_sparse_attention

        o, lse = triton_block_sparse_attention(q, k, v, layout, scale)
    else:
        from .flex import flex_block_sparse_attention

        o, lse = flex_block_sparse_attention(q, k, v, layout, scale, return_lse=return_lse)
    return (o, lse) if return_lse else o


def block_sparse_tuner(q, k, v, layout, scale: float, density: Optional[float] = None,
                       timer: Optional[Callable] = None) -> Callable[[Sequence[str]], str]:
    """A tuner for :func:`dit_accel.kernels.backends.resolve`: given the backends that can run,
    time each through :func:`block_sparse_attention` on these very inputs
    (without autograd) and return the fastest, once per shape class."""
    def tune(names: Sequence[str], request) -> str:
        d = layout.density() if density is None else density
        shape = autotune.ShapeClass.of("block_sparse", request, d)

        def run(name):
            return lambda: block_sparse_attention(q.detach(), k.detach(), v.detach(), layout, scale=scale,
                                                  backend=name)

        with torch.no_grad():
            return autotune.choose(shape, {name: run(name) for name in names}, timer or autotune.cuda_event_timer)

    return tune
