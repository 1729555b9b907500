"""Per-model knowledge as data: one :class:`Preset` per supported transformer class, one module per family.

A preset says which attention modules hold self/joint attention (the only ones
dit_accel touches), where the text tokens sit in a joint sequence, how to read
the latent token grid ``(T, H, W)`` (or ``(H, W)``) from the transformer's
forward arguments, the settings the methods' authors published for the model
(:class:`Published`: values, the shape they were published for, and their
source), dit_accel's defaults for the other methods, and the oldest Diffusers
release the integration was checked against. Nothing here copies Diffusers code;
the grid readers only look at input shapes and the transformer config.

Layout: ``_common.py`` (:class:`Preset`, :class:`GridInfo`, :class:`Published`, shared grid-reader
helpers), one module per family (``wan.py``, ``flux.py``, ...: its grid reader, published settings
and ``PRESETS``), and this file: the registry and its look-ups.

Adding a model family (developer note)
--------------------------------------
1. Write ``presets/<family>.py`` defining ``PRESETS = (Preset(...), ...)``: one preset per transformer
   class, with its grid reader (build on ``_common``'s ``tensor_arg``/``split_patch``/``text_len``;
   a ``grid_key`` where the reader is shape-only), ``min_diffusers``, ``defaults``, ``published``
   (with sources), ``hub_words`` (more specific words before general ones) and ``notes``. Import only
   from ``._common`` (never from this package: no cycles). A class whose calls carry no single token
   grid (FramePack's packed history, ...) gets ``Preset.refusing(class_name, reason)`` instead: ``apply``
   raises the reason, which says what would work.
2. Add its module name to :data:`~dit_accel.models.families.FAMILIES` (the order is the registry's and
   ``info``'s; the tiny models' too).
3. Add ``models/tiny/<family>.py`` with a tiny transformer of each class (see :mod:`dit_accel.models.tiny`):
   ``tests/pipelines/test_apply.py`` then runs every class against the masked reference and
   ``tests/pipelines/test_presets.py`` checks the registration; ``tests/test_published.py`` checks
   published settings, ``tests/test_structure.py`` the import graph.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ...models.families import FAMILIES
from ._common import GridInfo, Preset, Published

__all__ = ["Preset", "PRESETS", "SUPPORTED", "GridInfo", "Published", "FAMILIES", "preset_for", "recommended",
           "register_preset", "unregister_preset", "family_of", "published_settings", "resolve_model_family",
           "model_family", "unknown_version"]

PRESETS: Dict[str, Preset] = {
    p.class_name: p for name in FAMILIES for p in importlib.import_module(f"{__name__}.{name}").PRESETS
}

# The classes the package ships working presets for (refused ones are known, not supported).
SUPPORTED: Tuple[str, ...] = tuple(name for name, p in PRESETS.items() if not p.refused)


def register_preset(preset: Preset) -> Preset:
    """Support another transformer class: ``apply`` finds ``preset`` by ``preset.class_name`` (and subclasses).

    Example::

        register_preset(Preset("MyVideoTransformer", attention=(r"blocks\\.\\d+\\.attn1",), text_position="none",
                               read_grid=my_grid_reader, min_diffusers="0.35.0", grid_dims=3))
    """
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a dit_accel.pipelines.Preset; got {type(preset).__name__}")
    name = preset.class_name
    # (a class or a blank key was stored as given: never found by apply, and every later "supported: ..." list
    # failed on it with a bare TypeError)
    if isinstance(name, type):
        raise TypeError(f"Preset.class_name={name!r} is a class: pass its name, Preset({name.__name__!r}, ...) "
                        "(apply finds a preset by the transformer's class name)")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Preset.class_name={name!r} is invalid: the transformer's class name, a Python identifier "
                         "such as 'MyVideoTransformer3DModel'")
    if preset.text_position not in ("none", "first", "last"):
        raise ValueError(f"Preset.text_position={preset.text_position!r} is invalid: 'none', 'first' or 'last'")
    if not callable(preset.read_grid):
        raise TypeError("Preset.read_grid must be callable: (transformer, bound forward arguments) -> GridInfo")
    if not isinstance(preset.refused, str):
        raise TypeError(f"Preset.refused must be a str (the reason, or '' for a working preset); "
                        f"got {type(preset.refused).__name__}")
    if preset.grid_dims is not None and (isinstance(preset.grid_dims, bool) or preset.grid_dims not in (1, 2, 3)):
        raise ValueError(f"Preset.grid_dims={preset.grid_dims!r} is invalid: the rank of the token grid read_grid "
                         "returns (3 for a video's (T, H, W), 2 for an image's (H, W)), or None to leave it unchecked")
    if not isinstance(preset.min_diffusers, str) or not re.fullmatch(r"\d+(\.\d+){0,2}", preset.min_diffusers):
        raise ValueError(f"Preset.min_diffusers={preset.min_diffusers!r} is invalid: the lowest Diffusers release "
                         "that has the class, a version string such as '0.35.0'")
    _check_attention(preset)
    _check_hub_words(preset)
    _check_settings(preset)
    PRESETS[preset.class_name] = preset
    return preset


# The apply() keywords a preset's default may carry: the schedule (tests hold it to apply's signature).
SETTING_APPLY_KEYS = ("dense_steps", "dense_last_steps", "dense_layers", "layer_methods")


def _check_settings(preset: Preset) -> None:
    """A preset's ``defaults``, ``refused_methods`` and ``published`` (ValueError naming the class and the entry).
    Checked here: a misspelt method name was never looked up (``recommended`` quietly gave the method's own defaults,
    and a refused method ran), and a malformed entry failed every later ``recommended`` with a bare KeyError or
    TypeError."""
    from ...methods import method_from_name

    def bad(what: str, problem: str) -> ValueError:
        return ValueError(f"Preset {preset.class_name!r}: {what} is invalid ({problem})")

    for what, table in (("defaults", preset.defaults), ("refused_methods", preset.refused_methods)):
        if not isinstance(table, dict):
            raise bad(f"{what}={table!r}", "a dict keyed by method name")
        for name in table:
            try:
                if _registered_method(name) != name:
                    raise ValueError("an alias or another spelling")
            except (TypeError, ValueError) as err:
                raise bad(f"{what}[{name!r}]", f"{err}; key it by a registered method's name") from None
    for name, reason in preset.refused_methods.items():
        if not isinstance(reason, str) or not reason.strip():
            raise bad(f"refused_methods[{name!r}]={reason!r}", "the reason, a non-empty str")
    for name, entry in preset.defaults.items():
        what = f"defaults[{name!r}]={entry!r}"
        if not (isinstance(entry, dict) and set(entry) == {"method", "apply"} and isinstance(entry["method"], dict)
                and isinstance(entry["apply"], dict)):
            raise bad(what, "expected {'method': {config fields}, 'apply': {apply keywords}}")
        other = sorted(set(entry["apply"]) - set(SETTING_APPLY_KEYS))
        if other:
            raise bad(what, f"apply keywords {other}; allowed: {', '.join(SETTING_APPLY_KEYS)}")
        try:
            check_method_for(preset.class_name, preset, method_from_name(name, **entry["method"]))
        except (TypeError, ValueError) as err:
            raise bad(what, str(err)) from None
    _check_published(preset, bad)


def _check_published(preset: Preset, bad) -> None:
    """A preset's ``published`` settings (``bad(what, problem)`` makes the error): each builds, for a registered
    method's own name (a misspelt one was never found by ``recommended``), with the keywords a setting carries."""
    if not isinstance(preset.published, (tuple, list)) or not all(isinstance(p, Published) for p in preset.published):
        raise bad(f"published={preset.published!r}", "a tuple of dit_accel.pipelines.presets.Published")
    for i, setting in enumerate(preset.published):
        try:
            if _registered_method(setting.method) != setting.method:
                raise ValueError(f"method={setting.method!r} is an alias or another spelling")
            config, kwargs = setting.build()
            check_method_for(preset.class_name, preset, config)
        except (TypeError, ValueError) as err:
            raise bad(f"published[{i}] ({setting.family}, {setting.method!r})", str(err)) from None
        if not isinstance(setting.family, str) or not setting.family.strip():
            raise bad(f"published[{i}].family={setting.family!r}", "the model family's name, a non-empty str")
        other = sorted(set(kwargs) - set(SETTING_APPLY_KEYS))
        if other:
            raise bad(f"published[{i}] ({setting.family}, {setting.method!r})",
                      f"apply keywords {other}; allowed: {', '.join(SETTING_APPLY_KEYS)}")


