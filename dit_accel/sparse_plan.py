"""``SparsePlan``: which method config runs per denoising-step range, attention layer and head.

A plan is a schedule, not a method: a list of step phases, each mapping attention layers to a
method config (one for the whole layer, or a :class:`~dit_accel.per_head.PerHead` config with one
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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from ._util import is_int, to_jsonable, versions
from .methods import Dense, Method, Tile, TileStrategy, method_from_name
from .per_head import PerHead

__all__ = ["SparsePlan", "Phase", "PlanMethod", "method_to_json", "method_from_json", "prompts_hash",
           "write_atomic", "FORMAT"]

FORMAT = "dit_accel.sparse_plan"
FORMAT_VERSION = 1


# ------------------------------------------------------------------ atomic files
def write_atomic(path, data) -> Path:
    """Write ``data`` (str or bytes) to ``path`` through a temporary file in the same folder and ``os.replace``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def prompts_hash(prompts: Iterable[str]) -> str:
    """sha256 of the prompts, one per line (the calibration set's fingerprint in a plan's provenance)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


# ------------------------------------------------------------------ method configs <-> JSON
def method_to_json(method: Method) -> dict:
    """A method config as JSON values: ``{"method": name, field: value, ...}`` (PerHead: ``"heads": [...]``)."""
    if isinstance(method, PerHead):
        return {"method": PerHead.name, "heads": [method_to_json(m) for m in method.methods]}
    if isinstance(method, (TileStrategy, PlanMethod)):
        raise ValueError(f"{type(method).__name__} is a schedule, not a per-(step, layer) method config; convert it "
                         "with SparsePlan.from_tile_strategy")
    return to_jsonable(method.to_dict())


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def method_from_json(data: Mapping) -> Method:
    """The inverse of :func:`method_to_json`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("method"), str):
        raise ValueError(f"a method entry must be an object with a \"method\" name, e.g. {{\"method\": \"dense\"}}; "
                         f"got {data!r}")
    name = data["method"]
    if name == PerHead.name:
        heads = data.get("heads")
        if not isinstance(heads, list) or not heads:
            raise ValueError(f"a per_head entry needs \"heads\": a list of method entries, one per head; got {heads!r}")
        return PerHead(tuple(method_from_json(h) for h in heads))
    return method_from_name(name, **{k: _tuples(v) for k, v in data.items() if k != "method"})


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
        for layer, method in self.layers.items():
            if not is_int(layer) or layer < 0 or not isinstance(method, Method):
                raise ValueError(f"Phase.layers[{layer!r}]={method!r}: expected {{layer index >= 0: method config}}")
        if not isinstance(self.default, Method):
            raise TypeError(f"Phase.default={self.default!r} is not a method config")
        object.__setattr__(self, "layers", {int(i): self.layers[i] for i in sorted(self.layers)})

    def covers(self, step: int) -> bool:
        return self.start <= step and (self.stop is None or step < self.stop)

    def method(self, layer: int) -> Method:
        return self.layers.get(layer, self.default)

    def to_json(self) -> dict:
        return {"steps": [self.start, self.stop], "default": method_to_json(self.default),
                "layers": {str(i): method_to_json(m) for i, m in self.layers.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> "Phase":
        steps = data.get("steps")
        if not (isinstance(steps, list) and len(steps) == 2):
            raise ValueError(f"a phase needs \"steps\": [start, stop or null]; got {steps!r}")
        layers = data.get("layers") or {}
        return cls(steps[0], steps[1], {int(i): method_from_json(m) for i, m in layers.items()},
                   method_from_json(data.get("default", {"method": "dense"})))


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

    def __post_init__(self):
        phases = tuple(sorted(self.phases, key=lambda p: p.start))
        for a, b in zip(phases, phases[1:]):
            if a.stop is None or a.stop > b.start:
                raise ValueError(f"SparsePlan phases overlap: steps {a.start}..{a.stop} and {b.start}..{b.stop}")
        for phase in phases:
            for layer, method in phase.layers.items():
                if self.num_layers is not None and layer >= self.num_layers:
                    raise ValueError(f"phase {phase.start}..{phase.stop} names layer {layer} but the plan is for "
                                     f"{self.num_layers} layers")
                if isinstance(method, PerHead) and self.num_heads is not None and method.heads != self.num_heads:
                    raise ValueError(f"layer {layer} has {method.heads} head methods; the plan is for "
                                     f"{self.num_heads} heads")
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "provenance", dict(self.provenance))

    # -------------------------------------------------------------- queries
    def for_layer_step(self, layer: int, step: int) -> Optional[Method]:
        """The method ``layer`` runs at ``step``; None where the plan runs dense."""
        for phase in self.phases:
            if phase.covers(step):
                method = phase.method(layer)
                return None if _is_dense(method) else method
        return None

    def methods(self) -> Tuple[Method, ...]:
        """Every distinct method config the plan names (per-head entries as themselves)."""
        return tuple(dict.fromkeys(m for p in self.phases for m in (p.default, *p.layers.values())))

    def head_methods(self, layer: int, step: int, heads: int) -> Tuple[Method, ...]:
        """The config of each of ``heads`` heads of ``layer`` at ``step`` (``Dense()`` where dense)."""
        method = self.for_layer_step(layer, step)
        if method is None:
            return (Dense(),) * heads
        return method.methods if isinstance(method, PerHead) else (method,) * heads

    def runs_sla(self, layer: int) -> bool:
        """Whether some phase runs SLA on some head of ``layer`` (apply() gives that layer an SLA projection)."""
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
    def from_json(cls, data: Mapping) -> "SparsePlan":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a dit_accel sparse plan (expected \"format\": \"{FORMAT}\"); FastVideo STA "
                             "strategy files load with SparsePlan.from_tile_strategy(path)")
        if data.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"the plan has format_version {data['format_version']}; this dit_accel reads up to "
                             f"{FORMAT_VERSION}: upgrade dit-accel")
        return cls(tuple(Phase.from_json(p) for p in data.get("phases", [])), data.get("num_layers"),
                   data.get("num_heads"), data.get("provenance") or {})

    def save(self, path) -> Path:
        """Write the plan's JSON to ``path`` atomically (temporary file + ``os.replace``)."""
        return write_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "SparsePlan":
        """Read a plan written by :meth:`save` (or ``dit-accel calibrate``); a FastVideo STA strategy file
        is recognised and imported with :meth:`from_tile_strategy` (its default tile (6, 8, 8))."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise ValueError(f"cannot read the plan {str(path)!r}: {err.strerror or err}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} is not valid JSON ({err}); a plan is written by plan.save or "
                             "dit-accel calibrate (a half-written file means its writer was interrupted)") from None
        if isinstance(data, dict) and "format" not in data and data and all("_" in str(k) for k in data):
            return cls.from_tile_strategy(path)
        return cls.from_json(data)

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
            strategy = TileStrategy(path=os.fspath(strategy), tile=tile)
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
                                                          strategy.path, "tile": list(strategy.tile)})

    def to_tile_strategy(self, path=None, *, num_steps: Optional[int] = None, grid=None) -> dict:
        """FastVideo's STA mask-strategy JSON (``{"step_layer_head": [wt, wh, ww]}``) of a plan whose sparse
        entries are all Tile windows of one tile; written atomically to ``path`` when given.

        Dense layers are left out (FastVideo runs an unlisted (step, layer) dense). A dense *head* in a
        layer with Tile heads needs ``grid``: it is written as the window that covers the grid. A phase
        open to the end needs ``num_steps``.
        """
        out: Dict[str, List[int]] = {}
        tiles = set()
        heads = self.num_heads
        for phase in self.phases:
            stop = phase.stop if phase.stop is not None else num_steps
            if stop is None:
                raise ValueError(f"phase {phase.start}..end is open: pass num_steps to write every step")
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
        from .patterns.checks import per_head

        inner = method.methods if isinstance(method, PerHead) else (method,)
        for m in inner:
            if not isinstance(m, (Tile, Dense)):
                raise ValueError(f"{m!r} is not a Tile window: only plans of Tile windows (and dense heads) export to "
                                 "a FastVideo STA strategy")
            if isinstance(m, Tile):
                tiles.add(m.tile if isinstance(m.tile, tuple) else (m.tile,) * 3)
        if isinstance(method, Tile):
            wins = per_head(method.window)
            if wins is not None:
                return [w if isinstance(w, tuple) else (w,) * 3 for w in wins]
            if heads is None:
                raise ValueError("the plan does not say its head count (num_heads): needed to write per-head windows")
            w = method.window if isinstance(method.window, tuple) else (method.window,) * 3
            return [w] * heads
        windows = []
        for m in inner:
            if isinstance(m, Dense):
                if grid is None or not tiles:
                    raise ValueError("a dense head beside Tile heads is written as the window covering the grid: "
                                     "pass grid=(T, H, W)")
                tile = next(iter(tiles))
                windows.append(tuple(-(-g // t) for g, t in zip(grid, tile)))
            else:
                windows.append(m.window if isinstance(m.window, tuple) else (m.window,) * 3)
        return windows

    # -------------------------------------------------------------- display
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

    def check_layers(self, num_layers: int) -> None:
        """ValueError when the plan was made for a model with another number of attention layers."""
        expected = self.sparse_plan.num_layers
        if expected is not None and expected != num_layers:
            model = self.sparse_plan.provenance.get("model_id") or "another model"
            raise ValueError(f"the plan is for {expected} attention layers ({model}); this model has {num_layers}: "
                             "calibrate a plan for it (dit-accel calibrate)")

    def plan(self, grid):
        raise ValueError("a SparsePlan has one method per (layer, step): dit_accel.apply resolves it per call")

    def to_dict(self) -> dict:
        return {"method": self.name, "plan": self.sparse_plan.to_json()}
