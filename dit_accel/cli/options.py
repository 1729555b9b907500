"""Method options shared by ``generate``, ``finetune`` and ``eval``, derived from the method registry.

Every registered method's config fields that carry CLI metadata
(:func:`dit_accel.option`) become flags; methods that share a flag (``--tile``
for Tile and GNA, ``--block-size`` for Radial and SLA) share one option. A
method registered outside the package gets its flags the same way.

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
from typing import Dict, List, Optional, Tuple

from .._util import int_at_least
from ..methods import METHOD_ALIASES, CliOption, Method, canonical_method_name, method_from_name, registered_methods

__all__ = ["BACKENDS", "HelpFormatter", "plain", "add_method_options", "method_from_args", "schedule_from_args", "int_tuple", "int_list",
           "method_options_given", "check_method_flags", "method_flags", "check_plan_flags", "add_plan_any_grid",
           "GUIDANCE_MAX", "guidance_error", "refuse_method_flags"]

#: ``auto`` and dit_accel.kernels.backends.BACKENDS (spelled out: this module is imported without torch).
BACKENDS = ("auto", "triton", "flex", "torch", "fa4", "cudnn", "natten")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; "(default: X)" after an option's help only when X says something (not None or
    False) and the help text does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        # A flag without a value (store_true/store_false) says what giving it does: its default (True for
        # --no-baseline) only reads as the opposite of what it does.
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text.lower()
                or action.option_strings == [] or isinstance(action, argparse._HelpAction) or action.nargs == 0):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"

    def _split_lines(self, text, width):
        # Names such as tiny-minimax-h3 or --plan-any-grid stay whole: lines break at spaces only.
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def plain(docstring: str) -> str:
    """A module docstring as --help text: without reST markup (``code``, literal-block ``::``)."""
    text = re.sub(r"``([^`]+)``", r"\1", docstring)
    text = re.sub(r":(?:func|class|meth|mod|data):`~?([^`]+)`", r"\1", text)
    return re.sub(r"::\n", ":\n", text)


def int_tuple(text: str):
    """``"6,8,8"`` / ``"6x8x8"`` / ``"(6, 8, 8)"`` -> ``(6, 8, 8)``; ``"7"`` -> ``7``. An empty item (``1,,1,1``: a
    value left out) is refused, where it was dropped (a 3-D window from a 4-value typo); one trailing comma is
    Python's one-tuple (``1,``)."""
    body = text.strip().strip("()[]").strip()
    body = body[:-1].rstrip() if body.endswith(",") else body
    parts = re.split(r"\s*[,x]\s*|\s+", body) if body else []
    if "" in parts:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give every value, e.g. 6,8,8")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or a comma-separated tuple like 6,8,8")
    return values[0] if len(values) == 1 else values


def int_list(text: str):
    """``"none"`` / ``""`` -> ``()``; ``"0,1"`` / ``"[0, 1]"`` -> ``(0, 1)``. ``x`` is refused: it separates a
    grid's sizes (``6x8x8``), and ``1x2`` read as the list 1, 2 (layers 1 and 2, for a typo of 1,2 or 12)."""
    if text.strip().lower() in ("", "none", "off", "[]"):
        return ()
    if "x" in text.lower():
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers: separate them by commas, e.g. 0,5,7 "
                                         "(x separates a grid's sizes, as in 6x8x8)")
    try:
        value = int_tuple(text)
    except argparse.ArgumentTypeError as err:  # (before: "... a comma-separated tuple like 6,8,8", a grid's form)
        if "empty item" in str(err):
            raise
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers: give them separated by commas, e.g. "
                                         "0,5,7 (or none)") from None
    return value if isinstance(value, tuple) else (value,)


def _layers(text: str):
    """``--dense-layers 2`` = the first 2 layers; ``0,5,7`` or ``[1]`` = those layers; ``none``."""
    value = int_list(text)
    if len(value) == 1 and not re.search(r"[,\[\]()]", text):
        return value[0]
    return list(value)


#: The largest --guidance-scale taken. Diffusers bounds none, but models run at about 1 to 20, and a scale such as 1e308
#: multiplied the guided noise prediction past float range: NaN frames, refused after the whole run and blamed on the
#: weights.
GUIDANCE_MAX = 100.0


def guidance_error(value, flag: str = "--guidance-scale") -> Optional[str]:
    """Why ``value`` of ``flag`` is no guidance scale to run (None when it is, or is unset): NaN, infinity, a negative
    number, or one past :data:`GUIDANCE_MAX`."""
    from .checks import finite_error

    problem = finite_error(value, flag, minimum=0)
    if problem is None and value is not None and value > GUIDANCE_MAX:
        problem = (f"{flag} {value:g} is past any model's range: give a scale from 0 to {GUIDANCE_MAX:g} (models run "
                   "at about 1 to 20), or leave it out for the model's default")
    return problem


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


