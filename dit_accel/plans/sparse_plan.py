"""``SparsePlan``: which method config runs per denoising-step range, attention layer and head.

A plan is a schedule, not a method: a list of step phases, each mapping attention layers to a
method config (one for the whole layer, or a :class:`~dit_accel.plans.per_head.PerHead` config with one
per head), with every unlisted layer running the phase's ``default`` (dense unless said). Dense
warm-up steps are a phase whose default is ``Dense()``; dense layers are entries like any other.
``dit_accel.apply(pipe, plan)`` runs it; ``dit-accel calibrate`` writes one; FastVideo's STA
strategy files are one way to build one (:meth:`SparsePlan.from_tile_strategy`) and a plan of
Tile windows only exports back to that format (:meth:`SparsePlan.to_tile_strategy`).

The JSON form (``plan.save(path)`` / ``SparsePlan.load(path)``)::

    {"format": "dit_accel.sparse_plan", "format_version": 1, "num_layers": 4, "num_heads": 12,
     "phases": [{"steps": [0, 2], "default": {"method": "dense"}, "layers": {}},
                {"steps": [2, null], "default": {"method": "dense"},
                 "layers": {"1": {"method": "tile", "tile": [4, 4, 4], "window": [1, 1, 3]},
                            "2": {"method": "per_head", "heads": [{"method": "sla", "topk": 0.3, ...}, ...]}}}],
     "provenance": {"model_class": ..., "model_id": ..., "grids": [[4, 12, 12]], "prompts_sha256": ...,
                    "budget": {...}, "objective": ..., "versions": {...}, "date": ...}}

Steps count denoising steps from 0 (both classifier-free-guidance calls of a step share it);
``null`` as a phase's end means "to the last step". Layers count the wrapped attention layers in
model order, as everywhere in dit_accel.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._util import file_in_the_way, is_int, to_jsonable, versions
from ..methods import Dense, Method, Tile, TileStrategy
from ..patterns.config_helpers import layer_step
from .per_head import PerHead

from .plan_json import (_CALL_COUNTS, _PHASE_FIELDS, _PLAN_FIELDS, FORMAT, FORMAT_VERSION,  # noqa: F401
                               _Fields, _method_entry, _provenance, _show, _tuples, method_from_json,
                               method_to_json, prompts_hash, repeated_key, with_comma_hint, without_stale_quality,
                               write_atomic)
from .plan_text import (_CostBasis, _gaps, _grid_text, _heads_text, _span, method_label, own_heads,  # noqa: F401
                        plan_profile)

__all__ = ["SparsePlan", "Phase", "PlanMethod", "method_to_json", "method_from_json", "method_label", "prompts_hash",
           "write_atomic", "file_to_write", "FORMAT"]


# ------------------------------------------------------------------ where a plan is written
def file_to_write(path, what: str, example: str) -> Path:
    """``path`` as the file :meth:`SparsePlan.save` (or ``to_tile_strategy``, or ``calibrate --out``) writes; a
    ValueError that names it when it is a folder (an existing one, or a name ending in a separator) or lies under a
    file, raised before anything is written (``os.replace`` onto a folder would say only ``IsADirectoryError`` of a temp name)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or pathlib.Path); got {type(path).__name__}")
    text = str(os.fspath(path))
    if not text.strip():
        raise ValueError(f"path={text!r} is empty; pass {what} file name, e.g. {example}")
    file = Path(text).expanduser()  # (before: "~/plan.json" was written to a folder named "~" in the working one)
    if file.is_dir() or text.endswith(("/", os.sep)):
        raise ValueError(f"path={text!r} is a folder; pass {what} file name, e.g. {file / example}")
    folder = file_in_the_way(file.parent)
    if folder is not None:
        raise ValueError(f"path={text!r}: {folder} is a file, not a folder; pass {what} file name in a folder, "
                         f"e.g. {folder.parent / example}")
    return file


# ------------------------------------------------------------------ reading a phase
def _phase(r: _Fields, where: str, data, num_layers: Optional[int], num_heads: Optional[int]) -> "Phase":
    r.obj(where, data, 'a phase: {"steps": [start, stop or null], "default": {...}, "layers": {"0": {...}}}')
    r.known(where, data, _PHASE_FIELDS, "a phase")
    steps = data.get("steps")
    if not (isinstance(steps, list) and len(steps) == 2):
        r.fail(f"{where}.steps", f"must be [start, stop or null] (steps start..stop-1; null: to the last step); "
                                 f"got {_show(steps) if 'steps' in data else 'nothing'}")
    start = r.count(f"{where}.steps[0]", steps[0], minimum=0, nullable=False)
    stop = steps[1]
    if stop is not None and (not is_int(stop) or stop <= start):
        r.fail(f"{where}.steps[1]", f"must be a step index > start ({start}), or null (to the last step); "
                                    f"got {_show(stop)}")
    if "default" in data:
        default = _method_entry(r, f"{where}.default", data["default"], num_heads)
    else:
        default = Dense()
    layers = r.obj(f"{where}.layers", data.get("layers", {}), 'an object {"layer index": method entry}')
    methods: Dict[int, Method] = {}
    for key, entry in layers.items():
        field_name = f"{where}.layers[{json.dumps(key) if isinstance(key, str) else key}]"
        if is_int(key) and key >= 0:
            index = int(key)
        elif isinstance(key, str) and re.fullmatch("[0-9]+", key):
            index = int(key)
        else:
            r.fail(field_name, "is not a layer index: layers are named by their index from 0, as a string "
                               "(\"0\", \"1\", ...)")
        if index in methods:
            r.fail(field_name, f"names layer {index} a second time")
        if num_layers is not None and index >= num_layers:
            r.fail(field_name, f"layer {index} is past the plan's {num_layers} layers (num_layers; layers count "
                               "from 0)")
        methods[index] = _method_entry(r, field_name, entry, num_heads)
    return Phase(start, None if stop is None else int(stop), methods, default)


