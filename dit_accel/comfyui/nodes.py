"""The ComfyUI nodes: one per registered method (its config fields as widgets, its published settings as
presets) and one for a calibrated plan file. Each takes a MODEL and returns the patched clone
(:func:`~.patch.patch_model`). Built from the method registry, so a registered method gets its node too.

Widgets, per config field's CLI metadata: ``ints`` and ``int_list`` fields are text (``6,8,8``; ``none``), ints
and floats are numbers, fields with choices are lists, flags are booleans; a field whose default is None is
text, empty for the default. Errors are one line (ComfyUI shows them on the node). Path widgets (the plan
file, the fine-tuned folder, a FILE/DIR field) drop surrounding whitespace and one pair of surrounding quotes, as
Windows' "Copy as path" adds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import os
import re
from typing import Dict, Optional, Tuple

from .._util import is_int, is_number
from ..cli.options import int_list, int_tuple
from ..methods import CliOption, method_from_name, registered_methods
from ..pipelines.apply_checks import BACKENDS
from .families import FAMILIES, family_for
from .weights import EXPERTS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "CATEGORY", "node_for", "PlanNode", "FinetunedNode"]

CATEGORY = "dit_accel"
CUSTOM = "custom"  # the widgets below, not a preset

# The options every node has besides its method's fields: patch_model's keyword arguments.
_COMMON = {
    "dense_steps": ("INT", {"default": 0, "min": 0, "max": 10000,
                            "tooltip": "run the first N sampling steps dense"}),
    "dense_last_steps": ("INT", {"default": 0, "min": 0, "max": 10000,
                                 "tooltip": "run the last N sampling steps dense"}),
    # (step 0.001: ComfyUI's frontend rounds a FLOAT to its step's decimals, and at 0.01 a typed 0.875, Wan 2.2 A14B's
    # switch of experts, ran as 0.88)
    "dense_above_sigma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.001,
                                    "tooltip": "run dense while the sampler's sigma is above this (0: off)"}),
    "dense_layers": ("STRING", {"default": "", "tooltip": "N: the first N self-attention layers dense; 0,5,7: "
                                                        "those layers; empty: none"}),
    "backend": (list(BACKENDS), {"default": "auto", "tooltip": "kernel backend (auto picks per call)"}),
}


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value)


def _path_text(value, widget: str = "path") -> str:
    """A path widget's text without surrounding whitespace and one pair of surrounding quotes ("C:\\x\\plan.json"
    from Windows' "Copy as path"), a leading ``~`` as the user's home (no shell expands it in a widget). Text only:
    ComfyUI converts a typed value, not one linked from another node's output (an any-type node's None read as the
    path "None")."""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"dit_accel: widget {widget}={value!r} is invalid: a path (text); the node linked to it "
                         f"gives {type(value).__name__}")
    text = os.fspath(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return os.path.expanduser(text) if text.startswith("~") else text


def _check_found(widget: str, path) -> None:
    """A relative path widget whose file or folder is not there, said with the folder a relative path is read from:
    ComfyUI's working folder, which is not ComfyUI's own where it was started from another (the Windows portable
    starts in the folder above it), so "no such file" alone named a path the user sees in the ComfyUI folder."""
    if isinstance(path, str) and path and not os.path.isabs(path) and not os.path.exists(path):
        raise ValueError(f"dit_accel: widget {widget}={path!r} is not there: a relative path is read from ComfyUI's "
                         f"working folder {os.getcwd()}, not from ComfyUI's folder or its models folder; give the full "
                         "path")


_HASHED = 1 << 20  # files up to this size are compared by content (plans, strategies, a folder's method file)

# Each file kind the path nodes read, as the node that reads it names it
_NODE_OF = {"plan": "the dit_accel plan node (plan_path)", "strategy": "the dit_accel TileStrategy node (path)",
            "finetune": "the dit_accel fine-tuned weights node (weights_path)"}


def _kind_of(path) -> Optional[str]:
    """What a path widget's file or folder is, where it is another path node's input: ``"finetune"`` (a ``dit-accel
    finetune`` output folder, or a file of one), ``"plan"`` (a calibrated plan JSON), ``"strategy"`` (FastVideo's STA
    mask strategy, as :meth:`~dit_accel.SparsePlan.load` tells one); None for anything else (the node's own reader
    says what is wrong with it)."""
    from ..atomic_files import read_json
    from ..checkpoints.finetuned import METHOD_FILE

    if not isinstance(path, str) or not path:
        return None
    if os.path.isfile(os.path.join(path, METHOD_FILE)):
        return "finetune"
    if not os.path.isfile(path):
        return None
    try:  # (a JSON file, or a small one: a plan or strategy; not a LoRA's safetensors)
        data = read_json(path, kind=None) if path.lower().endswith(".json") or os.path.getsize(path) <= _HASHED \
            else None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("format") == "dit_accel.sparse_plan":
        return "plan"
    if isinstance(data, dict) and data and "format" not in data and \
            all(re.fullmatch(r"[0-9]+_[0-9]+_[0-9]+", str(k)) for k in data):
        return "strategy"
    folder = os.path.dirname(os.path.abspath(path))
    return "finetune" if os.path.isfile(os.path.join(folder, METHOD_FILE)) else None


def _for_another_node(widget: str, path: str, kind: str, wanted: str) -> ValueError:
    """The refusal of a path another path node reads (:func:`_kind_of`): what it is, what this widget takes
    (``wanted``), and the node that reads it."""
    what = {"plan": "a dit_accel plan (dit-accel calibrate's JSON)", "strategy": "a FastVideo STA mask strategy",
            "finetune": "a dit-accel finetune output folder" if os.path.isdir(path) else
            f"a file of the dit-accel finetune output folder {os.path.dirname(os.path.abspath(path))}"}[kind]
    give = "its folder" if kind == "finetune" and not os.path.isdir(path) else "it"
    return ValueError(f"dit_accel: widget {widget}={path!r} is {what}, not {wanted}: load {give} with "
                      f"{_NODE_OF[kind]}")


def _check_not_a_report(path: str) -> None:
    """A calibration's report folder (its ``calibration.json`` records the plan it wrote) in the plan widget: said
    with that plan's path, which is what goes there (the plan reader said "it is a folder", naming no plan)."""
    from ..atomic_files import read_json

    record = os.path.join(path, "calibration.json")
    if not os.path.isfile(record):
        return
    try:
        plan = read_json(record).get("plan_path")
    except (OSError, ValueError):
        return
    if isinstance(plan, str) and plan:
        raise ValueError(f"dit_accel: widget plan_path={path!r} is the report folder of a calibration, not a plan: "
                         f"the plan it wrote is {plan}; give that file")


