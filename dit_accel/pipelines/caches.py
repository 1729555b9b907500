"""Step caches stacked with sparse attention: ``--cache NAME[:k=v,...]``.

Diffusers' caches skip whole transformer blocks (or attention modules) on some denoising steps and
reuse or extrapolate their earlier outputs; dit_accel makes the blocks that do run cheaper. The two
compose in either order because they hook different places: a cache wraps block (or attention module)
forwards through ``transformer.enable_cache(config)``, dit_accel wraps the attention processors. A
skipped block calls no processor, so it is simply not counted; the denoising step dit_accel's
schedule uses (``dense_steps``, per-step plans) comes from the scheduler's position, not from the
number of transformer calls, so a cached call never moves it.

Names (:data:`CACHES`):

- ``fbcache`` (Diffusers ``FirstBlockCacheConfig``: ``threshold``)
- ``taylorseer`` (``TaylorSeerCacheConfig``: ``cache_interval``, ``disable_cache_before_step``, ``max_order``, ...)
- ``magcache`` (``MagCacheConfig``: needs ``mag_ratios=flux`` or ``calibrate=true``; ``num_inference_steps``
  defaults to the run's steps)
- ``fastercache`` (``FasterCacheConfig``) and ``pab`` (``PyramidAttentionBroadcastConfig``): the current
  timestep is read from the pipeline (``pipe.current_timestep``)
- ``dbcache`` and ``cachedit-taylorseer``: cache-dit's DBCache (with TaylorSeer), an optional extra
  (``pip install cache-dit``), enabled with ``cache_dit.enable_cache``.

Values: integers, floats, ``true``/``false``/``none``, and tuples as ``a/b`` (``pab:spatial_attention_block_skip_range=2``).
Options are separated by ``,`` (or ``;`` inside ``eval --stacks``, whose stacks are separated by ``,``).

Example::

    spec = CacheSpec.parse("fbcache:threshold=0.1")
    with dit_accel.apply(pipe, Tile()), enable_cache(pipe, spec):
        video = pipe(prompt).frames
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

__all__ = ["CACHES", "CacheSpec", "enable_cache", "parse_stack", "missing_package_error"]

# name -> (Diffusers config class, or None for cache-dit, one-line description)
CACHES = {
    "fbcache": ("FirstBlockCacheConfig", "Diffusers FirstBlockCache: skip the other blocks while the first "
                                         "block's residual changes less than threshold"),
    "taylorseer": ("TaylorSeerCacheConfig", "Diffusers TaylorSeerCache: predict module outputs by a Taylor "
                                            "series between full steps every cache_interval"),
    "magcache": ("MagCacheConfig", "Diffusers MagCache: skip blocks by accumulated magnitude-ratio error "
                                   "(needs mag_ratios=flux or calibrate=true)"),
    "fastercache": ("FasterCacheConfig", "Diffusers FasterCache: reuse attention outputs and the unconditional "
                                         "branch"),
    "pab": ("PyramidAttentionBroadcastConfig", "Diffusers PyramidAttentionBroadcast: reuse attention outputs "
                                               "every *_block_skip_range steps"),
    "dbcache": (None, "cache-dit DBCache (optional extra: pip install cache-dit)"),
    "cachedit-taylorseer": (None, "cache-dit DBCache with TaylorSeer calibration (optional extra)"),
}
_ALIASES = {"firstblockcache": "fbcache", "first_block_cache": "fbcache", "taylorseercache": "taylorseer",
            "mag": "magcache", "faster": "fastercache", "pyramid_attention_broadcast": "pab",
            "pyramidattentionbroadcast": "pab"}


def option_value(text: str):
    """An option's value as written in a stack (``threshold=0.1``, ``tile=1/8/8``): a bool, None, a tuple (``/``),
    an int, a float, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "/" in text:
        return tuple(option_value(part) for part in text.split("/"))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


