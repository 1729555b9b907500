"""Method configurations and the method registry: the method is the unit of extension.

A method is one frozen dataclass, registered once with :func:`register_method`
(its CLI name, a one-line summary, whether ``dit-accel finetune`` can train it),
whose fields carry their CLI metadata (:func:`option`) and whose
:meth:`Method.plan` turns a token grid into a :class:`~dit_accel.plans.plan.Plan`
through its pattern. The CLI flags, ``dit-accel info`` and ``dit-accel finetune``
derive their tables from the registry; nothing else needs to know a method.

A config holds only the method's own parameters and checks the shape-free rules
when it is built (a bad value raises ``ValueError``/``TypeError`` naming the
field, the value and what is allowed); the rules that need the grid run once,
in the pattern, when the plan is built.

Example: a new method, complete::

    @dit_accel.register_method("frames", summary="each frame attends to itself and the previous one")
    @dataclasses.dataclass(frozen=True)
    class PreviousFrame(dit_accel.Method):
        reach: int = dit_accel.option(1, "frames back each query sees", parse="int")

        def plan(self, grid):
            layout = BlockLayout.from_dense_mask(my_mask(grid, self.reach))   # the pattern
            return LayoutPlan(self, grid, layout)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

from ._util import DitAccelWarning, check_registration
from .kernels.limits import GPU_LAYOUT_BLOCKS
from .kernels.sla.common import LINEAR_EPS, REFERENCE_LINEAR_EPS, ROUNDINGS
from .kernels.vsa.api import check_vsa_config
from .patterns.checks import (as_grid, check_options, check_search, flag, int_or_tuple, number_in, per_dim, per_head,
                              positive_int, share_beside)
from .patterns.config_helpers import freeze as _freeze, grid_shares, layer_step
from .patterns.gna import check_gna_args
from .patterns.radial import RADIAL_RULES, check_radial_args
from .patterns.tile import check_tile_args, check_tile_block, read_sta_strategy

__all__ = ["Method", "Dense", "GNA", "Tile", "TileStrategy", "Radial", "SLA", "VSA", "method_from_name", "register_method",
           "unregister_method", "registered_methods", "MethodEntry", "option", "CliOption"]

IntOrTuple = Union[int, Tuple[int, ...]]
_PARSERS = ("ints", "int", "float", "str", "flag", "int_list")


# ------------------------------------------------------------------ CLI metadata
@dataclass(frozen=True)
class CliOption:
    """How a config field appears on the command line (``--flag``), read by :mod:`dit_accel.cli.options`.

    ``parse``: ``"ints"`` (an int or a tuple like ``6,8,8``), ``"int"``, ``"float"``, ``"str"``
    (with ``choices``), ``"flag"`` (a switch that sets True) or ``"int_list"`` (``0,3`` or ``none``).
    Methods may share a flag (``--tile`` sets ``Tile.tile`` and ``GNA.tile``) when they parse it alike.
    """

    help: str
    parse: str = "ints"
    flag: Optional[str] = None
    metavar: Optional[str] = None
    choices: Optional[Tuple[Any, ...]] = None


def option(default, help: str, *, parse: str = "ints", flag: Optional[str] = None, metavar: Optional[str] = None,
           choices: Optional[Tuple[Any, ...]] = None):
    """A config field with CLI metadata: ``tile: IntOrTuple = option((6, 8, 8), "tokens per tile")``."""
    if parse not in _PARSERS:
        raise ValueError(f"parse={parse!r} is invalid: choose one of {_PARSERS}")
    meta = CliOption(help, parse, flag, metavar, tuple(choices) if choices is not None else None)
    return field(default=default, metadata={"cli": meta})


# ------------------------------------------------------------------ the registry
class Method:
    """Base class of method configs; subclasses are frozen dataclasses registered by :func:`register_method`."""

    name: ClassVar[str] = ""
    #: Keys :meth:`ran_dict` adds beside the fields (a record of what ran): a config built from a record takes them
    #: back, and :meth:`check_record` refuses one that no longer matches.
    RECORD_KEYS: ClassVar[Tuple[str, ...]] = ()
    #: The token grid rank every config of the method needs (Radial's and VSA's 3); None: any.
    NEEDS_DIMS: ClassVar[Optional[int]] = None

    def plan(self, grid: Tuple[int, ...]):
        """The :class:`~dit_accel.plans.plan.Plan` this method runs on ``grid`` (grid rules are checked here)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement plan(grid)")

    def at_density(self, grid: Tuple[int, ...], density: float, **search) -> "Method":
        """A config of this method whose visited density on ``grid`` is near ``density``, in (0, 1] (for like-for-like
        comparisons in ``bench fidelity``); a method whose rule fixes its density returns itself, and one for another
        grid rank refuses it. ``search``: the method's own search options (:meth:`Tile._at_density`'s ``tile``)."""
        density = number_in("density", density, 0.0, 1.0, owner=f"{type(self).__name__}.at_density: ", lo_open=True)
        check_search(self, search)
        grid = as_grid(grid)
        if self.NEEDS_DIMS is not None and len(grid) != self.NEEDS_DIMS:  # (a config no plan of the grid can run)
            raise ValueError(f"{type(self).__name__}.at_density: grid={grid} has {len(grid)} dimensions; {self.name} "
                             f"runs on {self.NEEDS_DIMS}-D (video) token grids: use tile, gna or sla on this grid")
        return self._at_density(grid, density, **search)

    def _at_density(self, grid: Tuple[int, ...], density: float) -> "Method":
        return self

    def for_shares(self, grid: Tuple[int, ...], shares: int) -> "Method":
        """The config to run when context parallelism gives each of ``shares`` ring ranks an equal slab of
        ``grid`` along its first axis: one whose blocks do not straddle ranks, where the method can choose
        (a default tile); the method itself otherwise. A bad ``grid`` or ``shares`` raises naming the argument."""
        return self._for_shares(*grid_shares(f"{type(self).__name__}.for_shares", grid, shares))

    def _for_shares(self, grid: Tuple[int, ...], shares: int) -> "Method":  # (grid and shares checked)
        return self

    def to_dict(self) -> dict:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def ran_dict(self) -> dict:
        """:meth:`to_dict` with every default that the config leaves open resolved to the value that runs: what a
        report prints and records (``to_dict`` keeps the open defaults, so saved configs layer under flags)."""
        return self.to_dict()

    def check_record(self, record: dict) -> None:
        """ValueError when ``record`` (a :meth:`ran_dict`'s :data:`RECORD_KEYS`) names a setting it does not run."""

    def replace(self, **changes) -> "Method":
        check_options(f"{type(self).__name__}.replace", type(self), changes)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its CLI name, class, one-line summary and whether it can be fine-tuned."""

    name: str
    cls: type
    summary: str
    finetunable: bool

    def cli_options(self) -> Dict[str, CliOption]:
        """``{field name: CliOption}`` of the fields that appear on the command line."""
        return {f.name: f.metadata["cli"] for f in dataclasses.fields(self.cls) if "cli" in f.metadata}


_REGISTRY: Dict[str, MethodEntry] = {}
# Names users know from the papers and other tools, for a registered method: STA is sliding tile attention
# (FastVideo, arXiv:2502.04507), which dit_accel calls `tile`.
METHOD_ALIASES: Dict[str, str] = {"sta": "tile"}


def canonical_method_name(name: str) -> str:
    """The registered name for ``name``: lower-cased, aliases resolved (``"STA"`` -> ``"tile"``); names
    that are neither registered nor aliases come back lower-cased, for the caller's own error."""
    name = name.strip().lower()
    return METHOD_ALIASES.get(name, name)