def _file_state(value) -> str:
    """A path widget's ``IS_CHANGED``: ComfyUI keeps a node's output while its inputs are the same, so a plan (or
    strategy, or fine-tuned folder) written again at the same path ran the old one. This is what the path holds: a
    small file's content hash, a larger one's size and modification time (a folder: each of its files'), else the
    text itself (the node's own error says what is wrong)."""
    path = _path_text(value) if isinstance(value, str) else ""
    try:
        files = sorted(p.path for p in os.scandir(path) if p.is_file()) if os.path.isdir(path) else [path]
        parts = []
        for file in files:
            stat = os.stat(file)
            if stat.st_size > _HASHED:
                parts.append(f"{file}:{stat.st_size}:{stat.st_mtime_ns}")
            else:
                with open(file, "rb") as f:
                    parts.append(f"{file}:{hashlib.sha256(f.read()).hexdigest()}")
    except OSError:
        return str(value)
    return "\n".join(parts)


# What a valid text of each widget kind looks like, when the field's default cannot show it (None).
_EXAMPLES = {"ints": "4,4,4", "int_list": "0,4", "int": "8", "float": "0.5"}


def _example(field: dataclasses.Field, opt: CliOption) -> str:
    """The hint of an invalid widget text: an example of its kind (the default where there is one)."""
    if field.default is None:
        return f"e.g. {_EXAMPLES.get(opt.parse, '')}, or blank for the default"
    example = _text(field.default)
    if opt.parse == "int_list":
        return f"e.g. {example}; a comma-separated list of integers, or none"
    return f"e.g. {example}"


