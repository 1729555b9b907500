"""``dit-accel finetune`` outputs on a ComfyUI model: the LoRA as ComfyUI weight patches, the SLA projections
for the override.

ComfyUI's own LoRA loader does not know the Diffusers names of Wan's modules (``blocks.N.attn1.to_q``; ComfyUI's
``WanModel`` calls it ``blocks.N.self_attn.q``), so the folder's LoRA is given to ComfyUI's LoRA machinery
(``comfy.lora.load_lora``, ``ModelPatcher.add_patches``) with the Wan names added to ComfyUI's key map. The SLA
projections (``sla_projections.safetensors``, ``"blocks.N.attn1.weight"``) become the layers' ``proj`` in
``Plan.run``, as ``dit_accel.apply(..., weights=DIR)`` uses them.

Families whose ComfyUI modules are the Diffusers transformer's one to one (:data:`BLOCKS`): Wan (and Fun Camera),
Wan HuMo and Wan Animate (their ``blocks.N`` are Wan's ``WanTransformerBlock``), Wan VACE (``blocks.N`` and the
control blocks ``vace_blocks.N``, whose ``proj_in`` / ``proj_out`` ComfyUI calls ``before_proj`` / ``after_proj``).
Modules off these blocks (Animate's face adapter, HuMo's audio layers, the embeddings) are not mapped: a LoRA on
them is refused naming the first.

The other families with a Diffusers transformer (:data:`MAPPED`: FLUX, HunyuanVideo, HunyuanImage 2.1, Chroma,
Qwen-Image, HiDream, LTX-Video, Cosmos Predict2, Cosmos 1, Lumina 2, Mochi, SD3 / SD3.5, AuraFlow) take their map
from :mod:`~dit_accel.comfyui.weight_maps`: ``{Diffusers module: ComfyUI weight}``, a weight being a key, the rows of a
fused weight (FLUX-style ``img_attn.qkv`` / ``linear1``, Lumina 2's ``attention.qkv``, Mochi's ``qkv_x``, SD3's
``x_block.attn.qkv``) or a weight whose halves ComfyUI orders the other way (Mochi's ``final_layer.mod``, SD3's and
AuraFlow's final modulation). ComfyUI's own maps are used where it has them: ``comfy.utils.flux_to_diffusers`` (FLUX,
Chroma, the blocks of HunyuanVideo and HunyuanImage 2.1), ``mmdit_to_diffusers`` (SD3), ``auraflow_to_diffusers``
(AuraFlow) and the ``transformer.<module>`` keys ``comfy.lora.model_lora_keys_unet`` gives Qwen-Image and HiDream,
whose ComfyUI modules carry the Diffusers names one to one. A LoRA on a module the map does not have, or refuses
(Mochi's feed-forward input projections: ComfyUI gates the other half of their output), is a one-line error naming the
first such key and the family; families without a Diffusers transformer (:data:`UNMAPPED`) and the rest say that their weights are not
supported. SLA projections: each family's layers by their Diffusers names
(:func:`~dit_accel.comfyui.weight_maps.diffusers_layer_name`): FLUX-style ``double_blocks.N`` is
``transformer_blocks.N.attn`` and ``single_blocks.N`` ``single_transformer_blocks.N.attn``, Cosmos Predict2's
``blocks.N.self_attn``, Cosmos 1's full-attention building block of ``blocks.blockN`` and Mochi's ``blocks.N.attn``
are ``transformer_blocks.N.attn1``, Lumina 2's ``<noise_refiner|layers>.N.attention`` is ``<...>.N.attn``, SD3's
``joint_blocks.N.x_block.attn`` / ``.attn2`` ``transformer_blocks.N.attn`` / ``.attn2``, AuraFlow's
``double_layers.N.attn`` / ``single_layers.N.attn`` ``joint_transformer_blocks.N.attn`` /
``single_transformer_blocks.N.attn``; Qwen-Image, HiDream and LTX-Video keep their names.

Wan 2.2 A14B's two experts are two ComfyUI MODELs (two loaders, two samplers). A folder of both (``dit-accel
convert --transformer-2``) keys the second expert's tensors (Diffusers' ``transformer_2``, the low-noise expert)
``transformer_2.blocks.N...``: ``expert="transformer_2"`` loads those, and only those, into the low-noise expert's
MODEL; ``expert="transformer"`` (the default) loads the rest into the high-noise expert's.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..atomic_files import BadFileError, check_hashes, load_safetensors, safetensors_keys, safetensors_metadata
from ..checkpoints.finetuned import METHOD_FILE, SLA_FILE, VSA_FILE, read_weights_info
from ..checkpoints.lora_checks import (check_float_weights, check_lora_covers, check_lora_pairs, check_lora_scales,
                                       kohya_alpha, kohya_alpha_problem, lacking_lora)
from .weight_maps import MAPS, describe, diffusers_layer_name, refused_module, targets

__all__ = ["BLOCKS", "EXPERTS", "MAPPED", "UNMAPPED", "check_expert", "check_folder", "experts_in", "layer_names",
           "lora_patches", "sla_projections"]

#: The transformers of a weights folder, as the Diffusers pipeline names them (Wan 2.2 A14B: high-, low-noise expert)
EXPERTS = ("transformer", "transformer_2")
_SECOND = "transformer_2."  # the key prefix of the second expert's tensors (the first's have none, or "transformer.")

# Diffusers WanTransformer3DModel module -> ComfyUI WanModel module, inside blocks.N
_WAN_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_WAN_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_WAN_FFN = {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
# Diffusers WanVACETransformerBlock module -> ComfyUI VaceWanAttentionBlock module, inside vace_blocks.N
_VACE_PROJECTIONS = {"proj_in": "before_proj", "proj_out": "after_proj"}
_REDO = "train or convert it again"  # (what the Diffusers path says of such a file)
# Options of a Diffusers transformer that its tiny config (dit_accel.models.tiny) leaves off but a published model
# sets: built too, so that their modules are known as the family's (HunyuanImage 2.1's ByT5 embedder)
_PUBLISHED_OPTIONS: Dict[str, dict] = {"HunyuanImageTransformer2DModel": {"text_embed_2_dim": 8}}


def _indexless(name: str) -> str:
    """A module name with its block indices as ``N`` (``blocks.N.attn1``): one name for every size of a model."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


