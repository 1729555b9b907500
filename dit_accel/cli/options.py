"""Method options shared by ``generate``, ``finetune`` and ``eval``.

Usage in a subcommand::

    def register(subparsers):
        p = subparsers.add_parser("generate", ...)
        add_method_options(p)
        p.set_defaults(func=run, _parser=p)

    def run(args):
        method = method_from_args(args)          # dit_accel.Method, validated
        schedule = schedule_from_args(args)      # dense_steps, ..., backend for dit_accel.apply

Every option defaults to ``None`` ("not given") so callers can layer defaults:
explicit flags > caller's defaults (e.g. a model preset) > the config class's
defaults. A flag that does not belong to the chosen method is an error, not
silently ignored. Errors go through ``parser.error`` and name the flag.
"""

from __future__ import annotations

import argparse
import re
from typing import Optional

from ..methods import Method, method_from_name

__all__ = [
    "METHODS",
    "BACKENDS",
    "add_method_options",
    "method_from_args",
    "schedule_from_args",
    "int_tuple",
    "int_list",
    "method_options_given",
    "check_method_flags",
]

METHODS = ("dense", "radial", "tile", "gna", "sla")
BACKENDS = ("auto", "triton", "torch", "flex")

# flag dest -> (config field, methods that take it)
_FIELDS = {
    "tile": ("tile", ("tile", "gna")),
    "window": ("window", ("tile",)),
    "kernel_size": ("kernel_size", ("gna",)),
    "stride": ("stride", ("gna",)),
    "dilation": ("dilation", ("gna",)),
    "causal": ("is_causal", ("gna",)),
    "decay": ("decay", ("radial",)),
    "sink_frames": ("sink_frames", ("radial",)),
    "radial_spatial": ("spatial", ("radial",)),
    "block_size": (None, ("radial", "sla")),  # radial: block_size, sla: block_q
    "topk": ("topk", ("sla",)),
    "negligible": ("negligible", ("sla",)),
    "feature_map": ("feature_map", ("sla",)),
    "linear_tokens": ("linear_tokens", ("sla",)),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def int_tuple(text: str):
    """``"6,8,8"`` / ``"6x8x8"`` / ``"(6, 8, 8)"`` -> ``(6, 8, 8)``; ``"7"`` -> ``7``."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("()[]")) if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or a comma-separated tuple like 6,8,8")
    return values[0] if len(values) == 1 else values


def int_list(text: str):
    """``"none"`` / ``""`` -> ``()``; ``"0,1"`` -> ``(0, 1)``."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    value = int_tuple(text)
    return value if isinstance(value, tuple) else (value,)


def _layers(text: str):
    """``--dense-layers 2`` = the first 2 layers; ``--dense-layers 0,5,7`` = those layers; ``none``."""
    value = int_list(text)
    if len(value) == 1 and "," not in text:
        return value[0]
    return list(value)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def add_method_options(parser: argparse.ArgumentParser, *, default_method: Optional[str] = "dense",
                       weights: bool = True) -> argparse.ArgumentParser:
    """Add ``--method``, the per-method options and the schedule options to ``parser``.

    Args:
        parser: an ``argparse`` parser (or subparser).
        default_method: value of ``--method`` when not given.
        weights: also add ``--weights DIR`` (trained SLA projections / LoRA from ``finetune``).
    """
    g = parser.add_argument_group("attention method")
    g.add_argument("--method", choices=METHODS, default=default_method,
                   help=f"attention method (default: {default_method}); dense runs through the same path as a baseline")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernel backend: auto (Triton on GPU, PyTorch otherwise), triton, torch, flex")
    t = parser.add_argument_group("tile / gna options (per-dimension tuples like 6,8,8 for T,H,W)")
    t.add_argument("--tile", type=int_tuple, default=None, metavar="T,H,W",
                   help="tokens per tile (tile: the STA tile; gna: tile used to make the window block-sparse)")
    t.add_argument("--window", type=int_tuple, default=None, metavar="T,H,W",
                   help="tile: window in tiles per dimension, odd (e.g. 3,3,3)")
    t.add_argument("--kernel-size", type=int_tuple, default=None, metavar="T,H,W",
                   help="gna: window size in tokens per dimension (>= 2)")
    t.add_argument("--stride", type=int_tuple, default=None, metavar="T,H,W", help="gna: stride (1 <= stride <= kernel)")
    t.add_argument("--dilation", type=int_tuple, default=None, metavar="T,H,W", help="gna: dilation (>= 1)")
    t.add_argument("--causal", action="store_true", default=None, help="gna: causal along every dimension")
    r = parser.add_argument_group("radial / sla options")
    r.add_argument("--decay", type=_fraction, default=None, help="radial: band decay in (0, 1] (paper: 0.95)")
    r.add_argument("--sink-frames", type=int_list, default=None, metavar="F,...",
                   help="radial: key frames every query attends to (default 0; 'none' disables)")
    r.add_argument("--radial-spatial", choices=("band", "window"), default=None,
                   help="radial: far frame pairs keep the reference raster band (band, default) or a 2-D "
                        "window of rows x columns on tiled order (window)")
    r.add_argument("--block-size", type=int, default=None, choices=(64, 128),
                   help="radial: block granularity; sla: query block size")
    r.add_argument("--topk", type=_fraction, default=None, help="sla: fraction of key blocks kept for softmax (0, 1]")
    r.add_argument("--negligible", type=_fraction, default=None, help="sla: fraction of key blocks skipped [0, 1-topk]")
    r.add_argument("--feature-map", choices=("softmax", "elu", "relu"), default=None, help="sla: linear-branch feature map")
    r.add_argument("--linear-tokens", choices=("marginal", "all"), default=None,
                   help="sla: tokens of the linear branch (marginal = paper, all = later reference code)")
    s = parser.add_argument_group("schedule (dense where sparsity hurts most)")
    s.add_argument("--dense-steps", type=_nonneg_int, default=None, metavar="N", help="first N denoising steps dense")
    s.add_argument("--dense-last-steps", type=_nonneg_int, default=None, metavar="N", help="last N denoising steps dense")
    s.add_argument("--dense-layers", type=_layers, default=None, metavar="N|L,L,...",
                   help="dense layers: the first N (e.g. 1) or an explicit list (e.g. 0,5,7)")
    if weights:
        s.add_argument("--weights", default=None, metavar="DIR",
                       help="trained weights from `dit-accel finetune` (SLA projections, LoRA)")
    return parser


def method_options_given(args: argparse.Namespace) -> dict:
    """The per-method flags the user gave: ``{dest: value}``."""
    return {dest: getattr(args, dest) for dest in _FIELDS if getattr(args, dest, None) is not None}


def method_from_args(args: argparse.Namespace, defaults: Optional[dict] = None,
                     parser: Optional[argparse.ArgumentParser] = None) -> Method:
    """Build the validated :class:`dit_accel.Method` from parsed options.

    Args:
        args: parsed arguments (from a parser that had :func:`add_method_options`).
        defaults: config field defaults to use for fields the user did not give
            (e.g. a model preset's paper values); fields not in the config are ignored.
        parser: where to report errors (``parser.error`` exits with status 2);
            defaults to ``args._parser`` when set, else a ``ValueError`` is raised.

    Example::

        args = parser.parse_args(["--method", "tile", "--tile", "6,8,8", "--window", "3,3,3"])
        method_from_args(args)   # Tile(tile=(6, 8, 8), window=(3, 3, 3))
    """
    parser = parser or getattr(args, "_parser", None)
    name = getattr(args, "method", None) or "dense"
    given = method_options_given(args)
    check_method_flags(args, parser)
    options = {}
    valid = _config_fields(name)
    for key, value in (defaults or {}).items():
        if key in valid:
            options[key] = value
    for dest, value in given.items():
        field = _FIELDS[dest][0] or ("block_size" if name == "radial" else "block_q")
        if dest == "causal":
            value = True
        options[field] = value
    try:
        return method_from_name(name, **options)
    except (ValueError, TypeError) as err:
        flag_of = {(_FIELDS[d][0] or ("block_size" if name == "radial" else "block_q")): _flag(d) for d in _FIELDS}
        field = next((f for f in sorted(options, key=len, reverse=True) if f".{f}=" in str(err)), None)
        prefix = f"{flag_of[field]}: " if field in flag_of and field in _given_fields(name, given) else ""
        _error(parser, prefix + str(err))


def check_method_flags(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Error (via ``parser.error``) when a per-method flag does not belong to ``--method``."""
    parser = parser or getattr(args, "_parser", None)
    name = getattr(args, "method", None) or "dense"
    wrong = [dest for dest in method_options_given(args) if name not in _FIELDS[dest][1]]
    if wrong:
        flags = ", ".join(_flag(d) for d in wrong)
        _error(parser, f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --method {name}; "
                       + "; ".join(f"{_flag(d)} is for --method {'/'.join(_FIELDS[d][1])}" for d in wrong))


def schedule_from_args(args: argparse.Namespace, defaults: Optional[dict] = None) -> dict:
    """Keyword arguments for :func:`dit_accel.apply` from the schedule flags.

    Returns ``dense_steps``, ``dense_last_steps``, ``dense_layers``, ``backend``
    (and ``weights`` when given); flags not given take ``defaults`` (e.g. a
    preset's paper schedule), then 0 / None / "auto".
    """
    defaults = defaults or {}
    out = {
        "dense_steps": 0,
        "dense_last_steps": 0,
        "dense_layers": None,
        "backend": "auto",
    }
    for key in out:
        if key in defaults:
            out[key] = defaults[key]
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if isinstance(out["dense_layers"], (list, tuple)) and not out["dense_layers"]:
        out["dense_layers"] = None
    if getattr(args, "weights", None):
        out["weights"] = args.weights
    return out


def _config_fields(name: str) -> set:
    from dataclasses import fields

    return {f.name for f in fields(type(method_from_name(name)))}


def _given_fields(name: str, given: dict) -> set:
    return {(_FIELDS[d][0] or ("block_size" if name == "radial" else "block_q")) for d in given}


def _error(parser, message: str):
    if parser is not None:
        parser.error(message)  # exits with status 2
    raise ValueError(message)