def _check_hub_words(preset: Preset) -> None:
    """A preset's ``hub_words``: ``(regex, family or None)`` pairs (ValueError naming the class). Checked here, since
    :func:`resolve_model_family` searches every registered preset's words for an id the earlier ones do not name."""
    words, problem = preset.hub_words, None
    if isinstance(words, str) or not isinstance(words, (tuple, list)):
        problem = f"a {type(words).__name__}, not a tuple of pairs"
    else:
        for pair in words:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
                    and (pair[1] is None or isinstance(pair[1], str))):
                problem = f"{pair!r} is not a (regex, family or None) pair"
                break
            try:
                re.compile(pair[0])
            except re.error as err:
                problem = f"{pair[0]!r}: {err}"
                break
    if problem is not None:
        raise ValueError(f"Preset {preset.class_name!r}: hub_words={words!r} is invalid ({problem}): expected a tuple "
                         "of (regular expression, family name or None) pairs, e.g. ((r'my-?model', None),)")


def _check_attention(preset: Preset) -> None:
    """A preset's ``attention``: a tuple of regular expressions of module names (ValueError naming the class)."""
    patterns, problem = preset.attention, None
    if isinstance(patterns, str):
        problem = "one string, not a tuple of them"
    else:
        try:
            for pattern in patterns:
                re.compile(pattern)
        except (TypeError, re.error) as err:
            problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        raise ValueError(f"Preset {preset.class_name!r}: attention={patterns!r} is invalid ({problem}): expected a "
                         r"tuple of regular expressions of module names, e.g. (r'blocks\.\d+\.attn1',)")


