"""What one attention call runs for a (method, grid): a :class:`Plan`, and ``Plan.run(q, k, v)``.

A method config turns a token grid into a plan once (``method.plan(grid)``); every
attention call on that grid then runs ``plan.run``. The pipelines' hooks and
``dit-accel bench fidelity`` share this one execution path:

- :class:`DensePlan`: plain attention (``Dense()``, or a pattern that covers the grid;
  ``reason`` says which).
- :class:`LayoutPlan`: a block layout, with tokens permuted to tiled order when the
  pattern needs it; block-sparse kernel; inverse permutation.
- :class:`SLAPlan`: sparse-linear attention (blocks chosen per call from q and k).

``run`` takes SDPA-shaped ``(B, H, S, D)`` tensors. With text tokens in the
sequence (joint attention), video queries attend sparsely to video keys plus
densely to the valid text keys, merged exactly by log-sum-exp, and text queries
attend densely to every valid key (METHODS.md, "Text tokens").
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .._util import is_int
from ..patterns.checks import as_grid
from ..kernels import autotune, block_sparse_attention, merge_attention
from ..kernels.backends import Request, env_backend, env_value, forced_backend, resolve
from ..kernels.block_sparse import api as _bs_api
from ..kernels.block_sparse.api import (DENSE, block_sparse_backend, layout_on, live_keys, prepare_layout,
                                        timed_against_dense)
from ..kernels._cache import LayoutCache
from ..kernels.checks import in_autocast, no_autocast
from ..kernels.block_sparse.gather import (gather_faster, gather_fits, gather_forced, gather_runs, gathered_forward,
                                          kept_choice, padding_unseen, raster_allowed)
from ..kernels.block_sparse.naive import dense_is_faster
from ..kernels.block_sparse.one_pass import OnePass, one_pass_fits
from ..kernels.layout import BlockLayout
from ..kernels.request import forward_ad, in_functorch, in_graph, records_grad, tracing
from ..kernels.sla import sla_parts_checked

__all__ = ["Plan", "DensePlan", "LayoutPlan", "SLAPlan", "attend_with_lse", "plan_grid", "token_slices"]

# Queries per chunk of the dense text branch: bounds its fp32 score buffer.
_TEXT_CHUNK = 4096


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
                    scale: float):
    """Dense attention with its log-sum-exp, in fp32, chunked over queries.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, H, M, D)`` (M small: text tokens).
        key_valid: bool ``(B or 1, M)`` or None (all valid), or a float ``(B or 1, M)`` bias added to the
            scores (an additive key mask).
    Returns:
        ``o`` (q's dtype) and ``lse`` fp32 ``(B, H, N)``; rows without a valid key give 0 and ``-inf``. In fp32
        inside a ``torch.autocast`` region too (there its matmuls ran in the region's dtype: ``o`` 0.26 and the
        lse 0.13 off at scores of about 9, against SDPA's 0.008 in the same region, and a bf16 lse).
    """
    if in_autocast(q):
        with no_autocast(q.device.type):
            return attend_with_lse(q, k, v, key_valid, scale)
    kf, vf = k.float(), v.float()
    bias = None
    if key_valid is not None and key_valid.is_floating_point():
        bias = key_valid.to(device=q.device, dtype=torch.float32)[:, None, None, :]
    elif key_valid is not None:
        bias = torch.zeros(key_valid.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~key_valid.to(q.device), float("-inf"))[:, None, None, :]
    outs, lses = [], []
    for start in range(0, q.shape[2], _TEXT_CHUNK):
        s = torch.matmul(q[:, :, start:start + _TEXT_CHUNK].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    if len(outs) == 1:  # one chunk (N <= _TEXT_CHUNK): no concatenated copy
        return outs[0].to(q.dtype), lses[0]
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


# Backend names recorded when ``auto`` runs a short layout on CPU other than through the PyTorch twin:
# masked dense attention, or one gathered flash call (:mod:`dit_accel.kernels.block_sparse.one_pass`).
DENSE_MASKED = "dense-masked"
ONE_PASS = "one-pass"
DENSE_MASK_BYTES = 256 * 2**20  # the largest fp32 additive mask (heads x N x N) the dense path may build
_DENSE_BIAS = LayoutCache("dense_bias")


def plan_grid(method, grid) -> Tuple[int, ...]:
    """``grid`` as a tuple of 1 to 3 positive ints; ValueError naming ``method``'s ``plan`` otherwise."""
    try:
        return as_grid(grid)
    except ValueError as err:
        raise ValueError(f"{type(method).__name__}.plan(grid): {err}; pass the token grid of the attention call, "
                         "e.g. (21, 30, 52)") from None


class Plan:
    """What a (method, grid) runs. Subclasses implement :meth:`attend` on video tokens.

    Attributes:
        method: the config that made the plan. grid: the token grid.
        density: visited block fraction of video-video attention (None: per call, SLA).
        dense_reason: why the plan is dense attention (None for sparse plans).
    """

    kind = "abstract"
    for_heads: Optional[int] = None  # the head count of the PerHead config the plan runs (None: any); Plan.run checks it

    def __init__(self, method, grid: Tuple[int, ...], *, density: Optional[float] = None,
                 dense_reason: Optional[str] = None, token_density: Optional[float] = None):
        self.method = method
        self.grid = plan_grid(method, grid)  # (SLA's and Dense's plans took "abc" or zeros, refused at their call)
        self.density = density
        self.dense_reason = dense_reason
        self.token_density = token_density

    @property
    def is_dense(self) -> bool:
        return self.dense_reason is not None

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def attend(self, q, k, v, *, scale: Optional[float], backend: str, proj=None, heads=None, lse: bool = True):
        """Attention among video tokens (raster order): ``(o, lse, o_extra or None, density)``.

        ``o_extra`` is added to the merged output (SLA's projected linear branch);
        ``density`` is a float or a 0-d tensor (never synced here). ``heads = (start, stop)``:
        q, k, v hold only these heads of the model (context parallelism splits heads). ``lse=False``: the
        caller merges nothing, so the kernels are not asked for the lse (backends that cannot give one, or not
        with a backward, stay eligible); the returned lse may then be None.
        """
        raise NotImplementedError

    def attend_part(self, q, k, v, *, rows: Tuple[int, int], shards, scale: Optional[float], backend: str,
                    proj=None, heads=None):
        """Attention of the video queries ``rows = (start, stop)`` (raster indices; ``q`` holds only those)
        against every video key (``k, v`` hold all of them), as the concatenation of the key ``shards``
        ``[(start, stop), ...]``. Same returns as :meth:`attend`, ``o`` in fp32 where shards were merged (the caller
        rounds it once). The default runs one call over all keys."""
        return self.attend(q, k, v, scale=scale, backend=backend, proj=proj, heads=heads)

    def check_part(self, rows: Tuple[int, int]) -> None:
        """ValueError unless :meth:`attend_part` can serve the video queries ``rows`` (whole blocks)."""

    def backend_for(self, q, k, v, backend: str, lse: bool = True) -> str:
        """The kernel backend a call with these inputs runs (``backend`` resolved as the kernels resolve it;
        ``lse``: whether the call asks for the lse, as :meth:`attend`)."""
        return "sdpa"

    def prepare(self, device, backend: str = "auto") -> None:
        """Build now what calls on ``device`` derive from the plan (device copies, kernel plans), so a call
        only reads them: the pipelines' hooks call it before the transformer runs (``torch.compile``
        then traces attention without building anything)."""

    def run(self, q, k, v, *, num_text: int = 0, text_first: bool = False, key_mask: Optional[torch.Tensor] = None,
            scale: Optional[float] = None, backend: str = "auto", proj=None,
            sdpa: Callable = F.scaled_dot_product_attention, text_queries: bool = True,
            text_query_mask: Optional[torch.Tensor] = None, check_mask: bool = True):
        """Attention over ``[text, video]`` (``text_first``), ``[video, text]`` or video alone.

        Args:
            q, k, v: ``(B, H, S, D)`` with ``S = num_tokens + num_text``.
            key_mask: bool key-padding mask of shape ``(B or 1, 1, 1, S)`` (True = attend) or None; or a
                float bias of that shape added to the scores, which must be zero on every video key (the
                sparse part takes no bias): the text keys' bias enters the dense text branch.
            text_query_mask: the text queries' own mask ``(B or 1, 1, num_text, S)`` for their dense attention
                (default ``key_mask``).
            scale: softmax scale (default ``1/sqrt(D)``). backend: the kernel backend.
            proj: the layer's SLA projection (SLA plans only).
            sdpa: dense attention for text queries (the caller's original SDPA).
            text_queries: False when ``q`` holds the video queries alone (``(B, H, num_tokens, D)``) against
                the whole sequence of keys (Qwen-Image 2.1's target call); only video rows are returned.
            check_mask: read ``key_mask`` on the video keys (one host sync; skipped while traced or captured) and
                refuse one that is False or nonzero there (before, the sparse part dropped it without a word: 0.38
                off on a GNA plan). False: the caller vouches for it (the pipelines' hooks, whose presets build
                their masks True on every video token).
        Returns ``(o (B, H, S, D), density)`` (``(B, H, num_tokens, D)`` without text queries).

        Raises:
            ValueError: q, k, v are not 4-D, or their lengths and ``num_text`` are not the plan's grid plus the
                text (a Tile plan returned 256 of a 264-token sequence's rows for ``num_text=0``, without a word).
        """
        self._check_run(q, k, v, num_text, text_queries, key_mask, text_query_mask)
        if key_mask is not None and check_mask and not in_graph():
            _check_video_keys(key_mask, num_text, text_first)
        if num_text == 0:
            # Video alone: nothing is merged, so no lse is asked for.
            o_video, _, extra, density = self.attend(q, k, v, scale=scale, backend=backend, proj=proj, lse=False)
            if extra is not None:
                o_video = o_video + extra
            return (o_video if o_video.dtype == q.dtype else o_video.to(q.dtype)), density
        video, text = token_slices(k.shape[2], num_text, text_first)
        q_video = q[:, :, video] if text_queries else q
        o_video, lse, extra, density = self.attend(q_video, k[:, :, video], v[:, :, video], scale=scale,
                                                   backend=backend, proj=proj)
        text_valid = None if key_mask is None else key_mask.reshape(key_mask.shape[0], key_mask.shape[-1])[:, text]
        scale_value = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        o_text, lse_text = attend_with_lse(q_video, k[:, :, text], v[:, :, text], text_valid, scale_value)
        o_video, _ = merge_attention(o_video, lse, o_text, lse_text)
        if extra is not None:
            o_video = o_video + extra  # (VSA's fp32 extra: the sum rounded once, below)
        if not text_queries:
            return o_video.to(q.dtype), density
        tq_mask = key_mask if text_query_mask is None else text_query_mask
        o_tq = sdpa(q[:, :, text], k, v, attn_mask=tq_mask, scale=scale).to(q.dtype)  # text: dense over all keys
        parts = [o_tq, o_video.to(q.dtype)] if text_first else [o_video.to(q.dtype), o_tq]
        return torch.cat(parts, dim=2), density

    def _check_run(self, q, k, v, num_text, text_queries: bool, key_mask, text_query_mask=None) -> None:
        """ValueError naming the argument unless ``q, k, v`` (B, H, S, D) hold this plan's grid tokens and
        ``num_text`` text tokens (shapes only: no host sync). Before, a sequence of another length than the grid
        was cut (a tiled plan returned ``num_tokens`` rows), ran on whatever length came (SLA, dense), or failed
        in a kernel with a raw shape error."""
        def shapes() -> str:
            return ", ".join(str(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__)
                             for t in (q, k, v))

        if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
            raise ValueError(f"Plan.run: q, k, v must be tensors of shape (B, H, S, D); got {shapes()}")
        if k.shape[:3] != v.shape[:3] or (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise ValueError(f"Plan.run: q, k, v must share their batch and heads (B, H), q and k their head dim, and "
                             f"k and v their length; got {shapes()}")  # (before: a raw reshape error in a kernel)
        if self.for_heads is not None and q.shape[1] != self.for_heads:
            raise ValueError(f"Plan.run: this plan runs a per_head config of {self.for_heads} head methods (all "
                             f"alike), but q holds {q.shape[1]} heads: give one method per head of the layer "
                             "(calibrate the plan on this model)")
        s, n = k.shape[2], self.num_tokens
        if not (is_int(num_text) or isinstance(num_text, torch.SymInt)) or not 0 <= num_text <= s:
            raise ValueError(f"Plan.run: num_text={num_text!r} is invalid: the text tokens in the sequence, a whole "
                             f"number from 0 to {s} (k's length)")
        if s - num_text != n:
            fix = (f"pass num_text={s - n} (the text tokens in the sequence)" if s > n else
                   "pass the whole sequence")
            raise ValueError(f"Plan.run: the plan of {self.method!r} is for grid {self.grid} ({n} video tokens); k "
                             f"holds {s} tokens with num_text={num_text}, so {s - num_text} video tokens: {fix}, or "
                             "build the plan for the grid of these tokens (method.plan(grid))")
        if key_mask is not None:  # (before: a raw "shape '[2, 264]' is invalid" or broadcast error mid-call)
            shape = tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else ()
            if len(shape) != 4 or shape[3] != s or shape[1:3] != (1, 1) or shape[0] not in (1, q.shape[0]):
                hint = ("; pass mask[:, None, None, :] for a (B, S) mask, mask[:, None] for a (B, 1, S) one"
                        if len(shape) in (2, 3) and shape[-1] == s else
                        "; a mask per head or per query cannot run sparse: run this call with "
                        "F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)")
                raise ValueError(f"Plan.run: key_mask must be a tensor of shape (B or 1, 1, 1, S) = ({q.shape[0]}, "
                                 f"1, 1, {s}) (one row of keys per sample); got "
                                 f"{tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else key_mask!r}"
                                 f"{hint if shape else ''}")
            _check_mask_dtype("key_mask", key_mask, q)
        if text_query_mask is not None:  # (before: a raw SDPA broadcast error in the text queries' call)
            shape = tuple(text_query_mask.shape) if isinstance(text_query_mask, torch.Tensor) else ()
            if (len(shape) != 4 or shape[3] != s or shape[2] != num_text or shape[1] not in (1, q.shape[1])
                    or shape[0] not in (1, q.shape[0])):
                got = shape or repr(text_query_mask)
                raise ValueError(f"Plan.run: text_query_mask must be a tensor of shape (B or 1, 1 or H, num_text, S) "
                                 f"= ({q.shape[0]}, 1, {num_text}, {s}) (the text queries' rows); got {got}; pass "
                                 "None to give the text queries key_mask")
            _check_mask_dtype("text_query_mask", text_query_mask, q)
        want = s if text_queries else n
        if q.shape[2] != want:
            raise ValueError(f"Plan.run: q holds {q.shape[2]} queries; with text_queries={text_queries} it holds "
                             f"{'every token of k' if text_queries else 'the grid tokens alone'} ({want})")

    def describe(self) -> dict:
        """What the plan runs, for stats and sidecars."""
        out = {"kind": "dense" if self.is_dense else self.kind, "grid": list(self.grid), "density": self.density}
        if self.token_density is not None:
            out["token_density"] = self.token_density
        if self.is_dense:
            out["dense_reason"] = self.dense_reason
        return out

    def __repr__(self) -> str:
        extra = f", dense: {self.dense_reason}" if self.is_dense else f", density={self.density}"
        return f"{type(self).__name__}({self.method!r}, grid={self.grid}{extra})"


def _check_mask_dtype(name: str, mask: torch.Tensor, q: torch.Tensor) -> None:
    """ValueError unless ``mask`` is bool or a float bias in fp32 or q's dtype (what SDPA takes). Before, an int
    mask failed with a raw "masked_fill_ only supports boolean masks", an fp64 one inside the text queries' SDPA."""
    if mask.dtype != torch.bool and mask.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"Plan.run: {name} has dtype {mask.dtype}; it must be bool (True = attend) or a float bias "
                         f"in torch.float32 or q's dtype ({q.dtype}): pass mask.bool() for a 0/1 mask, or "
                         "mask.float() for a bias")


def token_slices(s: int, num_text: int, text_first: bool) -> Tuple[slice, slice]:
    """``(video, text)``: the slices of a sequence of ``s`` tokens whose ``num_text`` text tokens come first
    (``text_first``) or last."""
    return ((slice(num_text, s), slice(0, num_text)) if text_first else
            (slice(0, s - num_text), slice(s - num_text, s)))


def _check_video_keys(key_mask: torch.Tensor, num_text: int, text_first: bool) -> None:
    """ValueError if ``key_mask`` (checked shape) hides a video key or biases one: the sparse part takes no mask,
    so it would be dropped there (one host sync)."""
    video = key_mask[..., token_slices(key_mask.shape[-1], num_text, text_first)[0]]
    bad = ~video if video.dtype == torch.bool else video != 0
    if not bool(bad.any()):
        return
    where = bad.reshape(bad.shape[0], -1).nonzero()[0].tolist()
    first = where[1] + (num_text if text_first else 0)
    raise ValueError(f"Plan.run: key_mask {'hides' if video.dtype == torch.bool else 'biases'} video key {first} of "
                     f"sample {where[0]} ({int(bad.sum())} video keys in all): the sparse part runs every video key "
                     "unmasked, so it must be True (bool) or 0.0 (float bias) on all of them, and may hide or bias "
                     "text keys only; pass such a mask, or run this call with F.scaled_dot_product_attention(q, k, v, "
                     "attn_mask=key_mask)")


class DensePlan(Plan):
    """Dense attention; ``reason`` says why (``"Dense()"``, ``"the window covers the grid"``, ...)."""

    kind = "dense"

    def __init__(self, method, grid, reason: str):
        super().__init__(method, grid, density=1.0, dense_reason=reason, token_density=1.0)

    def attend(self, q, k, v, *, scale, backend, proj=None, heads=None, lse: bool = True):
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        o, lse = attend_with_lse(q, k, v, None, scale)
        return o, lse, None, 1.0


class LayoutPlan(Plan):
    """A block layout over the video tokens, in tiled order when ``perm`` is given (raster order otherwise).

    ``wide_q=True`` (Tile and GNA plans): on CUDA, calls without autograd whose backend is the Triton kernels
    (``auto`` or ``triton``) run :func:`~dit_accel.patterns.separable.wide_query_layout`, the same pattern in
    128-row query blocks (the one-loop forward's 128 x 64 tiles), where every 128-row block's two
    64-row halves visit the same key blocks; else ``layout`` itself. A call that records a backward keeps
    ``layout``: the 128-row backward ran about 10% slower per visited tile than the 64-row one on an H200
    (BENCHMARKS 10.1, tile-128 against Tile), where the 128-row forward ran 14% faster. Both visit the same key tiles
    per token, so ``density`` holds for either. CPU calls, the PyTorch twin, FlexAttention forced,
    and ring attention (:meth:`attend_part`) keep ``layout``.

    ``kernel_plan`` (a Tile whose blocks are whole tiles of a size no kernel takes, such as 144-token frames):
    a function that builds the same pattern in 64-token blocks over packed tiles
    (:func:`~dit_accel.patterns.tile.packed_tile_layout`); calls that run kernels (a kernel backend forced
    anywhere, and CUDA under ``auto`` where ``kernel_plan_auto``) run that plan instead (:meth:`call_plan`),
    built on first use. The PyTorch twin, CPU ``auto`` and ring attention keep ``layout``.
    """

    kind = "layout"

    def __init__(self, method, grid, layout: BlockLayout, perm=None, *, token_density: Optional[float] = None,
                 wide_q: bool = False, kernel_plan: Optional[Callable[[], "LayoutPlan"]] = None,
                 kernel_plan_auto: bool = True):
        super().__init__(method, grid, density=layout.density(), token_density=token_density)
        self.layout = layout
        self.perm = perm
        self.wide_q = bool(wide_q)
        self._kernel_plan = kernel_plan  # a builder, then [the plan] once built
        self._kernel_plan_auto = bool(kernel_plan_auto)
        self._wide: Optional[list] = None  # [wide layout or None], built on the first CUDA call
        self._layouts: Dict[tuple, BlockLayout] = {}  # per (device, heads) copies, made once
        self._parts: Dict[tuple, "_Part"] = {}
        self._short_path: Dict[tuple, Optional[str]] = {}  # (heads, batch, heads of q, head dim) -> see _short
        self._gpu_choice: Dict[tuple, str] = {}  # _gpu_key -> DENSE or "sparse", see _gpu_dense
        self._gather_choice: Dict[tuple, bool] = {}  # call signature -> whether it reads raster order (_reads_raster)
        self._padded_backends: Dict[tuple, str] = {}  # see backend_for
        self.dense_reasons: list = []  # why CUDA calls ran dense attention (_gpu_dense), one sentence each
        self._raster_bias: Dict[int, torch.Tensor] = {}  # id of a layout in self._layouts -> raster-order mask
        self._one_pass: Dict[int, OnePass] = {}  # id of a layout in self._layouts -> its one-pass call
        self._prepared = set()  # (device, backend, $DIT_ACCEL_BACKEND) that prepare() has built for

    def wide_layout(self) -> Optional[BlockLayout]:
        """The plan's layout in 128-row query blocks when that visits the same tiles, else None (built once)."""
        if self._wide is None:
            from ..patterns.separable import wide_query_layout

            self._wide = [wide_query_layout(self.perm, self.layout) if self.wide_q and self.layout.block_q == 64
                          else None]
            if self._wide[0] is not None:  # the same token mask: NATTEN's window (if any) holds for it too
                from ..kernels.block_sparse.backends.natten import share_window

                share_window(self.layout, self._wide[0])
        return self._wide[0]

    def call_plan(self, device, backend: str = "auto") -> "LayoutPlan":
        """The plan that calls on ``device`` with ``backend`` run: this one, or its ``kernel_plan`` (see the class
        docstring) where the call runs kernels: any backend but the PyTorch twin forced (by ``backend`` or
        ``$DIT_ACCEL_BACKEND``), or CUDA under ``auto`` where ``kernel_plan_auto``."""
        if self._kernel_plan is None:
            return self
        device = device if isinstance(device, torch.device) else torch.device(device)
        chosen = forced_backend(backend)
        if chosen == "torch" or (chosen is None and (device.type != "cuda" or not self._kernel_plan_auto)):
            return self
        if callable(self._kernel_plan):
            self._kernel_plan = [self._kernel_plan()]
        return self._kernel_plan[0]

    def kernel_layout(self, device, backend: str = "auto", grad: bool = False) -> BlockLayout:
        """The layout (on the CPU) that calls on ``device`` with ``backend`` run (``grad``: calls that record a
        backward): see the class docstring. Its token order is :meth:`call_plan`'s (``call_plan(device,
        backend).perm``)."""
        device = device if isinstance(device, torch.device) else torch.device(device)
        runner = self.call_plan(device, backend)
        if runner is not self:
            return runner.kernel_layout(device, backend, grad)
        if self.wide_q and not grad and device.type == "cuda" and forced_backend(backend) in (None, "triton"):
            wide = self.wide_layout()
            if wide is not None:
                return wide
        return self.layout

    def layout_on(self, device, heads=None, backend: str = "auto", grad: bool = False) -> BlockLayout:
        device = device if isinstance(device, torch.device) else torch.device(device)
        base = self.kernel_layout(device, backend, grad)
        key = (device, heads if base.num_heads > 1 else None, base.block_q)
        layout = self._layouts.get(key)
        if layout is None:
            layout = base if key[1] is None else base.select(heads=heads)
            layout = self._layouts[key] = layout_on(layout, key[0])
        return layout

    def backend_for(self, q, k, v, backend: str, lse: bool = True, heads=None) -> str:
        """(``heads``: q, k, v hold these heads of the model, as :meth:`attend`'s under Ulysses.)"""
        runner = self.call_plan(q.device, backend)
        if runner is not self:
            return runner.backend_for(q, k, v, backend, lse, heads)
        short = self._short(q, backend, heads)
        if short is not None:
            return short
        if self._gpu_choice.get(self._gpu_key(q, k, heads, lse)) == DENSE:
            return DENSE
        grad = records_grad(q, k, v)
        layout = self.layout_on(q.device, heads, backend=backend, grad=grad)
        if q.shape[-2] != layout.q_len or k.shape[-2] != layout.kv_len:
            # Raster tokens of a padded tiling: the kernels see other lengths. Padding keys are never visited,
            # so auto never runs such a layout as dense attention (block_sparse.api.all_keys_visited). Resolved
            # once per eager call signature, as the kernels' own decision is (stats ask on every call; a traced
            # call resolves it in the trace, where a dict written at run time would recompile the graph).
            def resolved() -> str:
                return resolve("block_sparse", backend, Request.of(q, k, v, layout.block_q, layout.block_k))

            if tracing():
                return resolved()
            key = (backend, env_value(), grad, in_functorch(), grad and forward_ad(q, k, v), q.shape, q.dtype, q.device,
                   k.shape, v.shape)
            return self._padded_backends.get(key) or self._padded_backends.setdefault(key, resolved())
        # The kernels' own cached decision for this call (on CUDA it may be dense attention).
        return block_sparse_backend(q, k, v, layout, backend, return_lse=lse)

    def _short(self, q, backend: str, heads=None) -> Optional[str]:
        """``backend="auto"`` on CPU, eager, no autograd: :data:`ONE_PASS` or :data:`DENSE_MASKED` when either
        runs the layout faster than the twin, else None. One gathered call where it fits
        (:func:`~dit_accel.kernels.block_sparse.one_pass.one_pass_fits`: short, and every row visits at most
        half the key blocks); else masked dense attention when
        :func:`~dit_accel.kernels.block_sparse.naive.dense_is_faster` says so and its mask stays within
        :data:`DENSE_MASK_BYTES`. Decided once per (heads, batch, heads of q, head dim)."""
        if (backend != "auto" or q.device.type != "cpu" or tracing()
                or (torch.is_grad_enabled() and q.requires_grad) or env_backend() is not None or forward_ad(q)):
            return None  # (a backend forced by $DIT_ACCEL_BACKEND runs as forced)
        key = (heads, q.shape[0], q.shape[1], q.shape[-1])
        try:
            return self._short_path[key]
        except KeyError:
            pass
        layout = self.layout_on(q.device, heads)
        choice = None
        if one_pass_fits(layout, batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[-1]):
            try:
                self._one_pass_of(layout)
                choice = ONE_PASS
            except ValueError:  # a query without keys: see below
                pass
        if choice is None:
            size = layout.num_heads * layout.num_q_blocks * layout.block_q * layout.num_kv_blocks * layout.block_k
            if (size * 4 <= DENSE_MASK_BYTES and bool((layout.kv_counts > 0).all())
                    and dense_is_faster(layout, batch_heads=q.shape[0] * q.shape[1], head_dim=q.shape[-1])):
                choice = DENSE_MASKED
        return self._short_path.setdefault(key, choice)

    def _one_pass_of(self, layout: BlockLayout) -> OnePass:
        one = self._one_pass.get(id(layout))
        if one is None:
            order = None if self.perm is None else self.perm.order
            one = self._one_pass.setdefault(id(layout), OnePass(layout, self.num_tokens, order))
        return one

    def _dense_masked(self, q, k, v, layout: BlockLayout, scale):
        """The layout's exact result by masked dense attention (ATen's CPU flash kernel with an additive mask).

        q, k, v and the result are in raster order: the mask is permuted once (and its padding
        dropped), so the call gathers nothing."""
        if self.perm is None:
            bias = _DENSE_BIAS.get(layout, "bias", lambda: self._dense_bias(layout))  # (1, heads of the layout, N, N)
        else:  # the permutation is the plan's: so is the raster-order mask
            bias = self._raster_bias.get(id(layout))
            if bias is None:
                bias = self._raster_bias.setdefault(id(layout), self._dense_bias(layout))
        # The kernel broadcasts the mask over the batch (and over the heads when the layout has one).
        dtype = q.dtype
        if dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        return (o if dtype == torch.float32 else o.to(dtype)), lse

    def _dense_bias(self, layout: BlockLayout) -> torch.Tensor:
        """fp32 additive mask ``(1, heads, N, N)`` of ``layout`` in raster order (padding dropped)."""
        mask = layout.to_dense_mask()
        if self.perm is not None:  # tiled positions of the raster tokens, rows and columns
            inverse = self.perm.inverse
            mask = mask[:, inverse][:, :, inverse]
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))[None]

    def prepare(self, device, backend: str = "auto") -> None:
        key = (torch.device(device), backend, env_backend())
        if key in self._prepared:
            return
        runner = self.call_plan(device, backend)
        if runner is not self:
            runner.prepare(device, backend)
            self._prepared.add(key)
            return
        inference, training = (self.layout_on(device, backend=backend, grad=grad) for grad in (False, True))
        for layout in (inference,) if training is inference else (inference, training):  # (128-row: two)
            prepare_layout(layout, device, backend)
        if self.perm is not None:
            self.perm.prepare(device)
        self._prepared.add(key)

    def _check_heads(self, layout: BlockLayout, q) -> None:
        source = getattr(self.method, "_source", None)  # the strategy file of a TileStrategy's Tile
        if (layout.num_heads > 1 or source) and layout.num_heads != q.shape[1]:
            what = f"{source}: lists windows for" if source else f"{type(self.method).__name__} has windows for"
            raise ValueError(f"{what} {layout.num_heads} heads per layer, but this model's attention layers run "
                             f"{q.shape[1]} heads; expected per-head windows for heads 0..{q.shape[1] - 1}")

    def attend(self, q, k, v, *, scale, backend, proj=None, heads=None, lse: bool = True):
        runner = self.call_plan(q.device, backend)
        if runner is not self:  # the same pattern over packed tiles; the call reports this plan's density
            return runner.attend(q, k, v, scale=scale, backend=backend, proj=proj, heads=heads, lse=lse)[:3] + (
                self.density,)
        grad = records_grad(q, k, v)
        layout = self.layout_on(q.device, heads, backend, grad)
        want_lse = lse
        self._check_heads(layout, q)
        short = self._short(q, backend, heads)
        if short is not None:  # raster order in and out
            if short == ONE_PASS:
                o, lse = self._one_pass_of(layout)(q, k, v, scale)
            else:
                o, lse = self._dense_masked(q, k, v, layout, scale)
            return o, lse, None, self.density
        if self._gpu_dense(q, k, v, layout, scale, backend, heads, want_lse):
            o, lse = _bs_api._run_dense(q, k, v, scale, want_lse)
            return o, lse, None, self.density
        return self._sparse(q, k, v, layout, scale, backend, want_lse) + (None, self.density)

    def _sparse(self, q, k, v, layout: BlockLayout, scale, backend: str, want_lse: bool, gather=None):
        """``(o, lse or None)`` of the layout's kernels on raster q, k, v: gathered into tiled order and back, or
        read where they are by the kernel (:meth:`_reads_raster`; ``gather`` True / False: that path, forced)."""
        if self.perm is not None and (gather if gather is not None else
                                      self._reads_raster(q, k, v, layout, scale, backend, want_lse)):
            o, lse = gathered_forward(q, k, v, layout, scale, self.perm)
            return o, (lse if want_lse else None)
        if self.perm is not None:  # tiled order: windows become contiguous blocks
            q, k, v = (self.perm.permute(x, dim=-2) for x in (q, k, v))
        if not want_lse:
            o = block_sparse_attention(q, k, v, layout, scale=scale, backend=backend)
            return (o if self.perm is None else self.perm.unpermute(o, dim=-2)), None
        o, lse = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend=backend)
        if self.perm is not None:
            o, lse = self.perm.unpermute(o, dim=-2), self.perm.unpermute(lse, dim=-1)
        return o, lse

    def _reads_raster(self, q, k, v, layout: BlockLayout, scale, backend: str, want_lse: bool) -> bool:
        """Whether this call's kernel reads q, k, v in raster order through the permutation's row table instead of
        their gathered copies (:mod:`dit_accel.kernels.block_sparse.gather`): an eager call whose gathered call
        runs the Triton kernel, where :func:`~dit_accel.kernels.block_sparse.gather.gather_runs` allows it (on a
        GPU after its self-check, and for a call that records a backward the raster backward's too;
        ``DIT_ACCEL_GATHER``) and it timed faster (a training call: forward and backward). Decided once per call
        signature, layout and autograd state (asking the kernels' backend choice takes one gathered copy of q, k
        and v); a CUDA graph capture takes the eager call's answer, a traced call the gathering path (the gathered
        launch is no custom op)."""
        forced = gather_forced()
        if not raster_allowed(q, forced) or k.shape[-2] != q.shape[-2] or not gather_fits(q, k, v):
            return False
        grad = records_grad(q, k, v)
        key = (id(layout), backend, env_value(), forced, want_lse, grad, q.shape, q.stride(), k.shape, k.stride(),
               v.stride(), q.dtype, q.device)
        return kept_choice(self._gather_choice, key, lambda: self._gather_decision(
            q, k, v, layout, scale, backend, want_lse, forced, grad))

    def _gather_decision(self, q, k, v, layout: BlockLayout, scale, backend: str, want_lse: bool, forced,
                         grad: bool) -> bool:
        qp, kp, vp = (self.perm.permute(x, dim=-2) for x in (q, k, v))  # (asked with the call's autograd state)
        if block_sparse_backend(qp, kp, vp, layout, backend, want_lse) != "triton" or \
                not padding_unseen(layout, self.perm) or \
                not gather_runs(q.device, q.dtype, q.shape[-1], layout.block_q, layout.block_k, forced, grad):
            return False
        if forced:
            return True
        if not grad:
            return gather_faster(layout, q, lambda gather: self._sparse(q, k, v, layout, scale, "triton", want_lse,
                                                                        gather))
        # A training call: forward and backward timed together, on detached copies (no gradient reaches the
        # caller's graph).
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step(gather: bool):
            o = self._sparse(*leaves, layout, scale, "triton", want_lse, gather)[0]
            torch.autograd.grad(o, leaves, torch.ones_like(o))

        return gather_faster(layout, q, step, family="block_sparse.gather_train")

    def _gpu_key(self, q, k, heads, want_lse: bool) -> tuple:
        """The call signature of :meth:`_gpu_dense` (the plan's grid fixes the token count; :meth:`backend_for` may
        see text tokens beside the video ones)."""
        return ("gpu", heads, q.shape[0], q.shape[1], q.shape[-1], k.shape[1], q.dtype, q.device, want_lse)

    def _gpu_dense(self, q, k, v, layout: BlockLayout, scale, backend: str, heads, want_lse: bool) -> bool:
        """CUDA under ``auto``, without autograd: whether the call runs dense attention over the raster tokens
        because that measured faster than the sparse path *with its gathers* (the kernels' own rule,
        :func:`~dit_accel.kernels.block_sparse.api.dense_reason`, sees the kernel alone: at a few thousand
        tokens and heads the gathers into tiled order and back are launches of their own, and a layout of
        small blocks loses to one SDPA call). Timed once per call signature on the call's inputs, eager, with
        the autotuner on; a traced or captured call takes the eager call's answer. Only where every raster key
        is some query's key: dense attention is then the pattern's unmasked original
        (:func:`~dit_accel.kernels.block_sparse.api.all_keys_visited`). :attr:`dense_reasons` says why."""
        if backend != "auto" or not _bs_api._dense_applies(q.device) or env_backend() is not None or (
                records_grad(q, k, v)):
            return False
        key = self._gpu_key(q, k, heads, want_lse)
        hit = self._gpu_choice.get(key)
        if hit is None:
            if in_graph() or not autotune.enabled():
                return False
            hit = self._gpu_choice.setdefault(key, self._measured(q, k, v, layout, scale, backend, want_lse))
        return hit == DENSE

    def _measured(self, q, k, v, layout: BlockLayout, scale, backend: str, want_lse: bool) -> str:
        """:data:`DENSE` where dense attention timed faster than :meth:`_sparse` on these inputs, else
        ``"sparse"`` (also where a raster key is nobody's, or either path cannot be timed here)."""
        live = live_keys(layout)
        if self.perm is not None:
            live = live[:, self.perm._indices(live.device)[1]]  # (the permutation's device copy)
        if not bool(live.all()):
            return "sparse"
        times = timed_against_dense(lambda q, k, v: self._sparse(q, k, v, layout, scale, backend, want_lse),
                                    q, k, v, scale, want_lse)
        if times is None or times[1] >= times[0]:
            return "sparse"
        sparse_ms, dense_ms = times
        self.dense_reasons.append(
            f"measured: sparse with its gathers {sparse_ms:.3f} ms > dense {dense_ms:.3f} ms at N={q.shape[2]}, "
            f"{q.shape[0]}x{q.shape[1]} heads, d={q.shape[-1]}, {q.dtype}")
        return DENSE

    def attend_part(self, q, k, v, *, rows, shards, scale, backend, proj=None, heads=None):
        part = self._part(tuple(rows), tuple(map(tuple, shards)), heads, q.device)
        if self.perm is not None:  # local rows to their tiled positions; all keys to tiled order
            q = torch.cat([q, q.new_zeros(q.shape[:2] + (1, q.shape[3]))], 2).index_select(2, part.gather)
            k, v = self.perm.permute(k, dim=-2), self.perm.permute(v, dim=-2)
        o = lse = None
        for (start, stop), layout in zip(part.cols, part.layouts):  # one key shard at a time (ring order)
            o_s, lse_s = block_sparse_attention(q, k[:, :, start:stop], v[:, :, start:stop], layout, scale=scale,
                                                return_lse=True, backend=backend)
            # the running merge in fp32, rounded once by the caller (merged into a bf16 output, each shard added a
            # rounding: bf16 over 4 shards, mean error 23% over one call's, 11% now, as over 2 shards)
            o, lse = (o_s, lse_s) if o is None else merge_attention(o.float(), lse, o_s, lse_s)
        if self.perm is not None:
            o, lse = o.index_select(2, part.scatter), lse.index_select(2, part.scatter)
        return o, lse, None, part.density

    def check_part(self, rows: Tuple[int, int]) -> None:
        self._span(tuple(rows), self.layout.block_q)

    def _part(self, rows, shards, heads, device) -> "_Part":
        key = (rows, shards, heads, device)
        if key not in self._parts:
            span = self._span(rows, self.layout.block_q)
            cols = [self._span(shard, self.layout.block_k) for shard in shards]
            layout = self.layout if heads is None or self.layout.num_heads == 1 else self.layout.select(heads=heads)
            layouts = [layout_on(layout.select(rows=span, cols=c), device) for c in cols]
            visited = sum(float(lay.kv_counts.sum()) for lay in layouts)
            total = sum(lay.num_heads * lay.num_q_blocks * lay.num_kv_blocks for lay in layouts)
            gather = scatter = None
            if self.perm is not None:
                order = self.perm.order[span[0]:span[1]]
                gather = torch.where(order >= 0, order - rows[0], rows[1] - rows[0]).to(device)
                scatter = (self.perm.inverse[rows[0]:rows[1]] - span[0]).to(device)
            self._parts[key] = _Part(cols, layouts, gather, scatter, visited / total)
        return self._parts[key]

    def _span(self, rows: Tuple[int, int], block: int) -> Tuple[int, int]:
        """The layout positions of the raster tokens ``rows``: the same range in raster order; in tiled order
        the range of whole blocks their tiles fill. ValueError when the tokens do not fill whole blocks."""
        if self.perm is None:
            span = rows
        else:
            tiled = self.perm.inverse[rows[0]:rows[1]]
            span = (int(tiled.min()), min(-(-(int(tiled.max()) + 1) // block) * block, self.perm.num_padded))
            order = self.perm.order[span[0]:span[1]]
            inside = (order == -1) | ((order >= rows[0]) & (order < rows[1]))
            if not bool(inside.all()):
                span = None
        length = self.layout.q_len
        if span is None or span[0] % block or (span[1] % block and span[1] != length):
            # The tiles named are the layout's: a Tile whose own tile holds under one block is ordered by another
            tile = None if self.perm is None else tuple(self.perm.tile)
            axis = "frame" if len(self.grid) == 3 else "row"
            advice = (f"whole slabs of its {tile} tiles along the first axis, e.g. a latent {axis} count that is a "
                      f"multiple of the ring degree x {tile[0]}" if tile else
                      f"whole blocks, e.g. a video token count that is a multiple of the ring degree x {block}")
            raise ValueError(
                f"tokens {rows[0]}..{rows[1] - 1} of grid {self.grid} do not fill whole {block}-token blocks of "
                f"{self.method!r}'s layout{' (tiled order)' if tile else ''}: split the sequence so every rank holds "
                f"{advice}")
        return span


def separable_plan(method, grid, relations, tile, what: str, attach=None):
    """Dense when the window covers the grid, else a tiled-order block layout of the relations (tensors or
    :class:`~dit_accel.patterns.separable.Band` objects; ``attach(layout, perm)`` then records what a vendor kernel needs
    to know of the pattern, e.g. NATTEN's window)."""
    from ..patterns.permutation import permutation_for
    from ..patterns.separable import covers_grid, relation_density, separable_layout

    if covers_grid(relations):
        return DensePlan(method, grid, f"the {what} covers the whole grid {tuple(grid)}; a smaller {what} makes it "
                                       "sparse")
    # Without a tile: the one under which the pattern visits least work (partial blocks cost more).
    perm = permutation_for(tuple(grid), tile, 64, 64, relations)
    token_density = math.prod(relation_density(r) for r in relations)
    layout = separable_layout(perm, relations, 64, 64)
    if attach is not None:
        attach(layout, perm)
    return LayoutPlan(method, grid, layout, perm, token_density=token_density, wide_q=True)


class _Part:
    """One rank's share of a LayoutPlan under ring attention (see :meth:`LayoutPlan.attend_part`)."""

    def __init__(self, cols, layouts, gather, scatter, density):
        self.cols, self.layouts, self.gather, self.scatter, self.density = cols, layouts, gather, scatter, density


class SLAPlan(Plan):
    """Sparse-linear attention with ``params`` (:class:`dit_accel.kernels.SLAParams`); blocks chosen per call."""

    kind = "sla"

    def __init__(self, method, grid, params):
        super().__init__(method, grid)
        self.params = params
        self._backends: Dict[tuple, str] = {}  # what backend_for resolved, per eager call signature

    def backend_for(self, q, k, v, backend: str, lse: bool = True) -> str:
        if tracing():
            return resolve("sla", backend, Request.of(q, k, v, self.params.block_q, self.params.block_k))
        # The statistics ask on every layer call; resolving once per signature keeps that off the call.
        grad = records_grad(q, k, v)
        key = (q.device, q.dtype, q.shape[-1], grad, in_functorch(), grad and forward_ad(q, k, v), backend,
               env_value())  # (torch.func: the twin)
        name = self._backends.get(key)
        if name is None:
            name = self._backends[key] = resolve("sla", backend, Request.of(q, k, v, self.params.block_q,
                                                                            self.params.block_k))
        return name

    def check_part(self, rows: Tuple[int, int]) -> None:
        block = self.params.block_q
        if rows[0] % block or (rows[1] % block and rows[1] != self.num_tokens):
            raise ValueError(f"video tokens {rows[0]}..{rows[1] - 1} of grid {self.grid} do not fill whole "
                             f"{block}-token query blocks of {self.method!r}: split the sequence so every rank holds "
                             "whole blocks (a token count per rank that is a multiple of the block)")

    def attend(self, q, k, v, *, scale, backend, proj=None, heads=None, lse: bool = True):
        # Under context parallelism (attend_part) k, v hold every key: pooling and linear sums stay global.
        # The layer's q, k, v are the processor's, checked by their shapes in routing: only the scale's default.
        o, lse, o_lin, info = sla_parts_checked(q, k, v, self.params, proj,
                                                scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                                                self.backend_for(q, k, v, backend))
        return o, lse, o_lin, info["density"]
