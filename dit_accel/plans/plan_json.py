"""Reading and writing a :class:`~dit_accel.plans.sparse_plan.SparsePlan`'s JSON: method configs to and from JSON, the
field checks every reader runs (each failure one line naming the file and the field), provenance, and the
atomic write. The format itself is described in :mod:`dit_accel.plans.sparse_plan`."""


from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional, Tuple

from .._util import existing_ancestor, is_int, to_jsonable
from ..methods import Method, TileStrategy
from .per_head import PerHead

__all__ = ["method_to_json", "method_from_json", "prompts_hash", "write_atomic", "FORMAT"]


FORMAT = "dit_accel.sparse_plan"


FORMAT_VERSION = 1


def write_atomic(path, data) -> Path:
    """Write ``data`` (str or bytes) to ``path`` through a temporary file in the same folder and ``os.replace``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _naming(err, path) from None
    payload = data.encode() if isinstance(data, str) else bytes(data)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and err.errno is not None:
            raise _naming(err, path) from None
        raise
    return path


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` (same class and errno) naming ``path``, not the temporary file beside it that is gone, and what to do
    (before: "Permission denied; nothing written" only)."""
    full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    todo = "free space on that disk" if full else f"make {existing_ancestor(path.parent) or path.parent} writable"
    kept = " (the file already there is unchanged)" if os.path.lexists(path) else ""
    try:
        return type(err)(err.errno, f"{err.strerror or err}; nothing written{kept}: {todo}, or write the file to "
                                    "another folder", str(path))
    except TypeError:  # an OSError subclass of another signature: as it was
        return err


def prompts_hash(prompts: Iterable[str]) -> str:
    """sha256 of the prompts, one per line (the calibration set's fingerprint in a plan's provenance)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


class _Pairs(dict):
    """A JSON object that remembers the keys its text gave more than once (``json`` keeps the last silently)."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.repeated = []
        if len(self) < len(pairs):  # (a FastVideo strategy holds steps x layers x heads keys: no pairwise search)
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    self.repeated.append(key)
                seen.add(key)


def _field(where: str, key) -> str:
    """``where`` and one more step into it, spelled as the plan's messages spell fields."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key)}]"


def repeated_key(text: str) -> Optional[str]:
    """The field (``phases[1].layers["3"]``) of the first key that ``text``, valid JSON, gives twice in one object,
    or None: a hand-edited plan's second entry for a layer would otherwise replace its first without a word."""
    def walk(value, where: str) -> Optional[str]:
        if isinstance(value, _Pairs) and value.repeated:
            return _field(where, value.repeated[0])
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            found = walk(item, _field(where, key))
            if found:
                return found
        return None

    return walk(json.loads(text, object_pairs_hook=_Pairs), "")


def method_to_json(method: Method) -> dict:
    """A method config as JSON values: ``{"method": name, field: value, ...}`` (PerHead: ``"heads": [...]``)."""
    if isinstance(method, PerHead):
        return {"method": PerHead.name, "heads": [method_to_json(m) for m in method.methods]}
    if isinstance(method, Method) and hasattr(method, "for_layer_step"):  # TileStrategy, sparse_plan.PlanMethod
        raise ValueError(f"{type(method).__name__} is a schedule, not a per-(step, layer) method config; convert it "
                         "with SparsePlan.from_tile_strategy")
    return to_jsonable(method.to_dict())


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _show(value) -> str:
    """A JSON value as the file spells it, cut to 60 characters (for one-line messages)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Reads a plan's JSON value field by field: every problem is one ValueError line naming the file (or
    "the plan" for a value with no file) and the field, e.g. ``plan.json: phases[1].layers["one"]: ...``."""

    def __init__(self, source: Optional[str]):
        self.source = source or "the plan"

    def fail(self, where: str, problem: str):
        raise ValueError(f"{self.source}: {where}: {problem}")

    def count(self, where: str, value, *, minimum: int = 1, nullable: bool = True) -> Optional[int]:
        if value is None and nullable:
            return None
        if not is_int(value) or value < minimum:
            self.fail(where, f"must be a whole number >= {minimum}{' or null' if nullable else ''}; got {_show(value)}")
        return int(value)

    def obj(self, where: str, value, what: str) -> dict:
        if not isinstance(value, Mapping):
            self.fail(where, f"must be {what}; got {_show(value)}")
        return value

    def known(self, where: str, value: Mapping, fields: Tuple[str, ...], what: str) -> None:
        for key in value:
            if key not in fields:
                self.fail(f"{where}.{key}" if where else str(key),
                          f"not a field of {what} (its fields: {', '.join(fields)})")