@dataclass(frozen=True)
class CacheSpec:
    """A cache name and its options, as given on the command line."""

    name: str
    options: Dict[str, object] = field(default_factory=dict)
    # What :func:`enable_cache` set beyond ``options`` where Diffusers' default would differ (PAB's skip range,
    # MagCache's steps, TaylorSeer's numbered modules), on the spec it yields; not part of the label.
    filled: Dict[str, object] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, text: str, source: str = "--cache") -> "CacheSpec":
        """``NAME[:k=v,...]``; ValueError naming ``source``, the cache and what is allowed."""
        name, _, rest = str(text).strip().partition(":")
        if not name.strip():
            raise ValueError(f"{source} {text!r} names no cache; give one of {', '.join(CACHES)} (e.g. "
                             f"{source} fbcache:threshold=0.1), or leave {source} out for no cache")
        key = _ALIASES.get(name.strip().lower(), name.strip().lower())
        if key not in CACHES:
            raise ValueError(f"{source} {text!r}: unknown cache {name!r}; valid caches: {', '.join(CACHES)}")
        options = {}
        for item in rest.replace(";", ",").split(","):
            if not item.strip():
                continue
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"{source} {text!r}: option {item!r} is not key=value")
            if k.strip() in options:  # (the last one won before, the other value unsaid)
                raise ValueError(f"{source} {text!r}: option {k.strip()!r} is given twice; give it once")
            options[k.strip()] = option_value(v)
        spec = cls(key, options)
        spec._check(source)
        return spec

    def _check(self, source: str) -> None:
        problem = self._refusal()  # (before: said by enable_cache, after the model loaded and the prompt was encoded)
        if problem is not None:
            raise ValueError(f"{source} {problem}")
        config_name = CACHES[self.name][0]
        if config_name is None:
            return
        import diffusers

        fields = [f.name for f in dataclasses.fields(getattr(diffusers, config_name)) if not f.name.startswith("_")]
        unknown = sorted(set(self.options) - set(fields))
        if unknown:
            raise ValueError(f"{source} {self.name}: {config_name} has no option {unknown[0]!r}; valid options: "
                             f"{', '.join(fields)}")
        declared = {f.name: f for f in dataclasses.fields(getattr(diffusers, config_name))}
        for key, value in self.options.items():
            problem = _option_problem(key, value, declared[key].type)
            if problem is not None:
                default = declared[key].default
                example = (f" (Diffusers' default: {key}={str(default).lower() if isinstance(default, bool) else default})"
                           if isinstance(default, (int, float)) else "")
                raise ValueError(f"{source} {self.name}:{key}={_shown(value)}: {key} {problem}{example}")

    def _refusal(self) -> Optional[str]:
        """Why this cache runs on no pipeline as given (the same on every model, so said when it is parsed), or None."""
        if self.name == "fastercache":
            return (f"{self.name}: refused: Diffusers' FasterCache splits the unconditional and conditional branches "
                    "out of one batch, but the pipelines dit_accel supports call the transformer once per branch (it "
                    "fails inside the hook with an IndexError); use pab, fbcache, taylorseer or magcache")
        if self.name == "magcache" and self.options.get("mag_ratios") is None and not self.options.get("calibrate"):
            return (f"{self.name}: MagCache needs the model's magnitude ratios: pass magcache:mag_ratios=flux "
                    "(Diffusers' Flux ratios), ratios as a/b/c..., or magcache:calibrate=true to measure them (no "
                    "skipping in that run)")
        return None

    @property
    def label(self) -> str:
        return self.name + ("" if not self.options else ":" + ";".join(
            f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in self.options.items()))

    def describe(self) -> dict:
        return {"cache": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}

    def config(self, pipe, steps: Optional[int] = None):
        """The Diffusers config object for ``pipe`` (ValueError with the reason when it cannot be built)."""
        import diffusers

        config_name = CACHES[self.name][0]
        options = dict(self.options)
        if self.name == "magcache":
            ratios = options.get("mag_ratios")
            if isinstance(ratios, str) and ratios.lower() == "flux":
                from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

                options["mag_ratios"] = FLUX_MAG_RATIOS
            elif isinstance(ratios, tuple):
                options["mag_ratios"] = list(ratios)
            if options.get("mag_ratios") is None and not options.get("calibrate"):
                raise ValueError("--cache magcache: MagCache needs the model's magnitude ratios: pass "
                                 "magcache:mag_ratios=flux (Diffusers' Flux ratios), ratios as a/b/c..., or "
                                 "magcache:calibrate=true to measure them (no skipping in that run)")
            given = options.get("num_inference_steps")
            if steps is not None and given is not None and given != int(steps):  # (its ratios read at the wrong steps)
                raise ValueError(f"--cache {self.label}: num_inference_steps={given} but the run makes {int(steps)} "
                                 f"steps; MagCache spreads its magnitude ratios over num_inference_steps and counts "
                                 f"the run's steps against them: drop num_inference_steps (it defaults to the run's "
                                 f"steps) or give {int(steps)}")
            if steps is not None:
                options.setdefault("num_inference_steps", int(steps))
        if self.name == "fastercache":
            raise ValueError("--cache fastercache: refused: Diffusers' FasterCache splits the unconditional and "
                             "conditional branches out of one batch, but the pipelines dit_accel supports call the "
                             f"transformer once per branch ({type(pipe).__name__} fails inside the hook with an "
                             "IndexError); use pab, fbcache, taylorseer or magcache")
        if self.name in ("pab", "fastercache"):
            if not hasattr(type(pipe), "current_timestep"):
                raise ValueError(f"--cache {self.name}: {type(pipe).__name__} has no current_timestep to drive "
                                 f"{config_name}; use fbcache or taylorseer")
            options.setdefault("current_timestep_callback", lambda: pipe.current_timestep)
        if self.name == "pab" and not any(k.endswith("block_skip_range") for k in options):
            options["spatial_attention_block_skip_range"] = 2  # PAB's documented example setting
        if self.name == "fastercache" and "tensor_format" not in options:
            options["tensor_format"] = "BCFHW" if "num_frames" in _call_params(pipe) else "BCHW"
        options = _typed_options(config_name, options)
        try:
            return getattr(diffusers, config_name)(**options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--cache {self.label}: {config_name}: {' '.join(str(err).split())[:300]}") from None


# Options whose least sensible value is above 0 (every other number an option takes is >= 0): a cache refreshed
# every 0 steps, or a block skipped over a range of 0, would divide by zero or never run.
_MINIMUM = {"cache_interval": 1, "num_inference_steps": 1, "spatial_attention_block_skip_range": 1,
            "temporal_attention_block_skip_range": 1, "cross_attention_block_skip_range": 1,
            "unconditional_batch_skip_range": 1}
_MAXIMUM = {"retention_ratio": 1}  # a share of the steps


def _shown(value) -> str:
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _kinds(annotation) -> list:
    """The types an option annotation allows: the members of a union (``int | None``), else the annotation."""
    import types
    import typing

    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return list(typing.get_args(annotation)) if union else [annotation]


def _names_list(kinds) -> Optional[type]:
    """``list`` or ``tuple`` when the option is a sequence of strings (module-name patterns), else None."""
    import typing

    for kind in kinds:
        if typing.get_origin(kind) in (list, tuple) and typing.get_args(kind)[:1] == (str,):
            return typing.get_origin(kind)
    return None


def _typed_options(config_name: str, options: dict) -> dict:
    """The command line's values as the Diffusers config takes them: a dtype's name as the torch dtype (the string
    reached ``tensor.to("float16")``, a RuntimeError mid-run), and one pattern where a list of patterns goes as a
    list of one (a string was iterated by character: no module matched and the cache did nothing, in silence)."""
    import diffusers
    import torch

    declared = {f.name: f.type for f in dataclasses.fields(getattr(diffusers, config_name))}
    typed = dict(options)
    for key, value in options.items():
        kinds = _kinds(declared.get(key))
        if torch.dtype in kinds and isinstance(value, str):
            typed[key] = getattr(torch, value)
        elif _names_list(kinds) is not None and value is not None:
            typed[key] = _names_list(kinds)(str(v) for v in (value if isinstance(value, tuple) else (value,)))
    return typed


def _option_problem(key: str, value, annotation) -> Optional[str]:
    """What is wrong with ``value`` for a Diffusers cache option of type ``annotation`` (None when nothing is):
    numbers must be numbers of the option's kind, finite and in range; flags true or false; a dtype one of
    :data:`_DTYPE_NAMES`; a callable cannot be given. Options of other types (identifier lists) are left to
    Diffusers."""
    import collections.abc
    import math
    import typing

    import torch

    if typing.get_origin(annotation) is collections.abc.Callable:  # (a raw "unhashable type: 'list'" before)
        return "takes a Python function, which the command line cannot give; leave it out"
    if torch.dtype in _kinds(annotation):  # (the name reached tensor.to(), a RuntimeError mid-run)
        if value is None and type(None) in _kinds(annotation):
            return None
        optional = " or none" if type(None) in _kinds(annotation) else ""
        return None if value in _DTYPE_NAMES else f"must be one of {', '.join(_DTYPE_NAMES)}{optional}"
    if typing.get_origin(annotation) in (tuple, list):  # e.g. timestep ranges a/b: numbers, any sign
        inner = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if inner and inner[0] in (int, float):
            parts = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in parts):
                return "must be finite numbers separated by / (e.g. 100/800)"
            # (one number failed mid-run with a raw "'int' object is not subscriptable"; a third was dropped)
            if Ellipsis not in typing.get_args(annotation) and len(parts) != len(inner):
                return f"must be {len(inner)} numbers separated by / (e.g. 100/800)"
            if key.endswith("timestep_skip_range") and not parts[0] < parts[1]:  # (an empty range: never skips)
                return "must be a range LOW/HIGH of timesteps with LOW < HIGH (e.g. 100/800)"
        return None
    kinds = set(typing.get_args(annotation)) or {annotation}
    if value is None:
        return None if type(None) in kinds else "needs a value (none is not allowed)"
    if bool in kinds:
        return None if isinstance(value, bool) else "must be true or false"
    if float in kinds or int in kinds:
        integer = float not in kinds
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            return f"must be {'an integer' if integer else 'a number'}"
        if not math.isfinite(value):
            return "must be a finite number"
        low, high = _MINIMUM.get(key, 0), _MAXIMUM.get(key)
        if value < low or (high is not None and value > high):
            return f"must be >= {low}" + (f" and <= {high}" if high is not None else "")
    return None


