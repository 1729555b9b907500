"""``dit_accel.comfyui.patch_model``: a ComfyUI model patcher whose video self-attention runs a dit_accel method."""

from __future__ import annotations

import inspect
import logging
import math
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Union


from .._util import WarningLog, is_int, is_number
from ..kernels.checks import check_flag
from ..methods import Method
from ..pipelines.apply_checks import _check_apply_args, _resolve_layers, _warn_unknown_strategy_layers
from ..plans.model_config import check_model_config
from ..plans.sparse_plan import SparsePlan
from .families import HOOKS, WHAT_TO_DO, family_for, refusal, supported
from .merges import watch_merges
from .override import AttentionOverride, Patch, attention_spaces, replaced_attention

__all__ = ["patch_model", "WRAPPER_KEY"]

LOG = logging.getLogger("dit_accel.comfyui")

WRAPPER_KEY = "dit_accel"  # the key of the diffusion_model (or apply_model) wrapper on the patched clone


def _wrapper_type(hook: str = "diffusion_model") -> str:
    """ComfyUI's name of the wrapper type of a ``Family.hook`` (its own constant where ComfyUI is importable)."""
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:
        return hook
    return {"diffusion_model": WrappersMP.DIFFUSION_MODEL, "apply_model": WrappersMP.APPLY_MODEL}[hook]


def _diffusion_model(model):
    """The ``diffusion_model`` of a ComfyUI ModelPatcher, or a one-line TypeError."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None or not all(hasattr(model, a) for a in ("clone", "model_options", "add_wrapper_with_key")):
        raise TypeError(f"dit_accel.comfyui.patch_model(model=...) needs a ComfyUI MODEL (a comfy.model_patcher."
                        f"ModelPatcher, the output of a model loader node); got {type(model).__name__}")
    return inner


def _check_attention_override(inner) -> None:
    """The running ComfyUI hands the attention calls of ``inner``'s code to ``transformer_options
    ["optimized_attention_override"]`` (its ``wrap_attn``, in ComfyUI 0.3.64): a function that does not (an older
    ComfyUI's, or one a custom node set in place of ComfyUI's, in ``comfy.ldm.modules.attention`` or in the model's
    own module, as ``comfy.ldm.wan.model.optimized_attention``) would run every call as its own, the node doing nothing
    without a word. Probed once per patch on 1-token calls; nothing where ComfyUI's modules are not loaded."""
    replaced = replaced_attention(attention_spaces(inner))
    if replaced is not None:
        raise ValueError("dit_accel: this ComfyUI's attention does not call transformer_options"
                         "['optimized_attention_override'] (the hook the dit_accel nodes set, which ComfyUI 0.3.64 "
                         f"has; {replaced}, which this model's code calls, does not), so the node would change "
                         "nothing: an older ComfyUI (update ComfyUI), or a custom node "
                         "that replaced ComfyUI's attention function with its own (a SageAttention patch: use "
                         "ComfyUI's --use-sage-attention instead); else remove the dit_accel node")


def patched_by(model) -> Optional[str]:
    """`` (the method's summary)`` when ``model`` comes out of a dit_accel node (``""`` when its method is not known),
    else None."""
    get = getattr(model, "get_wrappers", None)
    earlier = [w for hook in HOOKS for w in get(_wrapper_type(hook), WRAPPER_KEY)] if callable(get) else ()
    if not earlier:
        return None
    patch = getattr(earlier[-1], "__self__", None)
    method = getattr(getattr(patch, "schedule", None), "method", None)
    return "" if method is None else f" ({getattr(method, 'summary_line', lambda: repr(method))()})"


def _check_not_patched(model) -> None:
    """One dit_accel patch per model: a second one would stack on the first (its override gets every call the
    second declines, so a Dense node after a Tile node still runs Tile; a second LoRA doubles it)."""
    what = patched_by(model)
    if what is not None:
        raise ValueError(f"dit_accel: this MODEL already comes out of a dit_accel node{what}; a second one would run "
                         "on top of it. Connect this node's model input to the MODEL before the first dit_accel node "
                         "(the loader's), or keep one dit_accel node per model")


def _heads(module) -> Optional[int]:
    # (n_heads: AuraFlow's attention modules; n_local_heads: Lumina 2's, where a plan for another head count ran
    # unchecked and a PerHead of another count failed at the first sparse step)
    for name in ("num_heads", "heads", "n_heads", "n_local_heads"):
        value = getattr(module, name, None)
        if is_int(value):
            return int(value)
    return None


