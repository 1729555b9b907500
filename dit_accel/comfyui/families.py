"""The ComfyUI model classes dit_accel knows, as data (one :class:`Family` per layout rule).

ComfyUI's attention override hands over q, k and v with neither a token grid nor the layer that made the
call. A family says, for one kind of ComfyUI ``diffusion_model``: which modules make the video
self-attention calls (their order is the layer index, as ``dit_accel.apply`` counts the Diffusers modules),
how the latent the model is called with becomes the token grid, and where text sits in a joint sequence.
Its ``diffusers_class`` is the Diffusers transformer of the same model: the published settings of
``dit_accel.pipelines.presets`` and the model class a :class:`~dit_accel.SparsePlan` records are under it.

Token layout, checked against ComfyUI's code: Wan patchifies with a Conv3d and ``flatten(2)``, LTX-Video with
``b c (f p1) (h p2) (w p3) -> b (f h w) ...``, HunyuanVideo with a Conv3d patch embed and ``flatten(2)``: all
frame-major, then row, then column, the order of METHODS.md, and so is Cosmos Predict2's
``b t h w d -> b (t h w) d``; FLUX with ``b c (h ph) (w pw) -> b (h w) ...``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from torch import nn

__all__ = ["Family", "FAMILIES", "family_for", "supported"]


def _patched_grid(shape, patch) -> Tuple[int, ...]:
    """The token grid of a latent ``(B, C, *extent)`` padded up to whole patches (ComfyUI's pad_to_patch_size)."""
    extent = tuple(int(s) for s in shape[2:])
    patch = (int(patch),) * len(extent) if isinstance(patch, int) else tuple(int(p) for p in patch)[-len(extent):]
    return tuple(math.ceil(e / p) for e, p in zip(extent, patch))


def _wan_layers(model: nn.Module) -> List[nn.Module]:
    return [block.self_attn for block in model.blocks]


def _wan_grid(model: nn.Module, x) -> Tuple[int, ...]:
    return _patched_grid(x.shape, model.patch_size)


def _hunyuan_layers(model: nn.Module) -> List[nn.Module]:
    # Double-stream blocks, then single-stream blocks, as the Diffusers transformer orders its attention layers.
    return [*model.double_blocks, *model.single_blocks]


def _hunyuan_grid(model: nn.Module, x) -> Tuple[int, ...]:
    return _patched_grid(x.shape, model.patch_size)  # (also FLUX: an int patch on a (B, C, H, W) latent)


def _ltxv_layers(model: nn.Module) -> List[nn.Module]:
    return [block.attn1 for block in model.transformer_blocks]


def _ltxv_grid(model: nn.Module, x) -> Tuple[int, ...]:
    return _patched_grid(x.shape, model.patchifier._patch_size)  # (1, p, p): its only record of the patch


def _cosmos_grid(model: nn.Module, x) -> Tuple[int, ...]:
    return _patched_grid(x.shape, (model.patch_temporal, model.patch_spatial, model.patch_spatial))


@dataclass(frozen=True)
class Family:
    """One ComfyUI model family.

    Attributes:
        name: what messages and the log call it.
        classes: the ComfyUI ``diffusion_model`` class names it covers (exact names).
        diffusers_class: the Diffusers transformer class of the same model (published settings, plan checks).
        text_position: where text tokens sit in a self-attention call: ``"none"`` (video only; text comes
            through cross-attention), ``"last"`` ([video, text]) or ``"first"`` ([text, video]).
        layers: ``diffusion_model -> [module, ...]``: the modules whose ``forward`` makes the video self-attention
            call, in model order (layer ``i`` is the ``i``-th).
        grid: ``(diffusion_model, latent x) -> token grid``.
        notes: one line for the docs and the log.
    """

    name: str
    classes: Tuple[str, ...]
    diffusers_class: str
    text_position: str
    layers: Callable[[nn.Module], List[nn.Module]]
    grid: Callable[[nn.Module, object], Tuple[int, ...]]
    notes: str = ""


FAMILIES: Tuple[Family, ...] = (
    Family("Wan", ("WanModel",), "WanTransformer3DModel", "none", _wan_layers, _wan_grid,
           "Wan 2.1 and 2.2, T2V and I2V (the I2V image tokens go through cross-attention, which stays dense)"),
    Family("HunyuanVideo", ("HunyuanVideo",), "HunyuanVideoTransformer3DModel", "last", _hunyuan_layers,
           _hunyuan_grid, "HunyuanVideo T2V and I2V: double blocks then single blocks, [video, text] with padded "
           "text masked"),
    Family("Cosmos", ("MiniTrainDIT",), "CosmosTransformer3DModel", "none", _wan_layers, _cosmos_grid,
           "Cosmos Predict2 (text/image to image and video): blocks.*.self_attn over video only"),
    Family("FLUX", ("Flux",), "FluxTransformer2DModel", "first", _hunyuan_layers, _hunyuan_grid,
           "FLUX.1 dev and schnell (image): double blocks then single blocks, [text, image]"),
    Family("LTX-Video", ("LTXVModel",), "LTXVideoTransformer3DModel", "none", _ltxv_layers, _ltxv_grid,
           "LTX-Video: transformer_blocks.*.attn1 over video only"),
)


def supported() -> str:
    """The covered ComfyUI classes, for messages."""
    return ", ".join(f"{c} ({f.name})" for f in FAMILIES for c in f.classes)


def family_for(diffusion_model: nn.Module) -> Optional[Family]:
    """The family of a ComfyUI ``diffusion_model`` (by exact class name), or None."""
    name = type(diffusion_model).__name__
    for family in FAMILIES:
        if name in family.classes:
            return family
    return None