def _call_params(pipe):
    import inspect

    return inspect.signature(pipe.__call__).parameters


# The modules Diffusers' TaylorSeer hooks when told none: whole names (re.fullmatch) of its blocks' attention. They
# fit FLUX's ``transformer_blocks.N.attn`` but not Wan's numbered ``blocks.N.attn1`` / ``attn2``: there the cache hooked
# nothing and every call ran (the report: "skipped 0 of N").
_TAYLORSEER_ATTENTION = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn",
                         "^temporal_transformer_blocks.*attn")


def _taylorseer_modules(model, config):
    """``config`` for ``model``: where the user named no modules and Diffusers' default patterns fit none of
    ``model``'s, the same attention modules numbered (``attn1``, ``attn2``), as those patterns mean them."""
    import re

    if config.cache_identifiers is not None or config.skip_predict_identifiers is not None or config.use_lite_mode:
        return config
    names = [name for name, _ in model.named_modules()]
    if any(re.fullmatch(p, name) for p in _TAYLORSEER_ATTENTION for name in names):
        return config
    numbered = [p + r"\d*" for p in _TAYLORSEER_ATTENTION]
    if not any(re.fullmatch(p, name) for p in numbered for name in names):
        return config
    return dataclasses.replace(config, cache_identifiers=numbered)


