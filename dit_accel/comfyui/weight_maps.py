"""Per family, where ComfyUI holds each module of the Diffusers transformer ``dit-accel finetune`` trains: the map a
LoRA in Diffusers names is loaded through (:func:`targets`), and the Diffusers names of the self-attention layers the
SLA projections file keys (:func:`diffusers_layer_name`).

A target is ComfyUI's weight key ``"diffusion_model.<module>.weight"``, or, for a Diffusers module that ComfyUI holds
as rows of a fused weight, ``(key, (0, first row, rows))``, or ``(key, None, function)`` where the rows are reordered
(``function`` takes the Diffusers-ordered LoRA difference to ComfyUI's order), as ``ModelPatcher.add_patches`` takes
them. Each map rests on the conversion between the two names (ComfyUI loads the original checkpoints; Diffusers'
``scripts/convert_*_to_diffusers.py`` renames and splits them), and, where ComfyUI has one, on ComfyUI's own map of
Diffusers names (``comfy.utils.flux_to_diffusers``, ``mmdit_to_diffusers``, ``auraflow_to_diffusers``,
``comfy.lora.model_lora_keys_unet``):

- FLUX, Chroma: ``flux_to_diffusers`` (the fused ``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1`` slices), all of it;
  Chroma's distilled guidance layer besides (its ``layers.N.linear_1`` / ``linear_2`` are ComfyUI's ``in_layer`` /
  ``out_layer``).
- HunyuanVideo, HunyuanImage 2.1: the blocks of ``flux_to_diffusers`` and the text token refiner (``to_q`` /
  ``to_k`` / ``to_v`` thirds of ``self_attn.qkv``).
- Qwen-Image, HiDream: ComfyUI's modules are the Diffusers transformer's one to one; ComfyUI's own LoRA key map
  (``model_lora_keys_unet``: ``transformer.<module>``) is taken as it is.
- LTX-Video: one to one but for ``proj_in`` (ComfyUI's ``patchify_proj``) and ``time_embed`` (``adaln_single``).
- Cosmos (Predict2, ``MiniTrainDIT``) and Cosmos 1 (``GeneralDIT``): renamed module by module (``blocks.N.self_attn
  .q_proj`` / ``blocks.blockN.blocks.0.block.attn.to_q.0`` is ``transformer_blocks.N.attn1.to_q``).
- Lumina 2: ``to_q`` / ``to_k`` / ``to_v`` are the rows of ``attention.qkv`` (q's heads, then the key-value heads'
  k and v), the feed-forward ``linear_1`` / ``linear_2`` / ``linear_3`` ComfyUI's ``w1`` / ``w2`` / ``w3``.
- Mochi: ``to_q`` / ``to_k`` / ``to_v`` (``add_*_proj``) the thirds of ``qkv_x`` (``qkv_y``), ``norm_out.linear``
  ``final_layer.mod`` with its shift and scale halves swapped. Its feed-forward input projections are refused
  (:data:`REFUSED_MODULES`): ComfyUI's Mochi applies SiLU to the first half of ``w1``'s output, Diffusers' SwiGLU to
  the second, so the same weight is not the same function.
- SD3 / SD3.5: ``comfy.utils.mmdit_to_diffusers`` (ComfyUI's map of Diffusers SD3 LoRAs), all of it: ``to_q`` /
  ``to_k`` / ``to_v`` (``add_*_proj``, SD3.5's ``attn2.to_*``) the thirds of ``x_block.attn.qkv``
  (``context_block.attn.qkv``, ``x_block.attn2.qkv``); the last block's context half is pre-only (no ``to_add_out`` or
  ``ff_context`` on either host) and its ``norm1_context.linear``, like ``norm_out.linear``, has its shift and scale
  halves swapped.
- AuraFlow: ``comfy.utils.auraflow_to_diffusers``, all of it: module by module (the double layers' image ``to_*`` are
  ComfyUI's ``w2*``, the text ``add_*_proj`` / ``to_add_out`` its ``w1*``; ``ff.linear_1`` / ``linear_2`` /
  ``out_projection`` its ``c_fc1`` / ``c_fc2`` / ``c_proj``), ``norm_out.linear`` ``modF.1`` with its halves swapped.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Dict, Optional, Tuple

__all__ = ["MAPS", "REFUSED_MODULES", "describe", "diffusers_layer_name", "refused_module", "targets"]

_W = "diffusion_model."  # ComfyUI's key prefix of the diffusion model's weights

# Diffusers HunyuanVideo / HunyuanImage token refiner block (context_embedder.token_refiner.refiner_blocks.N) ->
# ComfyUI's (txt_in.individual_token_refiner.blocks.N): (weight, which third of its rows; None: all)
_REFINER = {"attn.to_q": ("self_attn.qkv", 0), "attn.to_k": ("self_attn.qkv", 1), "attn.to_v": ("self_attn.qkv", 2),
            "attn.to_out.0": ("self_attn.proj", None), "ff.net.0.proj": ("mlp.0", None), "ff.net.2": ("mlp.2", None),
            "norm_out.linear": ("adaLN_modulation.1", None)}
# ComfyUI name -> Diffusers name, applied in order (re.sub on the module name without ".weight")
_LTXV = ((r"^patchify_proj$", "proj_in"), (r"^adaln_single\.", "time_embed."))
_COSMOS2 = ((r"^blocks\.(\d+)\.", r"transformer_blocks.\1."), (r"\.self_attn\.", ".attn1."),
            (r"\.cross_attn\.", ".attn2."), (r"\.q_proj$", ".to_q"), (r"\.k_proj$", ".to_k"), (r"\.v_proj$", ".to_v"),
            (r"\.output_proj$", ".to_out.0"), (r"\.mlp\.layer1$", ".ff.net.0.proj"), (r"\.mlp\.layer2$", ".ff.net.2"),
            (r"\.adaln_modulation_self_attn\.(\d)$", r".norm1.linear_\1"),
            (r"\.adaln_modulation_cross_attn\.(\d)$", r".norm2.linear_\1"),
            (r"\.adaln_modulation_mlp\.(\d)$", r".norm3.linear_\1"), (r"^x_embedder\.proj\.1$", "patch_embed.proj"),
            (r"^t_embedder\.1\.", "time_embed.t_embedder."), (r"^final_layer\.linear$", "proj_out"),
            (r"^final_layer\.adaln_modulation\.(\d)$", r"norm_out.linear_\1"))
# Cosmos 1: a block's building blocks by type (ComfyUI's block_type) -> the Diffusers module and its norm
_COSMOS1_PARTS = {"fa": ("attn1", "norm1"), "full_attn": ("attn1", "norm1"), "ca": ("attn2", "norm2"),
                  "cross_attn": ("attn2", "norm2"), "mlp": ("ff", "norm3"), "ff": ("ff", "norm3")}
_COSMOS1_INNER = {"attn.to_q.0": "to_q", "attn.to_k.0": "to_k", "attn.to_v.0": "to_v", "attn.to_out.0": "to_out.0",
                  "layer1": "net.0.proj", "layer2": "net.2"}
_COSMOS1_TOP = {"x_embedder.proj.1": "patch_embed.proj", "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
                "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2", "final_layer.linear": "proj_out",
                "final_layer.adaLN_modulation.1": "norm_out.linear_1",
                "final_layer.adaLN_modulation.2": "norm_out.linear_2"}
# Lumina 2, inside noise_refiner.N / context_refiner.N / layers.N (Diffusers -> ComfyUI)
_LUMINA_BLOCK = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
                 "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
                 "norm1.linear": "adaLN_modulation.1"}
_LUMINA_TOP = {"x_embedder": "x_embedder", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_caption_embed.caption_embedder.1": "cap_embedder.1",
               "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}
# Mochi, inside transformer_blocks.N (Diffusers) / blocks.N (ComfyUI), besides the q, k, v thirds
_MOCHI_BLOCK = {"attn1.to_out.0": "attn.proj_x", "attn1.to_add_out": "attn.proj_y", "ff.net.2": "mlp_x.w2",
                "ff_context.net.2": "mlp_y.w2", "norm1.linear": "mod_x", "norm1_context.linear": "mod_y",
                "norm1_context.linear_1": "mod_y"}  # (the last block's, which does not update the text)
_MOCHI_TOP = {"patch_embed.proj": "x_embedder.proj", "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.pooler.to_kv": "t5_y_embedder.to_kv",
              "time_embed.pooler.to_q": "t5_y_embedder.to_q", "time_embed.pooler.to_out": "t5_y_embedder.to_out",
              "time_embed.caption_proj": "t5_yproj", "proj_out": "final_layer.linear"}

#: family -> ((Diffusers module pattern, why a LoRA on it is refused), ...)
REFUSED_MODULES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "Mochi": ((r"transformer_blocks\.\d+\.ff(_context)?\.net\.0\.proj",
               "ComfyUI's Mochi feed-forward (mlp_x / mlp_y w1) applies SiLU to the first half of its output, "
               "Diffusers' SwiGLU to the second: the same weight computes another function, so no LoRA on it is exact"),),
}


def _comfy(name: str):
    """ComfyUI's module ``name`` (dit_accel imports ComfyUI only from inside ComfyUI)."""
    try:
        return importlib.import_module(name)
    except ImportError:  # only reached from ComfyUI, which has it
        raise RuntimeError(f"dit_accel: mapping a LoRA onto a ComfyUI model needs ComfyUI ({name})") from None