@functools.lru_cache(maxsize=None)
def _diffusers_modules(class_name: str) -> Tuple[frozenset, frozenset]:
    """``(module names without indices, top-level module names)`` of the Diffusers transformer ``class_name``, as
    its tiny config builds it (on the meta device: no weights); two empty sets where it has none."""
    import diffusers

    from ..models.tiny import TRANSFORMERS

    config = next((t.config for t in TRANSFORMERS.values() if t.class_name == class_name), None)
    if config is None or not hasattr(diffusers, class_name):
        return frozenset(), frozenset()
    try:
        with torch.device("meta"):
            model = getattr(diffusers, class_name)(**{**config, **_PUBLISHED_OPTIONS.get(class_name, {})})
    except Exception:  # noqa: BLE001 - a Diffusers release that builds it otherwise: the message says another model
        return frozenset(), frozenset()
    return frozenset(_indexless(n) for n, _ in model.named_modules() if n), frozenset(n for n, _ in
                                                                                       model.named_children())


def _unpatched(module: str, family, mapped) -> bool:
    """Whether the Diffusers ``module`` (which the node does not map) is a module of ``family``'s Diffusers
    transformer that the node does not patch (an embedder, ``proj_out``), not another model's: it is one of that
    transformer's modules (block indices aside) and not one the map has at another index (a block past this
    model's), or it lies under a top-level module none of whose modules the node maps."""
    names, tops = _diffusers_modules(family.diffusers_class)
    plain = _indexless(module)
    has = {_indexless(m) for m in mapped} if mapped is not None else {f"{b}.N" for b in BLOCKS[family.name]}
    if plain in has:
        return False
    top = module.partition(".")[0]
    covered = any(m == top or m.startswith(top + ".") for m in has)
    return plain in names or (top in tops and not covered)


#: family name -> the block lists whose modules carry the same index and structure on both hosts
BLOCKS: Dict[str, Tuple[str, ...]] = {"Wan": ("blocks",), "Wan HuMo": ("blocks",), "Wan Animate": ("blocks",),
                                      "Wan VACE": ("blocks", "vace_blocks")}