def _float_step(default: float) -> float:
    """A FLOAT widget's step: 0.001, or the default's own decimal where it is smaller. ComfyUI's frontend shows
    and rounds a FLOAT to the decimals of its step, so at 0.001 SLA's linear_eps (1e-6; its reference, 1e-5)
    showed 0.000 and a typed 1e-5 became 0."""
    if 0 < default < 0.001:
        return 10.0 ** math.floor(math.log10(default))
    return 0.001


def _accepts(method: str, field: str, value) -> bool:
    """Whether the method's config (its other fields at their defaults) takes ``value`` for ``field``."""
    try:
        method_from_name(method, **{field: value})
    except Exception:  # noqa: BLE001 (a refusal of any kind: the value is out of the widget's range)
        return False
    return True


def _float_range(method: str, field: str, step: float) -> dict:
    """A FLOAT widget's ``min`` and ``max``, as the config's own check has them (probed, not written twice), so that
    ComfyUI's validation stops a value out of range in the UI (a widget max of 1e6 let SLA's topk=5 through to the
    node's run): one that refuses 0 starts at its step, one that takes 0.5 but no value above 1 (a fraction: SLA's
    topk, negligible, Radial's decay) ends at 1."""
    capped = _accepts(method, field, 0.5) and not any(_accepts(method, field, v) for v in (1.001, 2.0, 1e3))
    return {"min": 0.0 if _accepts(method, field, 0.0) else step, "max": 1.0 if capped else 1e6}


def _widget(field: dataclasses.Field, opt: CliOption, method: str = ""):
    """The ComfyUI input spec of one config field (of the registered ``method``: its FLOAT widgets' range)."""
    tip = {"tooltip": opt.help}
    default = field.default
    if opt.choices:
        return ([str(c) for c in opt.choices], {"default": str(default), **tip})
    if opt.parse == "flag":
        return ("BOOLEAN", {"default": bool(default), **tip})
    if opt.parse == "int" and default is not None:
        return ("INT", {"default": int(default), "min": 0, "max": 1 << 20, **tip})
    if opt.parse == "float" and default is not None:
        step = _float_step(float(default))
        return ("FLOAT", {"default": float(default), **_float_range(method, field.name, step), "step": step, **tip})
    return ("STRING", {"default": _text(default), **tip})


def _value(name: str, field: dataclasses.Field, opt: CliOption, value):
    """A widget's value as the config field takes it; ValueError naming the widget."""
    if opt.choices:
        match = [c for c in opt.choices if str(c) == str(value)]
        if not match:
            raise ValueError(f"dit_accel: widget {name}={value!r} is invalid: choose one of "
                             f"{', '.join(map(str, opt.choices))}")
        return match[0]
    if value is None and field.default is not None:  # (linked from an any-type node: it ran the default unsaid)
        raise ValueError(f"dit_accel: widget {name}=None is invalid: {opt.help} ({_example(field, opt)}); the node "
                         "linked to it gives None: link a value, or type one")
    if not isinstance(value, str):
        return value
    if opt.parse == "str" and opt.metavar in ("FILE", "DIR"):
        return _path_text(value)
    text = value.strip()
    if text == "" and field.default is None:
        return None
    if text == "" and opt.parse == "int_list":  # int_list reads blank as none: not this widget's default
        raise ValueError(f"dit_accel: widget {name}={value!r} is invalid: {opt.help} ({_example(field, opt)})")
    try:
        if opt.parse == "ints":
            return int_tuple(text)
        if opt.parse == "int_list":
            return int_list(text)
        if opt.parse == "int":
            return int(text)
        if opt.parse == "float":
            return float(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"dit_accel: widget {name}={value!r} is invalid: {opt.help} ({_example(field, opt)})") \
            from None
    return text


def _whole(name: str, value) -> int:
    """An INT widget's value: ComfyUI converts a typed one, not one linked from another node's output (a math node's
    2.7 ran as 2; None or text failed in int() without the widget's name). Its range is patch_model's to check."""
    if is_int(value) or (is_number(value) and float(value).is_integer()):  # (numpy's 2.0 too)
        return int(value)
    raise ValueError(f"dit_accel: widget {name}={value!r} is invalid: a whole number of steps >= 0 (0: none)")