def _weights(patcher) -> Dict[str, object]:
    """ComfyUI's weight names of the diffusion model: ``{module: tensor}`` (2-D and conv weights, not norms)."""
    return {k[:-len(".weight")]: v for k, v in patcher.model.diffusion_model.state_dict().items()
            if k.endswith(".weight") and v.dim() >= 2}


def _flux(patcher, keep: Optional[Tuple[str, ...]] = None) -> Dict[str, object]:
    """``comfy.utils.flux_to_diffusers`` (the Diffusers FLUX names ComfyUI maps for Diffusers FLUX LoRAs): all of it,
    or the modules under ``keep``."""
    names = _comfy("comfy.utils").flux_to_diffusers(patcher.model.model_config.unet_config, output_prefix=_W)
    return {k[:-len(".weight")]: v for k, v in names.items()
            if k.endswith(".weight") and (keep is None or k.startswith(keep))}


def _comfy_map(function: str):
    """The map of ``comfy.utils.<function>`` (SD3's ``mmdit_to_diffusers``, AuraFlow's ``auraflow_to_diffusers``:
    the Diffusers names ComfyUI maps for those families' Diffusers LoRAs), weights only."""
    def mapped(patcher, key_map) -> Dict[str, object]:
        names = getattr(_comfy("comfy.utils"), function)(patcher.model.model_config.unet_config, output_prefix=_W)
        return {k[:-len(".weight")]: v for k, v in names.items() if k.endswith(".weight")}

    return mapped