#: The families whose ComfyUI modules are renamed, fused or the same as the Diffusers transformer's (the maps of
#: :mod:`~dit_accel.comfyui.weight_maps`)
MAPPED: Tuple[str, ...] = tuple(MAPS)
#: family name -> why its weights cannot be loaded (no Diffusers transformer `dit-accel finetune` could train)
UNMAPPED: Dict[str, str] = {
    "Chroma Radiance": "it has no Diffusers transformer, so no `dit-accel finetune` folder is its",
    "OmniGen2": "it has no Diffusers transformer (dit_accel runs it with Lumina 2's settings), so no `dit-accel "
                "finetune` folder is its",
}


def _wan_module(name: str, blocks: Tuple[str, ...] = ("blocks",)):
    """ComfyUI's name of a Diffusers Wan module inside ``blocks`` (``blocks.N`` / ``vace_blocks.N``), or None."""
    m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", name)
    if m is None or m.group(1) not in blocks:
        return None
    block, rest = f"{m.group(1)}.{m.group(2)}", m.group(3)
    attention, _, projection = rest.partition(".")
    if attention in _WAN_ATTENTION and projection in _WAN_PROJECTIONS:
        return f"{block}.{_WAN_ATTENTION[attention]}.{_WAN_PROJECTIONS[projection]}"
    if rest in _WAN_FFN:
        return f"{block}.{_WAN_FFN[rest]}"
    if m.group(1) == "vace_blocks" and rest in _VACE_PROJECTIONS:
        return f"{block}.{_VACE_PROJECTIONS[rest]}"
    return None


def layer_names(model: nn.Module, layers) -> List[str]:
    """The Diffusers name of each self-attention layer, the keys of the SLA projections file
    (:func:`~dit_accel.comfyui.weight_maps.diffusers_layer_name` for the model's family): ComfyUI's
    ``<blocks>.N.self_attn`` is ``blocks.N.attn1`` (``vace_blocks.N.attn1``), its FLUX / HunyuanVideo
    ``double_blocks.N`` is ``transformer_blocks.N.attn``, Cosmos Predict2's ``blocks.N.self_attn``
    ``transformer_blocks.N.attn1``, and so on."""
    from .families import family_for

    family = family_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [diffusers_layer_name(None if family is None else family.name, names.get(id(layer), "?"))
            for layer in layers]


def check_expert(expert) -> str:
    """``expert`` if it names one of :data:`EXPERTS`, else a one-line ValueError."""
    if not isinstance(expert, str) or expert not in EXPERTS:
        raise ValueError(f"dit_accel: expert={expert!r} is invalid: transformer (the folder's first transformer; Wan "
                         "2.2 A14B's high-noise expert) or transformer_2 (its low-noise expert)")
    return expert


def _of_expert(key: str, expert: str):
    """``key`` without the second expert's prefix when it is ``expert``'s tensor, None when it is the other's."""
    second = key.startswith(_SECOND)
    if second != (expert == "transformer_2"):
        return None
    return key[len(_SECOND):] if second else key


def experts_in(folder, info: dict) -> Dict[str, int]:
    """``{expert: number of its tensors}`` in the folder's LoRA and SLA projections."""
    count = dict.fromkeys(EXPERTS, 0)
    for kind in ("lora", "sla_projections"):
        name = (info.get("files") or {}).get(kind)
        if name:
            for key in safetensors_keys(Path(folder) / name):
                count["transformer_2" if key.startswith(_SECOND) else "transformer"] += 1
    return count


def _check_expert_in(folder, count: Dict[str, int], expert: str) -> None:
    """A folder with tensors (``count``: :func:`experts_in`), none of them ``expert``'s: the widget names the other
    expert (a one-line error)."""
    if count[expert] or not any(count.values()):
        return
    if expert == "transformer_2":
        raise ValueError(f"dit_accel: {folder} has no transformer_2 part (no LoRA or SLA projections keyed "
                         "transformer_2.*: it is one transformer's weights, not Wan 2.2 A14B's two experts'): load it "
                         "with expert=transformer, or give a folder of both experts (dit-accel convert "
                         "--transformer-2)")
    raise ValueError(f"dit_accel: {folder} holds only transformer_2 weights (Wan 2.2 A14B's low-noise expert's): load "
                     "it into the low-noise expert's MODEL with expert=transformer_2")


