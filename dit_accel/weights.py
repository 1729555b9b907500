"""The fine-tuned weights folder: a Diffusers LoRA plus the SLA projections, written by ``dit-accel finetune``.

An output folder of ``dit-accel finetune`` holds::

    pytorch_lora_weights.safetensors   Diffusers-format LoRA ("transformer." keys, adapter
                                       metadata with rank/alpha): pipe.load_lora_weights(DIR);
                                       absent when files.lora is null (a converted checkpoint
                                       without LoRA, see dit_accel.convert)
    sla_projections.safetensors        SLA only: "<attention module>.weight"/".bias" per layer
    dit_accel_method.json              the method config and LoRA settings the weights belong to

Load everything in one line::

    handle = dit_accel.apply(pipe, dit_accel.training.load_method(DIR), weights=DIR)

It sits below both :mod:`dit_accel.pipelines` (``apply(..., weights=DIR)`` loads it
with :func:`load_into`) and :mod:`dit_accel.training` (which writes it), so neither
imports the other.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ._util import DitAccelWarning
from .methods import Method, method_from_name

__all__ = [
    "LORA_FILE", "SLA_FILE", "METHOD_FILE", "ADAPTER_NAME",
    "save_trained_weights", "load_into", "load_trained_weights", "load_method", "read_weights_info", "lora_state_dict",
    "sla_state_dict", "method_from_dict",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
SLA_FILE = "sla_projections.safetensors"
METHOD_FILE = "dit_accel_method.json"
ADAPTER_NAME = "dit_accel"


def _lora_mixin():
    # The LoRA loader of Wan pipelines; classmethods work without a pipeline instance.
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    return WanLoraLoaderMixin


def _json_roundtrip(d: dict) -> dict:
    return json.loads(json.dumps(d))


def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """peft LoRA tensors of ``transformer`` (keys without the ``transformer.`` prefix), detached fp32 copies."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def sla_state_dict(projections: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``{"<layer>.weight": ..., "<layer>.bias": ...}`` fp32 copies of SLA projections."""
    out = {}
    for name, module in projections.items():
        for pname, p in module.named_parameters():
            out[f"{name}.{pname}"] = p.detach().float().cpu().contiguous()
    return out


def save_trained_weights(output_dir, *, transformer: nn.Module, method: Method, lora_config,
                         sla_projections: Optional[Dict[str, nn.Module]] = None, extra: Optional[dict] = None,
                         adapter_name: str = "default") -> None:
    """Write the LoRA (Diffusers format), the SLA projections and the method file to ``output_dir``."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = lora_config.to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    _lora_mixin().save_lora_weights(
        out, transformer_lora_layers=lora_state_dict(transformer, adapter_name),
        transformer_lora_adapter_metadata=metadata, weight_name=LORA_FILE,
    )
    if sla_projections:
        save_file(sla_state_dict(sla_projections), str(out / SLA_FILE))
    info = {
        "format": 1,
        "method": _json_roundtrip(method.to_dict()),
        "lora": {"rank": lora_config.r, "alpha": lora_config.lora_alpha,
                 "target_modules": sorted(lora_config.target_modules)},
        "files": {"lora": LORA_FILE, "sla_projections": SLA_FILE if sla_projections else None},
        **(extra or {}),
    }
    (out / METHOD_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _read_info(folder: Path) -> dict:
    if not folder.is_dir():
        raise ValueError(f"weights={str(folder)!r} is not a folder; pass the output folder of `dit-accel finetune`.")
    path = folder / METHOD_FILE
    if not path.is_file():
        raise ValueError(f"weights={str(folder)!r} has no {METHOD_FILE}; is it the output folder of `dit-accel finetune`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None


def read_weights_info(folder) -> dict:
    """The contents of a fine-tuned folder's ``dit_accel_method.json`` (method, LoRA settings, dense_layers, shape)."""
    return _read_info(Path(folder))


def method_from_dict(d: dict) -> Method:
    """The method config of a ``Method.to_dict()`` read back from JSON (lists become tuples again)."""
    d = dict(d)
    name = d.pop("method")
    for k, v in d.items():  # JSON turned tuples into lists
        if isinstance(v, list):
            d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return method_from_name(name, **d)


def load_method(folder) -> Method:
    """The method config a fine-tuned folder was trained with (for ``apply(pipe, load_method(DIR), weights=DIR)``)."""
    return method_from_dict(_read_info(Path(folder))["method"])


def _warn(message: str) -> None:
    warnings.warn(message, DitAccelWarning, stacklevel=4)


