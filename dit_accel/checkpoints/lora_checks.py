"""Checks of trained tensors before they reach a model: float and finite weights, LoRA that fits the model.

:mod:`dit_accel.checkpoints.finetuned` (``apply(..., weights=DIR)``) and :mod:`dit_accel.checkpoints.convert`
(``dit-accel convert``) run these before the model or the output folder changes, so a diverged fine-tune (NaN
weights), a cast-to-int file or another model's LoRA is a one-line error naming the file and the tensor or
module, never NaN latents or peft's half-injected adapter. :func:`undo_injection` is the last line behind them:
when peft fails part-way anyway, the model gets its own layers back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..atomic_files import BadFileError

__all__ = ["check_float_weights", "lora_module_name", "kohya_alpha", "kohya_alpha_problem", "check_lora_modules",
           "check_lora_coverage", "lacking_lora", "check_lora_covers", "lora_ranks",
           "check_lora_pairs", "injection_state", "undo_injection", "check_lora_scales", "lora_sketch",
           "check_lora_not_merged"]

# float64 loads too (cast like the others), though no trainer of ours writes it
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BLOCK = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.")
_ABSENT = object()


def check_float_weights(path, tensors: Dict[str, torch.Tensor], *, redo: str,
                        any_dtype: Tuple[str, ...] = ()) -> None:
    """BadFileError naming ``path`` and the tensor unless every tensor is float16/bfloat16/float32 and finite.

    ``redo``: what the user should do about such a file (e.g. "train or convert it again"). Keys ending in one
    of ``any_dtype`` (LoRA ``alpha`` scalars) may be of any number type; float ones must still be finite."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_meta:  # (its finiteness check raised a raw "cannot be called on meta tensors")
            raise BadFileError(path, f"{key} is a meta tensor (a shape without values: saved from a model built "
                                     "without its weights)", f"weights with their values: {redo}")
        if tensor.dtype not in _FLOATS and not (any_dtype and key.endswith(any_dtype)):
            raise BadFileError(path, f"{key} is {str(tensor.dtype).replace('torch.', '')}",
                               "float16, bfloat16 or float32 weights; a file of other numbers is not a fine-tune's "
                               f"output: {redo}")
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise BadFileError(path, f"{key} has {bad} non-finite values (NaN or inf)",
                                   f"finite float weights; the fine-tune diverged or the file is damaged: {redo}")


def check_lora_scales(path, meta: dict, *, redo: str) -> None:
    """BadFileError naming ``path`` and the field when the LoRA's adapter metadata ``meta`` (peft's LoraConfig fields,
    without Diffusers' ``transformer.`` prefix) gives ``lora_alpha``, ``r`` or a value of ``alpha_pattern`` /
    ``rank_pattern`` that is no finite number (ranks: no whole number of at least 1). The metadata is JSON that
    Python's parser reads NaN and Infinity in: a NaN alpha loaded as a scale of NaN, and every output was NaN."""
    import math

    def bad(value, rank: bool) -> bool:
        if rank:
            return isinstance(value, bool) or not isinstance(value, int) or value < 1
        return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)

    fields = [(name, meta[name], name == "r") for name in ("lora_alpha", "r") if meta.get(name) is not None]
    for pattern in ("alpha_pattern", "rank_pattern"):
        if isinstance(meta.get(pattern), dict):
            fields += [(f"{pattern}[{module!r}]", value, pattern == "rank_pattern")
                       for module, value in sorted(meta[pattern].items(), key=lambda kv: str(kv[0]))]
    for name, value, rank in fields:
        if bad(value, rank):
            allowed = "a whole number of at least 1" if rank else "a finite number (the LoRA's scale is alpha / rank)"
            raise BadFileError(path, f"its adapter metadata gives {name}={value!r}",
                               f"{allowed}; the file's metadata is damaged: {redo}")


def lora_module_name(key: str) -> Tuple[str, str]:
    """``(module, rest)`` of a LoRA key: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` ->
    ``("blocks.0.attn1.to_q", "A.weight")``."""
    name = key.split("transformer.", 1)[1] if key.startswith("transformer.") else key
    module, _, rest = name.partition(".lora_")
    return module, rest