def _refiner(patcher) -> Dict[str, object]:
    """:data:`_REFINER` for each block of a ComfyUI HunyuanVideo-class model's text token refiner."""
    txt_in = getattr(patcher.model.diffusion_model, "txt_in", None)
    blocks = getattr(getattr(txt_in, "individual_token_refiner", None), "blocks", ())
    hidden = patcher.model.model_config.unet_config["hidden_size"]
    out = {}
    for i in range(len(blocks)):
        for module, (weight, third) in _REFINER.items():
            key = f"{_W}txt_in.individual_token_refiner.blocks.{i}.{weight}.weight"
            out[f"context_embedder.token_refiner.refiner_blocks.{i}.{module}"] = (
                key if third is None else (key, (0, third * hidden, hidden)))
    return out


def _hunyuan(patcher, key_map) -> Dict[str, object]:
    return {**_flux(patcher, ("transformer_blocks.", "single_transformer_blocks.")), **_refiner(patcher)}


def _chroma(patcher, key_map) -> Dict[str, object]:
    out = _flux(patcher)
    for name in _weights(patcher):  # the distilled guidance layer: Diffusers' PixArtAlphaTextProjection layers
        m = re.fullmatch(r"distilled_guidance_layer\.(in_proj|out_proj|layers\.\d+\.(in|out)_layer)", name)
        if m:
            diffusers = name.replace(".in_layer", ".linear_1").replace(".out_layer", ".linear_2")
            out[diffusers] = f"{_W}{name}.weight"
    return out


def _same(patcher, key_map) -> Dict[str, object]:
    """ComfyUI's own map of ``transformer.<module>`` (Qwen-Image's and HiDream's, whose ComfyUI modules carry the
    Diffusers names)."""
    return {k[len("transformer."):]: v for k, v in key_map.items()
            if k.startswith("transformer.") and isinstance(v, str) and v.endswith(".weight")}


def _renamed(patcher, rules) -> Dict[str, object]:
    out = {}
    for name in _weights(patcher):
        diffusers = name
        for pattern, repl in rules:
            diffusers = re.sub(pattern, repl, diffusers)
        out[diffusers] = f"{_W}{name}.weight"
    return out


def _ltxv(patcher, key_map) -> Dict[str, object]:
    return _renamed(patcher, _LTXV)


def _cosmos2(patcher, key_map) -> Dict[str, object]:
    return _renamed(patcher, _COSMOS2)