def _check_sigma(value) -> Optional[float]:
    if value is None:
        return None
    if not is_number(value) or not 0 <= value < math.inf:  # (a numpy scalar a node links in is a number too)
        raise ValueError(f"dense_above_sigma={value!r} is invalid: a sigma >= 0 and finite (calls at a higher sigma "
                         "run dense), or None")
    return float(value)


def _check_strength(value) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"lora_strength={value!r} is invalid: a finite number (1.0: as trained)")
    return float(value)


def _recorded_method(folder):
    """``folder``'s recorded method (None where there is no folder, or it cannot be read: its own check says why)."""
    from ..checkpoints.finetuned import load_method

    try:
        return None if folder is None else load_method(folder)
    except (OSError, ValueError, TypeError):
        return None


def _check_methods_for(family, methods, weights=None) -> None:
    """The Diffusers preset's refusals hold here too (Radial on an image model: it has no frames), said in the
    node's words: a setting typed in widgets is told its widgets and nodes (``dit_accel.recommended`` is no node's),
    one read from a file (a plan, a strategy, a ``weights`` folder) what to do about the file."""
    from ..pipelines.apply_checks import inner_configs
    from ..pipelines.presets import PRESETS, check_method_for

    preset = PRESETS.get(family.diffusers_class)
    if preset is None:
        return
    trained = _recorded_method(weights)  # (read once, not once per method and head)
    for m in methods:
        # a plan's phases and a PerHead's heads, before the first sparse step (a PerHead's were not looked into)
        outer = [] if getattr(m, "sparse_plan", None) is not None else [(m, None)]
        for each, note in [*outer, *inner_configs(m)]:
            if note is None and trained is not None and trained == m:
                note = f"{weights} was trained with it: the weights are for another model"
            try:
                check_method_for(f"{family.name} ({family.diffusers_class})", preset, each,
                                 host="comfyui" if note is None else "comfyui-file")
                _check_tile_block(each, preset.grid_dims)
            except ValueError as err:
                if note is None:
                    raise
                raise ValueError(f"{err} ({note})") from None


def _check_tile_block(method, dims) -> None:
    """A Tile's explicit ``block_size`` that is no box of its tile (``tile=(2, 4, 4)``, 32 tokens, in 64-token blocks):
    wrong at any grid of the family's rank, so said here, not at the first sampling step (where ``Tile.plan``
    refuses it, deep in the sampler)."""
    from ..patterns.tile import check_tile_block

    block, tile = getattr(method, "block_size", None), getattr(method, "tile", None)
    if getattr(method, "name", None) != "tile" or block is None or tile is None or not dims:
        return
    check_tile_block((1,) * dims, tile, block)


def _check_heads(model_name: str, layers, methods) -> None:
    """Per-head windows (Tile, GNA, a strategy file) for the heads the model's layers run, as apply checks them:
    else the first sparse step fails inside the sampler."""
    known = sorted({h for h in (_heads(m) for m in layers) if h is not None})
    for m in methods:
        want = getattr(m, "heads", None)
        if is_int(want) and known and known != [want]:
            path = getattr(m, "path", None)
            fix = "use a strategy searched for this model" if path else "give one window per head, or one for all"
            raise ValueError(f"dit_accel: {path or type(m).__name__} has windows for {want} heads per layer, but "
                             f"{model_name}'s self-attention layers run {', '.join(map(str, known))} heads: {fix}")


def _check_plan_model(method, family, model_name: str, layers, config=None) -> None:
    """A plan made for this model (its Diffusers class), layers and heads; its refusal says what this MODEL is, as
    ComfyUI names it (the plan's own said "this pipeline's transformer is WanTransformer3DModel": no pipeline, and
    not the class ComfyUI shows). A plan calibrated on another model of the class, layers and heads (Wan 2.1 I2V's
    on T2V: ``in_channels`` 36 against 16) is run with ``dit_accel.apply``'s warning, from ``config``
    (:func:`_model_config`)."""
    if not hasattr(method, "check_model"):
        return
    try:
        method.check_model(family.diffusers_class, [_heads(m) for m in layers])
    except ValueError as err:
        own = f"this MODEL is ComfyUI's {model_name} ({family.name}; Diffusers' "
        text = re.sub(r"this pipeline's transformer is (\w+):", lambda m: f"{own}{m.group(1)}):", str(err))
        # (a plan for other layer or head counts was refused in Diffusers' words: "this model has 2", no dit_accel:
        # prefix, and a PerHead of another head count said no remedy)
        this = f"this MODEL (ComfyUI's {model_name}, {family.name})"
        text = (text.replace("this model's layers have", f"the self-attention layers of {this} have")
                .replace("that layer of this model has", f"that layer of {this} has")
                .replace("this model has", f"{this} has"))
        if "calibrate" not in text:
            text += "; calibrate a plan for this model (dit-accel calibrate)"
        raise ValueError(f"dit_accel: {text.removeprefix('dit_accel: ')}") from None
    warning = check_model_config(method, config) if config else None
    if warning:
        LOG.warning("dit_accel: %s", warning)