def register_method(name: str, *, summary: str, finetunable: bool = False):
    """Class decorator: register a :class:`Method` dataclass under the CLI name ``name``.

    Example::

        @register_method("tile", summary="sliding tile attention", finetunable=True)
        @dataclass(frozen=True)
        class Tile(Method): ...
    """
    check_registration(name, summary, finetunable, METHOD_ALIASES)

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)) or not \
                cls.__dataclass_params__.frozen:  # (configs key the plan caches: a mutable one is unhashable)
            raise TypeError(f"register_method({name!r}) decorates a frozen dataclass subclass of dit_accel.Method "
                            f"(@dataclasses.dataclass(frozen=True)); got {cls!r}")
        old = _REGISTRY[name].cls if name in _REGISTRY else cls  # (the same class again may register again)
        if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].cls.__name__}); "
                             "pick another name or unregister_method it first")
        cls.name = name
        _REGISTRY[name] = MethodEntry(name, cls, summary, bool(finetunable))
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a registered method (no error when absent)."""
    _REGISTRY.pop(name, None)


def registered_methods() -> Dict[str, MethodEntry]:
    """``{name: MethodEntry}`` of every registered method, in registration order."""
    return dict(_REGISTRY)


def method_from_name(name: str, **options) -> Method:
    """Build a method config from its registered name (``dense``, ``gna``, ``tile``, ``radial``, ``sla``, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a method name string such as 'tile'; got {type(name).__name__}. "
                        f"Registered: {sorted(_REGISTRY)}")
    entry = _REGISTRY.get(canonical_method_name(name))
    if entry is None:
        raise ValueError(f"name={name!r} is not a registered method; choose one of {sorted(_REGISTRY)} "
                         f"(aliases: {', '.join(f'{a} = {n}' for a, n in METHOD_ALIASES.items())})")
    check_options(f"method_from_name({entry.name!r})", entry.cls, options, entry.cls.RECORD_KEYS)
    record = {key: options.pop(key) for key in entry.cls.RECORD_KEYS if key in options}
    method = entry.cls(**options)
    method.check_record(record)  # (a record's ran_dict, fed back: its file must still hold what ran)
    return method


# ------------------------------------------------------------------ the built-in methods
@register_method("dense", summary="dense attention through dit_accel's path (baseline, no-op check)")
@dataclass(frozen=True)
class Dense(Method):
    """Dense attention through dit_accel's path: a baseline and a no-op check."""

    def plan(self, grid):
        from .plans.plan import DensePlan

        return DensePlan(self, grid, "Dense()")


@register_method("gna", finetunable=True,
                 summary="generalized neighborhood attention (NATTEN semantics: kernel, stride, dilation, causal)")