def kohya_alpha(state: Dict[str, torch.Tensor], modules: Iterable[str] = ()) -> Optional[str]:
    """The first kohya-style alpha key of a LoRA state dict, or None: a ``<module>.alpha`` beside that module's
    ``lora_A``, or on a module of ``modules`` (the model's names, without Diffusers' ``transformer.`` prefix)."""
    modules = set(modules)
    for key in sorted(state):
        if key.endswith(".alpha") and (f"{key[:-len('.alpha')]}.lora_A.weight" in state
                                       or lora_module_name(key)[0][:-len(".alpha")] in modules):
            return key
    return None


def kohya_alpha_problem(name: str, *, node: bool = False) -> str:
    """What is wrong with a LoRA file holding the kohya-style alpha ``name`` (:func:`kohya_alpha`), and what to do:
    the message after the file's name, for ``dit_accel.apply`` and (``node``) the ComfyUI node, which both refuse
    it."""
    loader = "Diffusers' loader (dit_accel.apply) does not apply, nor does this node" if node else \
        "Diffusers' loader does not apply"
    return (f"holds {name}, a kohya-style LoRA alpha, which {loader} (a Diffusers-format LoRA keeps its scale in the "
            "adapter metadata's lora_alpha): the LoRA would not run at its trained scale. Convert the checkpoint "
            "with dit-accel convert (it folds alpha / rank into lora_A), or save the file without the alpha tensors")


def _base(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)  # a peft layer (an adapter loaded before): its plain layer
    return get() if callable(get) else module


def _expected_shape(base: nn.Module, side: str) -> Tuple[object, ...]:
    """The shape peft gives ``lora_<side>.weight`` on ``base``, with ``"r"`` where the rank goes (``"r/g"`` for a
    grouped conv's lora_B, which peft makes a conv of the base layer's groups)."""
    if isinstance(base, nn.Linear):
        return ("r", base.in_features) if side == "A" else (base.out_features, "r")
    kernel = tuple(base.kernel_size)  # nn.ConvNd: lora_A a conv of the same kernel, lora_B a 1x..x1 conv
    if side == "A":
        return ("r", base.in_channels) + kernel
    return (base.out_channels, "r" if base.groups == 1 else "r/g") + (1,) * len(kernel)


def _rank(shape: Tuple[int, ...], want: Tuple[object, ...], groups: int) -> Optional[int]:
    """The rank a tensor of ``shape`` has where ``want`` (:func:`_expected_shape`) fits it, else None."""
    if len(shape) != len(want) or any(w != s for w, s in zip(want, shape) if isinstance(w, int)):
        return None
    at = next(i for i, w in enumerate(want) if isinstance(w, str))
    return shape[at] * (groups if want[at] == "r/g" else 1)


def _missing_message(path: Path, cls: str, missing: List[str], modules: Dict[str, nn.Module]) -> str:
    depth = {int(m.group(1)) for m in map(_BLOCK.match, modules) if m}
    deeper = depth and all((m := _BLOCK.match(name)) and int(m.group(1)) > max(depth) for name in missing)
    shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    count = f"{len(missing)} module{'s' if len(missing) != 1 else ''}"
    return (f"{path}: holds LoRA for {count} this {cls} lacks ({shown}): trained on another "
            f"{'(deeper) ' if deeper else ''}model? Load it into the model it was trained on, or fine-tune this one")


