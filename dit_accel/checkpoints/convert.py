"""Checkpoints of the SLA reference code (TurboDiffusion, thu-ml/SLA) as dit_accel weights folders.

TurboDiffusion (and thu-ml/SLA integrated into Wan the same way) fine-tunes one
``proj_l = Linear(D, D)`` per self-attention layer together with the model and
saves the original Wan (not Diffusers) state dict. The supported key layout is
TurboDiffusion's at commit fcf81c9 (``turbodiffusion/inference/modify_model.py``,
``turbodiffusion/rcm/networks/wan2pt1.py``, ``wan2pt2.py``)::

    blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight   [D, D]
    blocks.{i}.self_attn.attn_op.local_attn.proj_l.bias     [D]
    blocks.{i}.self_attn.q.weight, ..., head.head.weight    the Wan model itself

with optional ``net.`` / ``net_ema.`` / ``model.`` / ``module.`` / ``_orig_mod.`` /
``diffusion_model.`` / ``transformer.`` prefixes and an optional ``{"state_dict": ...}`` wrapper (also ``"model"``, beside a
training checkpoint's ``step``/``optimizer`` entries); any
module path between ``self_attn`` (or Diffusers' ``attn1``) and ``proj_l`` is
accepted. LoRA tensors (``lora_A``/``lora_B``, ``lora_down``/``lora_up`` + ``alpha``,
original or Diffusers names) go through Diffusers' own Wan LoRA conversion.

Layer ``i``'s projection becomes Diffusers' ``blocks.{i}.attn1`` (``transformer_2.``
in front for Wan 2.2's second expert), and the folder records the SLA config the
weights were trained with (:meth:`dit_accel.SLA.reference`), so
``load_method(DIR)`` gives it back. The model's own weights cannot go into the
folder (it holds LoRA and projections only): a checkpoint that carries them is
refused unless ``base_weights="skip"`` says the Diffusers model you load has the
same ones (see docs/api.md, "Converting SLA checkpoints").
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .._util import DitAccelWarning, file_in_the_way
from ..methods import SLA
from ..atomic_files import BadFileError, is_temp_name
from .finetuned import LORA_FILE, METHOD_FILE, RUN_FILE, SLA_FILE, write_weights_folder
from .lora_checks import check_float_weights, check_lora_pairs, lora_ranks

__all__ = ["convert_checkpoint", "read_checkpoint", "split_checkpoint", "SplitCheckpoint", "SUPPORTED_LAYOUT"]

SUPPORTED_LAYOUT = ("TurboDiffusion@fcf81c9 / thu-ml SLA in Wan: blocks.{i}.self_attn.<...>.proj_l.{weight,bias} "
                    "(+ the original Wan model's keys, + optional LoRA)")

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net_ema.", "net.", "model.", "module.", "_orig_mod.",
             "transformer.")
_WRAPPERS = ("state_dict", "model", "net", "net_ema", "module")
_PROJ = re.compile(r"^blocks\.(\d+)\.(?:self_attn|attn1)\.(?:\w+\.)*?proj_l\.(weight|bias)$")
_LORA = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.|\.alpha$")
# peft's state_dict() names the adapter: <module>.lora_A.<adapter>.weight
_ADAPTER_NAMED = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.(\w+)\.(weight|bias)$")
_QUANTIZED = re.compile(r"\.(int8_weight|scale)$")
# Diffusers' Wan module names (the original model's are self_attn/cross_attn.q, ffn.0, head.head, *_embedding).
_DIFFUSERS_NAMES = re.compile(r"\.(attn1|attn2)\.|\.(to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)\.|\.ffn\.net\.|"
                              r"^(proj_out|condition_embedder)\.")
# The Wan model's own tensors, in the original layout and in Diffusers' (recognised, never converted).
_BASE = re.compile(
    r"^(patch_embedding|text_embedding|time_embedding|time_projection|head|img_emb|condition_embedder|proj_out|"
    r"scale_shift_table|rope)(\.|$)"
    r"|^blocks\.\d+\.(modulation|scale_shift_table|norm[123]\.|ffn\.|"
    r"(self_attn|cross_attn|attn1|attn2)\.(q|k|v|o|norm_q|norm_k|k_img|v_img|norm_k_img|to_q|to_k|to_v|to_out\.0|"
    r"add_k_proj|add_v_proj|norm_added_k)\.)")

_EXPECTED = ("blocks.{i}.self_attn.<...>.proj_l.weight/.bias (SLA projections), LoRA tensors (lora_A/lora_B, "
             "lora_down/lora_up, alpha), or the Wan model's own keys (patch_embedding.*, blocks.{i}.self_attn.q.*, "
             "blocks.{i}.ffn.*, head.*, ...)")


@dataclass
class SplitCheckpoint:
    """A checkpoint's tensors by kind: SLA projections per layer, LoRA tensors, the model's own keys."""

    projections: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    lora: Dict[str, torch.Tensor] = field(default_factory=dict)
    base: List[str] = field(default_factory=list)


def read_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` (told by its content, whatever its name) or ``.pt``/``.pth`` (read with
    ``weights_only=True``) checkpoint, unwrapped from ``{"state_dict": ...}``-style containers (:func:`_unwrap`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a file")
    if path.suffix.lower() == ".safetensors" or _is_safetensors(path):
        from ..atomic_files import load_safetensors

        state = load_safetensors(path, expected="a checkpoint of tensors in the SLA reference layout; if it is "
                                                "damaged or cut short, download or copy it again")
    else:
        try:
            with warnings.catch_warnings():  # (a pickle protocol note on stderr, beside the one-line answer)
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types, PyTorch's with a page of advice: say what to do
            damage = _damage(path, err)
            if damage:  # (before: "if you trust the file, load it yourself" for a download cut short)
                raise BadFileError(path, damage, "the whole checkpoint: download or copy it again (an interrupted "
                                                 "download or copy leaves such a file)") from None
            raise BadFileError(path, "not a PyTorch checkpoint that torch.load can read with weights_only=True "
                                     f"({_load_error(err)})",
                               "a .safetensors file or a .pt/.pth state dict of tensors: if you trust the file, "
                               "load it yourself, save its state dict with torch.save (or safetensors' save_file), "
                               "then convert that file") from None
    return _unwrap(path, state)


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does (an 8-byte little-endian header length, then the JSON
    header's ``{``), whatever its name: a renamed one (``.pth``, ``.bin``) went to torch.load, which said the file
    was no ``.safetensors`` file."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _damage(path: Path, err: Exception) -> str:
    """What is wrong with a ``.pt``/``.pth`` file that torch.load failed on because it is empty or cut short, else "":
    a zip checkpoint without its end (torch.load said ``OSError: Invalid argument``), a legacy one that ends early."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped and not zipfile.is_zipfile(path):
        return f"is truncated or damaged: a PyTorch (zip) checkpoint of {size} bytes whose end is missing"
    if isinstance(err, EOFError) or "unexpected EOF" in str(err):
        return f"is truncated: it ends early ({_load_error(err)})"
    return ""


