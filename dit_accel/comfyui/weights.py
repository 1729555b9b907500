"""``dit-accel finetune`` outputs on a ComfyUI model: the LoRA as ComfyUI weight patches, the SLA projections
for the override.

ComfyUI's own LoRA loader does not know the Diffusers names of Wan's modules (``blocks.N.attn1.to_q``; ComfyUI's
``WanModel`` calls it ``blocks.N.self_attn.q``), so the folder's LoRA is given to ComfyUI's LoRA machinery
(``comfy.lora.load_lora``, ``ModelPatcher.add_patches``) with the Wan names added to ComfyUI's key map. The SLA
projections (``sla_projections.safetensors``, ``"blocks.N.attn1.weight"``) become the layers' ``proj`` in
``Plan.run``, as ``dit_accel.apply(..., weights=DIR)`` uses them. Wan only: for the other families the node says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ..atomic_files import check_hashes, load_safetensors
from ..checkpoints.finetuned import METHOD_FILE, SLA_FILE, VSA_FILE, read_weights_info
from ..checkpoints.lora_checks import check_float_weights

__all__ = ["check_folder", "lora_patches", "sla_projections"]

# Diffusers WanTransformer3DModel module -> ComfyUI WanModel module, inside blocks.N
_WAN_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_WAN_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_WAN_FFN = {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_REDO = "train or convert it again"  # (what the Diffusers path says of such a file)


def _wan_module(name: str):
    """ComfyUI's name of a Diffusers Wan module inside the blocks, or None."""
    m = re.fullmatch(r"blocks\.(\d+)\.(attn1|attn2)\.(.+)", name)
    if m and m.group(3) in _WAN_PROJECTIONS:
        return f"blocks.{m.group(1)}.{_WAN_ATTENTION[m.group(2)]}.{_WAN_PROJECTIONS[m.group(3)]}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _WAN_FFN:
        return f"blocks.{m.group(1)}.{_WAN_FFN[m.group(2)]}"
    return None


def check_folder(folder, family) -> dict:
    """The folder's ``dit_accel_method.json`` (hashes of its files checked as ``apply`` checks them), or a
    one-line ValueError for a family whose Diffusers names this module does not map."""
    if family.name != "Wan":
        raise ValueError(f"dit_accel: loading `dit-accel finetune` weights into ComfyUI's {family.name} model is not "
                         "supported yet (its Diffusers module names are not mapped to ComfyUI's); only Wan is")
    info = read_weights_info(folder)
    gates = (info.get("files") or {}).get("vsa_gates")
    if gates:  # FastVideo's to_gate_compress modules: ComfyUI's WanModel has none; VSA without them is another model
        raise ValueError(f"dit_accel: {folder} holds trained VSA gates ({gates}), which ComfyUI's WanModel has no "
                         f"modules for; this node cannot run them. Run this folder with dit_accel.apply on the "
                         f"Diffusers pipeline, or use a folder without {VSA_FILE}")
    names = [n for n in (info.get("files") or {}).values() if n]
    if isinstance(info.get("sha256"), dict):
        check_hashes(Path(folder), {n: info["sha256"][n] for n in names if n in info["sha256"]},
                     Path(folder) / METHOD_FILE)
    return info


def lora_patches(patcher, folder, info: dict) -> Dict[str, object]:
    """ComfyUI weight patches of the folder's LoRA for ``patcher``'s Wan model (``{}`` when it has none)."""
    name = (info.get("files") or {}).get("lora")
    if not name:
        return {}
    try:
        import comfy.lora
    except ImportError:  # only reached from ComfyUI, which has it
        raise RuntimeError("dit_accel: loading a LoRA into a ComfyUI model needs ComfyUI (comfy.lora)") from None
    path = Path(folder) / name
    state = load_safetensors(path, expected="a Diffusers LoRA file (safetensors)")
    check_float_weights(path, state, redo=_REDO)
    modules = dict(patcher.model.diffusion_model.named_modules())
    alpha = (info.get("lora") or {}).get("alpha")
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora, unknown = {}, []
    for key, tensor in state.items():
        module, sep, rest = key.removeprefix("transformer.").partition(".lora_")
        target = _wan_module(module)
        if not sep or target is None or f"diffusion_model.{target}.weight" not in key_map.values():
            unknown.append(key)
            continue
        _check_lora_shape(path, key, tensor, target, modules[target].weight.shape)
        prefix = f"transformer.{module}"
        key_map[prefix] = f"diffusion_model.{target}.weight"
        lora[f"{prefix}.lora_{rest}"] = tensor
        if alpha is not None:  # peft scales by alpha / rank; ComfyUI reads alpha from "<prefix>.alpha"
            lora[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    if unknown:
        raise ValueError(f"dit_accel: {path} has LoRA tensors for modules ComfyUI's WanModel does not have "
                         f"({unknown[0]}, ... {len(unknown)} in all): the weights are for another model")
    return comfy.lora.load_lora(lora, key_map, log_missing=False)


def _check_lora_shape(path, key: str, tensor, target: str, weight_shape) -> None:
    """lora_A is (r, in) and lora_B (out, r) of the weight it patches: ComfyUI would log a mismatch and run
    without the patch."""
    side = key.partition(".lora_")[2]
    if side not in ("A.weight", "B.weight") or len(weight_shape) != 2:
        return
    out_f, in_f = (int(n) for n in weight_shape)
    shape = tuple(tensor.shape)
    if len(shape) != 2 or (shape[1] != in_f if side == "A.weight" else shape[0] != out_f):
        raise ValueError(f"dit_accel: {path}: {key} has shape {shape}, but ComfyUI's WanModel {target} is "
                         f"{out_f}x{in_f} (lora_A takes (r, {in_f}), lora_B ({out_f}, r)): the weights are for "
                         "another model (another size of Wan)")


def sla_projections(folder, info: dict, layers, device=None, dtype=None) -> Dict[int, nn.Linear]:
    """``{layer index: Linear(D, D)}`` from the folder's SLA projections (``{}`` when it has none)."""
    name = (info.get("files") or {}).get("sla_projections")
    if not name:
        return {}
    path = Path(folder) / name
    state = load_safetensors(path, expected=f"the SLA projections `dit-accel finetune` writes ({SLA_FILE})")
    check_float_weights(path, state, redo=_REDO)
    out: Dict[int, nn.Linear] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn1\.(weight|bias)", key)
        if m is None or int(m.group(1)) >= len(layers):
            raise ValueError(f"dit_accel: {path} has {key!r}, which is no self-attention layer of this WanModel "
                             f"({len(layers)} layers): the weights are for another model")
        layer = int(m.group(1))
        d = getattr(layers[layer], "head_dim", None)
        want = None if d is None else ((d, d) if m.group(2) == "weight" else (d,))
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"dit_accel: {path}: {key} has shape {tuple(tensor.shape)}, but layer {layer} of this "
                             f"WanModel takes {want} (its head dim is {d}): the weights are for another model")
        if layer not in out:
            d = tensor.shape[-1]
            out[layer] = nn.Linear(d, d, device=device, dtype=torch.float32)
        with torch.no_grad():
            getattr(out[layer], m.group(2)).copy_(tensor.float())
    for proj in out.values():
        proj.requires_grad_(False)
        if dtype is not None:
            proj.to(dtype=dtype)
    return out

