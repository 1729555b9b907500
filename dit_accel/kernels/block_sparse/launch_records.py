"""What a block-sparse launcher derives once per (layout, call signature) and keeps with the layout's tile plans:
the forward's :class:`_Launch`, the backward's :class:`_BackwardLaunch` of :class:`_BackwardStep` s. Built by
:mod:`.triton`'s ``_forward_launch`` and ``_backward_launch``; read back by :mod:`.launches`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

from .configs import KernelConfig

__all__ = ["_Launch", "_BackwardLaunch", "_BackwardStep"]


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One forward launch as derived from (layout, call signature), once (:func:`.triton._forward_launch`).

    ``args``: the kernel's arguments after the call's own tensors (the tile plan first, then plan tensors, strides,
    sizes; the scale comes last, per call); ``grid``: None for the interpreter's persistent grid (read per call,
    :data:`.triton.INTERPRETER_PROGRAMS`); ``kw``: constexprs and launch options; ``prepare``: the inputs need last-dim
    contiguous or zero-padded copies first, ``pad`` the latter; ``descriptors``: TMA descriptors of K and V,
    checked, rebased per call (:func:`.triton._rebased`), or None; ``ws_ok``: Q, K and V are TMA-aligned, so the
    warp-specialized kernel (which makes a descriptor of each) may run."""

    cfg: KernelConfig
    args: tuple
    grid: Optional[tuple]
    kw: dict
    n_items: int
    prepare: bool
    pad: bool
    descriptors: Optional[tuple]
    ws_ok: bool = False


@dataclasses.dataclass(frozen=True)
class _BackwardLaunch:
    """The backward's launches as derived from (layout, call signature), once (:func:`.triton._backward_launch`).

    ``pre``: the preprocess's grid, static arguments and keywords; ``pad``: the pointer configuration whose ``block_d``
    the inputs are zero-padded to (None: no padding); ``copies``: dQ, dK, dV allocated like q, k, v would not share
    their strides, so the kernels get contiguous copies; ``steps``: per kernel (dK/dV, then dQ) its static arguments
    after the call's tensors (plan, strides, sizes; the scale comes last, per call), grid, keywords and TMA
    descriptor templates (rebased per call) or None; ``fused``: the one-pass kernel's step (:mod:`.bwd_fused`; same
    arguments as dK/dV's), None where none ships; ``ran`` which of the two ran (:func:`.launches.launched_variants`).
    """

    pre: tuple
    pad: Optional[KernelConfig]
    copies: bool
    steps: Tuple["_BackwardStep", "_BackwardStep"]
    fused: Optional["_BackwardStep"] = None
    ran: set = dataclasses.field(default_factory=set, compare=False)  # kernels run: True one-pass, False two-pass


class _BackwardStep(NamedTuple):
    args: tuple
    grid: tuple
    kw: dict
    descriptors: Optional[tuple]