def _load_error(err: Exception) -> str:
    """What torch.load's ``err`` says is wrong, without its weights-only advice (the unpickler's own reason, e.g.
    ``Unsupported global: GLOBAL collections.Counter``, where it gives one)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif "Weights only load failed" in text or isinstance(err, KeyError):  # (a KeyError's text is a bare key)
        text = ""
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
    reason = reason.split(". ", 1)[0].rstrip(".")[:120]
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict of {len(value)} entries, {tensors} tensors"
    return type(value).__name__


def _refuse_a_second_copy(path: Path, state: dict, chosen: str) -> None:
    """BadFileError when an entry beside ``state[chosen]`` holds tensors of the same names (``{"model": ...,
    "ema": ...}``): before, the wrapper's were converted and the other copy, perhaps the one meant, dropped without a
    word (an optimizer's state, ``step`` and the like have other keys and pass)."""
    names = {_strip(k) for k in state[chosen] if isinstance(k, str)}
    for key, value in state.items():
        if key != chosen and isinstance(value, dict) and names & {_strip(k) for k in value if isinstance(k, str)}:
            raise BadFileError(path, f"holds two state dicts of one model, {chosen!r} and {key!r} (its EMA copy?), and "
                                     "convert cannot tell which one is meant",
                               f"one state dict: save the one to convert alone, e.g. torch.save(checkpoint[{key!r}], "
                               "PATH), then convert that file")


def _unwrap(path: Path, state):
    """The flat state dict of tensors in ``state``: itself, or the one under a wrapper key (``state_dict``,
    ``model``, ...) beside entries that are no tensors (a training checkpoint's ``step``, ``optimizer``)."""
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        wrappers = [k for k in _WRAPPERS if isinstance(state.get(k), dict)]
        loose = any(isinstance(v, torch.Tensor) for v in state.values())
        if len(wrappers) != 1 or loose:
            break
        _refuse_a_second_copy(path, state, wrappers[0])
        state = state[wrappers[0]]
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        odd = [k for k in state if not isinstance(k, str)]
        if odd:  # a state dict's keys are module paths; others failed deep in the key matching
            raise BadFileError(path, f"holds tensors under {len(odd)} keys that are no strings (e.g. {odd[0]!r})",
                               "a state dict whose keys are parameter names (blocks.0.self_attn.q.weight, ...)")
        # (torch.save keeps sparse tensors; the checks and safetensors take strided ones: NotImplementedError before)
        return {k: v.to_dense() if v.layout != torch.strided else v for k, v in state.items()}
    if not isinstance(state, dict) or not state:
        what = f"holds {'an empty dict' if isinstance(state, dict) else 'a ' + type(state).__name__}"
    else:
        odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        shown = list(state)[:6] + [k for k in odd[:2] if k not in list(state)[:6]]
        entries = ", ".join(f"{k!r} ({_describe(state[k])})" for k in shown)
        what = (f"holds a dict of {len(state)} entries that is no flat state dict of tensors: {entries}"
                f"{', ...' if len(state) > len(shown) else ''}")
        several = [k for k in _WRAPPERS if isinstance(state.get(k), dict)]
        if len(several) > 1:
            what += f" (several state dicts: {', '.join(map(repr, several))}; convert cannot tell which one is meant)"
    raise BadFileError(path, what, "a state dict (keys -> tensors), alone or under one of "
                       f"{', '.join(map(repr, _WRAPPERS))} beside entries that are no tensors (step, optimizer, ...); "
                       "save the state dict to convert alone: torch.save(checkpoint[KEY], PATH)")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def split_checkpoint(state: Dict[str, torch.Tensor]) -> SplitCheckpoint:
    """Sort a state dict's tensors into SLA projections, LoRA and the model's own keys.

    Raises ValueError for quantized checkpoints (TurboDiffusion's ``-quant`` files) and for any key
    that is none of these, listing what was found and what was expected.
    """
    out, unknown, seen, copies, diffs = SplitCheckpoint(), [], {}, {}, []
    for raw, tensor in state.items():
        key = _strip(raw)
        first = seen.setdefault(key, raw)
        if first != raw:  # (before: the later one, e.g. net_ema.'s over net.'s, was converted without a word)
            raise ValueError(f"{first!r} and {raw!r} are one tensor under two prefixes (a model and its EMA copy?): "
                             "convert cannot tell which one is meant. Save the state dict of one alone, e.g. "
                             "torch.save({k[len('net_ema.'):]: v for k, v in state.items() if k.startswith('net_ema.')}"
                             ", PATH), then convert that file")
        proj = _PROJ.match(key)
        if proj is not None or _LORA.search(key):
            copies.setdefault("net_ema." in raw[:len(raw) - len(key)], raw)
        if proj is not None:
            out.projections.setdefault(int(proj.group(1)), {})[proj.group(2)] = tensor
        elif _LORA.search(key):
            out.lora[key] = tensor
        elif key.endswith((".diff", ".diff_b")):  # (before: taken for the model's own weights, and dropped silently
            diffs.append(raw)                     # by base_weights="skip")
        elif _QUANTIZED.search(key):
            raise ValueError(f"{raw!r} is a quantized weight (Int8Linear): this is a quantized checkpoint "
                             "(TurboDiffusion's *-quant.pth); convert the unquantized one (*.pth without -quant)")
        elif _BASE.match(key):
            out.base.append(raw)
        else:
            unknown.append(raw)
    if len(copies) == 2:  # (before: layer 0's projection of the model and layer 1's of its EMA, converted as one)
        raise ValueError(f"the trained tensors come from a model and its EMA copy ({copies[False]!r}, "
                         f"{copies[True]!r}): convert cannot tell which one is meant. Save the state dict of one "
                         "alone (every key under net. or every key under net_ema.), then convert that file")
    if diffs:
        raise ValueError(f"{len(diffs)} tensors are trained weight differences (.diff / .diff_b, e.g. {diffs[:3]}), "
                         "which a weights folder cannot hold (LoRA lora_A/lora_B and SLA projections only) and which "
                         "are no weights of the model to skip. Load that LoRA with Diffusers (pipe.load_lora_weights) "
                         "and convert a checkpoint without them")
    if unknown:
        raise ValueError(f"{len(unknown)} keys are neither SLA projections, LoRA nor Wan model weights: "
                         f"{unknown[:6]}{' ...' if len(unknown) > 6 else ''}. Expected {_EXPECTED}. Supported layout: "
                         f"{SUPPORTED_LAYOUT}")
    return out


def _check_trained_tensors(path, state: Dict[str, torch.Tensor]) -> None:
    """BadFileError naming the checkpoint and tensor when an SLA projection or LoRA tensor (what the folder gets)
    is not float or holds NaN/inf: convert would cast an int8 file silently or write NaN weights with valid
    hashes. The model's own tensors are never converted, so they are not read here."""
    trained = {raw: t for raw, t in state.items() if _PROJ.match(_strip(raw)) or _LORA.search(_strip(raw))}
    check_float_weights(path, trained, any_dtype=(".alpha",),
                        redo="convert the checkpoint of another (earlier) training step, or download it again")
    for raw in sorted(k for k in trained if k.endswith(".alpha")):
        alpha = trained[raw]
        # (before: a negative alpha hung Diffusers' conversion for ever; an alpha of 0, scale 1 to kohya-style
        # trainers, became a LoRA of zeros, silently)
        if alpha.numel() == 1 and (alpha.dtype == torch.bool or not float(alpha) > 0):
            raise BadFileError(path, f"{raw} is {alpha.item()}, no positive LoRA alpha (the LoRA's scale is alpha / "
                                     "rank)", "a positive alpha: an alpha of 0 means scale 1 to kohya-style trainers "
                                              "but a LoRA switched off to Diffusers, so convert cannot tell which was "
                                              "meant. Save the checkpoint with alpha = rank (scale 1), or without its "
                                              "alpha tensors, then convert it")


def _projection_tensors(split: SplitCheckpoint, prefix: str, where: str) -> Dict[str, torch.Tensor]:
    """``{"<prefix>blocks.{i}.attn1.weight": ...}`` in fp32, every layer checked for a square weight and a bias."""
    if not split.projections:
        raise ValueError(f"{where} has no SLA projections (blocks.{{i}}.self_attn.<...>.proj_l.weight); expected "
                         f"{SUPPORTED_LAYOUT}")
    gaps = sorted(set(range(max(split.projections) + 1)) - set(split.projections))
    if gaps:  # (before: converted, then refused at load as a dense_layers mismatch)
        raise ValueError(f"{where} has no SLA projection (proj_l) for layer(s) {gaps[:8]}"
                         f"{' ...' if len(gaps) > 8 else ''} but has them up to layer {max(split.projections)}: the "
                         "reference trains one for every self-attention layer, so the checkpoint is incomplete. "
                         "Convert the whole checkpoint (download it again, or save every layer's proj_l)")
    out, dims = {}, set()
    for layer, parts in sorted(split.projections.items()):
        weight, bias = parts.get("weight"), parts.get("bias")
        if weight is None or bias is None or weight.dim() != 2 or weight.shape[0] != weight.shape[1] or \
                tuple(bias.shape) != (weight.shape[0],) or weight.shape[0] == 0:
            raise ValueError(f"{where}: layer {layer}'s proj_l must be a Linear(D, D) weight [D, D] and bias [D] with "
                             f"D > 0; got {({k: tuple(v.shape) for k, v in parts.items()})}")
        dims.add(weight.shape[0])
        # copies: one tensor tied to two layers (or saved twice by torch.save) is two tensors to safetensors, which
        # refused them as shared memory with a raw traceback
        out[f"{prefix}blocks.{layer}.attn1.weight"] = weight.float().clone(memory_format=torch.contiguous_format)
        out[f"{prefix}blocks.{layer}.attn1.bias"] = bias.float().clone(memory_format=torch.contiguous_format)
    if len(dims) > 1:
        raise ValueError(f"{where}: the projections have different head dims {sorted(dims)}")
    return out


def _fold_alphas(lora: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Diffusers-named LoRA with ``<module>.alpha``: the scale ``alpha / rank`` folded into ``lora_A``, as Diffusers
    does for the original names. Diffusers keeps these alphas as they are, and a folder holding one failed to load
    ("a module this model lacks")."""
    out = {k: v for k, v in lora.items() if not k.endswith(".alpha")}
    for key in sorted(set(lora) - set(out)):
        module = key[:-len(".alpha")]
        down = out.get(f"{module}.lora_A.weight")
        if down is None or lora[key].numel() != 1:
            raise ValueError(f"{key} is no LoRA scale of a module with lora_A/lora_B weights (a one-element alpha "
                             f"beside {module}.lora_A.weight); found e.g. {sorted(lora)[:4]}")
        out[f"{module}.lora_A.weight"] = down.float() * (float(lora[key]) / down.shape[0])
    return out


def _renamed(lora: Dict[str, torch.Tensor], rename) -> Dict[str, torch.Tensor]:
    """``lora`` under the keys ``rename(key)`` gives; ValueError when two keys become one."""
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in lora.items():
        new = rename(key)
        if new in out:
            first = next(k for k in lora if rename(k) == new)
            raise ValueError(f"the checkpoint holds {first} and {key}, one LoRA tensor twice ({new}): convert cannot "
                             "tell which one is meant. Save the checkpoint with one of them, then convert it")
        out[new] = tensor
    return out


def _without_adapter_names(lora: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``lora`` with peft's adapter name taken out of its keys (``<module>.lora_A.default.weight``, as a peft model's
    ``state_dict()`` names them) as ``get_peft_model_state_dict`` does. Before, the folder kept the name, and the
    LoRA loaded as no LoRA at all (peft skipped the keys with a log line)."""
    names = sorted({m.group(2) for m in map(_ADAPTER_NAMED.search, lora) if m})
    if len(names) > 1:
        raise ValueError(f"the checkpoint holds the LoRA of {len(names)} peft adapters ({', '.join(names[:4])}): "
                         "convert takes one. Save the state dict of the adapter to convert alone "
                         "(peft.get_peft_model_state_dict(model, adapter_name=NAME)), then convert that file")
    return _renamed(lora, lambda k: _ADAPTER_NAMED.sub(r".\1.\3", k)) if names else lora


def _lora_layers(lora: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """LoRA tensors in Diffusers' Wan naming without the ``transformer.`` prefix (Diffusers converts them)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    lora = _without_adapter_names(lora)
    # (before: only attn1/to_q told Diffusers' names apart, so an ffn-only LoRA went to the wrong conversion)
    diffusers_names = any(_DIFFUSERS_NAMES.search(k) for k in lora)
    prefix = "transformer." if diffusers_names else "diffusion_model."
    if diffusers_names:
        # lora_down/lora_up are lora_A/lora_B (kohya's names): Diffusers keeps them as they are in Diffusers' module
        # names, and the folder failed to load ("peft could not load this LoRA ... IndexError")
        lora = _fold_alphas(_renamed(lora, lambda k: k.replace(".lora_down.", ".lora_A.").replace(".lora_up.",
                                                                                                 ".lora_B.")))
    try:
        converted = WanLoraLoaderMixin.lora_state_dict({prefix + k: v for k, v in lora.items()})
    except Exception as err:  # Diffusers raises several types for layouts it does not know
        raise ValueError(f"Diffusers cannot convert the checkpoint's LoRA tensors ({type(err).__name__}: {err}); "
                         f"found e.g. {sorted(lora)[:4]}") from None
    return {k[len("transformer."):] if k.startswith("transformer.") else k:
            v.float().clone(memory_format=torch.contiguous_format) for k, v in converted.items()}


def _method_json(method: SLA, lora: Dict[str, torch.Tensor], sources: List[str], layers: int, skipped: int) -> dict:
    ranks = sorted({int(v.shape[0]) for k, v in lora.items() if k.endswith("lora_A.weight")})
    modules = sorted({k.split(".lora_")[0].split(".", 2)[-1] for k in lora})
    return {
        "format": 1,
        "method": json.loads(json.dumps(method.to_dict())),
        "lora": {"rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": None, "target_modules": modules}
        if lora else None,
        "files": {"lora": LORA_FILE if lora else None, "sla_projections": SLA_FILE},
        "dense_layers": None,  # the reference replaces every self-attention layer
        "converted_from": {"checkpoints": sources, "layout": SUPPORTED_LAYOUT, "sla_layers": layers,
                           "model_tensors_not_converted": skipped},
    }


# How a message names convert_checkpoint's arguments: (as Python keywords, as dit-accel convert's command line)
_NAMES = {"checkpoint": ("checkpoint", "checkpoint"), "output": ("output", "--out"),
          "transformer_2": ("transformer_2", "--transformer-2"),
          "overwrite": ("overwrite=True (--overwrite)", "--overwrite"),
          "skip": ("base_weights='skip' (--skip-base-weights)", "--skip-base-weights"),
          "no transformer_2": ("None", "leave out --transformer-2")}


def _named(name: str, flags: bool, value=None, keyword: bool = True) -> str:
    """``name`` (with ``value``) as the caller wrote it: ``output='w'`` in Python (``keyword``, else
    ``output 'w'``), ``--out 'w'`` on the command line (before, the command's messages named the Python arguments,
    ``transformer_2=``, that no flag spells)."""
    text = _NAMES[name][flags]
    if value is None:
        return text
    return f"{text}{'=' if keyword and not flags else ' '}{os.fspath(value)!r}"


def _check_output(out: Path, overwrite: bool, flags: bool = False) -> Path:
    """``out`` unless it is a file, or a folder with files that ``overwrite`` does not allow replacing (a weights
    folder only: before, overwrite wrote into any folder, deleting a LoRA file of its own)."""
    in_the_way = file_in_the_way(out)  # (overwrite replaces a folder's files, never a file)
    output = _named("output", flags, out)
    if in_the_way is not None:
        where = "is a file" if in_the_way == out else f"lies under {str(in_the_way)!r}, which is a file"
        raise ValueError(f"{output} {where}; give a folder path (a new or empty folder)")
    held = sorted(p.name for p in out.iterdir() if not is_temp_name(p)) if out.is_dir() else []
    if held and not overwrite:
        raise ValueError(f"{output} is a folder with files in it; pass {_named('overwrite', flags)} to "
                         "replace them, or give a new folder")
    if held and METHOD_FILE not in held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ValueError(f"{output} holds {len(held)} file(s) that are no weights folder ({shown}; no "
                         f"{METHOD_FILE}): overwrite replaces a weights folder only, and nothing there is deleted. "
                         "Give a new or empty folder")
    if RUN_FILE in held:  # (before: its weights were replaced and its LoRA deleted, while its run record, log
        # and checkpoints stayed, describing a training the folder no longer held; finetune --resume then put the
        # run's weights back over the converted ones, silently)
        raise ValueError(f"{output} holds a fine-tuning run ({RUN_FILE}): overwrite replaces a weights "
                         "folder only, not a run's weights beside its record and checkpoints, and nothing there is "
                         "deleted. Give a new or empty folder")
    return out


def _checked_paths(checkpoint, output, transformer_2, flags: bool) -> tuple:
    """:func:`convert_checkpoint`'s paths as Paths (``~`` expanded); ValueError naming the argument (``flags``: the
    command's flag) when one is no path, an input is no file, or ``transformer_2`` is the checkpoint itself."""
    for name, value in (("checkpoint", checkpoint), ("output", output), ("transformer_2", transformer_2)):
        if not (value is None and name == "transformer_2") and (not isinstance(value, (str, os.PathLike))
                                                                or not os.fspath(value)):
            raise ValueError(f"{_named(name, flags)}{' ' if flags else '='}{value!r} is invalid: expected a path "
                             "(str or pathlib.Path)"
                             + (f", or {_named('no transformer_2', flags)}" if name == "transformer_2" else ""))
    # (before: "~/out" was written to a folder named "~" in the working one, past the check of the home's folder
    # for files that overwrite would replace, and "~/ckpt.pth" was "not a file")
    checkpoint, output = Path(checkpoint).expanduser(), Path(output).expanduser()
    transformer_2 = Path(transformer_2).expanduser() if transformer_2 is not None else None
    # (before: a missing transformer_2 was called "checkpoint", after the first one had been read)
    for name, value in (("checkpoint", checkpoint), ("transformer_2", transformer_2)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{_named(name, flags, value)} is not a file: give the "
                             + ("checkpoint to convert" if name == "checkpoint" else "low-noise expert's checkpoint")
                             + " (.pth, .pt or .safetensors)")
    if transformer_2 is not None and Path(transformer_2).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"{_named('transformer_2', flags, transformer_2)} is the checkpoint itself: give the "
                         f"low-noise expert's own checkpoint (Wan 2.2 A14B), or {_named('no transformer_2', flags)}")
    return checkpoint, output, transformer_2


def convert_checkpoint(checkpoint, output, *, method: Optional[SLA] = None, transformer_2=None,
                       base_weights: str = "refuse", overwrite: bool = False, flags: bool = False) -> Path:
    """Write a weights folder (LoRA + SLA projections + method) from an SLA reference checkpoint of Wan.

    Args:
        checkpoint: ``.pth``/``.pt``/``.safetensors`` in the reference layout (module docstring);
            for Wan 2.2 A14B the high-noise expert (Diffusers' ``transformer``).
        output: the folder to write (``apply(..., weights=output)``, ``generate --weights output``).
        method: the :class:`dit_accel.SLA` the weights were trained with; default
            ``SLA.reference(topk=0.1)`` (TurboDiffusion's default top-k). A config with
            ``linear_tokens="marginal"`` warns: the reference trains with all tokens.
        transformer_2: Wan 2.2 A14B's low-noise expert checkpoint (Diffusers' ``transformer_2``).
        base_weights: what to do with the model's own tensors when the checkpoint carries them:
            ``"refuse"`` (default, ValueError) or ``"skip"`` (the Diffusers model you load has them).
        overwrite: replace the files of an existing folder.
        flags: the messages name ``dit-accel convert``'s command line (``--out``, ``--transformer-2``) instead of
            these arguments (the command's own call).

    Returns the folder. Raises ValueError for unknown keys (listing them), quantized checkpoints,
    missing projections, or a non-empty ``output`` without ``overwrite``.

    Example::

        convert_checkpoint("TurboWan2.1-T2V-1.3B-480P.pth", "turbo/", method=SLA.reference(topk=0.1, block_q=128),
                           base_weights="skip")
        handle = dit_accel.apply(pipe, load_method("turbo/"), weights="turbo/")
    """
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from safetensors.torch import save_file

    method = SLA.reference(topk=0.1) if method is None else method
    if not isinstance(method, SLA):
        raise TypeError(f"method must be a dit_accel.SLA config (e.g. SLA.reference(topk=0.1)); got {method!r}")
    if base_weights not in ("refuse", "skip"):
        raise ValueError(f"base_weights={base_weights!r} is invalid: 'refuse' or 'skip'")
    checkpoint, output, transformer_2 = _checked_paths(checkpoint, output, transformer_2, flags)
    if method.linear_tokens != "all":
        warnings.warn(f"dit_accel: {method!r} runs the linear branch on the marginal blocks, but checkpoints of the reference "
                      "code (TurboDiffusion, thu-ml/SLA) were trained with it on all tokens: the projections will "
                      "see another linear branch than they learned. Use SLA.reference(...)", DitAccelWarning, stacklevel=2)
    out = _check_output(Path(output), overwrite, flags)
    sources = [("", checkpoint)] + ([("transformer_2.", transformer_2)] if transformer_2 is not None else [])
    projections, lora, skipped = {}, {}, 0
    for prefix, path in sources:
        state = read_checkpoint(path)
        split = split_checkpoint(state)
        _check_trained_tensors(path, state)
        if split.base and base_weights == "refuse":
            raise ValueError(
                f"{str(path)!r} carries the model's own weights too ({len(split.base)} tensors, e.g. "
                f"{split.base[:3]}): a weights folder holds LoRA and SLA projections only. If the Diffusers model you "
                f"load has these weights (projection-only fine-tuning), pass {_named('skip', flags)}; "
                "for a fully fine-tuned or distilled checkpoint (TurboDiffusion) load its weights into Diffusers "
                "first (WanTransformer3DModel.from_single_file) and then skip them here")
        skipped += len(split.base)
        projections.update(_projection_tensors(split, prefix, str(path)))
        if split.lora and prefix:
            raise ValueError(f"{str(path)!r} ({_named('transformer_2', flags)}) carries LoRA tensors; "
                             "only the first checkpoint's LoRA is converted")
        if split.lora:
            lora = _lora_layers(split.lora)
            # (Diffusers converts a lone lora_A; the folder then loaded with that module's lora_B zero, without a word)
            check_lora_pairs(path, lora_ranks(lora), redo="convert a complete checkpoint, or download it again")
    sizes = {p: {t.shape[0] for k, t in projections.items() if k.startswith("transformer_2.") == bool(p)}
             for p, _ in sources}
    if len(set().union(*sizes.values())) > 1:  # (one folder's layers of two models: refused at load, or never)
        raise ValueError(f"the projections of checkpoint {str(checkpoint)!r} (head dim {sorted(sizes[''])}) and of "
                         f"{_named('transformer_2', flags, transformer_2, keyword=False)} "
                         f"({sorted(sizes['transformer_2.'])}) differ in size: "
                         "give the two experts of one model (Wan 2.2 A14B's high- and low-noise checkpoints)")
    layers = {p: sum(k.startswith("transformer_2.") == bool(p) for k in projections) // 2 for p, _ in sources}
    if len(set(layers.values())) > 1:  # (Wan 2.1 1.3B and 14B share head dim 128: refused at load as dense_layers)
        raise ValueError(f"checkpoint {str(checkpoint)!r} has SLA projections for {layers['']} layers and "
                         f"{_named('transformer_2', flags, transformer_2, keyword=False)} for "
                         f"{layers['transformer_2.']}: give the two experts of one model "
                         "(Wan 2.2 A14B's high- and low-noise checkpoints, 40 layers each)")
    info = _method_json(method, lora, [str(p) for _, p in sources], len(projections) // 2, skipped)

    def write_tensors(staging: Path) -> None:
        save_file(projections, str(staging / SLA_FILE))
        if lora:
            WanLoraLoaderMixin.save_lora_weights(staging, transformer_lora_layers=lora, weight_name=LORA_FILE)

    write_weights_folder(out, write_tensors, info)  # all or nothing: the method file with the hashes comes last
    return out