def _layers(text):
    if text is not None and not isinstance(text, str):  # (linked from an any-type node: patch_model checks it)
        if is_int(text) or (isinstance(text, (list, tuple)) and all(is_int(i) for i in text)):
            return text
        raise ValueError(f"dit_accel: widget dense_layers={text!r} is invalid: N (the first N layers), a list like "
                         "0,5,7, or empty")
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = int_list(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"dit_accel: widget dense_layers={text!r} is invalid: N (the first N layers), a list "
                         "like 0,5,7, or empty") from None
    # "1": the first layer; "1," or "[1]": layer 1, as the command line reads them
    return value[0] if len(value) == 1 and not re.search(r"[,\[\]()]", text) else list(value)


def _sigma(value):
    """The dense_above_sigma widget's value for patch_model (0: off, None; patch_model checks the rest). A None linked
    from an any-type node's empty output is refused, as a None in a method widget with a default is (:func:`_value`):
    it ran as 0, off, without a word, where the user had linked a threshold. (dense_layers' None is its blank default,
    as for a method widget whose default is blank.)"""
    if value is None:
        raise ValueError("dit_accel: widget dense_above_sigma=None is invalid: a sigma >= 0 (calls at a higher sigma "
                         "run dense; 0: off); the node linked to it gives None: link a value, or type one")
    return None if is_number(value) and value == 0 else value  # (NaN too goes to patch_model's check)


def _backend(value) -> str:
    """The backend widget's value; one linked from another node's output that is none of them is said as the widget
    (patch_model's own refusal named ``backend=``, with Python's words)."""
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"dit_accel: widget backend={value!r} is invalid: choose one of {', '.join(BACKENDS)}")
    return value


def _options(widgets: dict) -> dict:
    """patch_model's keyword arguments from the common widgets."""
    backend = _backend(widgets.get("backend", "auto"))
    return dict(dense_steps=_whole("dense_steps", widgets.get("dense_steps", 0)),
                dense_last_steps=_whole("dense_last_steps", widgets.get("dense_last_steps", 0)),
                dense_above_sigma=_sigma(widgets.get("dense_above_sigma", 0.0)),
                dense_layers=_layers(widgets.get("dense_layers", "")), backend=backend)


def published(method_name: str) -> Dict[str, object]:
    """``{preset label: Published}``: the settings the method's authors published for the covered families."""
    return {label: entry for label, (entry, _) in _published(method_name).items()}


def _published(method_name: str) -> Dict[str, tuple]:
    """``{preset label: (Published, the Family it was published for)}``."""
    from ..pipelines.presets import PRESETS

    out = {}
    for family in FAMILIES:
        preset = PRESETS.get(family.diffusers_class)
        for entry in getattr(preset, "published", ()):
            if entry.method == method_name:
                values = ", ".join(f"{k}={_text(v)}" for k, v in {**entry.config, **entry.apply}.items())
                # (several families share a Diffusers class, Wan's subclasses: the first listed is the preset's)
                out.setdefault(f"{entry.family}: {values} ({entry.shape})", (entry, family))
    return out


def _check_preset_for(model, label: str, entry, family) -> None:
    """A published setting runs on the model family it was published for (another's grid, steps and layers
    differ); a model patch_model refuses anyway is left to it."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    ours = None if inner is None else family_for(inner)
    if ours is not None and ours.diffusers_class != family.diffusers_class:
        raise ValueError(f"dit_accel: preset {label!r} was published for {entry.family} ({family.name}); this MODEL "
                         f"is {type(inner).__name__} ({ours.name}): choose a preset published for it, or custom")


def _warn_preset_ignores(label: str, entry, fields: dict, widgets: dict, options: dict, published: dict) -> None:
    """Said in ComfyUI's log: the widgets a chosen preset sets, whose own value (changed from the widget's default,
    and not the preset's) the node does not run: the method's, and the dense steps/layers the preset names."""
    ignored = []
    for name, field in fields.items():
        shown = widgets.get(name)
        if name in widgets and name in entry.config and str(shown).strip() != _text(field.default) \
                and str(shown).strip() != _text(entry.config[name]):
            ignored.append(f"{name}={shown!r} (the preset's: {_text(entry.config[name])})")
    for name, value in published.items():
        if options.get(name) not in (None, 0) and options.get(name) != value:
            ignored.append(f"{name}={widgets.get(name)!r} (the preset's: {_text(value)})")
    if ignored:
        logging.getLogger("dit_accel.comfyui").warning(
            "dit_accel: preset %r sets the widgets %s, which run as the preset's, not as set; choose preset custom "
            "to run the widgets' values", label, ", ".join(ignored))


def _in_widgets(opts: Dict[str, CliOption]) -> Dict[str, CliOption]:
    """Each field's option with the command-line flags its help names (``or --vsa-sparsity``) written as the
    node's widget names (``or sparsity``): a node has no flags."""
    flags = {opt.flag or "--" + name.replace("_", "-"): name for name, opt in opts.items()}
    pattern = re.compile("|".join(re.escape(flag) + r"\b" for flag in sorted(flags, key=len, reverse=True)))
    return {name: dataclasses.replace(opt, help=pattern.sub(lambda m: flags[m.group()], opt.help))
            for name, opt in opts.items()}