_nonneg_int = int_at_least(0)


_TYPES = {"ints": int_tuple, "int": int, "float": _number, "str": str, "int_list": int_list}


def method_flags() -> Dict[str, Tuple[CliOption, List[Tuple[str, str]]]]:
    """``{flag: (first option, [(method, field), ...])}`` over every registered method, in registration order."""
    flags: Dict[str, Tuple[CliOption, List[Tuple[str, str]]]] = {}
    for name, entry in registered_methods().items():
        for field_name, opt in entry.cli_options().items():
            flag = opt.flag or "--" + field_name.replace("_", "-")
            first, users = flags.setdefault(flag, (opt, []))
            if first.parse != opt.parse:
                raise ValueError(f"methods {users[0][0]!r} and {name!r} both use {flag} but parse it differently "
                                 f"({first.parse} vs {opt.parse}); give one of them another flag")
            users.append((name, field_name))
    return flags


def _backend(text: str) -> str:
    """``--backend``: a vendor backend whose package is not installed is refused as the flags are read (before:
    by ``apply`` once the model had loaded, or at the first attention call)."""
    from ..kernels.block_sparse.backends import NAMES, install_reason

    why = install_reason(text) if text in NAMES else None
    if why is not None:
        why = why.replace("backend='auto' or backend='triton'", "--backend auto or --backend triton")
        raise argparse.ArgumentTypeError(f"{text!r} cannot run in this environment: {why}")
    return text


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_method_options(parser: argparse.ArgumentParser, *, default_method: Optional[str] = "dense",
                       weights: bool = True) -> argparse.ArgumentParser:
    """Add ``--method``, every registered method's options and the schedule options to ``parser``.

    Args:
        parser: an ``argparse`` parser (or subparser).
        default_method: value of ``--method`` when not given.
        weights: also add ``--weights DIR`` (trained SLA projections / LoRA from ``finetune``).
    """
    names = list(registered_methods())
    g = parser.add_argument_group("attention method")
    aliases = ", ".join(f"{alias} = {name}" for alias, name in METHOD_ALIASES.items())
    g.add_argument("--method", type=canonical_method_name, choices=names, default=default_method,
                   metavar="{" + ",".join(names) + "}",
                   help="attention method" + (f" (default: {default_method})" if default_method else "") +
                        f"; dense runs through the same path as a baseline; aliases: {aliases}; "
                        "`dit-accel info` describes each")
    g.add_argument("--backend", type=_backend, choices=BACKENDS, default=None,
                   help="kernel backend: auto (on a GPU the self-checked kernels, by timing where autotune is on; PyTorch "
                        "otherwise) or one "
                        f"of {', '.join(b for b in BACKENDS if b != 'auto')} (vendor ones need their package; "
                        "`dit-accel info` lists what this machine has)")
    m = parser.add_argument_group("method options (per-dimension tuples like 6,8,8 for T,H,W; each flag names the "
                                  "methods it applies to)")
    for flag, (opt, users) in method_flags().items():
        helps = list(dict.fromkeys(registered_methods()[n].cls.__dataclass_fields__[f].metadata["cli"].help
                                   for n, f in users))
        kwargs = dict(dest=_dest(flag), default=None, help="; ".join(helps))
        if opt.parse == "flag":
            m.add_argument(flag, action="store_true", **kwargs)
        else:
            m.add_argument(flag, type=_TYPES[opt.parse], metavar=opt.metavar, choices=opt.choices, **kwargs)
    s = parser.add_argument_group("schedule (dense where sparsity hurts most)")
    s.add_argument("--dense-steps", type=_nonneg_int, default=None, metavar="N", help="first N denoising steps dense")
    s.add_argument("--dense-last-steps", type=_nonneg_int, default=None, metavar="N", help="last N denoising steps dense")
    s.add_argument("--dense-layers", type=_layers, default=None, metavar="N|L,L,...",
                   help="dense layers: the first N (e.g. 1) or an explicit list (e.g. 0,5,7 or [1])")
    if weights:
        s.add_argument("--weights", default=None, metavar="DIR",
                       help="trained weights from `dit-accel finetune` (SLA projections, LoRA)")
    return parser