def check_lora_modules(transformer: nn.Module, path, state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, int]]:
    """Resolve every module ``state``'s LoRA keys name on ``transformer`` before anything is injected: ValueError
    naming ``path`` and the module when one is missing, is no Linear or Conv (peft cannot adapt a LayerNorm), or
    its lora_A/lora_B do not have the shapes peft gives them there. Returns ``{module: {"A": rank, "B": rank}}``
    (lora_A rows, lora_B columns) for the caller's rank check."""
    path, cls = Path(path), type(transformer).__name__
    modules = dict(transformer.named_modules())
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, rest = lora_module_name(key)
        by_module.setdefault(module, {})[rest or key] = tensor
    alpha = kohya_alpha(state, modules)
    if alpha is not None:  # (it was called a module this model lacks: "trained on another model?")
        raise ValueError(f"{path}: {kohya_alpha_problem(lora_module_name(alpha)[0])}")
    missing = sorted(m for m in by_module if m not in modules)
    if missing:
        raise ValueError(_missing_message(path, cls, missing, modules))
    ranks: Dict[str, Dict[str, int]] = {}
    for module, tensors in sorted(by_module.items()):
        base = _base(modules[module])
        if not isinstance(base, _LORA_TYPES):
            raise ValueError(f"{path}: holds LoRA for {module}, a {type(base).__name__} of this {cls}; LoRA adapts "
                             "Linear and Conv layers only (peft cannot load it there): the file is damaged or was "
                             "made for another model. Train or convert it again")
        for rest, tensor in sorted(tensors.items()):
            side, _, part = rest.partition(".")
            if side in ("A", "B") and part not in ("weight", "bias"):  # (peft skipped it with a log line: no LoRA)
                raise ValueError(f"{path}: holds {module}.lora_{rest}, a LoRA tensor under peft's adapter name "
                                 f"{part.rsplit('.', 1)[0]!r}, which Diffusers' loader skips: the LoRA would not load. "
                                 f"Save the file with keys <module>.lora_{side}.weight (as peft's "
                                 "get_peft_model_state_dict gives them), or convert it with dit-accel convert")
            if side not in ("A", "B") or part != "weight":
                continue  # lora_B.bias, DoRA magnitudes: peft checks those against its own layers
            want = _expected_shape(base, side)
            rank = _rank(tuple(tensor.shape), want, getattr(base, "groups", 1))
            if rank is None:
                shown = "(" + ", ".join(map(str, want)) + ")"
                raise ValueError(f"{path}: lora_{side} of {module} has shape {tuple(tensor.shape)}, but that "
                                 f"{type(base).__name__} of this {cls} takes lora_{side} of shape {shown} (r the "
                                 "rank): the weights belong to a model of another size, or the file is damaged")
            ranks.setdefault(module, {})[side] = rank
    return ranks


#: The fields of a LoRA's adapter metadata that say which modules it adapts (peft's own matching reads them).
_TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
#: LoRA tensors peft makes only where the adapter metadata's flag says so: ``(part of the key, flag)``.
_FLAGGED = ((".lora_B.bias", "lora_bias"), (".lora_magnitude_vector", "use_dora"))


def check_lora_coverage(transformer: nn.Module, path, state: Dict[str, torch.Tensor], meta: dict) -> None:
    """ValueError naming ``path`` and the modules when the LoRA's adapter metadata ``meta`` (keys without Diffusers'
    ``transformer.`` prefix; ``target_modules`` and the fields beside it, as peft matches them) names Linear/Conv
    modules of ``transformer`` that ``state`` holds no LoRA for. Trained, the LoRA adapted every module its config
    names on the model it was trained on, so such a module means another model: one with more layers of the same
    width (before: peft loaded the LoRA into the layers the file has with a RuntimeWarning, and the rest ran without
    it). Without metadata (converted folders) there is nothing to compare."""
    if not meta.get("target_modules"):
        return
    for key in sorted(state):  # tensors the config makes no place for: peft dropped them with a log line
        part, flag = next(((p, f) for p, f in _FLAGGED if p in key), (None, None))
        if part is not None and not meta.get(flag):
            raise ValueError(f"{path}: holds {key}, but its adapter metadata says {flag}={meta.get(flag)!r}, so peft "
                             f"would make no {part.lstrip('.')} and skip it: the LoRA would load without it. The "
                             "file is damaged or its metadata is another LoRA's: train or convert it again")
    lacking = lacking_lora((name for name, module in transformer.named_modules()
                            if name and isinstance(_base(module), _LORA_TYPES) and ".lora_" not in f".{name}"
                            and ".base_layer" not in f".{name}."), state, meta)
    check_lora_covers(path, meta, lacking, f"this {type(transformer).__name__}")