def _method(name: str, config: dict, opts: Dict[str, CliOption], widgets: dict, cls: type):
    """The method config of the widgets' values; an empty path widget the config refuses is said as a widget, and
    so is a value it refuses (its own error names its Python API: ``VSA.tile=(1, 1) is invalid``)."""
    try:
        return method_from_name(name, **{k: v for k, v in config.items() if v is not None})
    except ValueError as err:
        paths = [f for f in config if opts[f].metavar in ("FILE", "DIR")]
        empty = [f for f in paths if config[f] == ""]
        if empty:
            raise ValueError(f"dit_accel: widget {empty[0]} is empty: give the path of the "
                             f"{opts[empty[0]].help.split(': ', 1)[-1]}") from None
        # a file another path node reads, refused by this config as a file of its own kind ("key 'format' is not
        # \"step_layer_head\"" for a plan in the strategy node)
        other = [(f, _kind_of(config[f])) for f in paths if _kind_of(config[f]) in ("plan", "finetune")]
        if other:
            field, kind = other[0]
            raise _for_another_node(field, config[field], kind, f"a {opts[field].help.split(': ', 1)[-1]}") from None
        text = _as_widget(str(err), cls.__name__, config, widgets)
        if text == str(err):
            raise
        raise ValueError(text) from None


def _as_widget(message: str, owner: str, config: dict, widgets: dict) -> str:
    """A config's ``Owner.field=value`` refusal as the node's: ``widget field='text'`` (as typed) where the field is a
    widget, else the field alone (a strategy file's windows, its path leading)."""
    match = re.search(rf"{re.escape(owner)}\.(\w+)=", message)
    if match is None:
        return message
    field = match.group(1)
    shown = f"{owner}.{field}={config.get(field)!r}"
    if field in widgets and field in config and message.startswith(shown, match.start()):
        return f"dit_accel: widget {field}={widgets[field]!r}{message[match.start() + len(shown):]}"
    return f"dit_accel: {message[:match.start()]}{message[match.start() + len(owner) + 1:]}"


def _check_model(model) -> None:
    """The MODEL before any widget's file is read: a MODEL that already comes out of a dit_accel node (or no MODEL)
    is the error to say, not a bad path the node would not have run anyway."""
    from .patch import _check_not_patched, _diffusion_model

    _diffusion_model(model)
    _check_not_patched(model)