def _model_config(model, inner, family) -> Optional[dict]:
    """This MODEL's config entries under Diffusers' names (``family.config_keys``), read from ComfyUI's constructor
    arguments: ``unet_config``, else (ComfyUI built the model as ``cls(**unet_config)``) the constructor's default;
    the diffusion model's attribute of that name for a model built without one. None for a family that maps none."""
    if not family.config_keys:
        return None
    unet = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    if isinstance(unet, dict):
        try:
            params = inspect.signature(type(inner).__init__).parameters.values()
        except (TypeError, ValueError):  # (a constructor without a readable signature: its defaults unknown)
            params = ()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

        def get(name):
            return unet[name] if name in unet else defaults.get(name)
    else:
        def get(name):
            return getattr(inner, name, None)
    out = {}
    for ours, theirs in family.config_keys:
        value = theirs(get) if callable(theirs) else get(theirs)
        if value is not None:
            out[ours] = value
    return out or None


def _call_check(method: Method, allow_other_grid: bool):
    """A SparsePlan's checks of each model call's grid and step count (ValueError on a mismatch), or None."""
    check = getattr(method, "check_call", None)
    if check is None:
        return None
    warned = set()

    def on_call(grid, total_steps) -> None:
        warning = check(grid, total_steps, allow_other_grid, host="comfyui")
        if warning and tuple(grid) not in warned:
            warned.add(tuple(grid))
            LOG.warning(warning)

    return on_call