def check_folder(folder, family, model_name: str = "WanModel", expert: str = "transformer"
                 ) -> Tuple[dict, Dict[str, int]]:
    """The folder's ``dit_accel_method.json`` (hashes of its files checked as ``apply`` checks them) and its
    tensors per expert (:func:`experts_in`), or a one-line ValueError for a family whose Diffusers names this
    module does not map, or a folder without ``expert``'s tensors."""
    check_expert(expert)
    if family.name in UNMAPPED:
        raise ValueError(f"dit_accel: loading `dit-accel finetune` weights into ComfyUI's {family.name} model is not "
                         f"supported: {UNMAPPED[family.name]}")
    if family.name not in BLOCKS and family.name not in MAPPED:
        raise ValueError(f"dit_accel: loading `dit-accel finetune` weights into ComfyUI's {family.name} model is not "
                         "supported yet (its Diffusers module names are not mapped to ComfyUI's); only "
                         f"{', '.join([*BLOCKS, *MAPPED])} are")
    info = read_weights_info(folder)
    gates = (info.get("files") or {}).get("vsa_gates")
    if gates:  # FastVideo's to_gate_compress modules: ComfyUI's Wan models have none; VSA without them is another model
        raise ValueError(f"dit_accel: {folder} holds trained VSA gates ({gates}), which ComfyUI's {model_name} has no "
                         f"modules for; this node cannot run them. Run this folder with dit_accel.apply on the "
                         f"Diffusers pipeline, or use a folder without {VSA_FILE}")
    names = [n for n in (info.get("files") or {}).values() if n]
    if isinstance(info.get("sha256"), dict):
        check_hashes(Path(folder), {n: info["sha256"][n] for n in names if n in info["sha256"]},
                     Path(folder) / METHOD_FILE)
    count = experts_in(folder, info)
    _check_expert_in(folder, count, expert)
    return info, count