@dataclass(frozen=True)
class GNA(Method):
    """Generalized neighborhood attention (NATTEN semantics, see METHODS.md).

    Args:
        kernel_size: window size per grid dimension, ``>= 2`` (int or tuple).
        stride: query group size per dimension, ``1 <= stride <= kernel_size``.
        dilation: dilation per dimension, ``>= 1``.
        is_causal: causal along each dimension (bool or tuple of bools).
        tile: token tile used to make the window block-sparse. ``None`` picks a
            tile of 64 tokens that fits the grid.

    ``kernel_size * dilation`` must not exceed the grid extent; that is checked
    when the grid is known (before the first attention call). With ``fit=True`` (what
    :func:`dit_accel.pipelines.presets.recommended` and :meth:`at_density` return) a longer
    kernel is clamped to the extent instead, with a note: that dimension is then attended whole
    (a single latent frame included).

    Example::

        dit_accel.apply(pipe, dit_accel.GNA(kernel_size=(9, 24, 24), stride=(1, 8, 8)))
    """

    kernel_size: IntOrTuple = option(7, "gna: window size in tokens per dimension (>= 2)", metavar="T,H,W")
    stride: IntOrTuple = option(1, "gna: stride (1 <= stride <= kernel)", metavar="T,H,W")
    dilation: IntOrTuple = option(1, "gna: dilation (>= 1)", metavar="T,H,W")
    is_causal: Union[bool, Tuple[bool, ...]] = option(False, "gna: causal along every dimension", parse="flag",
                                                      flag="--causal")
    tile: Optional[IntOrTuple] = option(None, "gna: tile used to make the window block-sparse", metavar="T,H,W")
    fit: bool = option(False, "gna: clamp a kernel longer than the grid extent to it (with a note) instead of "
                              "refusing the grid", parse="flag", flag="--fit-grid")

    def __post_init__(self):
        fit = flag("GNA.", "fit", self.fit)
        ks, st, dl, ca = check_gna_args(self.kernel_size, self.stride, self.dilation, self.is_causal, owner="GNA.")
        tile = None if self.tile is None else int_or_tuple("GNA.", "tile", self.tile, minimum=1)
        kernels = per_head(ks) or (ks,)  # (per-head kernel sizes: one value per grid dimension in each)
        lengths = {len(v) for v in (*kernels, st, dl, ca, tile) if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(f"GNA.kernel_size={ks!r}, stride={st!r}, dilation={dl!r}, is_causal={ca!r}, tile={tile!r}"
                             ": these have different numbers of dimensions; give one value per grid dimension")
        _freeze(self, kernel_size=ks, stride=st, dilation=dl, is_causal=ca, tile=tile, fit=fit)

    @property
    def heads(self) -> Optional[int]:
        """Number of per-head kernel sizes, or None when every head shares one."""
        kernels = per_head(self.kernel_size)
        return None if kernels is None else len(kernels)

    def plan(self, grid):
        from .patterns.checks import per_dim
        from .patterns.gna import gna_relations, heads_layout
        from .patterns.separable import covers_grid
        from .plans.plan import DensePlan, LayoutPlan, separable_plan

        kernels = per_head(self.kernel_size)
        if self.fit and kernels is None:
            fitted = self._fitted_relations(grid)
            if fitted is not None:
                grid, rels = fitted
                tile = None if self.tile is None else per_dim("tile", self.tile, len(grid), owner="GNA.")
                return separable_plan(self, grid, rels, tile, "window")
        if kernels is None:
            grid, rels = gna_relations(grid, self.kernel_size, self.stride, self.dilation, self.is_causal,
                                       compact=True)  # (Bands: no L x L relation on a long 1-D grid)
            tile = None if self.tile is None else per_dim("tile", self.tile, len(grid), owner="GNA.")
            return separable_plan(self, grid, rels, tile, "window", attach=self._natten)
        # Per-head kernel sizes: one per-head block layout, run by the kernels in one launch (fit=True: clamped).
        fitted = [self._fitted_relations(grid, k) if self.fit else None for k in kernels]
        per = [f or gna_relations(grid, k, self.stride, self.dilation, self.is_causal) for f, k in zip(fitted, kernels)]
        grid = per[0][0]
        if all(covers_grid(rels) for _, rels in per):
            return DensePlan(self, grid, f"every head's window covers the whole grid {tuple(grid)}; smaller "
                                         "kernel sizes make it sparse")
        tile = None if self.tile is None else per_dim("tile", self.tile, len(grid), owner="GNA.")
        perm, layout = heads_layout(grid, kernels, [rels for _, rels in per], tile)
        token_density = sum(math.prod(float(r.float().mean()) for r in rels) for _, rels in per) / len(per)
        return LayoutPlan(self, grid, layout, perm, token_density=token_density, wide_q=True)

    def _natten(self, layout, perm) -> None:
        """Record this GNA's window on ``layout`` for the NATTEN backend (a reason where NATTEN cannot run it)."""
        from .kernels.block_sparse.backends.natten import attach_gna

        attach_gna(layout, perm, self.kernel_size, self.stride, self.dilation, self.is_causal)

    def _fitted_relations(self, grid, kernel_size=None):
        """``(grid, relations)`` with every kernel longer than its extent clamped to it (noted once per plan), or
        None when the kernel fits as it is. ``kernel_size``: one head's (per-head kernel sizes), else the config's."""
        from .patterns.gna import fitted_relations

        given = self.kernel_size if kernel_size is None else kernel_size
        fitted = fitted_relations(grid, given, self.stride, self.dilation, self.is_causal)
        if fitted is None:
            return None
        grid, rels, ks, over = fitted
        head = "" if kernel_size is None else f" (a head's kernel_size {kernel_size!r})"
        warnings.warn(f"dit_accel: {self!r} on grid {grid}: kernel_size{head} exceeds the grid extent along "
                      f"dimension(s) {over}; clamped to {ks} (those dimensions are attended whole)", DitAccelWarning,
                      stacklevel=4)
        return grid, rels

    def _for_shares(self, grid, shares):
        # The default tile is the most cube-like one, which may span the frames of several ranks: pick the
        # tile for one rank's slab instead, so tiles (and their blocks) stay whole on every rank.
        if self.tile is not None or shares <= 1 or grid[0] % shares:
            return self
        from .patterns.permutation import pick_tile

        return self.replace(tile=pick_tile((grid[0] // shares,) + tuple(grid[1:]), (64,)))

    def _at_density(self, grid, density):
        from .patterns.gna import kernels_at_density

        def config(ks):  # stride 1; an extent-1 dimension (one latent frame) takes kernel 2, clamped by fit=True
            return self.replace(kernel_size=ks, stride=1, fit=True)

        with warnings.catch_warnings():  # the clamping notes of candidates on a one-frame grid
            warnings.simplefilter("ignore", DitAccelWarning)
            return config(kernels_at_density(grid, density, lambda ks: config(ks).plan(grid).density))


@register_method("tile", finetunable=True,
                 summary="sliding tile attention (STA): window of tiles, implemented as GNA with stride = tile")
@dataclass(frozen=True)
class Tile(Method):
    """Sliding tile attention (STA): windows counted in tiles.

    Args:
        tile: tokens per tile, per dimension (T, H, W) for video, (H, W) for images.
        window: window size in tiles per dimension, ``>= 1``. An even window ``w``
            covers the same tiles as ``w + 1`` (FastVideo's convention: its searched
            strategies use even sizes). A tuple of windows, one per attention head
            (``((3, 3, 3), (1, 6, 10), ...)``), gives every head its own window; the
            heads run as one per-head block layout in one kernel launch, and the
            number of windows must equal the model's head count.

    Implemented as GNA with ``kernel_size = window * tile`` and ``stride = tile``.
    Extents that are not multiples of the tile are padded, never rejected.
    FastVideo's searched windows per (step, layer, head): :meth:`from_strategy`.

    Example::

        dit_accel.apply(pipe, dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3)))
    """

    tile: IntOrTuple = option((6, 8, 8), "tile: tokens per tile", metavar="T,H,W")
    window: IntOrTuple = option((3, 3, 3), "tile: window in tiles per dimension (e.g. 3,3,3; even w covers w+1)",
                                metavar="T,H,W")
    block_size: Optional[int] = option(None, "tile: kernel block in tokens, a box inside the tile (default 64)",
                                       parse="int")
    fit: bool = option(False, "tile: at plan time, a tile that divides the call's grid (packed blocks, no "
                              "element masks) with the window nearest this setting's density", parse="flag",
                       flag="--fit-grid")

    def __post_init__(self):
        fit = flag("Tile.", "fit", self.fit)
        tile, window = check_tile_args(self.tile, self.window, owner="Tile.")
        block = None if self.block_size is None else positive_int("block_size", self.block_size, owner="Tile.")
        if fit and per_head(window) is not None:  # (fit re-tiles one window; it was ignored here, unsaid)
            raise ValueError(f"Tile.fit=True is invalid with per-head windows {window!r}: fit picks one tile and window "
                             "for the grid, and per-head windows keep their tile; pass fit=False (or one window)")
        if fit and block is not None:  # (likewise: an explicit block keeps the tile given)
            raise ValueError(f"Tile.fit=True is invalid with block_size={block}: fit picks a tile packed into 64-token "
                             "blocks, and an explicit block_size keeps the tile given; pass one of them")
        if block is not None and isinstance(tile, tuple):  # (else refused at the first sparse call, deep in a run)
            from .patterns.tile import check_tile_block

            check_tile_block((1,) * len(tile), tile, block)
        _freeze(self, tile=tile, window=window, block_size=block, fit=fit)

    def to_dict(self) -> dict:  # without the defaults: plans written before the fields existed read the same
        return {k: v for k, v in super().to_dict().items() if k not in ("block_size", "fit") or v not in (None, False)}

    @classmethod
    def from_strategy(cls, path, *, tile=(6, 8, 8)) -> "TileStrategy":
        """FastVideo's searched STA windows per (step, layer, head), read from its mask-strategy JSON.

        Returns a :class:`TileStrategy`: at denoising step ``s`` layer ``l`` runs
        ``Tile(tile, window=<the file's windows of (s, l), one per head>)``.

        Example::

            dit_accel.apply(pipe, dit_accel.Tile.from_strategy("mask_strategy_hunyuan.json"))
        """
        return TileStrategy(path=path, tile=tile)  # (which checks the path)

    @property
    def heads(self) -> Optional[int]:
        """Number of per-head windows, or None when every head shares one window."""
        windows = per_head(self.window)
        return None if windows is None else len(windows)

    def plan(self, grid):
        from .patterns.tile import KERNEL_PACKED_WORK, packed_work, tile_covers_grid, tile_layout, tile_token_density
        from .plans.plan import DensePlan, LayoutPlan

        if tile_covers_grid(grid, self.tile, self.window):
            return DensePlan(self, tuple(grid), f"the window covers the whole grid {tuple(grid)}; a smaller window "
                                                "(or tile) makes it sparse")
        fitted = self.fitted(grid)
        if fitted is not None:  # in packed tile order: every block full or a key tile's ragged last block
            runs = self.replace(tile=fitted[0], window=fitted[1], fit=False)
            return runs.plan(grid) if tile_covers_grid(grid, *fitted) else runs._packed_plan(grid, *fitted)
        # Tiled by the STA tile when it holds whole 64-token blocks; else by a default tile. An explicit block_size
        # must be a box inside the STA tile, so that every block is one whole piece of a tile (no element masks): a
        # frame of 12 x 12 tokens runs as blocks of 144 (or 48), which only the PyTorch backend takes.
        if self.block_size is not None:
            check_tile_block(grid, self.tile, self.block_size)
        block = self.block_size or 64
        perm, layout = tile_layout(grid, self.tile, self.window, block_q=block, block_k=block)
        from .kernels.block_sparse.backends.natten import attach_tile

        attach_tile(layout, perm, self.tile, self.window)  # NATTEN's equivalent GNA window, or why there is none
        # Blocks no kernel takes (a 144-token frame): kernels run the same pattern (STA visits whole tiles) in 64-token
        # blocks over packed tiles, built on first use; auto on CUDA where that pads by at most KERNEL_PACKED_WORK.
        packed = (functools.partial(self._packed_plan, tuple(grid), self.tile, self.window)
                  if block not in GPU_LAYOUT_BLOCKS and per_head(self.window) is None else None)
        tile_tokens = math.prod(per_dim("tile", self.tile, len(grid), owner="Tile."))  # (a tile=4 failed here)
        return LayoutPlan(self, perm.grid, layout, perm, token_density=tile_token_density(grid, self.tile, self.window),
                          wide_q=True, kernel_plan=packed,
                          kernel_plan_auto=packed_work(tile_tokens) <= KERNEL_PACKED_WORK)

    def _packed_plan(self, grid, tile, window):
        """The plan of ``tile`` and ``window`` on ``grid`` in packed tile order (64-token blocks, every block full
        or a key tile's ragged last block), run as this Tile."""
        from .patterns.tile import packed_tile_layout, tile_token_density
        from .plans.plan import LayoutPlan

        perm, layout = packed_tile_layout(grid, tile, window)
        return LayoutPlan(self, perm.grid, layout, perm, token_density=tile_token_density(grid, tile, window),
                          wide_q=True)

    def fitted(self, grid) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        """``(tile, window)`` that ``fit=True`` runs on ``grid`` (:func:`~dit_accel.patterns.tile.fit_tile`), or None
        where the setting runs as given: no ``fit``, an explicit ``block_size``, a window over the whole grid, or a
        tile that already divides the grid into whole blocks. :meth:`plan` and ``dit-accel info`` both read it."""
        from .patterns.tile import fit_tile, tile_covers_grid

        if not self.fit or self.block_size is not None or per_head(self.window) is not None \
                or tile_covers_grid(grid, self.tile, self.window):
            return None
        tile, window = fit_tile(grid, self.tile, self.window)
        return None if tile == per_dim("tile", self.tile, len(tile)) else (tile, window)  # (tile=5 kept as (5, 5))

    def _at_density(self, grid, density, *, tile=None):
        """The Tile whose window visits the block density nearest ``density`` on ``grid``.

        ``tile``: the STA tile to search windows for; default a 64-token tile (one query block per tile).
        A 128-token tile such as (1, 16, 8) lets CUDA calls run 128-row query blocks
        (:meth:`dit_accel.plans.plan.LayoutPlan.kernel_layout`), at a coarser window.
        """
        from .patterns.checks import per_dim
        from .patterns.permutation import default_tile
        from .patterns.tile import window_at_density

        grid = tuple(grid)
        tile = default_tile(grid, 64) if tile is None else per_dim("tile", tile, len(grid), owner="Tile.at_density: ")
        return Tile(tile=tile, window=window_at_density(grid, tile, density))


@register_method("tile_strategy",
                 summary="sliding tile attention with FastVideo's searched windows per (step, layer, head), read from "
                         "its STA mask-strategy JSON (Tile.from_strategy)")
@dataclass(frozen=True)
class TileStrategy(Method):
    """Sliding tile attention whose windows change per denoising step, layer and head (FastVideo's STA search).

    The file maps ``"step_layer_head"`` to a window ``[wt, wh, ww]`` in tiles (even sizes
    cover ``w + 1`` tiles, as in FastVideo). The step is the denoising step index (both
    classifier-free-guidance calls of a step share it), the layer the attention-layer index
    in model order (HunyuanVideo: double-stream blocks, then single-stream blocks, as
    FastVideo numbers them). At step ``s``, layer ``l`` runs ``Tile(tile, window=<its
    windows, one per head>)``; a (step, layer) the file does not list runs dense.
    Build it with :meth:`Tile.from_strategy`.

    Args:
        path: the strategy JSON (read and checked when the config is built).
        tile: tokens per tile, FastVideo's (6, 8, 8) by default.

    Example::

        strategy = dit_accel.Tile.from_strategy("mask_strategy_hunyuan.json")
        dit_accel.apply(pipe, strategy)      # no dense_steps: the file's early steps are full windows
    """

    path: str = option("", "tile_strategy: FastVideo STA mask-strategy JSON (\"step_layer_head\" -> [wt, wh, ww])",
                       parse="str", flag="--strategy", metavar="FILE")
    tile: IntOrTuple = option((6, 8, 8), "tile_strategy: tokens per tile (FastVideo: 6,8,8)", metavar="T,H,W")

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"TileStrategy.path={self.path!r} is invalid: pass the FastVideo STA mask-strategy JSON "
                             "file, e.g. Tile.from_strategy('mask_strategy_hunyuan.json')")
        path = os.fspath(self.path)
        table = read_sta_strategy(path)
        some = next(iter(table.values()))
        try:
            tile, _ = check_tile_args(self.tile, some, owner="TileStrategy.")
        except ValueError as err:  # (windows of another rank than the tile: name the file they came from)
            raise ValueError(f"{path!r}: {err}") from None
        _freeze(self, path=path, tile=tile)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_sha256", hashlib.sha256(repr(sorted(table.items())).encode()).hexdigest())
        object.__setattr__(self, "_tiles", {})  # (step, layer) -> Tile, made on first use

    RECORD_KEYS: ClassVar[Tuple[str, ...]] = ("windows_sha256",)

    def ran_dict(self) -> dict:  # the windows that ran, by hash: the path alone names what the file holds later
        return {**self.to_dict(), "windows_sha256": self._sha256}

    def check_record(self, record: dict) -> None:
        recorded = record.get("windows_sha256")
        if recorded is not None and recorded != self._sha256:
            raise ValueError(f"windows_sha256={str(recorded)[:12]}... names other windows than {self.path!r} holds "
                             f"now ({self._sha256[:12]}...): the strategy file changed since the record was made; "
                             "pass the file that ran, or drop windows_sha256 to run the file as it is")

    @property
    def heads(self) -> int:
        """Heads per layer in the strategy (the model's head count must match)."""
        return len(next(iter(self._table.values())))

    @property
    def steps(self) -> Tuple[int, ...]:
        """The denoising steps the strategy lists."""
        return tuple(sorted({step for step, _ in self._table}))

    def for_layer_step(self, layer: int, step: int) -> Optional[Tile]:
        """The :class:`Tile` (per-head windows) that ``layer`` runs at ``step``; None (dense) when not listed."""
        layer, step = layer_step("TileStrategy.for_layer_step", layer, step)
        key = (step, layer)
        tile = self._tiles.get(key)
        if tile is None and key in self._table:
            made = Tile(tile=self.tile, window=self._table[key])
            object.__setattr__(made, "_source", self.path)  # errors about its windows name the file
            tile = self._tiles.setdefault(key, made)
        return tile

    def plan(self, grid):
        raise ValueError("TileStrategy has one plan per (layer, step): use strategy.for_layer_step(layer, step)"
                         ".plan(grid); dit_accel.apply resolves it for every call")


@register_method("radial", finetunable=True,
                 summary="radial attention: dense near frames, band halving with temporal distance (video only)")
@dataclass(frozen=True)
class Radial(Method):
    """Radial attention: dense on nearby frames, a spatial neighbourhood that halves with distance.

    Frame pairs follow the reference rule (METHODS.md): same, adjacent and sink key frames are dense; a farther
    pair is dropped by the power-of-two split rule or kept with a half-width ``half = max(decay * width,
    block_size)`` tokens that halves each time the frame distance crosses a power of two.

    Args:
        decay: band width factor in ``(0, 1]`` (paper: 0.95 to 1.0).
        block_size: block granularity in tokens, 64 or 128 (128 default; 64 for Wan 2.2).
        sink_frames: key frames every query attends to fully (attention sink), each listed once; ``(0,)`` is
            the reference setting for Wan, ``()`` disables it. A frame the clip does not have is refused.
        spatial: what a kept far frame pair allows inside the frames. ``"band"`` (default): the reference code,
            a diagonal band ``|k - l| <= half`` over raster positions, reduced to ``block_size`` blocks (raster
            order). ``"window"``: a true 2-D window, the frame scaled by ``sqrt((2*half + 1) / (H*W))``, pushed
            inward at borders like GNA, so every query sees ``~2*half + 1`` keys; exact per token, on tiled order
            (see :mod:`dit_accel.patterns.radial_window`).
        rule: how the band becomes blocks (``spatial="band"`` only). ``"union"`` (default): METHODS.md's rule on
            the placed bands. ``"reference"``: the reference code's blocks exactly (per-frame-pair reduction, a
            fixed 128 in the frame-drop test), for its published numbers; the presets that quote the reference
            use it.

    Example::

        dit_accel.apply(pipe, dit_accel.Radial(decay=0.95), dense_steps=12, dense_layers=1)
    """

    decay: float = option(1.0, "radial: band decay in (0, 1] (paper: 0.95)", parse="float")
    block_size: int = option(128, "radial: block granularity; sla: query block size", parse="int",
                             choices=(64, 128))
    sink_frames: Tuple[int, ...] = option((0,), "radial: key frames every query attends to (default 0; 'none' "
                                                "disables)", parse="int_list", metavar="F,...")
    spatial: str = option("band", "radial: far frame pairs keep the reference raster band (band) or a 2-D window "
                                  "of rows x columns on tiled order (window)", parse="str", flag="--radial-spatial",
                          choices=("band", "window"))
    NEEDS_DIMS: ClassVar[int] = 3  # a video's (T, H, W) grid: a rule over frames
    rule: str = option("union", "radial: block rule: union (METHODS.md) or reference (the reference code's blocks "
                                "exactly, for its published numbers)", parse="str", flag="--radial-rule",
                       choices=RADIAL_RULES)

    def __post_init__(self):
        block, decay, sinks = check_radial_args(self.block_size, self.decay, self.sink_frames, owner="Radial.",
                                                block_sizes=(64, 128))
        if self.spatial not in ("band", "window"):
            raise ValueError(f"Radial.spatial={self.spatial!r} is invalid: must be 'band' (reference raster band) "
                             "or 'window' (2-D window)")
        if self.rule not in RADIAL_RULES:
            raise ValueError(f"Radial.rule={self.rule!r} is invalid: must be 'union' (METHODS.md) or 'reference' "
                             "(the reference code's blocks)")
        if self.rule == "reference" and self.spatial != "band":
            raise ValueError("Radial.rule='reference' reproduces the reference code's raster band; it needs "
                             "spatial='band' (the 2-D window variant has no reference)")
        _freeze(self, block_size=block, decay=decay, sink_frames=sinks)

    def plan(self, grid):
        from .patterns.radial import radial_layout
        from .patterns.radial_window import radial_window_layout
        from .plans.plan import DensePlan, LayoutPlan, plan_grid

        grid = plan_grid(self, grid)  # (an int or None failed in tuple(grid), unnamed)
        if len(grid) != 3:
            raise ValueError(f"Radial attention needs a video token grid (T, H, W); this model has grid {grid}. "
                             "Use GNA or Tile for image models")
        sinks = self.sink_frames  # a sink frame the video does not have is an error (radial_args), not dropped
        perm, layout = (radial_window_layout(grid, self.block_size, self.decay, sinks) if self.spatial == "window"
                        else (None, radial_layout(grid, self.block_size, self.decay, sinks, rule=self.rule)))
        if layout.density() == 1.0 and layout.partial_fraction() == 0.0 and (
                perm is None or perm.num_padded == perm.num_tokens):
            return DensePlan(self, grid, f"radial attention keeps every block on grid {grid} (at most 2 frames, "
                                         "or frames smaller than a block)")
        return LayoutPlan(self, grid, layout, perm)


@register_method("sla", finetunable=True,
                 summary="sparse-linear attention: top-k block softmax + linear branch with a trainable projection; "
                         "with the projection at zero (no fine-tuning) it is training-free top-k block-sparse "
                         "attention")
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
    Checkpoints trained with the reference code (thu-ml/SLA, TurboDiffusion) need
    :meth:`reference`.

    Args:
        topk: fraction of key blocks kept for softmax attention, in ``(0, 1]``.
        negligible: fraction of key blocks skipped, in ``[0, 1 - topk]``.
        block_q: query block size, 64 or 128.
        block_k: key block size, 64, or 128 (TurboDiffusion's SageSLA on sm_90; the fused
            Triton kernel has 64-key blocks, so 128 runs on the PyTorch twin).
        feature_map: ``"softmax"`` (over head dim), ``"elu"`` (elu+1) or ``"relu"``.
        linear_tokens: ``"marginal"`` (paper) or ``"all"`` (later reference code).
        rounding: critical blocks per query block out of ``K``: ``"ceil"`` (``ceil(topk*K)``)
            or ``"floor"`` (the reference's ``int(topk*K)``); at least one block either way
            (the reference yields NaN outputs at zero blocks).
        linear_eps: added to the linear branch's denominator (reference code: 1e-5).
    """

    topk: float = option(0.05, "sla: fraction of key blocks kept for softmax (0, 1]", parse="float")
    negligible: float = option(0.0, "sla: fraction of key blocks skipped [0, 1-topk]", parse="float")
    block_q: int = option(64, "radial: block granularity; sla: query block size", parse="int", flag="--block-size",
                          choices=(64, 128))
    block_k: int = option(64, "sla: key block size (128: TurboDiffusion's SageSLA on sm_90, runs on the PyTorch "
                              "twin)", parse="int", choices=(64, 128))
    feature_map: str = option("softmax", "sla: linear-branch feature map", parse="str",
                              choices=("softmax", "elu", "relu"))
    linear_tokens: str = option("marginal", "sla: tokens of the linear branch (marginal = paper, all = later "
                                            "reference code)", parse="str", choices=("marginal", "all"))
    rounding: str = option("ceil", "sla: critical blocks per query block: ceil(topk*K) or floor = the reference's "
                                   "int(topk*K); at least 1 either way", parse="str", choices=ROUNDINGS)
    linear_eps: float = option(LINEAR_EPS, "sla: epsilon of the linear branch's denominator (reference: 1e-5)",
                               parse="float")

    def __post_init__(self):
        topk = number_in("topk", self.topk, 0.0, 1.0, owner="SLA.", lo_open=True)
        negligible = share_beside("negligible", self.negligible, topk, owner="SLA.")  # (topk + negligible <= 1)
        block_q = positive_int("block_q", self.block_q, owner="SLA.", allowed=(64, 128))
        block_k = positive_int("block_k", self.block_k, owner="SLA.", allowed=(64, 128))
        linear_eps = number_in("linear_eps", self.linear_eps, 0.0, 1.0, owner="SLA.", lo_open=True)
        for name, allowed in (("feature_map", ("softmax", "elu", "relu")), ("linear_tokens", ("marginal", "all")),
                              ("rounding", ROUNDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SLA.{name}={getattr(self, name)!r} is invalid: must be one of "
                                 f"{', '.join(map(repr, allowed))}")
        _freeze(self, topk=topk, negligible=negligible, block_q=block_q, block_k=block_k, linear_eps=linear_eps)

    @classmethod
    def reference(cls, topk: float, *, block_q: int = 64, block_k: int = 64, feature_map: str = "softmax") -> "SLA":
        """SLA exactly as the reference code computes it (thu-ml/SLA, and TurboDiffusion, which vendors it).

        Linear attention over all tokens, ``int(topk * K)`` critical blocks (at least one),
        epsilon 1e-5, no negligible class. Use it for checkpoints trained with that code.
        Block sizes: 64 x 64 in thu-ml/SLA and TurboDiffusion's training; TurboDiffusion's
        ``sla`` inference uses ``block_q=128``, its SageSLA ``block_k=128`` on sm_90.

        Example::

            dit_accel.apply(pipe, dit_accel.SLA.reference(topk=0.1), weights="converted/")
        """
        return cls(topk=topk, block_q=block_q, block_k=block_k, feature_map=feature_map, linear_tokens="all",
                   rounding="floor", linear_eps=REFERENCE_LINEAR_EPS)

    def plan(self, grid):
        from .kernels import SLAParams
        from .plans.plan import SLAPlan

        return SLAPlan(self, grid, SLAParams.of(self))  # (Plan checks the grid: tuple(None) failed unnamed)

    def _at_density(self, grid, density):
        return self.replace(topk=min(max(density, 1e-6), 1.0), negligible=min(self.negligible, 1.0 - density))


@register_method("vsa", finetunable=True,
                 summary="video sparse attention (FastVideo's VSA): coarse attention between cube means picks the "
                         "top-k key cubes per query cube, exact attention over them; out = coarse * gate + fine, with "
                         "the checkpoint's to_gate_compress gate where there is one (FastWan), else the fine branch "
                         "alone")
@dataclass(frozen=True)
class VSA(Method):
    """Video sparse attention (FastVideo's VSA, METHODS.md "VSA"): dynamic, selected from pooled scores.

    The video token grid is cut into cubes of ``tile`` tokens (edge cubes hold only their real tokens).
    Coarse softmax attention between cube means scores the key cubes; each query cube keeps its top-k (an
    exact tie to the lower cube index) and attends exactly to their real tokens (the fine branch). The output is
    ``coarse * gate + fine``: the gate is the checkpoint's per-token ``to_gate_compress`` projection
    (FastWan and other sparse-distilled checkpoints, found by :func:`dit_accel.apply` in the folder the
    transformer was loaded from or at ``weights=``); without one it is zero and VSA is training-free top-k
    cube-sparse attention. Differs from :class:`Tile` (a fixed window of tiles) by choosing the key cubes per
    call from the data, and from :class:`SLA` by its cube blocks, its exact cube means over real tokens (no
    smoothing of K), its gated coarse branch instead of a linear one, and its top-k count.

    Args:
        topk: key cubes kept per query cube (an int >= 1, clamped to the cube count). Or
        sparsity: fraction of key cubes skipped, in [0, 1): ``k = ceil((1 - sparsity) * cubes)``, at least 1.
            Give at most one; with neither, ``sparsity=0.8`` (FastWan's inference setting).
        tile: cube shape ``(T, H, W)`` in tokens: ``(4, 4, 4)`` (FastVideo's default) or ``(4, 8, 8)``.

    Joint text+video models: text keys are always attended (exactly, merged by log-sum-exp with the fine
    branch) and text queries are dense (FastVideo's design for packed prefixes).

    Example::

        dit_accel.apply(pipe, dit_accel.VSA(sparsity=0.8))          # FastWan: gates load from the checkpoint
    """

    topk: Optional[int] = option(None, "vsa: key cubes kept per query cube (>= 1); or --vsa-sparsity", parse="int",
                                 flag="--vsa-topk")
    sparsity: Optional[float] = option(None, "vsa: fraction of key cubes skipped in [0, 1) (default 0.8 when "
                                             "--vsa-topk is not given)", parse="float", flag="--vsa-sparsity")
    tile: IntOrTuple = option((4, 4, 4), "vsa: cube shape in tokens (4,4,4 or 4,8,8)", metavar="T,H,W")

    DEFAULT_SPARSITY: ClassVar[float] = 0.8
    NEEDS_DIMS: ClassVar[int] = 3  # a video's (T, H, W) grid: cubes span frames

    def __post_init__(self):
        # Neither given stays None in the config (so CLI defaults layered under a --vsa-topk do not clash) and
        # means DEFAULT_SPARSITY (effective_sparsity).
        topk, sparsity, tile = check_vsa_config(self.topk, self.effective_sparsity, self.tile, owner="VSA.")
        _freeze(self, topk=topk, sparsity=None if self.sparsity is None else sparsity, tile=tile)

    def ran_dict(self) -> dict:
        return {**self.to_dict(), "sparsity": self.effective_sparsity}  # neither given: DEFAULT_SPARSITY, not None

    @property
    def effective_sparsity(self) -> Optional[float]:
        """The sparsity the plan runs: ``sparsity``, or ``DEFAULT_SPARSITY`` when neither it nor ``topk`` is given."""
        return self.DEFAULT_SPARSITY if self.topk is None and self.sparsity is None else self.sparsity

    def plan(self, grid):
        from .plans import plan as plans, vsa

        return vsa.VSAPlan(self, plans.plan_grid(self, grid))  # (tuple(None) failed unnamed in VSAPlan)

    def _at_density(self, grid, density):
        return self.replace(topk=None, sparsity=min(max(1.0 - float(density), 0.0), 0.999))