def unregister_preset(class_name: str) -> None:
    """Remove a registered preset (no error when absent)."""
    PRESETS.pop(class_name, None)


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        m = re.match(r"\d+", part)
        out.append(int(m.group()) if m else 0)
    return tuple(out)


def check_pipeline(pipe) -> None:
    """ValueError when ``pipe`` is a pipeline class a preset refuses (``Preset.refused_pipelines``), or a subclass."""
    for cls in type(pipe).__mro__:
        for preset in PRESETS.values():
            reason = preset.refused_pipelines.get(cls.__name__)
            if reason is not None:
                raise ValueError(f"dit_accel does not support {type(pipe).__name__}: {reason}.")


def preset_for(transformer: torch.nn.Module, diffusers_version: Optional[str] = None) -> Preset:
    """The preset for ``transformer``'s class; ValueError for unsupported or refused classes (with the
    preset's reason) or old Diffusers."""
    name = type(transformer).__name__
    preset = PRESETS.get(_class_name(type(transformer)))  # subclasses of a supported class work too
    if preset is None:
        raise ValueError(f"dit_accel does not support transformer class {name}; supported: {_supported()}. "
                         "Support another class with dit_accel.register_preset(Preset(...))")
    _check_not_refused(name, preset)
    if diffusers_version is None:
        import diffusers

        diffusers_version = diffusers.__version__
    if _version_tuple(diffusers_version) < _version_tuple(preset.min_diffusers):
        raise ValueError(f"dit_accel needs diffusers>={preset.min_diffusers} for {preset.class_name} "
                         f"(installed: {diffusers_version}); run `pip install -U 'diffusers>={preset.min_diffusers}'`")
    return preset


def _supported() -> str:
    return ", ".join(name for name, p in PRESETS.items() if not p.refused)


def _did_you_mean(asked, names) -> str:
    """`` (did you mean X?)`` for the names closest to ``asked`` in any case (a misspelt or mis-cased class name),
    else "": the whole list alone left a reader to find WanTransformer3DModel among 60 names."""
    lower = {str(n).lower(): n for n in names}
    close = difflib.get_close_matches(str(asked).lower(), list(lower), n=2, cutoff=0.8)  # (0.6: Mochi for NoSuch)
    return f" (did you mean {' or '.join(lower[c] for c in close)}?)" if close else ""


def _check_not_refused(name: str, preset: Preset) -> None:
    if preset.refused:
        raise ValueError(f"dit_accel does not support transformer class {name}: {preset.refused}")


def _class_name(transformer_or_class) -> str:
    if isinstance(transformer_or_class, str):
        return transformer_or_class
    if not isinstance(transformer_or_class, (type, torch.nn.Module)):  # a pipeline reads as its transformer, as in
        # family_of (it was "no preset for WanPipeline", and Wan 2.2 A14B's experts alone read as Wan 2.1)
        transformer_or_class = getattr(transformer_or_class, "transformer", None) or transformer_or_class
    if not isinstance(transformer_or_class, type):  # torch.compile's OptimizedModule reads as the module it wraps
        transformer_or_class = getattr(transformer_or_class, "_orig_mod", transformer_or_class)
    cls = transformer_or_class if isinstance(transformer_or_class, type) else type(transformer_or_class)
    # A subclass of a supported class reads as it (preset_for, and so apply, takes it; its published settings and
    # family were "unknown" before)
    return next((base.__name__ for base in cls.__mro__ if base.__name__ in PRESETS), cls.__name__)