def lora_patches(patcher, folder, info: dict, family, expert: str = "transformer") -> Dict[str, object]:
    """ComfyUI weight patches of the folder's LoRA of ``expert`` for ``patcher``'s model of ``family`` (``{}``
    when it has none); the other expert's tensors are left out. A LoRA on a Diffusers module that ComfyUI holds as
    a slice of a fused weight (FLUX's and HunyuanVideo's ``to_q`` in ``img_attn.qkv``) patches that slice. A LoRA
    on a module the family's map refuses (:data:`~dit_accel.comfyui.weight_maps.REFUSED_MODULES`) or does not have is
    a one-line ValueError naming the first such key and the family."""
    name = (info.get("files") or {}).get("lora")
    if not name:
        return {}
    try:
        import comfy.lora
    except ImportError:  # only reached from ComfyUI, which has it
        raise RuntimeError("dit_accel: loading a LoRA into a ComfyUI model needs ComfyUI (comfy.lora)") from None
    path = Path(folder) / name
    state = load_safetensors(path, expected="a Diffusers LoRA file (safetensors)")
    check_float_weights(path, state, redo=_REDO, any_dtype=(".alpha",))
    _check_no_kohya_alpha(path, state)
    model_name = type(patcher.model.diffusion_model).__name__
    weights = patcher.model.state_dict()
    meta = _adapter_metadata(path)
    recorded = _lora_alpha(folder, info)
    check_lora_scales(path, meta, redo=_REDO)  # (a NaN lora_alpha: every patched weight NaN)
    alpha = _metadata_alpha(meta)  # (dit_accel.apply's source, not the method file's lora.alpha)
    rslora = _check_lora_scaling(path, meta)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    mapped = targets(patcher, family, key_map) if family.name in MAPPED else None
    lora, unknown, ranks, unpatched = {}, [], {}, {}
    for key, tensor in state.items():
        own = _of_expert(key, expert)
        if own is None:  # the other expert's (its own MODEL loads it)
            continue
        module, sep, rest = own.removeprefix("transformer.").partition(".lora_")
        why = refused_module(family.name, module)
        if why is not None:
            raise ValueError(f"dit_accel: {path} has a LoRA on {module} ({key}), which ComfyUI's {family.name} "
                             f"({model_name}) cannot take exactly: {why}; train without it (--target-modules)")
        if sep and re.fullmatch(r"(down|up)\.weight|[AB]\.\w+\.weight", rest):  # (kohya's, a named peft adapter's)
            raise ValueError(f"dit_accel: {path} has {key}: LoRA names of kohya (lora_down/lora_up) or of a named peft "
                             "adapter, not the Diffusers lora_A/lora_B names dit-accel finetune writes and this node "
                             "maps: convert the LoRA with dit-accel convert, which renames them, and load its folder")
        if sep and rest not in ("A.weight", "B.weight"):  # ComfyUI's LoRA loader would drop it without a word
            raise ValueError(f"dit_accel: {path} has {key}, which ComfyUI's LoRA loader does not apply (it takes "
                             "lora_A and lora_B weights; no LoRA bias or DoRA magnitude): run that LoRA with "
                             "dit_accel.apply on the Diffusers model, or train without it")
        if sep and tensor.dim() == 2:
            ranks.setdefault(module, {})[rest[0]] = int(tensor.shape[0 if rest[0] == "A" else 1])
        target = _target(module, family, mapped)
        weight = _weight_key(target)
        if target is None and sep and _unpatched(module, family, mapped):
            unpatched.setdefault("key", (module, key))  # (said after the loop: another model's keys come first)
            continue
        if not sep or weight not in weights:
            unknown.append(key)
            continue
        _check_lora_shape(path, key, tensor, model_name, target, weights[weight].shape, family.name)
        prefix = f"transformer.{module}"
        key_map[prefix] = target
        lora[f"{prefix}.lora_{rest}"] = tensor
        if alpha is not None:  # peft scales by alpha / rank; ComfyUI reads alpha from "<prefix>.alpha"
            lora[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    if alpha is not None and rslora:  # (peft's rsLoRA scales by alpha / sqrt(rank); ComfyUI divides alpha by rank)
        for module, sides in ranks.items():
            rank = sides.get("A", sides.get("B"))
            if f"transformer.{module}.alpha" in lora and rank:
                lora[f"transformer.{module}.alpha"] = torch.tensor(float(alpha) * math.sqrt(rank))
    if unknown:
        raise ValueError(f"dit_accel: {path} has LoRA tensors for modules ComfyUI's {model_name} does not have "
                         f"({unknown[0]}, ... {len(unknown)} in all; dit_accel maps {_mapped(family)}): the weights "
                         f"are for another model than this {family.name}")
    if unpatched:
        module, key = unpatched["key"]
        raise ValueError(f"dit_accel: {path} has a LoRA on {module} ({key}), a module of Diffusers' "
                         f"{family.diffusers_class} that the node does not patch on ComfyUI's {model_name} (it maps "
                         f"{_mapped(family)}): train without it (--target-modules), or run the folder with "
                         "dit_accel.apply on the Diffusers pipeline")
    check_lora_pairs(path, ranks, redo=_REDO)  # (ComfyUI skips a lone lora_A, fails on a lone lora_B)
    _check_metadata_rank(path, meta, ranks)
    _warn_other_alpha(folder, path, recorded, alpha, ranks)
    if expert == "transformer":  # (the metadata Diffusers writes describes the "transformer" adapter)
        names = ([m for m, t in mapped.items() if _weight_key(t) in weights]  # (the map may name absent ones)
                 if mapped is not None else _wan_names(weights, BLOCKS[family.name]))
        own = {key: tensor for key, tensor in state.items() if _of_expert(key, expert) is not None}
        check_lora_covers(path, meta, lacking_lora(names, own, meta), f"ComfyUI's {model_name}")
    return comfy.lora.load_lora(lora, key_map, log_missing=False)


def _check_no_kohya_alpha(path: Path, state: Dict[str, torch.Tensor]) -> None:
    """A ``<module>.alpha`` beside the module's ``lora_A`` (kohya's format) is refused, as ``dit_accel.apply`` refuses
    it: Diffusers' loader does not apply it, and the node said "the weights are for another model"."""
    alpha = kohya_alpha(state)
    if alpha is not None:
        raise ValueError(f"dit_accel: {path} {kohya_alpha_problem(alpha, node=True)}")


#: The safetensors header entry where Diffusers' ``save_lora_weights`` keeps the adapter's peft config
_ADAPTER_METADATA = "lora_adapter_metadata"


def _adapter_metadata(path: Path) -> dict:
    """The LoRA file's adapter metadata (peft's LoraConfig fields) of the ``transformer`` adapter, without the
    ``transformer.`` prefix Diffusers writes; ``{}`` when the file has none (a converted folder). Metadata that is no
    JSON object, or a ``use_rslora`` that is no true/false, is a BadFileError: read as none, the LoRA ran at scale 1
    (or without rsLoRA) where it was trained at another, and Diffusers' loader fails on it."""
    try:
        data = json.loads(safetensors_metadata(path).get(_ADAPTER_METADATA) or "{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise BadFileError(path, f"its {_ADAPTER_METADATA} is not a JSON object", f"the adapter metadata "
                           f"(peft's LoraConfig) dit-accel finetune writes, or none; {_REDO}")
    meta = {key.removeprefix("transformer."): value for key, value in data.items() if key.startswith("transformer.")}
    if meta.get("use_rslora") is not None and not isinstance(meta["use_rslora"], bool):
        raise BadFileError(path, f"its adapter metadata gives use_rslora={meta['use_rslora']!r}",
                           f"true or false; {_REDO}")
    return meta


def _lora_alpha(folder, info: dict):
    """The folder's recorded LoRA alpha (``lora.alpha`` of its method file; None: none), or a one-line ValueError for
    one that is no finite number (a NaN made every patched weight, and the output, NaN)."""
    alpha = (info.get("lora") or {}).get("alpha") if isinstance(info.get("lora"), dict) else None
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or
                              not math.isfinite(alpha)):
        raise ValueError(f"dit_accel: {Path(folder) / METHOD_FILE}: lora.alpha={alpha!r} is invalid: a finite number "
                         f"(the LoRA's scale is alpha / rank) or null; {_REDO}")
    return alpha