def node_for(name: str, cls: type, summary: str) -> type:
    """The node class of one registered method."""
    fields = {f.name: f for f in dataclasses.fields(cls) if "cli" in f.metadata}
    opts = _in_widgets({f: fields[f].metadata["cli"] for f in fields})
    presets = _published(name)
    paths = [f for f in fields if opts[f].metavar in ("FILE", "DIR")]
    specs = {f: _widget(fields[f], opts[f], name) for f in fields}  # (once: their ranges are probed)

    def INPUT_TYPES(_cls):  # noqa: N802 (ComfyUI's name)
        required = {"model": ("MODEL",)}
        if presets:
            required["preset"] = ([CUSTOM, *presets], {"default": CUSTOM, "tooltip": "a published setting: it sets "
                                                       "the method's widgets and the dense steps/layers it names"})
        required.update(specs)
        required.update(_COMMON)
        return {"required": required}

    def patch(self, model, preset: str = CUSTOM, **widgets):
        from .patch import patch_model

        options = _options(widgets)
        if preset != CUSTOM:
            if not isinstance(preset, str) or preset not in presets:  # (a list linked from another node: unhashable)
                raise ValueError(f"dit_accel: preset {preset!r} is not one of this node's: {', '.join(presets)}; "
                                 f"choose one of them, or {CUSTOM}")
            _check_preset_for(model, preset, *presets[preset])
            method, published_options = presets[preset][0].build()
            _warn_preset_ignores(preset, presets[preset][0], fields, widgets, options, published_options)
            options.update(published_options)
        else:
            config = {f: _value(f, fields[f], opts[f], widgets[f]) for f in fields if f in widgets}
            if paths:
                _check_model(model)
                for f in paths:
                    _check_found(f, config.get(f))
            method = _method(name, config, opts, widgets, cls)
            try:
                return (patch_model(model, method, **options),)
            except ValueError as err:  # (a refusal of the widgets' config, named as its widget)
                text = _as_widget(str(err), cls.__name__, config, widgets)
                if text == str(err):
                    raise
                raise ValueError(text) from None
        return (patch_model(model, method, **options),)

    def IS_CHANGED(_cls, **widgets):  # noqa: N802 (ComfyUI's name)
        """The state of the files its path widgets name (:func:`_file_state`): a strategy written again is read."""
        return "\n".join(_file_state(widgets.get(f, "")) for f in paths)

    extra = {"IS_CHANGED": classmethod(IS_CHANGED)} if paths else {}
    return type(f"DitAccel{cls.__name__}", (), {
        **extra, "INPUT_TYPES": classmethod(INPUT_TYPES), "RETURN_TYPES": ("MODEL",), "FUNCTION": "patch",
        "CATEGORY": CATEGORY, "DESCRIPTION": f"dit_accel {cls.__name__}: {summary}. Video self-attention of "
        "the covered models (Wan, HunyuanVideo, LTX-Video, Cosmos, Mochi, FLUX and others: docs/comfyui.md); "
        "everything else runs ComfyUI's own attention.", "patch": patch,
        "__module__": __name__, "__doc__": f"dit_accel {cls.__name__} ({summary}) on a ComfyUI MODEL."})


class PlanNode:
    """A calibrated plan (``dit-accel calibrate``'s JSON) on a ComfyUI MODEL."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ("dit_accel plan: a method per sampling step, layer and head, from `dit-accel calibrate`; "
                   "checked against the model, its token grid and the number of steps")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "model": ("MODEL",),
            "plan_path": ("STRING", {"default": "", "tooltip": "path of a plan JSON (dit-accel calibrate --out)"}),
            "allow_other_grid": ("BOOLEAN", {"default": False, "tooltip": "run on a token grid the plan was not "
                                                                          "calibrated for (with a warning)"}),
            "backend": _COMMON["backend"],
        }}

    @classmethod
    def IS_CHANGED(cls, plan_path: str = "", **_):  # noqa: N802 (ComfyUI's name)
        """The plan file's state: a plan calibrated again at the same path is read again (:func:`_file_state`)."""
        return _file_state(plan_path)

    def patch(self, model, plan_path: str, allow_other_grid: bool = False, backend: str = "auto"):
        from ..plans.sparse_plan import SparsePlan
        from .patch import patch_model

        path = _path_text(plan_path, "plan_path")
        if not path:
            raise ValueError("dit_accel: widget plan_path is empty: give the path of a plan JSON written by "
                             "dit-accel calibrate")
        _check_model(model)
        _check_found("plan_path", path)
        # (the plan file's errors: "it is a folder", "format: must be ..."; a strategy loaded as a plan took the tile
        # (6, 8, 8) without a word, where the strategy node has a tile widget)
        kind = _kind_of(path)
        if kind in ("finetune", "strategy"):
            raise _for_another_node("plan_path", path, kind, "a plan")
        _check_not_a_report(path)
        plan = SparsePlan.load(path)
        return (patch_model(model, plan, backend=_backend(backend), allow_other_grid=allow_other_grid),)