def _filled_in(spec: CacheSpec, config) -> dict:
    """The options of ``config`` that :meth:`CacheSpec.config` set where ``spec`` gave none and that differ from
    Diffusers' own defaults, as JSON values: what ran beyond the options given (a record of ``pab`` alone said
    nothing of the skip range 2 it ran with, where Diffusers' default skips nothing)."""
    import torch

    filled = {}
    for declared in dataclasses.fields(config):
        value = getattr(config, declared.name)
        if declared.name.startswith("_") or declared.name in spec.options or callable(value):
            continue
        default = (declared.default_factory() if declared.default_factory is not dataclasses.MISSING
                   else declared.default)
        if default is dataclasses.MISSING or value != default:
            filled[declared.name] = (str(value).removeprefix("torch.") if isinstance(value, torch.dtype)
                                     else list(value) if isinstance(value, tuple) else value)
    return filled


def _hooks_in(model) -> int:
    """The Diffusers hooks on ``model``'s modules (a cache registers one on each block or attention module it
    caches)."""
    return sum(len(getattr(module._diffusers_hook, "hooks", ())) for module in model.modules()
               if hasattr(module, "_diffusers_hook"))


def _check_hooked(spec: CacheSpec, model, before: int) -> None:
    """ValueError when enabling ``spec`` hooked no module of ``model``: module patterns that match none of its
    names made a cache that skips nothing, reported as "skipped 0" after a whole run."""
    if _hooks_in(model) > before:
        return
    given = [key for key in spec.options if key.endswith("identifiers")]
    how = "whole module names (re.fullmatch)" if spec.name == "taylorseer" else "parts of module names (re.search)"
    names = [name for name, _ in model.named_modules() if name.rpartition(".")[2].startswith("attn")][:3]
    what = (f"{', '.join(f'{k}={_shown(spec.options[k])}' for k in given)} match{'es' if len(given) == 1 else ''} "
            f"no module ({how}; its attention modules are named {', '.join(names) or 'otherwise'}, ...)"
            if given else "it found no module to cache")
    raise ValueError(f"--cache {spec.label}: {CACHES[spec.name][0]} hooked no module of {type(model).__name__}: "
                     f"{what}; give patterns that match, or leave them out for the cache's default modules")