def family_of(pipe_or_transformer) -> Optional[str]:
    """The model family of a pipeline or transformer for :class:`Published` lookups, or None when unknown.

    The preset's ``read_family`` decides where one class serves several families (Wan: a pipeline with a
    second expert or a 48-channel transformer is ``"Wan 2.2"``, other Wan models ``"Wan 2.1"``); else the
    family of its first published setting.
    """
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    preset = PRESETS.get(_class_name(transformer))
    if preset is None:
        return None
    if preset.read_family is not None:
        return preset.read_family(pipe_or_transformer)
    return preset.published[0].family if preset.published else None


def published_settings(transformer_or_class, method: Optional[str] = None,
                       family: Optional[str] = None) -> Tuple[Published, ...]:
    """The published settings for a model class (a name, a class, an instance or a pipeline: its transformer),
    optionally of one method and one family (default: the family of an instance or pipeline, else every family)."""
    preset = PRESETS.get(_class_name(_check_model_arg(transformer_or_class, "published_settings")))
    if preset is None:  # (an empty answer would read as "nothing published" for a class dit_accel does not know)
        asked = _class_name(transformer_or_class)
        raise ValueError(f"{asked!r} is not a model class dit_accel knows{_did_you_mean(asked, PRESETS)}; "
                         f"supported: {_supported()}")
    method = None if method is None else _registered_method(method)
    family = _known_family(preset, family)
    if family is None and not isinstance(transformer_or_class, (str, type)):
        family = family_of(transformer_or_class)
    # Copies: a caller's edit of an answer's config or apply dict changed what recommended() returned after it.
    return tuple(dataclasses.replace(p, config=copy.deepcopy(p.config), apply=copy.deepcopy(p.apply))
                 for p in preset.published
                 if (method is None or p.method == method) and (family is None or p.family == family))


def _check_model_arg(model, fn: str):
    """``model`` (:func:`recommended`'s and :func:`published_settings`' first argument) when it can name a class, else
    an error naming the argument: None, a number or "" read as "no preset for NoneType", and a method config (the
    arguments swapped) as "no preset for Radial"."""
    from ...methods import Method

    if isinstance(model, Method):
        raise TypeError(f"transformer_or_class={model!r} is a method config; pass the model first and the method's "
                        f"name second: {fn}(transformer, {model.name!r})")
    if isinstance(model, str) and model.strip() or isinstance(model, type) or not (
            model is None or isinstance(model, (str, bytes, int, float, tuple, list, dict))):
        return model
    raise ValueError(f"transformer_or_class={model!r} is invalid: pass a transformer, its class or class name (e.g. "
                     f"'WanTransformer3DModel'), or a pipeline; `dit-accel info` lists the supported classes")


def _registered_method(method) -> str:
    """``method``'s registered name (case and aliases as :func:`~dit_accel.methods.method_from_name` reads them);
    ValueError naming the registered ones for anything else, where a lookup would quietly find no setting."""
    from ...methods import _REGISTRY, METHOD_ALIASES, Method, canonical_method_name

    if isinstance(method, Method):  # (a config's own values would be ignored: the answer is a config)
        raise TypeError(f"method={method!r} is a method config; pass its method's name, {method.name!r}: the "
                        "recommended config of that method is the answer")
    name = canonical_method_name(method) if isinstance(method, str) else None
    if name not in _REGISTRY:
        raise ValueError(f"method={method!r} is not a registered method; choose one of {sorted(_REGISTRY)} "
                         f"(aliases: {', '.join(f'{a} = {n}' for a, n in METHOD_ALIASES.items())})")
    return name


def _known_family(preset: Preset, family: Optional[str]) -> Optional[str]:
    """``family`` as ``preset`` spells it (any case and separator: ``wan2.1`` is Wan 2.1, as ``--model`` reads it);
    ValueError naming its families for one it does not know, where a lookup would quietly find no setting and fall
    back to the defaults."""
    if family is None:
        return None
    known = list(dict.fromkeys([p.family for p in preset.published] + [f for _, f in preset.hub_words if f]))
    for name in known:
        if isinstance(family, str) and _name_key(family) == _name_key(name):
            return name
    raise ValueError(f"family={family!r} is not a published family of {preset.class_name}: "
                     + (f"choose one of {', '.join(map(repr, known))} or leave it unset (the model's own)" if known
                        else "it has none; leave family unset"))