class FinetunedNode:
    """A ``dit-accel finetune`` output folder on a ComfyUI MODEL: its method (or plan), LoRA and SLA projections."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ("dit_accel fine-tuned weights: the method the folder was trained with, its LoRA (as ComfyUI "
                   "weight patches) and its SLA projections (the models with a Diffusers transformer: Wan, FLUX, "
                   "HunyuanVideo, Qwen-Image, LTX-Video, Cosmos, Chroma, Lumina 2, HiDream, Mochi, HunyuanImage 2.1, "
                   "SD3 / SD3.5, AuraFlow; "
                   "docs/comfyui.md); for Wan 2.2 A14B "
                   "one node per expert, expert=transformer_2 on the low-noise expert's MODEL")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "model": ("MODEL",),
            "weights_path": ("STRING", {"default": "", "tooltip": "a dit-accel finetune output folder"}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                        "tooltip": "the LoRA's strength (1: as trained)"}),
            "allow_other_grid": ("BOOLEAN", {"default": False, "tooltip": "for a plan: run on a token grid it was "
                                                                          "not calibrated for (with a warning)"}),
            "backend": _COMMON["backend"],
            "expert": (list(EXPERTS), {"default": EXPERTS[0], "tooltip": "Wan 2.2 A14B: which expert this MODEL is "
                                       "(transformer: high noise; transformer_2: low noise, the folder's "
                                       "transformer_2 weights)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, weights_path: str = "", **_):  # noqa: N802 (ComfyUI's name)
        """The folder's state: weights trained again into the same folder are loaded again (:func:`_file_state`)."""
        return _file_state(weights_path)

    def patch(self, model, weights_path: str, lora_strength: float = 1.0, allow_other_grid: bool = False,
              backend: str = "auto", expert: str = EXPERTS[0]):
        from ..checkpoints.finetuned import load_method, read_weights_info
        from ..plans.sparse_plan import SparsePlan
        from .patch import patch_model

        folder = _path_text(weights_path, "weights_path")
        if not folder:
            raise ValueError("dit_accel: widget weights_path is empty: give a dit-accel finetune output folder")
        if expert not in EXPERTS:
            raise ValueError(f"dit_accel: widget expert={expert!r} is invalid: choose one of {', '.join(EXPERTS)}")
        _check_model(model)
        _check_found("weights_path", folder)
        try:
            method = load_method(folder)
        except ValueError as err:  # (its own error names the Python API's weights=)
            text = str(err)
            if not text.startswith("weights="):
                raise
            kind = _kind_of(folder)
            if kind in ("strategy", "finetune") and not os.path.isdir(folder):  # (a file: "is not a folder")
                raise _for_another_node("weights_path", folder, kind, "a dit-accel finetune output folder") from None
            if os.path.isfile(folder) and folder.lower().endswith(".json"):  # a plan, as `dit-accel calibrate` writes
                text += " A plan JSON goes into the dit_accel plan node (plan_path)."
            raise ValueError(f"dit_accel: widget weights_path{text[len('weights'):]}") from None
        # the layers it was trained with dense run dense, as `dit-accel generate --weights` runs them (a plan's
        # phases hold its own)
        dense_layers = None if isinstance(method, SparsePlan) else read_weights_info(folder).get("dense_layers")
        try:
            return (patch_model(model, method, backend=_backend(backend), allow_other_grid=allow_other_grid,
                                dense_layers=dense_layers, weights=folder, lora_strength=lora_strength,
                                expert=expert),)
        except (ValueError, TypeError) as err:  # (the node has no dense_layers widget: the folder's are named)
            if dense_layers is None or not str(err).startswith("dense_layers"):
                raise
            raise ValueError(f"dit_accel: {folder} was trained with dense_layers={dense_layers!r}, which this MODEL "
                             f"cannot run ({err}): the weights are for another model") from None


def _mappings() -> Tuple[Dict[str, type], Dict[str, str]]:
    classes, names = {}, {}
    for name, entry in registered_methods().items():
        node = node_for(name, entry.cls, entry.summary)
        classes[node.__name__] = node
        names[node.__name__] = f"dit_accel {entry.cls.__name__}"
    classes["DitAccelPlan"] = PlanNode
    names["DitAccelPlan"] = "dit_accel plan (calibrated)"
    classes["DitAccelFinetuned"] = FinetunedNode
    names["DitAccelFinetuned"] = "dit_accel fine-tuned weights"
    return classes, names


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _mappings()