def refuse_method_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """``--method`` and every per-method flag on a command that takes methods by ``--methods`` and their options by
    ``--method-config`` or ``--stacks`` (``eval``): one line naming the flag and how to say it there, in the config's
    field names (before: argparse's "unrecognized arguments: --tile 2,4,4", or "ambiguous option: --method could
    match --methods, --method-config")."""
    users = method_flags()

    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string == "--method":
                parser.error(f"--method is a flag of generate and finetune; {command} compares methods: name them "
                             f"with --methods (e.g. --methods dense,{values or 'tile'}) and give their options in "
                             "--method-config FILE or --stacks")
            opt, methods = users[option_string]
            ways = "; ".join(_config_ways(name, field, opt.parse, values) for name, field in methods)
            parser.error(f"{option_string} is a flag of generate and finetune; {command} takes a method's options "
                         f"as its config fields, in --method-config FILE or --stacks: {ways}")

    group = parser.add_argument_group("generate's method flags (refused here, with the way to say them)")
    group.add_argument("--method", action=Refuse, nargs="?", default=None, help=argparse.SUPPRESS)
    for flag, (opt, _) in users.items():
        group.add_argument(flag, action=Refuse, nargs=0 if opt.parse == "flag" else "?", default=None,
                           dest="refused_" + _dest(flag), help=argparse.SUPPRESS)


def _config_ways(name: str, field: str, parse: str, text) -> str:
    """How ``--method-config`` and ``--stacks`` say a method flag given as ``text`` (a list: a switch)."""
    if not isinstance(text, str):
        text = "true" if parse == "flag" else "VALUE"
    parts = [p for p in re.split(r"\s*[,x]\s*|\s+", text.strip().strip("()[]").strip()) if p]
    if parse == "int_list" and text.strip().lower() in ("none", "off", "[]"):
        as_json, as_stack = "[]", "none"
    elif parse in ("ints", "int_list") and (len(parts) > 1 or parse == "int_list"):
        as_json, as_stack = "[" + ", ".join(parts) + "]", "/".join(parts)
    else:
        as_json, as_stack = (f'"{text}"' if parse == "str" else text), text
    return f'{{"{name}": {{"{field}": {as_json}}}}} or {name}:{field}={as_stack}'


def method_options_given(args: argparse.Namespace) -> Dict[str, object]:
    """The per-method flags the user gave: ``{flag: value}``."""
    given = {flag: getattr(args, _dest(flag), None) for flag in method_flags()}
    return {flag: value for flag, value in given.items() if value is not None and value is not False}


_SCHEDULE_FLAGS = ("--dense-steps", "--dense-last-steps", "--dense-layers")


def check_plan_flags(args: argparse.Namespace) -> None:
    """ValueError when ``--plan`` comes with flags the plan replaces (``generate`` and ``finetune`` share it):
    ``--method`` and the method options (the plan names the method of every layer, head and step), and the
    schedule flags (its phases and entries say which steps and layers run dense)."""
    if not getattr(args, "plan", None):
        # (with --weights, generate checks it once the folder is read: one trained under a plan takes it)
        if getattr(args, "plan_any_grid", False) and not getattr(args, "weights", None):
            raise ValueError("--plan-any-grid applies to --plan: drop it, or give the plan it is for")
        return
    given = ["--method"] * (getattr(args, "method", None) is not None) + list(method_options_given(args))
    if given:
        raise ValueError(f"--plan and {', '.join(given)} exclude each other: the plan names the method of every "
                         "layer, head and step; drop " + ("them" if len(given) > 1 else "it") + ".")
    schedule = [flag for flag in _SCHEDULE_FLAGS if getattr(args, _dest(flag), None) is not None]
    if schedule:
        raise ValueError(f"{', '.join(schedule)} {'does' if len(schedule) == 1 else 'do'} not combine with --plan: "
                         "the plan's phases and entries say which steps and layers run dense; drop "
                         + ("them" if len(schedule) > 1 else "it") + ".")


def add_plan_any_grid(parser) -> None:
    """``--plan-any-grid``: run a plan on a token grid it was not calibrated for (``allow_other_grid``)."""
    parser.add_argument("--plan-any-grid", action="store_true",
                        help="run --plan (or a --weights folder trained under a plan, finetune --plan) at a size "
                             "(token grid) it was not calibrated for, with a warning, instead of refusing")


def _fields_of(name: str) -> Dict[str, str]:
    """``{flag: field}`` for method ``name``."""
    return {flag: field for flag, (_, users) in method_flags().items() for n, field in users if n == name}