def lacking_lora(names: Iterable[str], state: Dict[str, torch.Tensor], meta: dict) -> List[str]:
    """The module ``names`` that the adapter metadata ``meta`` names (``target_modules`` and the fields beside it,
    matched as peft matches them) and that ``state`` holds no LoRA for, sorted; ``[]`` without metadata, or with
    metadata this peft cannot read (Diffusers' load says what is wrong)."""
    if not meta.get("target_modules"):
        return []
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        config = LoraConfig(**{k: meta[k] for k in _TARGET_FIELDS if meta.get(k) is not None})
    except Exception:  # noqa: BLE001 - metadata this peft cannot read
        return []
    have = {lora_module_name(key)[0] for key in state}
    return sorted(name for name in set(names) if name not in have and bool(check_target_module_exists(config, name)))


def check_lora_covers(path, meta: dict, lacking: List[str], model: str) -> None:
    """ValueError naming ``path`` and the ``lacking`` modules (:func:`lacking_lora`) of ``model`` (words: "this
    WanTransformer3DModel") when there are any: the LoRA was trained on another model."""
    if lacking:
        shown = ", ".join(lacking[:4]) + (", ..." if len(lacking) > 4 else "")
        raise ValueError(f"{path}: its adapter metadata says the LoRA adapts target_modules={meta['target_modules']}, "
                         f"but it holds no LoRA for {len(lacking)} such module(s) of {model} ({shown}): it was "
                         "trained on another model (one with fewer layers?), and those would run without it. Load it "
                         "into the model it was trained on, or fine-tune this one")


def lora_ranks(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, int]]:
    """``{module: {"A": lora_A rows, "B": lora_B columns}}`` of a LoRA state dict, without a model (the side a module
    lacks is absent)."""
    ranks: Dict[str, Dict[str, int]] = {}
    for key, tensor in state.items():
        module, rest = lora_module_name(key)
        if rest in ("A.weight", "B.weight") and tensor.dim() >= 2:
            ranks.setdefault(module, {})[rest[0]] = int(tensor.shape[0 if rest[0] == "A" else 1])
    return ranks


def check_lora_pairs(path, ranks: Dict[str, Dict[str, int]], *, redo: str) -> None:
    """BadFileError naming ``path`` and the module when a module has lora_A without lora_B (or the reverse), or the
    two differ in rank: peft would fill the missing half with its initial values (lora_B zeros) and load the rest,
    a LoRA that is silently not the trained one."""
    for module, sides in sorted(ranks.items()):
        if set(sides) != {"A", "B"}:
            have = next(iter(sides))
            raise BadFileError(path, f"holds lora_{have} of {module} but no lora_{'B' if have == 'A' else 'A'}",
                               f"both lora_A and lora_B of every module it adapts (the LoRA is incomplete): {redo}")
        if sides["A"] != sides["B"]:
            raise BadFileError(path, f"the LoRA of {module} has rank {sides} (lora_A rows / lora_B columns)",
                               f"one rank on both sides: {redo}")