def patch_model(model, method: Union[Method, SparsePlan], *, dense_steps: int = 0, dense_last_steps: int = 0,
                dense_above_sigma: Optional[float] = None, dense_layers: Union[int, Sequence[int], None] = None,
                layer_methods: Optional[Dict[int, Method]] = None, backend: str = "auto",
                allow_other_grid: bool = False, weights=None, lora_strength: float = 1.0,
                expert: str = "transformer"):
    """A clone of the ComfyUI ``model`` whose video self-attention runs ``method``; ``model`` itself is unchanged.

    The clone carries a ``diffusion_model`` wrapper (``apply_model`` for Mochi, SD3 and OmniGen2, whose forwards
    run none; token grid from the latent and the model's patch size, step from the sampler's sigmas) and an
    ``optimized_attention_override``, stacked on any override already set: a call it does not make sparse
    (cross-attention, text tokens' own rows, dense steps and layers, an uncovered call) goes to that override, or
    to ComfyUI's own attention. The sparse calls run the same ``Plan.run`` as :func:`dit_accel.apply`: same
    plans, kernels and self-checks.

    Args:
        model: a ComfyUI ``ModelPatcher`` (the MODEL output of a loader node) of a covered family
            (:data:`dit_accel.comfyui.families.FAMILIES`: Wan 2.1/2.2 and its VACE, Animate, HuMo and
            Fun Camera models, HunyuanVideo, LTX-Video, Cosmos 1 and Predict2, Mochi, FLUX, Chroma, Chroma
            Radiance, Qwen-Image, Lumina 2, HunyuanImage 2.1, HiDream, SD3 / SD3.5, AuraFlow, OmniGen2).
        method: ``Dense()``, ``Tile``, ``GNA``, ``Radial``, ``SLA``, ``VSA`` (any registered method config) or a
            :class:`~dit_accel.SparsePlan` (``dit-accel calibrate``'s output; checked against the model class,
            layers and heads here, the grid and step count at the first sampled call).
        dense_steps, dense_last_steps: run the first / last N sampling steps dense (the step is the sampler's
            loop index over its sigmas, else the current sigma's place in them, so both calls of classifier-free
            guidance and every call of a second-order step share it). A KSampler's part of a schedule (denoise
            < 1, KSamplerAdvanced's start/end steps) counts the steps of the whole schedule, as Diffusers does.
        dense_above_sigma: run dense while the current sigma is above this value (None: off).
        dense_layers: int N (the first N self-attention layers dense) or a list of layer indices.
        layer_methods: ``{layer index: Method}`` overrides of ``method`` per layer.
        backend: kernel backend, ``"auto"``, ``"triton"``, ``"torch"`` or ``"flex"``.
        allow_other_grid: run a SparsePlan on a token grid it was not calibrated for (with a warning).
        weights: a ``dit-accel finetune`` output folder (Wan and its variants, FLUX, Chroma, HunyuanVideo,
            HunyuanImage 2.1, Qwen-Image, HiDream, LTX-Video, Cosmos, Cosmos 1, Lumina 2, Mochi, SD3 / SD3.5,
            AuraFlow): its LoRA becomes ComfyUI weight patches of the clone (at ``lora_strength``), its SLA
            projections the layers' projections. ``method`` should be the folder's own (``dit_accel.training.load_method(DIR)``);
            another one is run with a warning.
        expert: which transformer of ``weights`` this MODEL is: ``"transformer"`` (the default; Wan 2.2 A14B's
            high-noise expert) or ``"transformer_2"`` (its low-noise expert: the folder's ``transformer_2.*``
            tensors, which ``dit-accel convert --transformer-2`` writes). Each expert is its own ComfyUI MODEL:
            patch each with its part of the one folder. A folder without the expert's part is refused.

    Raises:
        TypeError / ValueError (one line): not a ComfyUI model, a model class no family covers (naming it and
        the covered ones), bad options, or a plan made for another model. The model is unchanged.

    Example::

        patched = dit_accel.comfyui.patch_model(model, dit_accel.Tile(tile=(4, 4, 4), window=(3, 3, 3)),
                                                dense_steps=2)
    """
    if isinstance(method, SparsePlan):
        method = method.as_method()
    method, dense_steps, dense_last_steps, dense_layers, layer_methods, _, _ = _check_apply_args(
        method, dense_steps, dense_last_steps, dense_layers, layer_methods, backend, None, None, None, None, False)
    dense_above_sigma = _check_sigma(dense_above_sigma)
    check_flag("allow_other_grid", allow_other_grid)
    lora_strength = _check_strength(lora_strength)
    _check_expert_option(expert, weights)
    inner = _diffusion_model(model)
    _check_not_patched(model)
    _check_attention_override(inner)
    family = family_for(inner)
    if family is None and refusal(inner):
        raise ValueError(refusal(inner))
    if family is None:
        raise ValueError(f"dit_accel: the ComfyUI model {type(inner).__name__} is not covered (dit_accel knows where "
                         f"the video self-attention of {supported()} is); {WHAT_TO_DO}")
    _check_methods_for(family, (method, *layer_methods.values()), weights)
    layers = family.layers(inner)
    _check_heads(type(inner).__name__, layers, (method, *layer_methods.values()))
    log = WarningLog()
    schedule = _resolve_layers(dict(method=method, dense_steps=dense_steps, dense_last_steps=dense_last_steps,
                                    dense_layers=dense_layers, layer_methods=layer_methods), len(layers), None, log)
    _warn_unknown_strategy_layers((method, *layer_methods.values()), len(layers), type(inner).__name__, log)
    for message in log.messages:  # (e.g. dense_layers covering every layer) into ComfyUI's log too
        LOG.warning(message)
    _check_plan_model(method, family, type(inner).__name__, layers, _model_config(model, inner, family))
    patch = Patch(family, inner, layers, schedule, backend, dense_above_sigma, _call_check(method, allow_other_grid))
    clone = model.clone()
    if weights is not None:
        _load_weights(clone, patch, weights, method, lora_strength, layers, expert)
    options = clone.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = AttentionOverride(patch, options.get("optimized_attention_override"))
    clone.add_wrapper_with_key(_wrapper_type(family.hook), WRAPPER_KEY, patch.wrapper)
    watch_merges(patched_by)  # (a merge node this MODEL reaches as its second model drops it: said in the log)
    LOG.info("dit_accel: %s (%s, %d self-attention layers): %s, backend %s%s", type(inner).__name__, family.name,
             len(layers), getattr(method, "summary_line", lambda: repr(method))(), backend,
             _options_text(schedule, dense_above_sigma))
    return clone


def _check_expert_option(expert, weights) -> None:
    from .weights import check_expert

    check_expert(expert)
    if weights is None and expert != "transformer":
        raise ValueError(f"dit_accel: expert={expert!r} picks a part of a weights folder, but no weights were given: "
                         "pass weights=DIR, or leave expert at 'transformer'")