def recommended(transformer_or_class, method: str, family: Optional[str] = None):
    """The settings for ``method`` on a model (a transformer, its class or class name, or a pipeline: a pipeline
    also tells Wan 2.2 A14B, whose experts alone read as Wan 2.1): ``(Method, apply_kwargs)``.

    The first published setting of the model's family (:class:`Published`, e.g. the radial
    reference scripts' decay and dense steps) when there is one, else dit_accel's preset
    default, else the method's config defaults. Windows fit the grid of every call (GNA's ``fit=True``:
    a kernel longer than a grid extent is clamped to it, with a note), so a setting published for a long
    video also runs on the model's short default; Tile's ``fit=True`` runs, on a grid its tile does not
    divide, a tile that does (packed blocks: no element masks, little padding) with the window nearest its
    density (:func:`dit_accel.patterns.tile.fit_tile`; the published setting itself stays available from
    :func:`published_settings`); a Tile with per-head windows or an explicit ``block_size`` keeps its tile (fit
    refuses those). A method the class refuses raises ValueError naming it.

    Example::

        m, kw = recommended(pipe, "radial")   # Wan 2.1: Radial(decay=0.2, rule="reference"), ...
        dit_accel.apply(pipe, m, **kw)
    """
    from ...methods import method_from_name

    name = _class_name(_check_model_arg(transformer_or_class, "recommended"))
    if name not in PRESETS:
        raise ValueError(f"no preset for {name}{_did_you_mean(name, PRESETS)}; supported: {_supported()}")
    _check_not_refused(name, PRESETS[name])
    method = _registered_method(method)
    check_method_for(name, PRESETS[name], method)
    published = published_settings(transformer_or_class, method, family)
    if published:
        config, kwargs = published[0].build()
    else:
        entry = PRESETS[name].defaults.get(method, {"method": {}, "apply": {}})
        try:
            # (copies: a caller's edit of a list in the answer, dense_layers=[0], changed the preset's default)
            config, kwargs = method_from_name(method, **entry["method"]), copy.deepcopy(entry["apply"])
        except (TypeError, ValueError) as err:  # (a method whose config has no default to run: tile_strategy's file)
            raise ValueError(f"dit_accel has no recommended {method!r} setting for {name}: the method has no "
                             f"published setting or preset default here, and its config's own defaults do not run "
                             f"({err}); build the config yourself") from None
    if getattr(config, "fit", True) is False:  # the grid of the call is not known here: fit it there
        try:
            config = config.replace(fit=True)
        except ValueError:  # (a Tile with per-head windows or a block_size keeps its tile: it was refused here)
            pass
    return config, kwargs


def check_method_for(class_name: str, preset: Preset, method, host: str = "diffusers") -> None:
    """ValueError naming the class when its preset refuses ``method``, a config or a method name: a method the
    class has no use for (:attr:`Preset.refused_methods`), or one for another token grid rank than its calls'
    (:attr:`Preset.grid_dims`: VSA or Radial on an image model, a ``tile=(6, 8, 8)`` on a 2-D grid). ``host`` words
    the fix (:func:`_other_rank`): ``"diffusers"`` (Python), ``"comfyui"`` (the node's widgets and presets),
    ``"comfyui-file"`` (a plan's or a fine-tuned folder's setting: the caller says what to do)."""
    name = method if isinstance(method, str) or method is None else getattr(method, "name", None)
    reason = preset.refused_methods.get(name)
    if reason:
        raise ValueError(f"dit_accel: method {name!r} does not apply to {class_name}: {reason}")
    choices = [p.family for p in preset.published if p.method == name]
    why = None if preset.grid_dims is None else _other_rank(method, preset.grid_dims, host, choices)
    if why:
        raise ValueError(f"dit_accel: {why[0]}, but the sparse calls of {class_name} see a "
                         f"{_rank_words(preset.grid_dims)} token grid.{' ' + why[1] if why[1] else ''}")


def _rank_words(dims: int) -> str:
    return {3: "video's (T, H, W)", 2: "2-D (H, W)"}.get(dims, f"{dims}-D")


