"""``dit_accel.comfyui.patch_model``: a ComfyUI model patcher whose video self-attention runs a dit_accel method."""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Union

from .._util import WarningLog, is_int
from ..kernels.checks import check_flag
from ..methods import Method
from ..pipelines.apply_checks import _check_apply_args, _resolve_layers
from ..plans.sparse_plan import SparsePlan
from .families import family_for, supported
from .override import AttentionOverride, Patch

__all__ = ["patch_model", "WRAPPER_KEY"]

LOG = logging.getLogger("dit_accel.comfyui")

WRAPPER_KEY = "dit_accel"  # the key of the diffusion_model wrapper on the patched clone


def _diffusion_wrappers() -> str:
    """ComfyUI's name of the diffusion-model wrapper type (its own constant where ComfyUI is importable)."""
    try:
        from comfy.patcher_extension import WrappersMP
    except ImportError:
        return "diffusion_model"
    return WrappersMP.DIFFUSION_MODEL


def _diffusion_model(model):
    """The ``diffusion_model`` of a ComfyUI ModelPatcher, or a one-line TypeError."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None or not all(hasattr(model, a) for a in ("clone", "model_options", "add_wrapper_with_key")):
        raise TypeError(f"dit_accel.comfyui.patch_model(model=...) needs a ComfyUI MODEL (a comfy.model_patcher."
                        f"ModelPatcher, the output of a model loader node); got {type(model).__name__}")
    return inner


def _heads(module) -> Optional[int]:
    for name in ("num_heads", "heads"):
        value = getattr(module, name, None)
        if is_int(value):
            return int(value)
    return None


def _check_sigma(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"dense_above_sigma={value!r} is invalid: a sigma >= 0 (calls at a higher sigma run dense), "
                         "or None")
    return float(value)


def _check_methods_for(family, methods) -> None:
    """The Diffusers preset's refusals hold here too (Radial on an image model: it has no frames)."""
    from ..pipelines.presets import PRESETS, check_method_for

    preset = PRESETS.get(family.diffusers_class)
    if preset is not None:
        for m in methods:
            check_method_for(f"{family.name} ({family.diffusers_class})", preset, m)


def _call_check(method: Method, allow_other_grid: bool):
    """A SparsePlan's checks of each model call's grid and step count (ValueError on a mismatch), or None."""
    check = getattr(method, "check_call", None)
    if check is None:
        return None
    warned = set()

    def on_call(grid, total_steps) -> None:
        warning = check(grid, total_steps, allow_other_grid)
        if warning and tuple(grid) not in warned:
            warned.add(tuple(grid))
            LOG.warning(warning)

    return on_call


def patch_model(model, method: Union[Method, SparsePlan], *, dense_steps: int = 0, dense_last_steps: int = 0,
                dense_above_sigma: Optional[float] = None, dense_layers: Union[int, Sequence[int], None] = None,
                layer_methods: Optional[Dict[int, Method]] = None, backend: str = "auto",
                allow_other_grid: bool = False, weights=None, lora_strength: float = 1.0):
    """A clone of the ComfyUI ``model`` whose video self-attention runs ``method``; ``model`` itself is unchanged.

    The clone carries a ``diffusion_model`` wrapper (token grid from the latent and the model's patch size,
    step from the sampler's sigmas) and an ``optimized_attention_override``, stacked on any override already
    set: a call it does not make sparse (cross-attention, text tokens' own rows, dense steps and layers, an
    uncovered call) goes to that override, or to ComfyUI's own attention. The sparse calls run the same
    ``Plan.run`` as :func:`dit_accel.apply`: same plans, kernels and self-checks.

    Args:
        model: a ComfyUI ``ModelPatcher`` (the MODEL output of a loader node) of a covered family
            (:data:`dit_accel.comfyui.families.FAMILIES`: Wan 2.1/2.2, HunyuanVideo, LTX-Video).
        method: ``Dense()``, ``Tile``, ``GNA``, ``Radial``, ``SLA``, ``VSA`` (any registered method config) or a
            :class:`~dit_accel.SparsePlan` (``dit-accel calibrate``'s output; checked against the model class,
            layers and heads here, the grid and step count at the first sampled call).
        dense_steps, dense_last_steps: run the first / last N sampling steps dense (the step is the current
            sigma's place in the sampler's sigmas, so both calls of classifier-free guidance share it).
        dense_above_sigma: run dense while the current sigma is above this value (None: off).
        dense_layers: int N (the first N self-attention layers dense) or a list of layer indices.
        layer_methods: ``{layer index: Method}`` overrides of ``method`` per layer.
        backend: kernel backend, ``"auto"``, ``"triton"``, ``"torch"`` or ``"flex"``.
        allow_other_grid: run a SparsePlan on a token grid it was not calibrated for (with a warning).
        weights: a ``dit-accel finetune`` output folder (Wan): its LoRA becomes ComfyUI weight patches of the
            clone (at ``lora_strength``), its SLA projections the layers' projections. ``method`` should be the
            folder's own (``dit_accel.training.load_method(DIR)``); another one is run with a warning.

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
    inner = _diffusion_model(model)
    family = family_for(inner)
    if family is None:
        raise ValueError(f"dit_accel: the ComfyUI model {type(inner).__name__} is not covered (dit_accel knows where "
                         f"the video self-attention of {supported()} is); use ComfyUI's own attention for it")
    _check_methods_for(family, (method, *layer_methods.values()))
    layers = family.layers(inner)
    log = WarningLog()
    schedule = _resolve_layers(dict(method=method, dense_steps=dense_steps, dense_last_steps=dense_last_steps,
                                    dense_layers=dense_layers, layer_methods=layer_methods), len(layers), None, log)
    for message in log.messages:  # (e.g. dense_layers covering every layer) into ComfyUI's log too
        LOG.warning(message)
    if hasattr(method, "check_model"):  # a plan: made for this model (its Diffusers class), layers and heads
        method.check_model(family.diffusers_class, [_heads(m) for m in layers])
    patch = Patch(family, inner, layers, schedule, backend, dense_above_sigma, _call_check(method, allow_other_grid))
    clone = model.clone()
    if weights is not None:
        _load_weights(clone, patch, weights, method, lora_strength, layers)
    options = clone.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = AttentionOverride(patch, options.get("optimized_attention_override"))
    clone.add_wrapper_with_key(_diffusion_wrappers(), WRAPPER_KEY, patch.wrapper)
    LOG.info("dit_accel: %s (%s, %d self-attention layers): %s, backend %s%s", type(inner).__name__, family.name,
             len(layers), getattr(method, "summary_line", lambda: repr(method))(), backend,
             _options_text(schedule, dense_above_sigma))
    return clone


def _load_weights(clone, patch: Patch, folder, method: Method, strength, layers) -> None:
    """The folder's SLA projections into ``patch``, its LoRA onto ``clone`` (both new objects: the model given
    to patch_model keeps its weights and patches)."""
    from ..checkpoints.finetuned import method_from_dict
    from .weights import check_folder, lora_patches, sla_projections

    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ValueError(f"lora_strength={strength!r} is invalid: a number (1.0: as trained)")
    info = check_folder(folder, patch.family)
    saved = method_from_dict(info["method"])
    if saved != method:
        LOG.warning("dit_accel: %s was trained with %r; running %r with its weights", folder, saved, method)
    patch.projections = sla_projections(folder, info, layers)
    patches = lora_patches(clone, folder, info)
    if patches:
        clone.add_patches(patches, float(strength))
    LOG.info("dit_accel: loaded %s: %d LoRA weight patches, %d SLA projections", folder, len(patches),
             len(patch.projections))


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