#: peft's LoraConfig default lora_alpha: what Diffusers' loader runs a LoRA at whose adapter metadata leaves it out
_PEFT_ALPHA = 8


def _metadata_alpha(meta: dict):
    """The LoRA alpha ``dit_accel.apply`` runs the folder's LoRA at (Diffusers' loader, from the LoRA file's adapter
    metadata ``meta``): its ``lora_alpha`` (peft's default where the metadata leaves it out), or None without
    metadata, where Diffusers loads the LoRA at alpha = rank (scale 1), as ComfyUI runs one without an alpha. The
    method file's ``lora.alpha`` is not read by apply: the node read it, and ran a hand-made folder whose two
    disagree at another scale than apply."""
    if not meta:
        return None
    alpha = meta.get("lora_alpha")
    return _PEFT_ALPHA if alpha is None else alpha


def _check_metadata_rank(path: Path, meta: dict, ranks: Dict[str, Dict[str, int]]) -> None:
    """The LoRA's ranks against its adapter metadata's ``r``, as ``dit_accel.apply`` checks them: ComfyUI divides
    alpha by each tensor's own rank, so a file whose metadata says another ran at another scale than trained."""
    want = meta.get("r")
    if not isinstance(want, int) or isinstance(want, bool) or meta.get("rank_pattern"):
        return
    for module, sides in sorted(ranks.items()):
        if any(r != want for r in sides.values()):
            raise ValueError(f"dit_accel: {path}: the LoRA of {module} has rank {sides} (lora_A rows / lora_B "
                             f"columns), but its adapter metadata says r={want}, which dit_accel.apply refuses too: "
                             f"{_REDO}")


def _warn_other_alpha(folder, path: Path, recorded, alpha, ranks: Dict[str, Dict[str, int]]) -> None:
    """Said in ComfyUI's log: a method file whose ``lora.alpha`` (``recorded``) is not the alpha the LoRA runs at
    (``alpha``, its adapter metadata's; None: the rank, for a file without metadata)."""
    if recorded is None:
        return
    rank_set = {r for sides in ranks.values() for r in sides.values()}
    if alpha is not None and float(recorded) == float(alpha):
        return
    if alpha is None and rank_set == {recorded}:
        return
    runs = (f"its adapter metadata's lora_alpha={alpha!r}" if alpha is not None else
            "alpha = rank (scale 1): the file has no adapter metadata, and Diffusers' loader reads no other alpha")
    logging.getLogger("dit_accel.comfyui").warning(
        "dit_accel: %s records lora.alpha=%r, but the LoRA %s runs at %s, as dit_accel.apply runs it; the method "
        "file's value is not used. Write the LoRA's adapter metadata with the alpha it was trained at (dit-accel "
        "finetune does), or convert the LoRA with dit-accel convert", Path(folder) / METHOD_FILE, recorded, path, runs)