def _pab_per_branch(model) -> None:
    """One PyramidAttentionBroadcast state per guidance branch. Diffusers' hook keeps one per attention module, and
    the pipelines call the transformer once per branch (Wan: ``cache_context("cond")``, then ``"uncond"``): the
    unconditional call reused the conditional call's attention output of the same step, where PAB reuses a
    branch's own output of an earlier step. Each hook now keys its state by the pipeline's cache context (the
    one state as before outside one)."""
    from diffusers.hooks.hooks import StateManager
    from diffusers.hooks.pyramid_attention_broadcast import (PyramidAttentionBroadcastHook,
                                                             PyramidAttentionBroadcastState)

    class PerBranchHook(PyramidAttentionBroadcastHook):
        @property
        def state(self):
            branches = self.__dict__["_branches"]
            return branches.get_state() if branches._context is not None else self.__dict__["_state"]

        @state.setter
        def state(self, value):
            self.__dict__["_state"] = value

        def reset_state(self, module):
            self.__dict__["_branches"].reset()
            return super().reset_state(module)

    for module in model.modules():
        hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
        for hook in hooks.values():
            if type(hook) is PyramidAttentionBroadcastHook:
                hook.__dict__["_state"] = hook.__dict__.pop("state")
                hook.__dict__["_branches"] = StateManager(PyramidAttentionBroadcastState)  # (found by the context)
                hook.__class__ = PerBranchHook