def _cosmos1(patcher, key_map) -> Dict[str, object]:
    """Each ``blocks.blockN`` is Diffusers' ``transformer_blocks.N``; its building blocks, by type, its ``attn1``,
    ``attn2`` and ``ff`` with their ``norm1`` / ``norm2`` / ``norm3`` (``adaLN_modulation.1`` / ``.2`` are the
    norm's ``linear_1`` / ``linear_2``)."""
    model = patcher.model.diffusion_model
    out = {d: f"{_W}{c}.weight" for c, d in _COSMOS1_TOP.items()}
    for name, block in getattr(model, "blocks", {}).items():
        index = re.fullmatch(r"block(\d+)", name)
        if index is None:
            continue
        for k, sub in enumerate(block.blocks):
            part = _COSMOS1_PARTS.get(getattr(sub, "block_type", None))
            if part is None:
                continue
            at, prefix = f"blocks.{name}.blocks.{k}", f"transformer_blocks.{index.group(1)}"
            for comfy_name, diffusers in _COSMOS1_INNER.items():
                if comfy_name.startswith("attn") == part[0].startswith("attn"):
                    out[f"{prefix}.{part[0]}.{diffusers}"] = f"{_W}{at}.block.{comfy_name}.weight"
            for j in (1, 2):
                out[f"{prefix}.{part[1]}.linear_{j}"] = f"{_W}{at}.adaLN_modulation.{j}.weight"
    return out


def _lumina(patcher, key_map) -> Dict[str, object]:
    model = patcher.model.diffusion_model
    out = {d: f"{_W}{c}.weight" for d, c in _LUMINA_TOP.items()}
    for blocks in ("noise_refiner", "context_refiner", "layers"):
        for i, block in enumerate(getattr(model, blocks, ())):
            attention, at = block.attention, f"{blocks}.{i}"
            q, kv = attention.n_local_heads * attention.head_dim, attention.n_local_kv_heads * attention.head_dim
            qkv = f"{_W}{at}.attention.qkv.weight"
            out.update({f"{at}.attn.to_q": (qkv, (0, 0, q)), f"{at}.attn.to_k": (qkv, (0, q, kv)),
                        f"{at}.attn.to_v": (qkv, (0, q + kv, kv))})
            out.update({f"{at}.{d}": f"{_W}{at}.{c}.weight" for d, c in _LUMINA_BLOCK.items()})
    return out


def _mochi(patcher, key_map) -> Dict[str, object]:
    model = patcher.model.diffusion_model
    out = {d: f"{_W}{c}.weight" for d, c in _MOCHI_TOP.items()}
    swap = _comfy("comfy.utils").swap_scale_shift  # Diffusers' (scale, shift) halves are Mochi's (shift, scale)
    out["norm_out.linear"] = (f"{_W}final_layer.mod.weight", None, swap)
    for i, block in enumerate(getattr(model, "blocks", ())):
        at, to = f"transformer_blocks.{i}", f"blocks.{i}"
        dim = block.attn.qkv_x.weight.shape[0] // 3
        for j, name in enumerate(("q", "k", "v")):
            out[f"{at}.attn1.to_{name}"] = (f"{_W}{to}.attn.qkv_x.weight", (0, j * dim, dim))
            out[f"{at}.attn1.add_{name}_proj"] = (f"{_W}{to}.attn.qkv_y.weight", (0, j * dim, dim))
        last = not getattr(block, "update_y", True)
        for d, c in _MOCHI_BLOCK.items():
            if d.startswith("norm1_context") and d.endswith("_1") != last:
                continue  # (Diffusers names the last block's text modulation linear_1)
            out[f"{at}.{d}"] = f"{_W}{to}.{c}.weight"
    return out


#: family name -> ``(patcher, ComfyUI's LoRA key map) -> {Diffusers module: target}``, for the families not in
#: :data:`~dit_accel.comfyui.weights.BLOCKS`
MAPS: Dict[str, Callable[[object, dict], Dict[str, object]]] = {
    "FLUX": lambda patcher, key_map: _flux(patcher), "HunyuanVideo": _hunyuan, "HunyuanImage 2.1": _hunyuan,
    "Chroma": _chroma, "Qwen-Image": _same, "HiDream": _same, "LTX-Video": _ltxv, "Cosmos": _cosmos2,
    "Cosmos 1": _cosmos1, "Lumina 2": _lumina, "Mochi": _mochi, "SD3": _comfy_map("mmdit_to_diffusers"),
    "AuraFlow": _comfy_map("auraflow_to_diffusers"),
}