def _tile_as_run(tile: Tile, grid) -> Tile:
    """``tile`` as a strategy writes it: a ``fit=True`` one re-tiles at plan time (:meth:`Tile.fitted`), so
    its windows as set are written only where they attend what the fitted tile does on ``grid`` (STA is a product
    of one relation per dimension); ValueError otherwise (a FastVideo strategy holds windows only: written as set,
    they ran another pattern, silently)."""
    from ..patterns.checks import per_dim, per_head
    from ..patterns.tile import fit_tile, tile_covers_grid, tile_mask

    if not tile.fit or tile.block_size is not None or per_head(tile.window) is not None:
        return tile
    if grid is None:
        raise ValueError(f"{tile!r} fits its tile to the grid of each call (fit=True), so its windows depend on the "
                         "grid: pass grid=(T, H, W), the token grid the plan runs on")
    if tile_covers_grid(grid, tile.tile, tile.window):
        return tile.replace(fit=False)
    fitted, window = fit_tile(grid, tile.tile, tile.window)
    own = zip(grid, per_dim("tile", tile.tile, len(grid)), per_dim("window", tile.window, len(grid)), fitted, window)
    if not all(torch.equal(tile_mask((g,), (t,), (w,)), tile_mask((g,), (ft,), (fw,))) for g, t, w, ft, fw in own):
        raise ValueError(f"{tile!r} runs tile={fitted}, window={window} on grid {tuple(grid)} (fit=True), another "
                         "pattern than its windows as set, and a FastVideo strategy holds windows only, not their "
                         f"tile: build the plan with Tile(tile={fitted}, window={window}) to export it")
    return tile.replace(fit=False)


def _tile_dims(tile: Tile, grid) -> int:
    """The grid dimensions ``tile`` runs on: its tile's or window's length where one is a tuple, else the grid's
    (a strategy of an image plan holds 2 values per window), else 3 (FastVideo's video windows)."""
    from ..patterns.checks import per_head

    for value in (tile.tile, *(per_head(tile.window) or (tile.window,))):
        if isinstance(value, tuple):
            return len(value)
    return len(grid) if grid is not None else 3


def _spelt(value, dims: int) -> Tuple[int, ...]:
    """A tile or window as one value per dimension (an int broadcast)."""
    return tuple(value) if isinstance(value, tuple) else (value,) * dims


def _is_dense(method: Optional[Method]) -> bool:
    return method is None or isinstance(method, Dense) or (
        isinstance(method, PerHead) and all(isinstance(m, Dense) for m in method.methods))


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Phase:
    """Steps ``start .. stop - 1`` (``stop=None``: to the end): ``layers[i]`` on layer ``i``, ``default`` elsewhere."""

    start: int
    stop: Optional[int]
    layers: Mapping[int, Method] = field(default_factory=dict)
    default: Method = Dense()

    def __post_init__(self):
        if not is_int(self.start) or self.start < 0:
            raise ValueError(f"Phase.start={self.start!r} is invalid: a step index >= 0")
        if self.stop is not None and (not is_int(self.stop) or self.stop <= self.start):
            raise ValueError(f"Phase.stop={self.stop!r} is invalid: a step index > start={self.start}, or None "
                             "(to the last step)")
        if not isinstance(self.layers, Mapping):
            raise TypeError(f"Phase.layers={self.layers!r} is invalid: expected a dict {{layer index: method "
                            "config} ({} for none: the phase's default then runs on every layer)")
        for layer, method in self.layers.items():
            if not is_int(layer) or layer < 0 or not isinstance(method, Method):
                raise ValueError(f"Phase.layers[{layer!r}]={method!r}: expected {{layer index >= 0: method config}}")
        if not isinstance(self.default, Method):
            raise TypeError(f"Phase.default={self.default!r} is not a method config")
        for where, method in (*((f"layers[{i}]", m) for i, m in self.layers.items()), ("default", self.default)):
            if hasattr(method, "for_layer_step"):  # (before: built, then refused at its first call)
                raise TypeError(f"Phase.{where}={type(method).__name__}(...) is a schedule (a method per layer and "
                                "step), not one layer's method config: a phase holds configs such as Tile(...) or "
                                "PerHead(...); import a FastVideo strategy with SparsePlan.from_tile_strategy(path)")
        object.__setattr__(self, "layers", {int(i): self.layers[i] for i in sorted(self.layers)})
        object.__setattr__(self, "start", int(self.start))  # (numpy ints: to_json and content_hash write them)
        object.__setattr__(self, "stop", None if self.stop is None else int(self.stop))

    def __hash__(self) -> int:  # (the generated one hashed the layers dict: "unhashable type: 'dict'")
        return hash((self.start, self.stop, tuple(self.layers.items()), self.default))

    def covers(self, step: int) -> bool:
        return self.start <= step and (self.stop is None or step < self.stop)

    def method(self, layer: int) -> Method:
        return self.layers.get(layer, self.default)

    def to_json(self) -> dict:
        return {"steps": [self.start, self.stop], "default": method_to_json(self.default),
                "layers": {str(i): method_to_json(m) for i, m in self.layers.items()}}

    @classmethod
    def from_json(cls, data: Mapping, *, where: str = "phase", source: Optional[str] = None,
                  num_layers: Optional[int] = None, num_heads: Optional[int] = None) -> "Phase":
        """A phase from its JSON object; ValueError naming ``source`` and the field for any bad value."""
        return _phase(_Fields(source), where, data, num_layers, num_heads)