def _check_lora_scaling(path: Path, meta: dict) -> bool:
    """Whether the LoRA's adapter metadata (peft's LoraConfig) scales it as rsLoRA (``alpha / sqrt(rank)``, which
    ``dit_accel.apply`` loads as trained); a per-module ``alpha_pattern``, which ComfyUI's loader cannot be given as
    Diffusers reads it, is a one-line ValueError (the LoRA would run at another scale on some modules)."""
    pattern = meta.get("alpha_pattern")
    if isinstance(pattern, dict) and pattern:
        first = next(iter(pattern))
        raise ValueError(f"dit_accel: {path}'s adapter metadata sets alpha_pattern (per-module LoRA alphas: {first!r} "
                         f"and {len(pattern) - 1} more), which the node cannot apply as Diffusers does: the LoRA would "
                         "run at another scale on those modules. Run the folder with dit_accel.apply on the Diffusers "
                         "pipeline, or train with one lora_alpha")
    return meta.get("use_rslora") is True


def _wan_names(weights, blocks: Tuple[str, ...]) -> List[str]:
    """The Diffusers names of the modules of ``blocks`` (:func:`_wan_module`) that ComfyUI's model (its state
    dict's keys ``weights``) has: the modules a LoRA of this model can patch."""
    found = {m.groups() for m in (re.match(r"diffusion_model\.(\w+)\.(\d+)\.", key) for key in weights)
             if m is not None and m.group(1) in blocks}
    rests = [f"{a}.{p}" for a in _WAN_ATTENTION for p in _WAN_PROJECTIONS] + [*_WAN_FFN, *_VACE_PROJECTIONS]
    names = (f"{block}.{index}.{rest}" for block, index in found for rest in rests)
    return [name for name in names if (target := _wan_module(name, blocks)) is not None
            and f"diffusion_model.{target}.weight" in weights]


def _target(module: str, family, mapped):
    """The ComfyUI weight key (or fused slice, :mod:`~dit_accel.comfyui.weight_maps`) a Diffusers ``module``'s LoRA
    patches, or None."""
    if mapped is not None:
        return mapped.get(module)
    target = _wan_module(module, BLOCKS[family.name])
    return None if target is None else f"diffusion_model.{target}.weight"


def _weight_key(target):
    """The ComfyUI weight key of a :func:`_target` (a key, or a fused slice whose first item is the key), or None."""
    return target if isinstance(target, str) or target is None else target[0]


def _mapped(family) -> str:
    """What the LoRA of ``family`` may be on, for messages."""
    if family.name in BLOCKS:
        return f"the attention and feed-forward modules of {' and '.join(b + '.N' for b in BLOCKS[family.name])}"
    return describe(family.name)


def _check_lora_shape(path, key: str, tensor, model_name: str, target, weight_shape, family_name: str) -> None:
    """lora_A is (r, in) and lora_B (out, r) of the weight, or the slice of a fused weight, it patches: ComfyUI
    would log a mismatch and run without the patch."""
    side = key.partition(".lora_")[2]
    if side not in ("A.weight", "B.weight") or len(weight_shape) != 2:
        return
    shape = [int(n) for n in weight_shape]
    where = target if isinstance(target, str) else target[0]
    where = where.removeprefix("diffusion_model.").removesuffix(".weight")
    offset = None if isinstance(target, str) else target[1]
    if offset is not None:  # (dim, start, size): rows start:start + size of the fused weight
        dim, start, size = (int(n) for n in offset)
        if start + size > shape[dim]:
            raise ValueError(f"dit_accel: {path}: {key} patches {'rows' if dim == 0 else 'columns'} "
                             f"{start}:{start + size} of ComfyUI's {model_name} {where}, which is "
                             f"{shape[0]}x{shape[1]}: the weights are for another model (another size of "
                             f"{family_name})")
        where = f"{where} {'rows' if dim == 0 else 'columns'} {start}:{start + size}"
        shape[dim] = size
    out_f, in_f = shape
    got = tuple(tensor.shape)
    if len(got) != 2 or (got[1] != in_f if side == "A.weight" else got[0] != out_f):
        raise ValueError(f"dit_accel: {path}: {key} has shape {got}, but ComfyUI's {model_name} {where} is "
                         f"{out_f}x{in_f} (lora_A takes (r, {in_f}), lora_B ({out_f}, r)): the weights are for "
                         f"another model (another size of {family_name})")