def _check_method(folder: Path, saved: dict, method, warn) -> None:
    """The handle's method must be the one the weights were trained for; only SLA's linear-token rule
    may differ (a warning: the projections then see another linear branch than they learned)."""
    current = _json_roundtrip(method.to_dict())
    if saved == current:
        return
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff == ["linear_tokens"]:
        warn(f"dit_accel: weights={str(folder)!r} were trained with SLA linear_tokens={saved['linear_tokens']!r} but "
             f"the method runs linear_tokens={current['linear_tokens']!r}: the projections learned one linear branch "
             "and now see the other, so the output differs from the trained model. Apply the saved method "
             f"(dit_accel.load_method({str(folder)!r})) to run them as trained.")
        return
    raise ValueError(
        f"weights={str(folder)!r} were trained for {saved} but the handle's method is {current} "
        f"(differs in {diff}). Apply the saved method: "
        f"dit_accel.apply(pipe, dit_accel.load_method({str(folder)!r}), weights=...)."
    )


def load_into(handle, folder) -> None:
    """Load a fine-tuned folder into an installed dit_accel handle (``apply(..., weights=DIR)`` calls this).

    Loads the LoRA into ``handle.transformer`` (as adapter ``"dit_accel"``; the
    same tensors ``pipe.load_lora_weights(DIR)`` would load) and, for SLA, the
    projections into ``handle.sla_projections()``.

    Raises ValueError when the folder is missing files, when it was trained for
    a different method config than ``handle.method`` (only SLA's ``linear_tokens``
    may differ, with a warning), or when its SLA projections do not match the
    model's attention layers.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    info = _read_info(folder)
    # Through the config and back: fields added since the folder was written take their defaults.
    saved = _json_roundtrip(method_from_dict(info["method"]).to_dict()) if "method" in info else {}
    method = getattr(handle, "method", None)
    if method is not None:  # the handle's warning log (its sidecars list the warning), else a plain warning
        log = getattr(getattr(handle, "_runtime", None), "warnings", None)
        _check_method(folder, saved, method, log.warn if log is not None else _warn)
    if (info.get("files") or {}).get("lora", LORA_FILE) is not None:
        _load_lora(handle.transformer, folder)

    projections = handle.sla_projections() if hasattr(handle, "sla_projections") else {}
    if saved.get("method") == "sla" or projections:
        sla_path = folder / SLA_FILE
        if not sla_path.is_file():
            raise ValueError(f"weights={str(folder)!r} is missing {SLA_FILE} (the method is SLA).")
        tensors = load_file(str(sla_path))
        expected = sla_state_dict(projections)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{sla_path} does not match the model's SLA layers: missing {missing[:4]}, unexpected {unexpected[:4]}; "
                f"was it trained on a different model? It was trained with dense_layers={info.get('dense_layers')}; "
                "pass the same dense_layers to apply()."
            )
        with torch.no_grad():
            for name, module in projections.items():
                for pname, p in module.named_parameters():
                    src = tensors[f"{name}.{pname}"]
                    if src.shape != p.shape:
                        raise ValueError(f"{sla_path}: {name}.{pname} has shape {tuple(src.shape)}, model has {tuple(p.shape)}.")
                    p.copy_(src.to(p.dtype))


def _check_lora_targets(transformer: nn.Module, folder: Path, state: Dict[str, torch.Tensor]) -> None:
    """ValueError naming the real reason when the LoRA's modules do not exist in ``transformer`` (weights
    trained on another model family), instead of peft's "Target modules ... not found"."""
    targets = set()
    for key in state:
        name = key.split("transformer.", 1)[1] if key.startswith("transformer.") else key
        targets.add(name.split(".lora_")[0])
    modules = {name for name, _ in transformer.named_modules()}
    if targets and not targets & modules:
        info = _read_info(folder)
        example = sorted(targets)[0]
        ours = next((n for n in sorted(modules) if n.endswith(("to_q", "attn.to_q", "attn1.to_q"))), None)
        raise ValueError(
            f"weights={str(folder)!r} hold LoRA for modules like {example!r} (trained on model "
            f"{info.get('model', 'unknown')!r}); this {type(transformer).__name__} has no such module"
            + (f" (its attention projections are like {ours!r})" if ours else "")
            + ": the weights belong to another model. Fine-tune on this model, or load them into the one "
              "they were trained on."
        )


def _load_lora(transformer: nn.Module, folder: Path) -> None:
    lora_path = folder / LORA_FILE
    if not lora_path.is_file():
        raise ValueError(f"weights={str(folder)!r} is missing {LORA_FILE}.")
    state, metadata = _lora_mixin().lora_state_dict(str(folder), weight_name=LORA_FILE, return_lora_metadata=True)
    _check_lora_targets(transformer, folder, state)
    if ADAPTER_NAME in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(ADAPTER_NAME)  # loading twice replaces, never stacks
    transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name=ADAPTER_NAME)


load_trained_weights = load_into  # the name used before the weights folder format moved here
