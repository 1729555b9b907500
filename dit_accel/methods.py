"""Method configurations: one validated, frozen dataclass per attention method.

A config holds only the method's own parameters. Everything that depends on the
model (token grid, text length, head count) is resolved when the config meets a
transformer in :func:`dit_accel.apply`. Invalid values raise ``ValueError`` at
construction, naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Tuple, Union

IntOrTuple = Union[int, Tuple[int, ...]]

__all__ = ["Method", "Dense", "GNA", "Tile", "Radial", "SLA", "method_from_name"]


def _fail(cls: str, name: str, value, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: {allowed}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(cls: str, name: str, value, *, minimum: int, ndim: int | None = None) -> tuple:
    items = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None or not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        _fail(cls, name, value, "expected an int or a tuple of ints, one per grid dimension")
    if ndim is not None and len(items) not in (1, ndim):
        _fail(cls, name, value, f"expected {ndim} values, one per grid dimension (T, H, W)")
    if len(items) > 3:
        _fail(cls, name, value, "at most 3 dimensions (T, H, W) are supported")
    if any(v < minimum for v in items):
        _fail(cls, name, value, f"every value must be >= {minimum}")
    return items if len(items) > 1 else items[0]


class Method:
    """Base class of method configs; ``name`` is the CLI spelling."""

    name: str = ""

    def to_dict(self) -> dict:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class Dense(Method):
    """Dense attention through dit_accel's path: a baseline and a no-op check."""

    name = "dense"


@dataclass(frozen=True)
class GNA(Method):
    """Generalized neighborhood attention (NATTEN semantics, see METHODS.md).

    Args:
        kernel_size: window size per grid dimension, ``>= 2`` (int or tuple).
        stride: query group size per dimension, ``1 <= stride <= kernel_size``.
        dilation: dilation per dimension, ``>= 1``.
        is_causal: causal along each dimension (bool or tuple of bools).
        tile: token tile used to make the window block-sparse. ``None`` picks a
            tile of 64 or 128 tokens that fits the grid.

    ``kernel_size * dilation`` must not exceed the grid extent; that is checked
    when the grid is known (before the first attention call).

    Example::

        dit_accel.apply(pipe, dit_accel.GNA(kernel_size=(9, 24, 24), stride=(1, 8, 8)))
    """

    kernel_size: IntOrTuple = 7
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: Union[bool, Tuple[bool, ...]] = False
    tile: IntOrTuple | None = None
    name = "gna"

    def __post_init__(self):
        ks = _as_tuple("GNA", "kernel_size", self.kernel_size, minimum=2)
        st = _as_tuple("GNA", "stride", self.stride, minimum=1)
        dl = _as_tuple("GNA", "dilation", self.dilation, minimum=1)
        causal = self.is_causal
        if isinstance(causal, list):
            causal = tuple(causal)
        if not (isinstance(causal, bool) or (
                isinstance(causal, tuple) and causal and all(isinstance(c, bool) for c in causal))):
            _fail("GNA", "is_causal", self.is_causal, "expected a bool or a tuple of bools, one per grid dimension")
        values = {"kernel_size": ks, "stride": st, "dilation": dl, "is_causal": causal}
        for name, value in values.items():
            object.__setattr__(self, name, value)
        lengths = {len(v) for v in values.values() if isinstance(v, tuple)}
        if len(lengths) > 1:
            given = {name: v for name, v in values.items() if isinstance(v, tuple)}
            raise ValueError(f"GNA per-dimension tuples must all have the same length; got {given}. "
                             "Use ints for settings shared by every dimension.")
        n = lengths.pop() if lengths else 1
        kt = ks if isinstance(ks, tuple) else (ks,) * n
        stt = st if isinstance(st, tuple) else (st,) * n
        if any(s > k for k, s in zip(kt, stt)):
            _fail("GNA", "stride", self.stride, f"stride must be <= kernel_size ({self.kernel_size}) in every dimension")
        if self.tile is not None:
            object.__setattr__(self, "tile", _as_tuple("GNA", "tile", self.tile, minimum=1))


@dataclass(frozen=True)
class Tile(Method):
    """Sliding tile attention (STA): windows counted in tiles.

    Args:
        tile: tokens per tile, per dimension (T, H, W) for video, (H, W) for images.
        window: window size in tiles per dimension, odd, ``>= 1``.

    Implemented as GNA with ``kernel_size = window * tile`` and ``stride = tile``.
    Extents that are not multiples of the tile are padded, never rejected.

    Example::

        dit_accel.apply(pipe, dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3)))
    """

    tile: IntOrTuple = (6, 8, 8)
    window: IntOrTuple = (3, 3, 3)
    name = "tile"

    def __post_init__(self):
        tile = _as_tuple("Tile", "tile", self.tile, minimum=1)
        window = _as_tuple("Tile", "window", self.window, minimum=1)
        tt = tile if isinstance(tile, tuple) else (tile,)
        wt = window if isinstance(window, tuple) else (window,)
        if len(tt) > 1 and len(wt) > 1 and len(tt) != len(wt):
            _fail("Tile", "window", self.window, f"must have as many dimensions as tile {self.tile}")
        if any(w % 2 == 0 for w in wt):
            _fail("Tile", "window", self.window, "window sizes are counted in tiles and must be odd (1, 3, 5, ...)")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "window", window)