def _head_dim(layer: nn.Module):
    """The head size of a ComfyUI attention layer: its ``head_dim`` / ``dim_head`` (Wan, Cosmos, Lumina 2, Mochi,
    Qwen-Image, LTX-Video); a FLUX-style block's or HiDream's width (``hidden_size`` / ``hidden_dim`` /
    ``inner_dim``) over its heads (``num_heads`` / ``heads``); None where it has neither."""
    for name in ("head_dim", "dim_head"):
        d = getattr(layer, name, None)
        if isinstance(d, int):
            return d
    hidden = next((getattr(layer, n) for n in ("hidden_size", "hidden_dim", "inner_dim")
                   if isinstance(getattr(layer, n, None), int)), None)
    heads = next((getattr(layer, n) for n in ("num_heads", "heads") if isinstance(getattr(layer, n, None), int)), None)
    return hidden // heads if hidden is not None and heads else None


def sla_projections(folder, info: dict, model: nn.Module, layers, device=None, dtype=None,
                    expert: str = "transformer") -> Dict[int, nn.Linear]:
    """``{layer index: Linear(D, D)}`` from the folder's SLA projections of ``expert`` (``{}`` when it has none):
    the key ``<Diffusers layer name>.weight`` / ``.bias`` (``transformer_2.`` in front for the second expert) goes
    to the layer of that name (:func:`layer_names`); the other expert's keys are left out."""
    name = (info.get("files") or {}).get("sla_projections")
    if not name:
        return {}
    path = Path(folder) / name
    state = load_safetensors(path, expected=f"the SLA projections `dit-accel finetune` writes ({SLA_FILE})")
    check_float_weights(path, state, redo=_REDO)
    names = layer_names(model, layers)
    index = {n: i for i, n in enumerate(names)}
    model_name = type(model).__name__
    out: Dict[int, nn.Linear] = {}
    kinds: Dict[int, set] = {}
    for key, tensor in state.items():
        own = _of_expert(key, expert)
        if own is None:  # the other expert's (its own MODEL loads it)
            continue
        module, _, kind = own.rpartition(".")
        layer = index.get(module) if kind in ("weight", "bias") else None
        if layer is None:
            raise ValueError(f"dit_accel: {path} has {key!r}, which is no self-attention layer of this {model_name} "
                             f"({len(layers)} layers: {', '.join(list(index)[:3])}, ...): the weights are for another "
                             "model")
        d = _head_dim(layers[layer])
        want = None if d is None else ((d, d) if kind == "weight" else (d,))
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"dit_accel: {path}: {key} has shape {tuple(tensor.shape)}, but layer {layer} of this "
                             f"{model_name} takes {want} (its head dim is {d}): the weights are for another model")
        if layer not in out:
            d = tensor.shape[-1]
            out[layer] = nn.Linear(d, d, device=device, dtype=torch.float32)
        with torch.no_grad():
            getattr(out[layer], kind).copy_(tensor.float())
        kinds.setdefault(layer, set()).add(kind)
    half = next((i for i, k in kinds.items() if len(k) < 2), None)
    if half is not None:  # (nn.Linear's other half would be its random initialisation)
        have = next(iter(kinds[half]))
        lost = "bias" if have == "weight" else "weight"
        raise ValueError(f"dit_accel: {path} has the {have} of layer {half}'s SLA projection "
                         f"({names[half]}.{have}) but not its {lost}: each projection is a Linear(D, D) weight "
                         f"and bias, as dit-accel finetune writes them; {_REDO}")
    for proj in out.values():
        proj.requires_grad_(False)
        if dtype is not None:
            proj.to(dtype=dtype)
    return out