def _other_rank(method, dims: int, host: str = "diffusers", presets=()) -> Optional[Tuple[str, str]]:
    """``(what, fix)`` where ``method`` (a config or a method name) needs another grid rank than ``dims``, else
    None: the class's ``NEEDS_DIMS`` (Radial and VSA: 3), or a per-dimension setting (a field whose command-line
    form is ``T,H,W``) given as a tuple of another length; per-head windows by each window's. An int broadcasts
    to any rank. The fix is said for ``host`` (:func:`check_method_for`): a ComfyUI node has no
    ``dit_accel.recommended``, but widgets, other nodes and the ``presets`` (families) published for the model."""
    import dataclasses

    from ...methods import canonical_method_name, registered_methods

    methods = registered_methods()
    if isinstance(method, str):
        entry = methods.get(canonical_method_name(method))
        method = None if entry is None else entry.cls
    need = getattr(method, "NEEDS_DIMS", None)
    if need is not None and need != dims:
        fitting = {n: e.cls.__name__ for n, e in methods.items()
                   if getattr(e.cls, "NEEDS_DIMS", None) in (None, dims) and n != "dense"}
        nodes = list(fitting.values())
        fix = {"diffusers": f"Use one of {', '.join(fitting)} (dit_accel.recommended(transformer, 'tile') gives a "
                            "setting that fits)",
               "comfyui": f"Use the dit_accel {', '.join(nodes[:-1])} or {nodes[-1]} node instead"}
        return f"method {method.name!r} needs a {_rank_words(need)} token grid", fix.get(host, "")
    if isinstance(method, type) or not dataclasses.is_dataclass(method):
        return None
    for f in dataclasses.fields(method):
        cli, value = f.metadata.get("cli"), getattr(method, f.name)
        if cli is None or cli.metavar != "T,H,W" or not isinstance(value, tuple):
            continue
        for item in (value if value and all(isinstance(v, tuple) for v in value) else (value,)):
            if len(item) != dims:
                return _other_length(method, f.name, item, dims, host, presets)
    return None


def _other_length(method, field: str, item: tuple, dims: int, host: str, presets) -> Tuple[str, str]:
    """:func:`_other_rank`'s ``(what, fix)`` of a per-dimension setting ``item`` of another length than ``dims``."""
    if host == "diffusers":
        example = ", ".join(["8"] * dims)
        return (f"{type(method).__name__}'s {field}={item!r} is for a {len(item)}-D token grid",
                f"Give {dims} values per dimension setting ({field}=({example}), say) or one int, or take "
                f"dit_accel.recommended(transformer, {method.name!r})")
    what = f"{type(method).__name__}'s {field}={','.join(map(str, item))} is for a {len(item)}-D token grid"
    if host != "comfyui":
        return what, ""
    preset = f", or choose the node's preset for {' or '.join(dict.fromkeys(presets))}" if presets else ""
    example = (item[:1] * (dims - len(item)) + item)[-dims:] or (8,) * dims  # (the user's: 6,8,8 -> 8,8; 8,8 -> 8,8,8)
    return what, f"Set the widget {field} to {dims} values ({','.join(map(str, example))}, say) or one{preset}"