_METHOD_EXAMPLE = '{"method": "tile", "tile": [1, 4, 4], "window": [1, 1, 3]}'


def _method_entry(r: _Fields, where: str, data, heads: Optional[int] = None, inner: bool = False) -> Method:
    """One method entry of a plan, validated: a registered method's options, or a per-head list of them."""
    from ..methods import canonical_method_name, registered_methods

    r.obj(where, data, f"a method entry such as {_METHOD_EXAMPLE}")
    name = data.get("method")
    if not isinstance(name, str):
        r.fail(f"{where}.method", f"must be a method name such as \"tile\"; got {_show(name)}")
    if name == PerHead.name:
        if inner:
            r.fail(f"{where}.method", "a per_head entry cannot hold another per_head entry: one method per head")
        r.known(where, data, ("method", "heads"), "a per_head entry")
        entries = data.get("heads")
        if not isinstance(entries, list) or not entries:
            r.fail(f"{where}.heads", f"must be a non-empty list of method entries, one per head; got {_show(entries)}")
        if heads is not None and len(entries) != heads:
            r.fail(f"{where}.heads", f"has {len(entries)} entries; the plan is for {heads} heads (num_heads)")
        methods = tuple(_method_entry(r, f"{where}.heads[{i}]", h, inner=True) for i, h in enumerate(entries))
        try:
            return PerHead(methods)
        except (ValueError, TypeError) as err:
            r.fail(where, " ".join(str(err).split()))
    entry = registered_methods().get(canonical_method_name(name))
    if entry is None:
        r.fail(f"{where}.method", f"unknown method {_show(name)}; choose one of "
                                  f"{', '.join(n for n in registered_methods() if n != 'tile_strategy')}, per_head")
    if entry.cls is TileStrategy or hasattr(entry.cls, "for_layer_step"):
        r.fail(f"{where}.method", f"{name} is a schedule, not a method for one (step, layer): import a FastVideo "
                                  "strategy with SparsePlan.from_tile_strategy")
    options = tuple(f.name for f in dataclasses.fields(entry.cls) if f.init)
    r.known(where, data, ("method", *options), f"method {name}")
    values = {k: _tuples(v) for k, v in data.items() if k != "method"}
    try:
        method = entry.cls(**values)
        hash(method)  # configs are cache keys: a JSON object left inside one would fail at the first call
    except Exception as err:  # noqa: BLE001 - a registered config's own check, whatever it raises, is the reason
        reason = " ".join(str(err).split()) or type(err).__name__
        key = next((k for k in values if re.search(rf"(^|[ .]){re.escape(k)}(\[[0-9]+\])?=", reason)), None)
        r.fail(f"{where}.{key}" if key else where, reason)
    own = getattr(method, "heads", None)  # a Tile's per-head windows, a GNA's per-head kernel sizes
    if heads is not None and own is not None and own != heads:
        r.fail(where, f"{type(method).__name__} has windows for {own} heads; the plan is for {heads} heads "
                      "(num_heads): give one window per head, or one window for every head")
    return method


def method_from_json(data: Mapping, *, where: str = "method", source: Optional[str] = None) -> Method:
    """The inverse of :func:`method_to_json`: ValueError naming ``source`` and ``where`` for a bad entry."""
    return _method_entry(_Fields(source), where, data)


_PHASE_FIELDS = ("steps", "default", "layers")


_PLAN_FIELDS = ("format", "format_version", "num_layers", "num_heads", "phases", "provenance")


_CALL_COUNTS = ("num_frames", "height", "width", "num_inference_steps", "max_sequence_length")