#: How :meth:`SparsePlan.check_call`'s messages name the settings to change, per host: the Diffusers path's (the
#: Python argument and the CLI flag) and ComfyUI's (the sampler's steps, the node's widget).
_HOST_HINTS = {
    "diffusers": {"steps": "CLI: --steps {steps}", "any_grid": "pass allow_other_grid=True (CLI: --plan-any-grid)"},
    "comfyui": {"steps": "the KSampler's steps", "any_grid": "turn on the node's allow_other_grid"},
}


def _whole(n) -> bool:
    """An int-valued count: a Python or NumPy int, a traced SymInt or a 0-d integer tensor (as a GridInfo's sizes)."""
    if isinstance(n, torch.Tensor):
        return n.dim() == 0 and not n.is_floating_point() and not n.is_complex() and n.dtype != torch.bool
    return is_int(n) or isinstance(n, torch.SymInt)


def _check_call_args(grid, total_steps, host, step) -> Tuple[int, ...]:
    """:meth:`SparsePlan.check_call`'s arguments, the grid as a tuple of ints: a TypeError / ValueError naming the
    argument (``grid="abc"`` read as the grid (a, b, c) failed in int(); a grid of 3.5 frames ran as 3)."""
    owner = "SparsePlan.check_call"
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or not all(map(_whole, grid)):
        raise TypeError(f"{owner}(grid={grid!r}) is invalid: the call's token grid, 1 to 3 ints >= 1 such as "
                        "(21, 30, 52) (frames, rows, columns)")
    sizes = tuple(int(g) for g in grid)
    if min(sizes) < 1:
        raise ValueError(f"{owner}(grid={sizes!r}) is invalid: every size of the token grid is >= 1")
    for name, value, low, what in (("total_steps", total_steps, 1, "the run's number of denoising steps"),
                                   ("step", step, 0, "the call's denoising step, from 0")):
        if value is not None and (not _whole(value) or int(value) < low):
            raise (TypeError if not _whole(value) else ValueError)(
                f"{owner}({name}={value!r}) is invalid: an int >= {low} ({what}), or None (not known)")
    if host not in _HOST_HINTS:
        raise ValueError(f"{owner}(host={host!r}) is invalid: choose one of {', '.join(map(repr, _HOST_HINTS))}")
    return sizes