@contextlib.contextmanager
def enable_cache(pipe, spec: CacheSpec, steps: Optional[int] = None):
    """Enable ``spec`` on ``pipe.transformer`` (and Wan 2.2's ``transformer_2``) for the block and disable it after
    (also on error). A cache that cannot run on this pipeline raises ValueError with the reason before anything is
    changed. ``steps``: the run's denoising steps, by default the pipeline call's default."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"--cache {spec.name}: {type(pipe).__name__} has no transformer to cache")
    if steps is None:  # (MagCache took its own 28 and started its schedule over mid-run: Wan's calls make 50)
        default = getattr(_call_params(pipe).get("num_inference_steps"), "default", None)
        steps = default if isinstance(default, int) and not isinstance(default, bool) else None
    if CACHES[spec.name][0] is None:
        with _cache_dit(pipe, spec):
            yield spec
        return
    # Wan 2.2's low-noise expert (transformer_2) runs the later steps: it ran uncached before, in silence.
    experts = [t for t in (transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    experts = [t for i, t in enumerate(experts) if all(t is not other for other in experts[:i])]
    for model in experts:
        if not hasattr(model, "enable_cache"):
            raise ValueError(f"--cache {spec.name}: {type(model).__name__} does not support Diffusers' caches "
                             "(no CacheMixin)")
    if spec.name == "magcache" and len(experts) > 1:
        raise ValueError(f"--cache magcache: {type(pipe).__name__}'s two transformers (transformer, transformer_2) "
                         "split the steps, and MagCache's schedule counts the steps of one; use fbcache, taylorseer "
                         "or pab")
    configs = [spec.config(pipe, steps) for _ in experts]  # (its refusals before anything is changed)
    if spec.name == "taylorseer":
        configs = [_taylorseer_modules(model, config) for model, config in zip(experts, configs)]
    ran = dataclasses.replace(spec, filled=_filled_in(spec, configs[0]))
    enabled, before = [], {id(model): _hooks_in(model) for model in experts}
    try:
        for model, config in zip(experts, configs):
            try:
                model.enable_cache(config)
            except (ValueError, TypeError, NotImplementedError) as err:
                raise ValueError(f"--cache {spec.label}: {type(model).__name__} refuses it: "
                                 f"{' '.join(str(err).split())[:300]}") from None
            enabled.append(model)
            _check_hooked(spec, model, before[id(model)])
            if spec.name == "pab":
                _pab_per_branch(model)
        yield ran
    finally:  # (also when the second refuses: the first is left as it was)
        for model in enabled:
            model.disable_cache()


def _not_installed(spec: CacheSpec, given: Optional[str] = None) -> str:
    return (f"{given or '--cache ' + spec.name}: cache-dit is not installed; `pip install cache-dit` to use DBCache / its "
            "TaylorSeer, or use a Diffusers cache (fbcache, taylorseer, magcache, fastercache, pab)")


def missing_package_error(spec: Optional[CacheSpec], given: Optional[str] = None) -> Optional[str]:
    """Why ``spec``'s cache cannot run here for want of its optional package (cache-dit's DBCache and its TaylorSeer:
    ``pip install cache-dit``), asked before a model loads, without importing it; None where it can (or needs none).
    ``given``: the flag and value the message names (``--stacks 'sla+dbcache'``); default ``--cache NAME``."""
    if spec is None or CACHES[spec.name][0] is not None:
        return None
    import importlib.util

    return None if importlib.util.find_spec("cache_dit") is not None else _not_installed(spec, given)


@contextlib.contextmanager
def _cache_dit(pipe, spec: CacheSpec):
    try:
        import cache_dit
    except ImportError:
        raise ValueError(_not_installed(spec)) from None
    options = dict(spec.options)
    if spec.name == "cachedit-taylorseer":
        options.setdefault("enable_taylorseer", True)
    try:
        cache_dit.enable_cache(pipe, **options)
    except Exception as err:  # cache-dit's own refusal, passed on in one line
        raise ValueError(f"--cache {spec.label}: cache-dit refuses it: {' '.join(str(err).split())[:300]}") from None
    try:
        yield spec
    finally:
        cache_dit.disable_cache(pipe)


def parse_stack(text: str, source: str = "--stacks"):
    """``"tile+fbcache:threshold=0.1"`` -> ``(method name, CacheSpec or None)``; ``"fbcache"`` alone is
    dense with that cache."""
    parts = [p.strip() for p in str(text).split("+")]
    if not all(parts) or len(parts) > 2:  # ("tile+" ran tile alone, labelled "tile+")
        raise ValueError(f"{source} {text!r}: a stack is METHOD, METHOD+CACHE or CACHE, with a name on each side of "
                         "'+' (e.g. sla+fbcache)")
    first = parts[0].partition(":")[0].lower()
    if len(parts) == 1 and (first in CACHES or first in _ALIASES):
        return "dense", CacheSpec.parse(parts[0], source)
    return parts[0], (CacheSpec.parse(parts[1], source) if len(parts) == 2 else None)
