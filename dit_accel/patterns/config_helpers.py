"""Small helpers of the method configs (:mod:`dit_accel.methods`), kept apart so that file stays one screen of
configs: setting a frozen config's checked fields, the checked ``(layer, step)`` of a per-call query and the checked
``(grid, shares)`` of :meth:`~dit_accel.methods.Method.for_shares`."""

from __future__ import annotations

from typing import Tuple

from .._util import is_int
from .checks import as_grid

__all__ = ["freeze", "layer_step", "grid_shares"]

_WHAT = {"layer": "the attention layer, counted from 0 in model order",
         "step": "the denoising step, counted from 0 (both classifier-free-guidance calls of a step share it)"}


def freeze(obj, **values) -> None:
    """Set fields of a frozen dataclass (its ``__post_init__``'s checked, normalised values)."""
    for key, value in values.items():
        object.__setattr__(obj, key, value)


def layer_step(owner: str, layer, step) -> Tuple[int, int]:
    """``(layer, step)`` as ints, or a TypeError (not an int: ``"0"``, ``1.5``) / ValueError (negative) naming
    ``owner`` (``"TileStrategy.for_layer_step"``), the argument and what it counts."""
    for name, value in (("layer", layer), ("step", step)):
        if not is_int(value) or value < 0:
            raise (TypeError if not is_int(value) else ValueError)(
                f"{owner}({name}={value!r}) is invalid: an int >= 0, {_WHAT[name]}")
    return int(layer), int(step)


def grid_shares(owner: str, grid, shares) -> Tuple[Tuple[int, ...], int]:
    """``(grid, shares)`` of ``owner`` (``"GNA.for_shares"``) checked: the grid as :func:`~.checks.as_grid` takes it,
    ``shares`` an int >= 1 (a bool refused); TypeError / ValueError naming the argument and what it counts."""
    try:
        grid = as_grid(grid)
    except ValueError as err:
        raise ValueError(f"{owner}(grid, shares): {err}; pass the token grid of the attention call, e.g. "
                         "(21, 30, 52)") from None
    if not is_int(shares) or shares < 1:
        raise (TypeError if not is_int(shares) else ValueError)(
            f"{owner}(shares={shares!r}) is invalid: an int >= 1, the number of ring ranks the grid's first axis "
            "is split across (the context-parallel ring degree; 1 runs the config as it is)")
    return grid, int(shares)