def injection_state(transformer: nn.Module) -> dict:
    """What :func:`undo_injection` puts back: the module tree, each peft layer's adapters, the peft config,
    Diffusers' loaded flag and every parameter's ``requires_grad``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(transformer.named_modules())
    layers = {name: (list(getattr(m, "_active_adapter", [])) if isinstance(getattr(m, "_active_adapter", None), list)
                     else getattr(m, "_active_adapter", None))
              for name, m in modules.items() if isinstance(m, BaseTunerLayer)}
    config = transformer.__dict__.get("peft_config")  # peft adds to this dict in place: keep it and its entries
    return {"modules": modules, "layers": layers, "has_config": "peft_config" in transformer.__dict__,
            "config": config, "entries": dict(config) if isinstance(config, dict) else None,
            "flag": transformer.__dict__.get("_hf_peft_config_loaded", _ABSENT),
            "grad": {id(p): p.requires_grad for p in transformer.parameters()}}


def undo_injection(transformer: nn.Module, adapter: str, before: dict) -> None:
    """Put ``transformer`` back as :func:`injection_state` found it after a LoRA load of ``adapter`` failed part-way
    (peft may raise after wrapping some layers and before recording its config, where Diffusers' own cleanup does
    not reach): wrapped layers become their original modules, layers that held adapters before lose ``adapter``."""
    modules = before["modules"]
    for name in sorted(modules, key=lambda n: n.count(".") if n else -1):
        if not name:
            continue
        parent, _, child = name.rpartition(".")
        owner = transformer.get_submodule(parent) if parent else transformer
        if owner._modules.get(child) is not modules[name]:
            owner._modules[child] = modules[name]
    for name, active in before["layers"].items():
        layer = modules[name]
        for attr in getattr(layer, "adapter_layer_names", ()) + getattr(layer, "other_param_names", ()):
            store = getattr(layer, attr, None)
            if isinstance(store, (dict, nn.ModuleDict, nn.ParameterDict)) and adapter in store:
                del store[adapter]
        layer._active_adapter = active
    if before["has_config"]:
        transformer.__dict__["peft_config"] = config = before["config"]
        if isinstance(config, dict):
            config.clear()
            config.update(before["entries"])
    else:
        transformer.__dict__.pop("peft_config", None)
    if before["flag"] is _ABSENT:
        transformer.__dict__.pop("_hf_peft_config_loaded", None)
    else:
        transformer.__dict__["_hf_peft_config_loaded"] = before["flag"]
    for p in transformer.parameters():
        if id(p) in before["grad"]:
            p.requires_grad_(before["grad"][id(p)])


_SKETCHED = 4  # LoRA modules whose base weight lora_sketch records (a few are enough to tell a merge)


def _sketch(weight: torch.Tensor) -> float:
    """``u @ W @ v`` for fixed random ``u``, ``v`` (seeded by the shape alone): one number that moves by the LoRA's
    own ``u @ dW @ v`` when the LoRA is merged into ``W``."""
    w = weight.detach().float()
    g = torch.Generator().manual_seed(0)
    u, v = (torch.randn(n, generator=g, dtype=torch.float64).to(w.device, torch.float32) for n in w.shape)
    return float(u @ (w @ v))


def lora_sketch(transformer: nn.Module, adapter: str) -> Dict[str, List[float]]:
    """``{module: [sketch of its base weight, sketch of the LoRA's delta]}`` for the first few Linear layers the
    peft ``adapter`` wraps: what :func:`check_lora_not_merged` compares, so a LoRA already merged into the model's
    weights (Diffusers' ``fuse_lora`` then ``unload_lora_weights``) is not loaded a second time."""
    from peft.tuners.lora import LoraLayer

    out: Dict[str, List[float]] = {}
    for name, module in sorted(transformer.named_modules(), key=lambda item: item[0]):
        base = getattr(module, "base_layer", None)
        if (isinstance(module, LoraLayer) and adapter in module.lora_A and isinstance(base, nn.Linear)
                and not getattr(module, "merged", False)):
            out[name] = [_sketch(base.weight), _sketch(module.get_delta_weight(adapter))]
            if len(out) == _SKETCHED:
                break
    return out


def check_lora_not_merged(transformer: nn.Module, folder, sketch) -> None:
    """ValueError naming ``folder`` when the model's weights hold its LoRA already: the sketches of the weights
    :func:`lora_sketch` recorded at training sit far nearer ``base + delta`` than ``base`` (a LoRA fused by
    Diffusers and unloaded, then loaded again by ``apply(weights=)``, counted twice, without a word). Another base
    model (near neither) and a folder without a sketch pass: the check only refuses what it can tell."""
    if not isinstance(sketch, dict):
        return
    near_base = near_merged = 0.0
    for name, pair in sketch.items():
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            continue
        module = getattr(module, "base_layer", module)
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, (int, float)) for x in pair)
        if not ok or not isinstance(module, nn.Linear) or module.weight.device.type == "meta":
            continue
        now = _sketch(module.weight)
        near_base += (now - pair[0]) ** 2
        near_merged += (now - pair[0] - pair[1]) ** 2
    if near_base > 0 and near_merged < 0.01 * near_base:
        raise ValueError(
            f"weights={str(folder)!r}: its LoRA is already merged into this {type(transformer).__name__}'s weights "
            "(pipe.load_lora_weights(DIR), pipe.fuse_lora(), then pipe.unload_lora_weights()), so loading it again "
            "would count it twice. Apply the weights to the model without it (load the model again, or "
            "pipe.unfuse_lora() before unloading): apply(weights=DIR) loads the LoRA itself, and handle.fuse_lora() "
            "then fuses it.")