def _size_text(call: dict, host: str) -> str:
    """The calibration call's size as the host sets it (`` (--frames 81 --height 480 --width 832)``, or ComfyUI's
    `` (81 frames of 480x832)``); "" when the plan did not record it."""
    if not {"height", "width"} <= set(call):
        return ""
    frames = call.get("num_frames")
    if host == "comfyui":
        return f" ({frames} frames of {call['height']}x{call['width']})" if frames else \
            f" ({call['height']}x{call['width']})"
    return f" (--frames {frames} --height {call['height']} --width {call['width']})" if frames else \
        f" (--height {call['height']} --width {call['width']})"


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """Method configs per denoising-step phase, attention layer and head, with where they came from.

    Args:
        phases: :class:`Phase` objects in step order, not overlapping; a step no phase covers runs dense.
        num_layers: attention layers of the model the plan is for (checked at ``apply``), or None.
        num_heads: heads per attention layer (per-head entries must match), or None.
        provenance: model class and id, grids, prompt hash, budget, objective, versions, date
            (:meth:`provenance_now` fills the versions and date).

    Example::

        plan = SparsePlan([Phase(0, 2), Phase(2, None, {1: Tile(tile=(4, 4, 4), window=(1, 1, 3))})])
        plan.save("plan.json")
        handle = dit_accel.apply(pipe, SparsePlan.load("plan.json"))
    """

    phases: Tuple[Phase, ...]
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    provenance: Mapping = field(default_factory=dict)
    source: Optional[str] = field(default=None, compare=False, repr=False)  # the file it was read from

    def __post_init__(self):
        for name in ("num_layers", "num_heads"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"SparsePlan.{name}={value!r} is invalid: a whole number >= 1, or None")
        if not isinstance(self.provenance, Mapping):
            raise TypeError(f"SparsePlan.provenance must be a mapping; got {type(self.provenance).__name__}")
        if not isinstance(self.phases, (list, tuple)) or not all(isinstance(p, Phase) for p in self.phases):
            raise TypeError(f"SparsePlan.phases={self.phases!r} is invalid: expected a list or tuple of Phase "
                            "objects, e.g. [Phase(0, 2), Phase(2, None, default=Tile(...))] ([] for an all-dense plan)")
        steps = _provenance(_Fields(None), to_jsonable(dict(self.provenance))).get("steps")  # what apply reads
        phases = tuple(sorted(self.phases, key=lambda p: p.start))
        for a, b in zip(phases, phases[1:]):
            if a.stop is None or a.stop > b.start:
                raise ValueError(f"SparsePlan phases overlap: steps {a.start}..{a.stop} and {b.start}..{b.stop}")
        late = next((p for p in phases if steps is not None and (p.start >= steps or (p.stop or 0) > steps)), None)
        if late is not None:  # (as load refuses it: a plan that saves must load back)
            raise ValueError(f"SparsePlan phase steps {_span(late)} run past the last step: provenance steps="
                             f"{steps} (steps 0..{steps - 1}); end the phase by step {steps}, or record the "
                             "run's step count")
        for phase in phases:
            for layer, method in (*phase.layers.items(), ("default", phase.default)):
                if layer != "default" and self.num_layers is not None and layer >= self.num_layers:
                    raise ValueError(f"phase {phase.start}..{phase.stop} names layer {layer} but the plan is for "
                                     f"{self.num_layers} layers")
                heads = getattr(method, "heads", None)  # PerHead's, or a Tile's/GNA's per-head windows
                if heads is not None and self.num_heads is not None and heads != self.num_heads:
                    raise ValueError(f"{'the default' if layer == 'default' else f'layer {layer}'} of phase "
                                     f"{phase.start}..{phase.stop} has {heads} head methods; the plan is for "
                                     f"{self.num_heads} heads")
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "provenance", dict(self.provenance))
        for name in ("num_layers", "num_heads"):  # (numpy ints: to_json and content_hash write them)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    def __eq__(self, other) -> bool:  # (before: identity, so a plan and its saved-and-loaded copy were unequal)
        """Same phases, layer and head counts and provenance (not ``source``, the file it was read from)."""
        return self.to_json() == other.to_json() if isinstance(other, SparsePlan) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.content_hash())

    # -------------------------------------------------------------- queries
    def for_layer_step(self, layer: int, step: int) -> Optional[Method]:
        """The method ``layer`` runs at ``step``; None where the plan runs dense."""
        layer, step = layer_step("SparsePlan.for_layer_step", layer, step)
        self._check_layer("SparsePlan.for_layer_step", layer)
        for phase in self.phases:
            if phase.covers(step):
                method = phase.method(layer)
                return None if _is_dense(method) else method
        return None

    def _check_layer(self, owner: str, layer: int) -> None:
        """ValueError for a layer past the plan's ``num_layers`` (before: it ran the phase's default, unsaid)."""
        if self.num_layers is not None and layer >= self.num_layers:
            raise ValueError(f"{owner}(layer={layer}) is invalid: {self._name()} is for {self.num_layers} attention "
                             f"layers (num_layers), so layer is 0..{self.num_layers - 1}; pass a layer of that model")

    def methods(self) -> Tuple[Method, ...]:
        """Every distinct method config the plan names (per-head entries as themselves)."""
        return tuple(dict.fromkeys(m for p in self.phases for m in (p.default, *p.layers.values())))

    def head_methods(self, layer: int, step: int, heads: int) -> Tuple[Method, ...]:
        """The config of each of ``heads`` heads of ``layer`` at ``step`` (``Dense()`` where dense): a Tile's or
        GNA's per-head windows as one single-head config each; ValueError when the entry is for another head count."""
        if not is_int(heads) or heads < 1:  # (before: 0 gave (), 2.0 a TypeError from inside)
            raise (TypeError if not is_int(heads) else ValueError)(
                f"SparsePlan.head_methods(heads={heads!r}) is invalid: the layer's number of attention heads, an int "
                ">= 1")
        method = self.for_layer_step(layer, step)
        if method is None:
            return (Dense(),) * heads
        split = method.methods if isinstance(method, PerHead) else own_heads(method)
        if split is None:
            return (method,) * heads
        if len(split) != heads:
            raise ValueError(f"{self._name()}: layer {layer} at step {step} runs {len(split)} per-head methods; "
                             f"heads={heads}")
        return tuple(split)

    def runs_sla(self, layer: int) -> bool:
        """Whether some phase runs SLA on some head of ``layer`` (apply() gives that layer an SLA projection)."""
        layer, _ = layer_step("SparsePlan.runs_sla", layer, 0)
        self._check_layer("SparsePlan.runs_sla", layer)
        for phase in self.phases:
            method = phase.method(layer)
            inner = method.methods if isinstance(method, PerHead) else (method,)
            if any(m.name == "sla" for m in inner):
                return True
        return False

    def content_hash(self) -> str:
        """sha256 of what the plan runs (layers, heads, phases; not its provenance): two plans with the same
        hash run the same attention everywhere. Fine-tuned weights record it (``finetune --plan``)."""
        body = {k: v for k, v in self.to_json().items() if k in ("num_layers", "num_heads", "phases")}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def as_method(self) -> "PlanMethod":
        """The plan as :func:`dit_accel.apply` schedules it (a method that resolves per layer and step)."""
        return PlanMethod(self)

    # -------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "phases": [p.to_json() for p in self.phases],
                "provenance": to_jsonable(self.provenance)}

    @classmethod
    def from_json(cls, data: Mapping, *, source=None) -> "SparsePlan":
        """A plan from its JSON value, every field validated: ValueError ``"<source>: <field>: <problem>"`` (one
        line) for any value that is not a plan's, ``source`` being the file (``"the plan"`` when None)."""
        source = None if source is None else str(source)
        r = _Fields(source)
        if not isinstance(data, Mapping):
            r.fail("format", f"not a dit_accel sparse plan: the JSON value is {_show(data)}, not an object with "
                             f"\"format\": \"{FORMAT}\"")
        if data.get("format") != FORMAT:
            r.fail("format", f"must be \"{FORMAT}\"; got {_show(data['format']) if 'format' in data else 'nothing'}"
                             " (not a dit_accel sparse plan; FastVideo STA strategy files load with "
                             "SparsePlan.from_tile_strategy(path))")
        version = r.count("format_version", data.get("format_version", 1), nullable=False)
        if version > FORMAT_VERSION:
            r.fail("format_version", f"is {version}; this dit_accel reads up to {FORMAT_VERSION}: upgrade dit-accel")
        r.known("", data, _PLAN_FIELDS, "a plan")
        num_layers = r.count("num_layers", data.get("num_layers"))
        num_heads = r.count("num_heads", data.get("num_heads"))
        if "phases" not in data:
            r.fail("phases", "missing: a plan lists its step phases (\"phases\": [...]; [] for an all-dense plan)")
        if not isinstance(data["phases"], list):
            r.fail("phases", f"must be a list of phases; got {_show(data['phases'])}")
        phases = [_phase(r, f"phases[{i}]", p, num_layers, num_heads) for i, p in enumerate(data["phases"])]
        order = sorted(range(len(phases)), key=lambda i: phases[i].start)
        for i, j in zip(order, order[1:]):
            a, b = phases[i], phases[j]
            if a.stop is None or a.stop > b.start:
                r.fail(f"phases[{j}].steps", f"steps {_span(b)} overlap phases[{i}].steps (steps {_span(a)})")
        provenance = _provenance(r, data.get("provenance"))
        steps = provenance.get("steps")
        if steps is not None:
            for i, p in enumerate(phases):
                if p.start >= steps or (p.stop is not None and p.stop > steps):
                    r.fail(f"phases[{i}].steps", f"steps {_span(p)} run past the last step: the plan is for "
                                                 f"{steps} steps (provenance.steps; steps 0..{steps - 1})")
        return without_stale_quality(cls(tuple(phases), num_layers, num_heads, provenance, source=source))

    def save(self, path) -> Path:
        """Write the plan's JSON to ``path`` (a file name, e.g. ``plan.json``; missing folders are made)
        atomically (temporary file + ``os.replace``). A folder is a ValueError, and nothing is written."""
        path = file_to_write(path, "the plan's", "plan.json")
        return write_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "SparsePlan":
        """Read a plan written by :meth:`save` (or ``dit-accel calibrate``); a FastVideo STA strategy file
        is recognised and imported with :meth:`from_tile_strategy` (its default tile (6, 8, 8)).

        Every field is validated: a missing, unreadable, binary or damaged file, or any value that is not a
        plan's, is a ValueError of one line naming the file and the field. A plan whose writer (``calibrate``)
        was killed after its commit point is finished first, with its report folder, or refused with the
        reason (:func:`dit_accel.atomic_files.finish_for_reader`): never a new plan beside an old report."""
        from ..atomic_files import commit_journal, finish_for_reader, read_json, read_text

        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise (ValueError if isinstance(path, str) else TypeError)(
                f"path={path!r} is invalid: expected the plan's file name (str or pathlib.Path), e.g. "
                "SparsePlan.load('plan.json')")
        path = Path(path).expanduser()  # (as save writes it, and as load_pipeline reads a model folder)
        journal = commit_journal(path) if path.name else None  # ("." or "/": a folder, which read_json names)
        if journal is not None and journal.exists():  # calibrate killed past its commit point: its reports too
            finish_for_reader(journal, path)
        try:
            data = read_json(path, expected="a dit_accel sparse plan (the JSON that plan.save or dit-accel "
                                            "calibrate writes)", kind=None)
            twice = repeated_key(read_text(path))
        except RecursionError:
            raise ValueError(f"{path}: format: nested too deeply to be a plan") from None
        except ValueError as err:
            raise with_comma_hint(err) from None
        if twice is not None:
            raise ValueError(f"{path}: {twice}: given twice in one object (JSON would keep only the last, without a "
                             "word): keep one of them")
        if isinstance(data, dict) and "format" not in data and data and \
                all(isinstance(k, str) and re.fullmatch(r"[0-9]+_[0-9]+_[0-9]+", k) for k in data):
            return cls.from_tile_strategy(path)
        if isinstance(data, dict) and "format" not in data and isinstance(data.get("plan_path"), str) and \
                "settings" in data:  # (before: "format: must be ...; got nothing", and no word of the plan's file)
            raise ValueError(f"{path}: format: this is the record of a calibration (calibration.json of its report "
                             f"folder), not a plan; the plan it wrote is {data['plan_path']}: pass that file")
        return cls.from_json(data, source=path)

    @staticmethod
    def provenance_now(**fields) -> dict:
        """``fields`` plus the package versions and the UTC date: what a plan's provenance records."""
        return {**fields, "versions": versions(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    # -------------------------------------------------------------- FastVideo STA strategies
    @classmethod
    def from_tile_strategy(cls, strategy, tile=(6, 8, 8)) -> "SparsePlan":
        """A plan from FastVideo's STA mask-strategy JSON (a path, or a :class:`~dit_accel.TileStrategy`).

        Every listed (step, layer) runs ``Tile(tile, window=<its per-head windows>)``; consecutive
        steps with the same windows become one phase; unlisted (step, layer) pairs run dense, as
        :class:`TileStrategy` runs them.
        """
        if not isinstance(strategy, TileStrategy):
            strategy = TileStrategy(path=strategy, tile=tile)  # (which checks the path)
        table = strategy._table  # {(step, layer): per-head windows}, read and checked by TileStrategy
        by_step: Dict[int, Dict[int, Method]] = {}
        for (step, layer) in sorted(table):
            by_step.setdefault(step, {})[layer] = strategy.for_layer_step(layer, step)
        phases: List[Phase] = []
        for step in sorted(by_step):
            layers = by_step[step]
            last = phases[-1] if phases else None
            if last is not None and last.stop == step and last.layers == layers:
                phases[-1] = Phase(last.start, step + 1, layers)
            else:
                phases.append(Phase(step, step + 1, layers))
        return cls(tuple(phases), None, strategy.heads, {"source": "FastVideo STA strategy", "strategy_path":
                                                          strategy.path, "tile": to_jsonable(strategy.tile)},
                   source=str(strategy.path))  # (its refusals named "the plan", not the file)

    def to_tile_strategy(self, path=None, *, num_steps: Optional[int] = None, grid=None) -> dict:
        """FastVideo's STA mask-strategy JSON (``{"step_layer_head": [wt, wh, ww]}``) of a plan whose sparse
        entries are all Tile windows of one tile; written atomically to ``path`` when given.

        Dense layers are left out (FastVideo runs an unlisted (step, layer) dense). A dense *head* in a
        layer with Tile heads needs ``grid``: it is written as the window that covers the grid; so does a
        ``Tile(fit=True)``, whose tile depends on the grid (refused where the tile fitted there attends otherwise).
        A phase open to the end needs ``num_steps`` (default: the steps the plan records, ``provenance.steps``, and
        no other: its phases name steps of a run of that many). A ``path`` that is a folder is a ValueError, and
        nothing is written.
        """
        from ..patterns.checks import as_grid

        if path is not None:
            path = file_to_write(path, "the strategy's", "strategy.json")
        if num_steps is not None and (not is_int(num_steps) or num_steps < 1):
            raise ValueError(f"num_steps={num_steps!r} is invalid: the run's number of denoising steps, a whole "
                             "number >= 1")
        steps = self.provenance.get("steps")
        if num_steps is not None and steps is not None and num_steps != steps:
            # (before: a 4-step plan's last phase was written for steps up to 49, a schedule it was never scored on)
            raise ValueError(f"num_steps={num_steps}: {self._name()} was calibrated for {steps} denoising steps "
                             f"(provenance.steps): its phases name steps of a {steps}-step run. Pass num_steps={steps} "
                             f"(or leave it out), or calibrate a plan for {num_steps} steps")
        num_steps = steps if num_steps is None else num_steps
        late = next((p for p in self.phases if num_steps is not None and p.stop is not None and p.stop > num_steps),
                    None)
        if late is not None:  # (before: its steps past the run were written, and num_steps said nothing)
            raise ValueError(f"num_steps={num_steps}: {self._name()} has a phase for steps {_span(late)}, past the "
                             f"run's last step {num_steps - 1}: pass num_steps={late.stop} or more")
        grid = None if grid is None else as_grid(grid.tolist() if hasattr(grid, "tolist") else grid)  # (numpy)
        out: Dict[str, List[int]] = {}
        tiles = set()
        heads = self.num_heads
        for phase in self.phases:
            stop = phase.stop if phase.stop is not None else num_steps
            if stop is None:
                raise ValueError(f"phase {phase.start}..end is open: pass num_steps to write every step")
            if self.num_layers is None and not _is_dense(phase.default):  # (its layers would be left out: dense)
                raise ValueError(f"steps {_span(phase)} run {phase.default!r} on every layer they do not list, but the "
                                 "plan does not say its layer count (num_layers), so those layers cannot be written")
            layers = set(phase.layers) | (set(range(self.num_layers or 0)) if not _is_dense(phase.default) else set())
            for layer in sorted(layers):
                method = phase.method(layer)
                if _is_dense(method):
                    continue
                windows = self._windows(method, heads, grid, tiles)
                heads = heads or len(windows)
                for step in range(phase.start, stop):
                    for head, window in enumerate(windows):
                        out[f"{step}_{layer}_{head}"] = list(window)
        if len(tiles) > 1:
            raise ValueError(f"the plan uses several tiles {sorted(tiles)}; a FastVideo strategy has one tile")
        if path is not None:
            write_atomic(path, json.dumps(out, indent=1) + "\n")
        return out

    @staticmethod
    def _windows(method: Method, heads: Optional[int], grid, tiles: set) -> List[Tuple[int, ...]]:
        from ..patterns.checks import per_head

        if isinstance(method, Tile):
            method = _tile_as_run(method, grid)
        inner = tuple(_tile_as_run(m, grid) if isinstance(m, Tile) else m
                      for m in (method.methods if isinstance(method, PerHead) else (method,)))
        for m in inner:
            if not isinstance(m, (Tile, Dense)):
                raise ValueError(f"{m!r} is not a Tile window: only plans of Tile windows (and dense heads) export to "
                                 "a FastVideo STA strategy")
            if isinstance(m, Tile):
                tiles.add(_spelt(m.tile, _tile_dims(m, grid)))
        if isinstance(method, Tile):
            dims = _tile_dims(method, grid)
            wins = per_head(method.window)
            if wins is not None:
                return [_spelt(w, dims) for w in wins]
            if heads is None:
                raise ValueError("the plan does not say its head count (num_heads): needed to write per-head windows")
            return [_spelt(method.window, dims)] * heads
        windows = []
        for m in inner:
            if isinstance(m, Dense):
                if grid is None or not tiles:
                    raise ValueError("a dense head beside Tile heads is written as the window covering the grid: "
                                     "pass grid=(T, H, W)")
                tile = next(iter(tiles))
                if len(grid) != len(tile):
                    raise ValueError(f"grid={grid} has {len(grid)} dimensions but the plan's tile {tile} has "
                                     f"{len(tile)}: pass the token grid the plan runs on")
                windows.append(tuple(-(-g // t) for g, t in zip(grid, tile)))
            else:
                windows.append(_spelt(m.window, _tile_dims(m, grid)))
        return windows

    # -------------------------------------------------------------- what the plan is for
    def _name(self) -> str:
        return f"plan {self.source}" if self.source else "the plan"

    def layers_named(self) -> Tuple[int, ...]:
        """Every layer index some phase names."""
        return tuple(sorted({i for p in self.phases for i in p.layers}))

    def check_model(self, model_class, layer_heads: Sequence[Optional[int]]) -> None:
        """ValueError (naming both values) unless this plan fits a transformer of class ``model_class`` (its name, or
        the class: a subclass of the class the plan was calibrated for fits too) whose attention layers have
        ``layer_heads[i]`` heads (None where a layer does not say)."""
        name, n = self._name(), len(layer_heads)
        made_for = self.provenance.get("model_class")
        fits = ({c.__name__ for c in model_class.__mro__} if isinstance(model_class, type) else {model_class})
        model_class = model_class.__name__ if isinstance(model_class, type) else model_class
        if made_for and made_for not in fits:  # (before: a user's subclass of WanTransformer3DModel was refused)
            model = self.provenance.get("model_id")
            raise ValueError(f"{name} was calibrated for {made_for}{f' ({model})' if model else ''}; this pipeline's "
                             f"transformer is {model_class}: calibrate a plan for this model (dit-accel calibrate)")
        if self.num_layers is not None and self.num_layers != n:
            model = self.provenance.get("model_id") or "another model"
            raise ValueError(f"{name} is for {self.num_layers} attention layers ({model}); this model has {n}: "
                             "calibrate a plan for it (dit-accel calibrate)")
        past = [i for i in self.layers_named() if i >= n]
        if past:
            raise ValueError(f"{name} names layer {past[0]} but this model has {n} attention layers (0..{n - 1}): "
                             "the plan is for another model (its num_layers is not recorded)")
        known = sorted({h for h in layer_heads if h is not None})
        if self.num_heads is not None and known and known != [self.num_heads]:
            raise ValueError(f"{name} is for {self.num_heads} heads per attention layer; this model's layers have "
                             f"{', '.join(map(str, known))}: calibrate a plan for this model (dit-accel calibrate)")
        for phase in self.phases:
            for layer in range(n):
                method, heads = phase.method(layer), layer_heads[layer]
                own = getattr(method, "heads", None)  # PerHead's, or a Tile's/GNA's per-head windows
                if own is not None and heads is not None and own != heads:
                    raise ValueError(f"{name}: steps {_span(phase)} give layer {layer} {own} per-head "
                                     f"methods; that layer of this model has {heads} heads")

    def check_call(self, grid, total_steps: Optional[int], allow_other_grid: bool = False,
                   host: str = "diffusers", step: Optional[int] = None) -> Optional[str]:
        """Check one transformer call's token ``grid`` and its run's number of denoising steps (None: unknown)
        against what the plan was calibrated for. ValueError naming both values on a mismatch; a grid the plan
        does not cover is allowed with ``allow_other_grid``, and the warning to give is returned. ``host``
        (``"diffusers"`` or ``"comfyui"``): whose settings the messages name. ``step``: the call's step, checked
        when the total is unknown (``handle.set_step(i)``): a step past the plan's last ran dense, unsaid."""
        grid = _check_call_args(grid, total_steps, host, step)
        name, hints = self._name(), _HOST_HINTS[host]
        warning = None
        grids = [tuple(g) for g in self.provenance.get("grids") or ()]
        if grids and grid not in grids:
            call = self.provenance.get("call") or {}
            size = _size_text(call, host)
            what = (f"{name} was calibrated for token grid {' or '.join(_grid_text(g) for g in grids)}{size}; this "
                    f"call's token grid is {_grid_text(grid)}")
            if not allow_other_grid:
                raise ValueError(f"{what}: its choices were scored at that size only. Run at the plan's size, "
                                 f"calibrate a plan at this one, or {hints['any_grid']} to run it anyway")
            warning = f"dit_accel: {what}; running it anyway (allow_other_grid): its quality was not checked here"
        steps = self.provenance.get("steps")
        if total_steps is None and step is not None and steps is not None and step >= steps:
            raise ValueError(f"{name} was calibrated for {steps} denoising steps (0..{steps - 1}); this call is step "
                             f"{step}, past its last: run {steps} steps, or calibrate a plan for this many (call "
                             "handle.set_step(step, total) to have the run's total checked too)")
        if total_steps is not None:
            if steps is not None and steps != total_steps:
                raise ValueError(f"{name} was calibrated for {steps} denoising steps; this run has {total_steps}: "
                                 f"its phases name steps of a {steps}-step run. Run {steps} steps "
                                 f"({hints['steps'].format(steps=steps)}) or calibrate a plan for {total_steps}")
            for phase in self.phases:
                if phase.start >= total_steps or (phase.stop is not None and phase.stop > total_steps):
                    raise ValueError(f"{name} has a phase for steps {_span(phase)}; this run has {total_steps} "
                                     f"denoising steps (0..{total_steps - 1}): run at least "
                                     f"{phase.stop if phase.stop is not None else phase.start + 1} steps or use a "
                                     "plan made for this many")
        return warning

    # -------------------------------------------------------------- display
    def profile(self) -> dict:
        """What the plan runs, weighted by modelled attention time (:mod:`dit_accel.kernels.cost`).

        Every (step, layer, head) slot is priced as one head of one attention call at the plan's first
        calibration grid (``provenance.grids``) with the cost model its provenance names (``arch``,
        ``kernel``, ``terms``; H100 per-head times otherwise), without the per-launch terms. Steps no phase
        covers run dense. Without a grid, or with a method that does not run at it, slots are counted instead of
        priced (``priced`` False; ``basis`` says why) and density is unknown.

        Returns ``{"seconds": {method: s or slots}, "share": {method: fraction}, "mean_density": float or None,
        "steps", "layers", "heads", "grid", "priced": bool, "basis": str}``.
        """
        return plan_profile(self)

    def summary_line(self) -> str:
        """The plan in one line: content hash, model, steps x layers x heads, methods by share of modelled
        attention time, mean density (``generate --plan`` prints it; ``eval``'s report shows it)."""
        prof = self.profile()
        steps = f"{prof['steps']} steps" if prof["steps"] else "? steps"
        layers = f"{self.num_layers} layers" if self.num_layers else "? layers"
        heads = f"{self.num_heads} heads" if self.num_heads else "? heads"
        model = self.provenance.get("model_class")
        where = f" for {model}" if model else ""
        grid = f" at grid {_grid_text(prof['grid'])}" if prof["grid"] else ""
        what = "attention time" if prof["priced"] else "(step, layer, head) slots"
        shares = ", ".join(f"{name} {100 * f:.0f}%" for name, f in prof["share"].items())
        density = "n/a" if prof["mean_density"] is None else f"{prof['mean_density']:.3f}"
        return (f"plan {self.content_hash()[:12]}{where}: {steps} x {layers} x {heads}{grid}; {what}: {shares}; "
                f"mean density {density} over every step, layer and head (dense ones as 1)")

    def table(self) -> List[str]:
        """The full plan, one line per step range and group of layers, heads grouped (``dit-accel info --plan``)."""
        prof = self.profile()
        prov = self.provenance
        lines = [self.summary_line(), f"content sha256 {self.content_hash()}"]
        facts = [f"{k} {_show(prov[k]) if not isinstance(prov[k], str) else prov[k]}"
                 for k in ("model_class", "model_id", "grids", "steps", "budget", "date") if prov.get(k) is not None]
        if facts:
            lines.append("provenance: " + "; ".join(facts))
        lines.append(f"shares: {prof['basis']}")
        heads = prof["heads"]
        named = prof["layers"] if self.num_layers is not None else max(self.layers_named(), default=-1) + 1
        if not self.phases:
            lines.append("every step: every layer dense (the plan has no phases)")
        for phase in self.phases:
            lines.append(f"steps {_span(phase)}:")
            rows = [(layer, _heads_text(phase.method(layer), heads)) for layer in range(named)]
            start = 0
            while start < len(rows):
                stop = start
                while stop + 1 < len(rows) and rows[stop + 1][1] == rows[start][1]:
                    stop += 1
                which = f"layer {start}" if stop == start else f"layers {start}-{stop}"
                lines.append(f"  {which}: {rows[start][1]}")
                start = stop + 1
            if self.num_layers is None:  # the default runs on every layer past the named ones too
                which = f"layers {named} and up" if named else "every layer"
                lines.append(f"  {which} (num_layers not recorded): {_heads_text(phase.default, heads)}")
        gaps = _gaps(self.phases, prof["steps"])
        if gaps:
            lines.append(f"steps {', '.join(gaps)}: no phase, every layer dense")
        return lines

    def summary(self) -> List[str]:
        lines = []
        for p in self.phases:
            end = "end" if p.stop is None else p.stop - 1
            sparse = {i: m for i, m in p.layers.items() if not _is_dense(m)}
            lines.append(f"steps {p.start}..{end}: default {p.default.name}, {len(sparse)} sparse layer entries")
        return lines

    def __repr__(self) -> str:
        return f"SparsePlan({len(self.phases)} phases, layers={self.num_layers}, heads={self.num_heads})"


@dataclass(frozen=True, eq=False)
class PlanMethod(Method):
    """A :class:`SparsePlan` as the pipelines' schedule asks for it: per (layer, step), like
    :class:`~dit_accel.TileStrategy`. Made by :meth:`SparsePlan.as_method`; ``apply(pipe, plan)`` uses it."""

    sparse_plan: SparsePlan = None

    name = "plan"

    def for_layer_step(self, layer: int, step: int) -> Optional[Method]:
        return self.sparse_plan.for_layer_step(layer, step)

    def runs_sla(self, layer: int) -> bool:
        return self.sparse_plan.runs_sla(layer)

    def check_model(self, model_class, layer_heads: Sequence[Optional[int]]) -> None:
        """:meth:`SparsePlan.check_model`."""
        self.sparse_plan.check_model(model_class, layer_heads)

    def check_call(self, grid, total_steps: Optional[int], allow_other_grid: bool = False,
                   host: str = "diffusers", step: Optional[int] = None) -> Optional[str]:
        """:meth:`SparsePlan.check_call`."""
        return self.sparse_plan.check_call(grid, total_steps, allow_other_grid, host, step)

    def summary_line(self) -> str:
        return self.sparse_plan.summary_line()

    def plan(self, grid):
        raise ValueError("a SparsePlan has one method per (layer, step): dit_accel.apply resolves it per call")

    def to_dict(self) -> dict:
        return {"method": self.name, "plan": self.sparse_plan.to_json()}