def _provenance(r: _Fields, data) -> dict:
    """The provenance object; the fields dit_accel reads are checked (the rest is a record for people)."""
    if data is None:
        return {}
    r.obj("provenance", data, "an object (model_class, grids, steps, ...) or null")
    out = dict(data)
    for key in ("model_class", "model_id"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            r.fail(f"provenance.{key}", f"must be a non-empty string or null; got {_show(value)}")
    grids = data.get("grids")
    if grids is not None:
        if not isinstance(grids, list):
            r.fail("provenance.grids", f"must be a list of token grids such as [[4, 12, 12]]; got {_show(grids)}")
        for i, grid in enumerate(grids):
            if not (isinstance(grid, list) and 1 <= len(grid) <= 4 and all(is_int(g) and g >= 1 for g in grid)):
                r.fail(f"provenance.grids[{i}]", f"must be a token grid: 1 to 4 whole numbers >= 1 such as "
                                                 f"[4, 12, 12]; got {_show(grid)}")
        out["grids"] = [[int(g) for g in grid] for grid in grids]
    for key in ("steps", "head_dim"):
        out[key] = r.count(f"provenance.{key}", data.get(key))
        if key not in data:
            out.pop(key)
    timesteps = data.get("timesteps")
    if timesteps is not None and not (isinstance(timesteps, list) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
            for t in timesteps)):
        r.fail("provenance.timesteps", f"must be a list of numbers >= 0 (one per step) or null; got {_show(timesteps)}")
    elif timesteps and isinstance(out.get("steps"), int) and len(timesteps) != out["steps"]:
        # (finetune --plan finds a noise level's step by its place in this list: 3 timesteps for 4 steps trained
        # step 3 never, and the last noise level as step 2, without a word)
        r.fail("provenance.timesteps", f"has {len(timesteps)} entries; the plan is for {out['steps']} steps "
                                       "(provenance.steps): one timestep per step, in step order")
    call = data.get("call")
    if call is not None:
        r.obj("provenance.call", call, "an object of the pipeline call's settings or null")
        for key in _CALL_COUNTS:
            r.count(f"provenance.call.{key}", call.get(key))
    cost = data.get("cost_model")
    if cost is not None:
        r.obj("provenance.cost_model", cost, "an object (arch, kernel, terms) or null")
    return out


def stamp_quality(plan):
    """``plan`` (a SparsePlan) with its ``provenance.quality`` naming the content it describes (``plan_sha256``):
    :func:`without_stale_quality` then tells the record of this plan from that of a plan edited since."""
    quality = plan.provenance.get("quality")
    if not isinstance(quality, Mapping):
        return plan
    quality = {**quality, "plan_sha256": plan.content_hash()}
    return dataclasses.replace(plan, provenance={**plan.provenance, "quality": quality})


def without_stale_quality(plan):
    """``plan`` (a SparsePlan), without its ``provenance.quality`` when that record names another plan's content
    (``plan_sha256``, which calibrate writes): the file was edited since, and ``generate`` printed the calibrated
    plan's PSNR for the edited one, without a word. Warns (DitAccelWarning) naming the file."""
    import warnings

    from .._util import DitAccelWarning

    quality = plan.provenance.get("quality")
    made = quality.get("plan_sha256") if isinstance(quality, Mapping) else None
    if made is None or made == plan.content_hash():
        return plan
    warnings.warn(f"dit_accel: {plan.source or 'the plan'}: provenance.quality describes the plan calibrate wrote "
                  f"(content sha256 {str(made)[:12]}), not this one ({plan.content_hash()[:12]}): the plan was edited "
                  "since, so its PSNR figures are left out; calibrate again to measure this one", DitAccelWarning,
                  stacklevel=3)
    provenance = {k: v for k, v in plan.provenance.items() if k != "quality"}
    return dataclasses.replace(plan, provenance=provenance)


def with_comma_hint(err: ValueError) -> ValueError:
    """``err`` (a plan file's :class:`~dit_accel.atomic_files.BadFileError`), saying so when the JSON fails at a
    comma after the last entry of an object or list, which hand edits leave and JSON allows nowhere (before, only
    the parser's "Expecting property name enclosed in double quotes", pointing past the comma)."""
    from ..atomic_files import BadFileError

    if not isinstance(err, BadFileError) or not err.problem.startswith("is not valid JSON"):
        return err
    try:
        text = Path(err.path).read_text(encoding="utf-8-sig")
        json.loads(text)
    except json.JSONDecodeError as bad:
        before = text[:bad.pos].rstrip()
        if text[bad.pos:bad.pos + 1] in ("}", "]") and before.endswith(","):
            line = before.count("\n") + 1
            column = len(before) - 1 - before.rfind("\n")
            return BadFileError(err.path, f"is not valid JSON: a comma after the last entry at line {line}, column "
                                          f"{column}, before '{text[bad.pos]}' (JSON allows none there): remove it",
                                err.expected)
    except (OSError, UnicodeDecodeError):
        pass
    return err