def _folder_family(folder: Path) -> Optional[Tuple[str, Optional[str]]]:
    """``(class name, family)`` from a Diffusers folder's ``model_index.json``, or None."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    from ...atomic_files import read_json

    info = read_json(index, expected="a Diffusers model_index.json (a JSON object naming the components)")
    entry = info.get("transformer") or [None, None]
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name not in PRESETS:
        return None
    preset = PRESETS[name]
    return name, preset.read_index_family(info) if preset.read_index_family is not None else family_of(name)


def _refuse_folder(folder: Path) -> None:
    """ValueError for a folder that :func:`_folder_family` could not read a supported model from."""
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a Diffusers model folder (no model_index.json); pass the folder that "
                         "`pipe.save_pretrained()` or `huggingface-cli download` produced, a hub id, a tiny model or "
                         "a transformer class (`dit-accel info` lists the supported ones)")
    from ...atomic_files import read_json

    entry = read_json(folder / "model_index.json").get("transformer") or [None, None]
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    raise ValueError(f"{folder}: its transformer ({name or 'none named in model_index.json'}) has no dit_accel "
                     "preset; `dit-accel info` lists the supported models")


def resolve_model_family(model: str) -> Tuple[str, Optional[str]]:
    """``(transformer class name, family)`` for a ``--model`` value, without loading the model.

    Accepts a transformer class name (``WanTransformer3DModel``), a family (``"Wan 2.2"``), an
    embedded tiny model, a local Diffusers folder (its ``model_index.json``) or a hub id / folder
    name that names the family (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``: the presets' ``hub_words``).
    """
    model = os.fspath(model) if isinstance(model, os.PathLike) else model  # (a pathlib folder was "invalid")
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} is invalid: pass a hub id, a folder, a tiny model or a class name")
    if model in PRESETS:
        return model, family_of(model)
    families = {p.family: p for preset in PRESETS.values() for p in preset.published}
    for family in families:  # (any separator: "Wan2.2", "wan_2.2", "Hunyuan Video")
        if _name_key(model) == _name_key(family):
            return next(c for c, preset in PRESETS.items() if families[family] in preset.published), family
    from ...models.tiny_shapes import shapes_model

    if shapes_model(model) is not None:  # the trained tiny Wans; tiny-<family> names carry their family's hub word
        model = "Wan"
    folder = Path(model).expanduser()
    found = _folder_family(folder) if folder.is_dir() else None
    if found is not None:
        return found
    if folder.is_dir() and shapes_model(model) is None:  # a folder: say what it lacks, not every class name
        _refuse_folder(folder)
    found = _hub_word_match(model)
    if found is not None:
        return found
    raise ValueError(f"cannot tell which model {model!r} is{_did_you_mean(model, [*PRESETS, *families])}: pass a "
                     f"transformer class ({', '.join(PRESETS)}), a "
                     f"family ({', '.join(families)}), a Diffusers folder or a hub id naming the model")


def _name_key(text: str) -> str:
    """``text`` in lower case without separators: "Wan 2.2", "wan_2.2" and "Wan-2.2" read alike."""
    return re.sub(r"[\s_-]", "", text.lower())


def _hub_word_match(model: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(class name, family)`` of the first preset whose hub word names ``model``, else None. The words are searched
    in the id with each run of spaces, ``_``, ``-`` and a ``.`` after a letter (and a ``v`` before a version) read as
    one ``-``, since the words allow ``-`` or nothing: as typed, "HunyuanVideo 1.5", "LTX 2", "FLUX 2" and "wan_2.2"
    read as HunyuanVideo, LTX-Video, FLUX.1 and Wan 2.1 before, and "Qwen Image" as nothing. A version of a family
    dit_accel does not know (Wan 2.3) is refused where ``model`` is only a name and a version, and warned of in a hub
    id (the class is likely right)."""
    spaced = re.sub(r"(?<=\d)_(?=\d)", ".", model.strip().lower())  # ("wan_2_2" is Wan 2.2)
    spaced = re.sub(r"-v(?=\d)", "-", re.sub(r"(?:[\s_-]|(?<=[a-z])\.)+", "-", spaced))
    for class_name, preset in PRESETS.items():
        for pattern, family in preset.hub_words:
            if re.search(pattern, spaced):
                _check_version(model, class_name, family)
                return class_name, family
    return None


def _versioned(families) -> Dict[str, list]:
    """``{name key: [family, ...]}`` of the families written as a name and a version ("Wan 2.1", "Wan 2.2")."""
    out: Dict[str, list] = {}
    for family in families:
        found = re.fullmatch(r"([a-z]+?)v?(\d+(?:\.\d+)*)", _name_key(family))
        if found:
            out.setdefault(found.group(1), []).append(family)
    return out


def _unknown_versions(text: str, families) -> list:
    """``(words, families of that name)`` for each family name in ``text`` followed by a version none of them has
    ("Wan2.3" where dit_accel knows Wan 2.1 and Wan 2.2; "Wan22" and "wan_2_2" are Wan 2.2)."""
    digits = lambda version: re.sub(r"\D", "", version)
    out = []
    for base, same in _versioned(families).items():
        known = {digits(_name_key(f)[len(base):]) for f in same}
        for hit in re.finditer(rf"(?<![a-z]){base}[\s._-]*v?(\d+(?:[._]\d+)*)", text.lower()):
            if digits(hit.group(1)) not in known:
                out.append((hit.group(0), same))
    return out


def unknown_version(model, families=None) -> str:
    """The line for a ``--model`` written as a family and a version dit_accel has no family of (``Wan 2.3``, where
    it knows Wan 2.1 and Wan 2.2), naming the closest; "" for anything else (``dit-accel info`` and
    :func:`resolve_model_family` refuse with it). ``families``: the published families (default: every preset's)."""
    if families is None:
        families = {p.family for preset in PRESETS.values() for p in preset.published}
    if not isinstance(model, str) or not _NAME_AND_VERSION.fullmatch(model):
        return ""
    if Path(model).expanduser().exists():
        return ""
    unknown = _unknown_versions(model, families)
    if not unknown:
        return ""
    same = unknown[0][1]
    close = difflib.get_close_matches(_name_key(model), [_name_key(f) for f in same], n=2, cutoff=0)
    names = [next(f for f in same if _name_key(f) == c) for c in close]
    return (f"{model!r} is no model family dit_accel knows (did you mean {' or '.join(names)}?): pass one of the "
            f"families ({', '.join(sorted(families))}), a transformer class, a Diffusers folder or a hub id; "
            "`dit-accel info` without --model lists the supported transformer classes")


#: Model lines whose versions dit_accel knows by class, not by a published family, and whose first class's hub word
#: matches any version: ``(name pattern, name, newest version)``. A newer version (FLUX.4, LTX-3, HunyuanVideo 2)
#: read as the first class without a word.
_CLASS_LINES = ((r"flux", "FLUX", (3,)), (r"ltx", "LTX", (2,)), (r"hunyuan[\s._-]*video", "HunyuanVideo", (1, 5)))
#: A ``--model`` that is only a name and a version ("Wan 2.3", "FLUX 4"): refused, where a hub id is warned of.
_NAME_AND_VERSION = re.compile(r"\s*[A-Za-z][A-Za-z_-]*?[\s._-]*v?\d+(?:[._]\d+)*\s*")


def _newer_versions(text: str) -> list:
    """``(words, line, newest)`` for each of :data:`_CLASS_LINES` named in ``text`` with a version past its newest."""
    out = []
    for pattern, line, newest in _CLASS_LINES:
        for hit in re.finditer(rf"(?<![a-z]){pattern}[\s._-]*v?(\d+(?:[._]\d+)*)(?!\d)", text.lower()):
            if tuple(int(part) for part in re.split(r"[._]", hit.group(1))) > newest:
                out.append((hit.group(0), line, ".".join(map(str, newest))))
    return out


def _check_version(model: str, class_name: str, family: Optional[str]) -> None:
    """:func:`_hub_word_match`'s check of a version in ``model``: ValueError for a bare family name and version
    dit_accel has no family of, a DitAccelWarning naming the guess for a hub id that names one."""
    preset = PRESETS[class_name]
    families = list(dict.fromkeys([p.family for p in preset.published] + [f for _, f in preset.hub_words if f]))
    unknown = _unknown_versions(model, families)
    if unknown:
        problem = unknown_version(model, families)
        if problem:
            raise ValueError(problem)
        words, same = unknown[0]
        known = f"it knows {', '.join(same)}"
    else:
        newer = _newer_versions(model)
        if not newer:
            return
        words, line, newest = newer[0]
        known = f"the newest {line} it knows is {line} {newest}"
        if _NAME_AND_VERSION.fullmatch(model) and not Path(model).expanduser().exists():
            raise ValueError(f"{model!r} is no model dit_accel knows ({known}): pass a transformer class, a "
                             "Diffusers folder or a hub id; `dit-accel info` without --model lists the supported "
                             "transformer classes")
    import warnings

    from ..._util import DitAccelWarning

    guess = f"{class_name} ({family})" if family else class_name
    warnings.warn(f"{model!r} names {words!r}, a version dit_accel has no family of ({known}): "
                  f"read as {guess} by its name, a guess" + (f", so settings chosen by family are {family}'s" if family
                                                               else "") + "; check "
                  f"{'them' if family else 'the settings it picks'} against the model card, or download the model (`huggingface-cli download {model}`) so that "
                  "dit_accel reads its transformer from the snapshot's model_index.json", DitAccelWarning,
                  stacklevel=4)


def model_family(model: str):
    """``(transformer class name, family)`` of a ``--model`` value, before it loads: as
    :func:`resolve_model_family`, but a hub id whose snapshot is in the local cache is
    read from the snapshot's model_index.json, as a folder is. By its name alone, a hub id that names no family
    (an ERNIE-Image, PixArt or any renamed model: most classes have no hub word) was refused by ``info`` with the
    list of every class, and ``finetune`` sized an image model's samples as a video's (81 frames, then a late
    ``--frames 81 is invalid`` the user never gave). ValueError (one line) when it cannot be told."""
    from ...models.loading import ModelLoadError, model_folder, resolve_model_kind

    model = os.fspath(model) if isinstance(model, os.PathLike) else model
    try:
        hub = resolve_model_kind(model) == "hub"
    except (ValueError, ModelLoadError):
        hub = False
    snapshot = model_folder(model) if hub else None
    if snapshot is not None and (snapshot / "model_index.json").is_file():
        return resolve_model_family(str(snapshot))
    try:
        return resolve_model_family(model)
    except ValueError:
        if not hub:
            raise
    raise ValueError(f"the hub id {model!r} names no model family dit_accel knows, and no snapshot of it is in the "
                     "local Hugging Face cache to read its transformer from: download it (`huggingface-cli download "
                     f"{model}`) or pass its transformer class instead ({len(SUPPORTED)} are supported; `dit-accel "
                     "info` lists them)") from None
