"""Argument checks shared by the patterns and the method configs: one message per rule.

Shape-free checks (an int or a tuple of ints, a bool or a tuple of bools, a
positive block size) run when a method config is built; grid checks (one value
per grid dimension) run in the pattern functions once the grid is known. The
``owner`` prefix (``"GNA."``) names the config a value came from. Numpy integer
scalars count as ints and numpy bools as bools (stored as Python's).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

from .._util import is_bool, is_int, is_number

__all__ = ["as_grid", "int_or_tuple", "bool_or_tuple", "flag", "per_dim", "per_dim_bool", "positive_int",
           "number_in", "share_beside", "ints", "per_head", "check_search", "check_mask_memory"]

IntOrTuple = Union[int, Tuple[int, ...]]


def _fail(owner: str, name: str, value, allowed: str, exc=ValueError):
    raise exc(f"{owner}{name}={value!r} is invalid: {allowed}")


def as_grid(grid) -> Tuple[int, ...]:
    """``(L,)``, ``(H, W)`` or ``(T, H, W)`` of positive ints (an int is a 1-D grid)."""
    if is_int(grid):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or not all(  # torch.Size is a tuple
            is_int(v) and v >= 1 for v in grid):
        _fail("", "grid", grid, "expected 1 to 3 positive ints, (L,), (H, W) or (T, H, W)")
    return tuple(int(v) for v in grid)


def ints(owner: str, name: str, value, *, minimum: int) -> Tuple[int, ...]:
    """An int or a non-empty sequence of at most 3 ints, each ``>= minimum``, as a tuple."""
    items = (value,) if is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None or not items or not all(is_int(v) for v in items):
        _fail(owner, name, value, "expected an int or a tuple of ints, one per grid dimension", TypeError)
    if len(items) > 3:
        _fail(owner, name, value, "at most 3 dimensions (T, H, W) are supported")
    if any(v < minimum for v in items):
        _fail(owner, name, value, f"every value must be >= {minimum}")
    return tuple(int(v) for v in items)


def int_or_tuple(owner: str, name: str, value, *, minimum: int) -> IntOrTuple:
    """Shape-free: an int (shared by every dimension) or a tuple of ints (one per dimension)."""
    items = ints(owner, name, value, minimum=minimum)
    return items if not is_int(value) else items[0]


def per_head(value) -> Optional[tuple]:
    """The per-head values of a window or kernel size given one per attention head (a sequence holding at
    least one sequence, e.g. ``((3, 3, 3), (1, 6, 10))``) as a tuple, or None for one value shared by all heads."""
    if isinstance(value, (tuple, list)) and any(isinstance(v, (tuple, list)) for v in value):
        return tuple(value)
    return None


def flag(owner: str, name: str, value) -> bool:
    """A switch field: True or False (numpy's too), as a Python bool; ValueError otherwise (a string such as
    ``"no"`` is truthy and would turn it on)."""
    if not is_bool(value):
        _fail(owner, name, value, "must be True or False")
    return bool(value)


def bool_or_tuple(owner: str, name: str, value) -> Union[bool, Tuple[bool, ...]]:
    """Shape-free: a bool or a non-empty tuple of bools (Python bools either way)."""
    if is_bool(value):
        return bool(value)
    if isinstance(value, (tuple, list)) and value and all(is_bool(v) for v in value) and len(value) <= 3:
        return tuple(bool(v) for v in value)
    _fail(owner, name, value, "expected a bool or a tuple of bools, one per grid dimension", TypeError)


def per_dim(name: str, value, ndim: int, *, minimum: int = 1, owner: str = "") -> Tuple[int, ...]:
    """Against a grid of ``ndim`` dimensions: an int broadcast, or exactly ``ndim`` ints."""
    items = ints(owner, name, value, minimum=minimum)
    if len(items) == 1 and is_int(value):
        return items * ndim
    if len(items) != ndim:
        raise ValueError(f"{owner}{name}={items!r} has {len(items)} values but the grid has {ndim} dimensions; "
                         "pass one int or one value per grid dimension")
    return items


def per_dim_bool(name: str, value, ndim: int, *, owner: str = "") -> Tuple[bool, ...]:
    """Against a grid of ``ndim`` dimensions: a bool broadcast, or exactly ``ndim`` bools."""
    value = bool_or_tuple(owner, name, value)
    if isinstance(value, bool):
        return (value,) * ndim
    if len(value) != ndim:
        raise ValueError(f"{owner}{name}={value!r} has {len(value)} values but the grid has {ndim} dimensions; "
                         "pass one bool or one per grid dimension")
    return value


def positive_int(name: str, value, *, owner: str = "", allowed: Tuple[int, ...] = ()) -> int:
    """A positive int (a block size), optionally one of ``allowed``."""
    if not is_int(value) or value < 1:
        _fail(owner, name, value, "expected a positive int such as 64 or 128", TypeError if not is_int(value)
              else ValueError)
    if allowed and value not in allowed:
        _fail(owner, name, value, f"must be one of {', '.join(map(str, allowed))}")
    return int(value)


def number_in(name: str, value, lo: float, hi: float, *, owner: str = "", lo_open: bool = False) -> float:
    """A real number (Python or numpy) in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), as a float."""
    bracket = "(" if lo_open else "["
    if not is_number(value):
        _fail(owner, name, value, f"must be a number in {bracket}{lo:g}, {hi:g}]", TypeError)
    value = float(value)
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        _fail(owner, name, value, f"must be a number in {bracket}{lo:g}, {hi:g}]")
    return value


def share_beside(name: str, value, taken: float, *, owner: str = "") -> float:
    """A fraction in ``[0, 1 - taken]``, as :func:`number_in` checks it, beside the fraction ``taken``: the two may
    sum to 1 exactly, which ``1 - taken`` in floats can fall short of (1 - 0.9 is 0.0999...: SLA's ``negligible=0.1``
    beside ``topk=0.9`` was refused), so a value within rounding of the bound is taken as the bound."""
    return min(number_in(name, value, 0.0, 1.0 - taken + 1e-9, owner=owner), 1.0 - taken)


def check_options(where: str, cls: type, options: dict, extra=()) -> None:
    """TypeError naming the options of config class ``cls`` for keys in ``options`` it does not take (its fields,
    and ``extra`` ones such as a record's keys): the dataclass's own "__init__() got an unexpected keyword
    argument" named neither the method nor what it takes."""
    import dataclasses

    valid = [f.name for f in dataclasses.fields(cls) if f.init] + list(extra)
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise TypeError(f"{where}: {cls.__name__} has no option {', '.join(map(repr, unknown))}; valid options: "
                        f"{', '.join(valid) or 'none'}")


def check_search(config, given: dict) -> None:
    """``config.at_density``'s search options ``given`` against the keyword-only ones its ``_at_density``
    takes: TypeError naming the public ``<Method>.at_density`` (not the private worker) and what it takes."""
    import inspect

    params = inspect.signature(config._at_density).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = [name for name in given if name not in allowed]
    if unknown:
        where = f"{type(config).__name__}.at_density"
        takes = f"it takes {', '.join(f'{a}=' for a in allowed)}" if allowed else "it takes no search options"
        raise TypeError(f"{where}(grid, density) got {', '.join(map(repr, unknown))}: {takes}")


def available_memory() -> Optional[int]:
    """Bytes this machine can still allocate without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_room(need: int, what: str, advice: str) -> None:
    """MemoryError before ``need`` bytes this machine cannot hold (the allocation would succeed and the system's
    out-of-memory killer then end the process without a word): ``what`` materialises them, ``advice`` says what to
    do instead."""
    free = available_memory()
    if free is not None and need > free:
        raise MemoryError(f"{what} ({need / 2**30:.1f} GiB while it is built) and this machine has "
                          f"{free / 2**30:.1f} GiB available: {advice}")


def check_mask_memory(what: str, grid: Tuple[int, ...], layout: str, *, heads: int = 1, copies: int = 1) -> None:
    """:func:`check_room` for a token mask of ``heads`` x ``N x N`` bools (``copies`` of it alive at once while it
    is built): ``tile_mask((30, 48, 80), ...)``, its docstring's grid, is 13 GiB."""
    n = math.prod(grid)
    # (+ each dimension's L x L relation, built through int64 index and bool temporaries: a 1-D grid's is N x N)
    need = n * n * heads * copies + 40 * sum(extent * extent for extent in grid)
    check_room(need, f"{what} on grid {tuple(grid)} materialises {heads} x {n} x {n} bools",
               f"masks are for inspection at small grids; use {layout} (the block layout, built without N x N) or a "
               "smaller grid")