def _load_weights(clone, patch: Patch, folder, method: Method, strength, layers, expert: str = "transformer") -> None:
    """The folder's SLA projections of ``expert`` into ``patch``, its LoRA onto ``clone`` (both new objects: the
    model given to patch_model keeps its weights and patches)."""
    from ..checkpoints.finetuned import check_trained_dense_layers, saved_method
    from .weights import check_folder, lora_patches, sla_projections

    info, experts = check_folder(folder, patch.family, patch.model_name, expert)
    check_trained_dense_layers(folder, info, patch.schedule, len(layers))
    saved = saved_method(Path(folder), info)  # (a plan edited after training is refused, as apply refuses it)
    if not _same_method(saved, method):
        LOG.warning("dit_accel: %s was trained with %r; running %r with its weights", folder, saved, method)
    patch.projections = sla_projections(folder, info, clone.model.diffusion_model, layers, expert=expert)
    _check_projections_cover(folder, info, patch, saved, layers, expert)
    patches = lora_patches(clone, folder, info, patch.family, expert)
    if patches:
        clone.add_patches(patches, float(strength))
    LOG.info("dit_accel: loaded %s (%s): %d LoRA weight patches, %d SLA projections", folder, expert, len(patches),
             len(patch.projections))
    if experts["transformer"] and experts["transformer_2"]:  # (Wan 2.2 A14B's: the sampler's sigmas tell its parts)
        patch.expert = expert
    if expert == "transformer" and experts["transformer_2"]:
        LOG.info("dit_accel: %s also holds transformer_2 weights (Wan 2.2 A14B's low-noise expert): load them into "
                 "that expert's MODEL with expert=transformer_2", folder)


def _same_method(saved: Method, method: Method) -> bool:
    """Whether ``method`` is the folder's own: for a plan (compared by identity) the same content, as
    ``dit_accel.apply`` compares them; a plan folder run as recorded warned it ran another."""
    from ..checkpoints.finetuned import same_setting

    plans = getattr(saved, "sparse_plan", None), getattr(method, "sparse_plan", None)
    if None not in plans:
        return plans[0].content_hash() == plans[1].content_hash()
    # (as apply compares them: `saved == method` warned "trained with Tile(window=3)" when running window=(3, 3, 3))
    return saved == method or (type(saved) is type(method) and same_setting(saved, method))


def _check_projections_cover(folder, info: dict, patch: Patch, saved: Method, layers, expert: str) -> None:
    """Every layer that runs SLA here, and ran it in training, has its projection (``dit_accel.apply`` refuses a
    folder without them too): else that layer would run a zero projection, training-free SLA, without a word."""
    from ..pipelines.apply_checks import _runs_sla
    from .weights import layer_names

    schedule = patch.schedule
    missing = [i for i in range(len(layers)) if i not in patch.projections and i not in schedule.dense_layers
               and _runs_sla(saved, i) and _runs_sla(schedule.layer_methods.get(i, schedule.method), i)]
    if not missing:
        return
    from ..checkpoints.finetuned import SLA_FILE

    names = layer_names(patch._model, layers)
    shown = ", ".join(f"{i} ({names[i]})" for i in missing[:3]) + (f", ... ({len(missing)} in all)"
                                                                  if len(missing) > 3 else "")
    where = "" if expert == "transformer" else f"{expert} "
    held = (info.get("files") or {}).get("sla_projections")
    file = f"its {held} holds" if held else f"it has no {SLA_FILE}, so it holds"
    raise ValueError(f"dit_accel: {folder} was trained with SLA, but {file} no {where}SLA projection for layers "
                     f"{shown} of this {patch.model_name}, which run SLA: "
                     "they would run untrained (a zero projection). The weights are for another model, or the file "
                     "is incomplete: train or convert it again")


def _options_text(schedule, dense_above_sigma) -> str:
    parts = []
    if schedule.dense_steps:
        parts.append(f"first {schedule.dense_steps} steps dense")
    if schedule.dense_last_steps:
        parts.append(f"last {schedule.dense_last_steps} steps dense")
    if dense_above_sigma is not None:
        parts.append(f"dense above sigma {dense_above_sigma:g}")
    if schedule.dense_layers:
        parts.append(f"dense layers {sorted(schedule.dense_layers)}")
    if schedule.layer_methods:
        parts.append(f"{len(schedule.layer_methods)} layers with their own method")
    return "" if not parts else "; " + ", ".join(parts)