_DESCRIBE = {
    "FLUX": "the modules ComfyUI maps for Diffusers FLUX LoRAs (comfy.utils.flux_to_diffusers)",
    "HunyuanVideo": "the modules of transformer_blocks.N, single_transformer_blocks.N (ComfyUI's FLUX map of its "
                    "double and single blocks) and the attention and feed-forward modules of "
                    "context_embedder.token_refiner.refiner_blocks.N",
    "Chroma": "the modules ComfyUI maps for Diffusers FLUX LoRAs (comfy.utils.flux_to_diffusers) and "
              "distilled_guidance_layer",
    "Qwen-Image": "every module of ComfyUI's QwenImageTransformer2DModel, which carries the Diffusers names",
    "HiDream": "every module of ComfyUI's HiDreamImageTransformer2DModel, which carries the Diffusers names",
    "LTX-Video": "every module of ComfyUI's LTXVModel (proj_in as patchify_proj, time_embed as adaln_single)",
    "Cosmos": "the attention, feed-forward and norm modules of transformer_blocks.N, patch_embed, time_embed, "
              "norm_out and proj_out",
    "Lumina 2": "the attention, feed-forward and norm1 modules of noise_refiner.N, context_refiner.N and layers.N, "
                "x_embedder, time_caption_embed, norm_out",
    "Mochi": "the attention and norm modules of transformer_blocks.N, ff.net.2 and ff_context.net.2, patch_embed, "
             "time_embed, norm_out and proj_out",
    "SD3": "the modules ComfyUI maps for Diffusers SD3 LoRAs (comfy.utils.mmdit_to_diffusers): the attention "
           "(SD3.5's attn2 too), feed-forward and norm modules of transformer_blocks.N, pos_embed, time_text_embed, "
           "context_embedder, norm_out and proj_out",
    "AuraFlow": "the modules ComfyUI maps for Diffusers AuraFlow LoRAs (comfy.utils.auraflow_to_diffusers): the "
                "attention, feed-forward and norm modules of joint_transformer_blocks.N and "
                "single_transformer_blocks.N, pos_embed, time_step_proj, context_embedder, norm_out and proj_out",
}
_DESCRIBE["HunyuanImage 2.1"] = _DESCRIBE["HunyuanVideo"]
_DESCRIBE["Cosmos 1"] = _DESCRIBE["Cosmos"]


def describe(family_name: str) -> str:
    """What a LoRA of ``family_name`` may be on, for messages."""
    return _DESCRIBE[family_name]


def targets(patcher, family, key_map: dict) -> Dict[str, object]:
    """``{Diffusers module: target}`` of ``patcher``'s model of ``family`` (one of :data:`MAPS`)."""
    return MAPS[family.name](patcher, key_map)


def refused_module(family_name: str, module: str) -> Optional[str]:
    """Why a LoRA on the Diffusers ``module`` of ``family_name`` is refused, or None."""
    for pattern, reason in REFUSED_MODULES.get(family_name, ()):
        if re.fullmatch(pattern, module):
            return reason
    return None


# ComfyUI layer (Family.layers) -> the Diffusers attention module the SLA projections file names, per family
_FLUX_LAYERS = ((r"^double_blocks\.(\d+)$", r"transformer_blocks.\1.attn"),
                (r"^single_blocks\.(\d+)$", r"single_transformer_blocks.\1.attn"))
_LAYER_NAMES = {
    "Cosmos": ((r"^blocks\.(\d+)\.self_attn$", r"transformer_blocks.\1.attn1"),),
    "Cosmos 1": ((r"^blocks\.block(\d+)\.blocks\.\d+\.block\.attn$", r"transformer_blocks.\1.attn1"),),
    "Lumina 2": ((r"^(noise_refiner|layers)\.(\d+)\.attention$", r"\1.\2.attn"),),
    "Mochi": ((r"^blocks\.(\d+)\.attn$", r"transformer_blocks.\1.attn1"),),
    "SD3": ((r"^joint_blocks\.(\d+)\.x_block\.(attn2?)$", r"transformer_blocks.\1.\2"),),
    "AuraFlow": ((r"^double_layers\.(\d+)\.attn$", r"joint_transformer_blocks.\1.attn"),
                 (r"^single_layers\.(\d+)\.attn$", r"single_transformer_blocks.\1.attn")),
    "Qwen-Image": (), "HiDream": (), "LTX-Video": (),  # (the Diffusers names)
}
_WAN_LAYERS = ((r"\.self_attn$", ".attn1"),)


def diffusers_layer_name(family_name: Optional[str], name: str) -> str:
    """The Diffusers name of ComfyUI's self-attention layer ``name`` in a model of ``family_name``: Wan's
    ``<blocks>.N.self_attn`` is ``<blocks>.N.attn1``, FLUX-style ``double_blocks.N`` ``transformer_blocks.N.attn`` and
    ``single_blocks.N`` ``single_transformer_blocks.N.attn``; the others as :data:`_LAYER_NAMES` says."""
    rules = _LAYER_NAMES.get(family_name, _WAN_LAYERS + _FLUX_LAYERS)
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name