def check_method_flags(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Error (via ``parser.error``) when a per-method flag does not belong to ``--method``."""
    parser = parser or getattr(args, "_parser", None)
    name = getattr(args, "method", None) or "dense"
    own = _fields_of(name)
    wrong = [flag for flag in method_options_given(args) if flag not in own]
    if wrong:
        users = method_flags()
        _error(parser, f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --method {name}; "
                       + "; ".join(f"{flag} is for --method {'/'.join(n for n, _ in users[flag][1])}"
                                   for flag in wrong))


def method_from_args(args: argparse.Namespace, defaults: Optional[dict] = None,
                     parser: Optional[argparse.ArgumentParser] = None) -> Method:
    """Build the validated :class:`dit_accel.Method` from parsed options.

    Args:
        args: parsed arguments (from a parser that had :func:`add_method_options`).
        defaults: config field defaults for fields the user did not give (e.g. a
            model preset's paper values); fields the config does not have are ignored.
        parser: where to report errors (``parser.error`` exits with status 2);
            defaults to ``args._parser`` when set, else a ``ValueError`` is raised.

    Example::

        args = parser.parse_args(["--method", "tile", "--tile", "6,8,8", "--window", "3,3,3"])
        method_from_args(args)   # Tile(tile=(6, 8, 8), window=(3, 3, 3))
    """
    parser = parser or getattr(args, "_parser", None)
    name = getattr(args, "method", None) or "dense"
    check_method_flags(args, parser)
    own = _fields_of(name)
    fields = set(registered_methods()[name].cls.__dataclass_fields__)
    options = {k: v for k, v in (defaults or {}).items() if k in fields}
    given = {own[flag]: value for flag, value in method_options_given(args).items()}
    _check_dimensions(name, given, options, own, parser)
    if name == "tile" and {"tile", "window", "block_size"} & set(given) and "fit" not in given:
        options.pop("fit", None)  # a preset's fit=True re-tiles at plan time: never the tile a user spelled out
    options.update(given)
    try:
        return method_from_name(name, **options)
    except (ValueError, TypeError) as err:
        flag = next((f for f, field in own.items() if f".{field}=" in str(err)), None)
        if flag is not None and own[flag] not in given:  # a required field left at its (invalid) default
            opt = method_flags()[flag][0]
            what = re.sub(rf"^{re.escape(name)}: ", "", opt.help)
            _error(parser, f"--method {name} needs {flag} {opt.metavar or ''}".rstrip() + f": {what}")
        _error(parser, (f"{flag}: " if flag else "") + str(err))


def _check_dimensions(name: str, given: dict, defaults: dict, own: Dict[str, str], parser) -> None:
    """A per-dimension flag whose length differs from the per-dimension values it is combined with: blame the
    flag the user gave (``--tile 2,4`` on a video model), not the default it disagrees with."""
    import dataclasses

    cls = registered_methods()[name].cls
    class_defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    flag_of = {field: flag for flag, field in own.items()}
    for field, value in given.items():
        if not isinstance(value, tuple):
            continue
        for other in (f for f in own.values() if f not in given):
            default = defaults.get(other, class_defaults.get(other))
            if isinstance(default, tuple) and default and all(isinstance(v, int) for v in default) \
                    and len(default) != len(value):
                n = len(default)
                source = "this model's" if other in defaults else "the"
                _error(parser, f"{flag_of[field]} {','.join(map(str, value))} has {len(value)} values, but "
                               f"{source} default {flag_of[other]} {','.join(map(str, default))} has {n}: give "
                               f"{flag_of[field]} one value per grid dimension ({n}: "
                               f"{'T,H,W' if n == 3 else 'H,W' if n == 2 else 'one per dimension'}), or set "
                               f"{flag_of[other]} with {len(value)} values too")


def schedule_from_args(args: argparse.Namespace, defaults: Optional[dict] = None) -> dict:
    """Keyword arguments for :func:`dit_accel.apply` from the schedule flags.

    Returns ``dense_steps``, ``dense_last_steps``, ``dense_layers``, ``backend``
    (and ``weights`` when given); flags not given take ``defaults`` (e.g. a
    preset's paper schedule), then 0 / None / "auto".
    """
    defaults = defaults or {}
    out = {"dense_steps": 0, "dense_last_steps": 0, "dense_layers": None, "backend": "auto"}
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


def _error(parser, message: str):
    if parser is not None:
        parser.error(message)  # exits with status 2
    raise ValueError(message)


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    """``--cache NAME[:k=v,...]``: a Diffusers (or cache-dit) step cache stacked with the method or plan."""
    from ..pipelines.caches import CACHES

    parser.add_argument("--cache", metavar="NAME[:k=v,...]", default=None,
                        help="stack a step cache with the method or plan: " + "; ".join(
                            f"{name} ({what})" for name, (_, what) in CACHES.items())
                        + ". Example: --cache fbcache:threshold=0.1")


def cache_from_args(args: argparse.Namespace):
    """The parsed ``--cache`` (a :class:`~dit_accel.pipelines.caches.CacheSpec`) or None; ValueError names it."""
    from ..pipelines.caches import CacheSpec

    text = getattr(args, "cache", None)
    return None if text is None else CacheSpec.parse(text)