@dataclass(frozen=True)
class Radial(Method):
    """Radial attention: dense on nearby frames, a spatial neighbourhood that halves with distance.

    Frame pairs follow the reference rule (METHODS.md): same, adjacent and sink
    key frames are dense; a farther pair is dropped by the power-of-two split
    rule or kept with a half-width ``half = max(decay * width, block_size)``
    tokens that halves each time the frame distance crosses a power of two.

    Args:
        decay: band width factor in ``(0, 1]`` (paper: 0.95 to 1.0).
        block_size: block granularity in tokens, 64 or 128 (128 default; 64 for Wan 2.2).
        sink_frames: key frames every query attends to fully (attention sink);
            ``(0,)`` is the reference setting for Wan, ``()`` disables it.
        spatial: what a kept far frame pair allows inside the frames.
            ``"band"`` (default): the reference code, a diagonal band ``|k - l| <= half``
            over raster positions, reduced to ``block_size`` blocks (raster order).
            ``"window"``: a true 2-D window, the frame scaled by ``sqrt((2*half + 1) / (H*W))``:
            ``kh = min(2*floor(H*sqrt(.)/2) + 1, H)`` rows by ``kw`` (same with ``W``)
            columns around the query, pushed inward at borders like GNA, so every
            query sees ``kh*kw ~ 2*half + 1`` keys (token density comparable to the
            band). Exact per token, on tiled order (tokens permuted like GNA / Tile);
            see :mod:`dit_accel.patterns.radial_window`.

    Example::

        dit_accel.apply(pipe, dit_accel.Radial(decay=0.95), dense_steps=12, dense_layers=1)
        dit_accel.apply(pipe, dit_accel.Radial(decay=0.95, spatial="window"), dense_steps=12, dense_layers=1)
    """

    decay: float = 1.0
    block_size: int = 128
    sink_frames: Tuple[int, ...] = (0,)
    spatial: str = "band"
    name = "radial"

    def __post_init__(self):
        if not _is_number(self.decay) or not 0.0 < float(self.decay) <= 1.0:
            _fail("Radial", "decay", self.decay, "must be a number in (0, 1]")
        if self.block_size not in (64, 128):
            _fail("Radial", "block_size", self.block_size, "must be 64 or 128")
        frames = tuple(self.sink_frames) if isinstance(self.sink_frames, (tuple, list)) else None
        if frames is None or not all(isinstance(f, int) and f >= 0 for f in frames):
            _fail("Radial", "sink_frames", self.sink_frames, "expected a tuple of non-negative frame indices")
        if self.spatial not in ("band", "window"):
            _fail("Radial", "spatial", self.spatial, "must be 'band' (reference raster band) or 'window' (2-D window)")
        object.__setattr__(self, "sink_frames", frames)
        object.__setattr__(self, "decay", float(self.decay))


@dataclass(frozen=True)
class SLA(Method):
    """Sparse-linear attention (SLA): top-k block-sparse softmax plus linear attention.

    Per query block, key blocks are ranked by pooled scores (K smoothed by its
    mean). The top ``topk`` fraction (at least one block) gets exact softmax
    attention; the bottom ``negligible`` fraction is skipped; the rest
    (marginal) goes through linear attention, projected by a zero-initialised
    trainable ``Linear(D, D)`` per layer and added to the sparse output.

    While ``proj`` is still zero (no fine-tuning), SLA is training-free top-k
    block-sparse attention. Fine-tune with ``dit-accel finetune --method sla``.

    Args:
        topk: fraction of key blocks kept for softmax attention, in ``(0, 1]``.
        negligible: fraction of key blocks skipped, in ``[0, 1 - topk]``.
        block_q: query block size, 64 or 128.
        block_k: key block size, 64.
        feature_map: ``"softmax"`` (over head dim), ``"elu"`` (elu+1) or ``"relu"``.
        linear_tokens: ``"marginal"`` (paper) or ``"all"`` (later reference code).
    """

    topk: float = 0.05
    negligible: float = 0.0
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    linear_tokens: str = "marginal"
    name = "sla"

    def __post_init__(self):
        if not _is_number(self.topk) or not 0.0 < float(self.topk) <= 1.0:
            _fail("SLA", "topk", self.topk, "must be a fraction in (0, 1]")
        if not _is_number(self.negligible) or not 0.0 <= float(self.negligible) <= 1.0 - float(self.topk):
            _fail("SLA", "negligible", self.negligible, f"must be in [0, 1 - topk] = [0, {1.0 - float(self.topk):g}]")
        if self.block_q not in (64, 128):
            _fail("SLA", "block_q", self.block_q, "must be 64 or 128")
        if self.block_k != 64:
            _fail("SLA", "block_k", self.block_k, "must be 64")
        if self.feature_map not in ("softmax", "elu", "relu"):
            _fail("SLA", "feature_map", self.feature_map, "must be 'softmax', 'elu' or 'relu'")
        if self.linear_tokens not in ("marginal", "all"):
            _fail("SLA", "linear_tokens", self.linear_tokens, "must be 'marginal' or 'all'")
        object.__setattr__(self, "topk", float(self.topk))
        object.__setattr__(self, "negligible", float(self.negligible))


_BY_NAME = {cls.name: cls for cls in (Dense, GNA, Tile, Radial, SLA)}


def method_from_name(name: str, **options) -> Method:
    """Build a method config from its CLI name (``dense``, ``gna``, ``tile``, ``radial``, ``sla``)."""
    try:
        cls = _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_BY_NAME)}") from None
    return cls(**options)
