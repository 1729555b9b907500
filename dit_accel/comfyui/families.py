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
``b t h w d -> b (t h w) d``; FLUX and Chroma with ``b c (h ph) (w pw) -> b (h w) ...``, Qwen-Image and Lumina 2
with a row-major view of 2x2 patches. Wan's subclasses patchify as Wan: VACE and Animate hold reference frames as
the latent's leading frames (dense, before the grid, as dit_accel's Diffusers presets run them), HuMo appends its
reference frames after the video. On Wan's own class, a ``ref_conv`` (Wan 2.2 Fun's reference image, also Animate's)
puts the ``reference_latent``'s tokens before the video, and Phantom's ``time_dim_concat`` subject frames follow the
video's frames: [reference, video, subject frames], both counted exactly per call and dense. LTX-Video's guides
(``LTXVAddGuide``) are latent frames appended after the video's, their tokens the last ``keyframe_idxs.shape[2]``:
[video, guide frames], the guide frames counted exactly per call and dense. Joint attention: [text,
image] for FLUX, Chroma, Qwen-Image and Lumina 2 (the caption's valid tokens), [video, text] for HunyuanVideo.
Reference images on the grid's other side, FLUX Kontext's and Qwen-Image-Edit's after the image ([text, image,
references]) and HunyuanVideo's ref_latent before the video ([reference, video, text]), are counted exactly per call
(``Family.references``) and run dense, as text does.
HunyuanImage 2.1 is ComfyUI's HunyuanVideo class with a 2-D patch (``Family.when`` tells them apart): [image, text,
ByT5 tokens]. Mochi patchifies each frame with a Conv2d, ``(B T) C H W -> B (T H W) C``, and attends over [video, the
first ``num_tokens`` text tokens] (the padded rest cut off; its text stream projected to the video's heads and head
size), as Diffusers' ``MochiTransformer3DModel`` attends over [video, valid text]; its forward runs no diffusion-model
wrapper, so its grid is read around ``BaseModel.apply_model`` (``Family.hook``). Cosmos 1 patchifies
``b c (t r) (h m) (w n) -> b t h w ...`` and attends over ``(t h w)``; HiDream's image is ``B C (H p1) (W p2) -> B (H
W) ...``, then T5 and the Llama-3.1 tokens twice, as Diffusers orders them.
SD3 / SD3.5 (``OpenAISignatureMMDITWrapper``) patchifies with a Conv2d and ``flatten(2)`` and attends over [register
tokens (``register_length``: 0 as ComfyUI detects SD3), text, image] in each joint block, SD3.5's dual-attention
blocks then over the image alone (``x_block.attn2``); both calls are made in the module-level ``_block_mixing``, so
the family names their layer from that frame (``Family.caller``), and its forward runs no diffusion-model wrapper
(``apply_model``). AuraFlow
(``MMDiT``) patchifies row-major and attends over [8 register tokens, text, image] in its double and single layers.
OmniGen2 patchifies ``b c (h p1) (w p2) -> b (h w) ...``; its image refiner attends over the image alone, its joint
layers over [text (all of ``context``: no mask there), reference images, image], the references counted exactly per
call; its forward runs no diffusion-model wrapper either. Chroma Radiance is Chroma on pixels: a Conv2d of its patch
and ``flatten(2)``, [text, image]. Layers whose calls hold the image alone are ``Family.alone``.
Classes known and refused (``REFUSED``) fail with their reason: Wan S2V, PixArt and HunyuanDiT (their attention calls
pass no ``transformer_options``, so ComfyUI's override never sees them), Hunyuan3D 2.0 / 2.1 (3-D shape latents) and
ACE-Step (audio); any other class fails naming the covered ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from .._util import is_int

__all__ = ["Family", "FAMILIES", "HOOKS", "REFUSED", "WHAT_TO_DO", "family_for", "refusal", "supported"]

#: The ComfyUI wrappers a family may read its calls' grid in (``Family.hook``).
HOOKS = ("diffusion_model", "apply_model")


def _patched_grid(shape, patch) -> Tuple[int, ...]:
    """The token grid of a latent ``(B, C, *extent)`` padded up to whole patches (ComfyUI's pad_to_patch_size)."""
    extent = tuple(int(s) for s in shape[2:])
    patch = (int(patch),) * len(extent) if isinstance(patch, int) else tuple(int(p) for p in patch)[-len(extent):]
    return tuple(math.ceil(e / p) for e, p in zip(extent, patch))


def _wan_layers(model: nn.Module) -> List[nn.Module]:
    return [block.self_attn for block in model.blocks]


def _wan_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    return _patched_grid(x.shape, model.patch_size)


def _vace_layers(model: nn.Module) -> List[nn.Module]:
    # The main blocks, then the control blocks: Diffusers' WanVACETransformer3DModel registers ``blocks`` before
    # ``vace_blocks``, and dit_accel.apply counts ``blocks.*.attn1`` then ``vace_blocks.*.attn1`` in that order.
    return [*_wan_layers(model), *(block.self_attn for block in getattr(model, "vace_blocks", ()))]


def _vace_reference_frames(model: nn.Module, control) -> int:
    """Leading latent frames of ComfyUI's ``vace_context`` ``(B, contexts, C, F, H, W)`` that are reference images:
    zero in every channel after the first ``in_dim`` (WanVaceToVideo prepends the reference latent with zeros as its
    reactive half and its mask), in every sample and context. The rule of dit_accel's WanVACETransformer3DModel
    preset, so a reference frame runs dense on both hosts."""
    if not hasattr(control, "dim") or control.dim() != 6 or control.shape[2] <= model.in_dim:
        return 0
    zero = (control[:, :, model.in_dim:] == 0).flatten(4).all(dim=-1).all(dim=2).all(dim=1).all(dim=0)  # (F,)
    nonzero = (~zero).nonzero()
    return int(zero.shape[0] if nonzero.numel() == 0 else nonzero[0, 0])  # one host sync per model call


def _vace_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    frames, h, w = _wan_grid(model, x)
    refs = _vace_reference_frames(model, (call or {}).get("vace_context"))
    pt = int(model.patch_size[0])
    if refs % pt:
        raise ValueError(f"dit_accel: {refs} VACE reference frames are not a multiple of the temporal patch {pt}")
    if refs // pt >= frames:
        raise ValueError(f"dit_accel: every latent frame of the call reads as a VACE reference frame (all {frames}: "
                         f"its vace_context is zero after the first {model.in_dim} channels in each, as WanVaceToVideo "
                         "writes a reference image), so no frame is left for the video grid: give WanVaceToVideo a "
                         "control video or more frames, or use ComfyUI's own attention for this model (bypass the "
                         "dit_accel node)")
    return frames - refs // pt, h, w  # the leading reference frames: dense tokens before the grid


def _animate_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    frames, h, w = _wan_grid(model, x)
    if frames < 2:
        raise ValueError(f"dit_accel: Wan Animate latents of {x.shape[2]} frames hold the reference frame only; "
                         "the call needs the reference frame followed by at least one video frame")
    return frames - 1, h, w  # WanAnimateToVideo's leading reference frame: dense tokens before the grid


def _ref_conv_tokens(model: nn.Module, x, call, grid=None) -> int:
    """The tokens a ``ref_conv`` puts before the video (Wan 2.2 Fun's reference image, Animate's), exactly: the
    ``reference_latent`` ``(B, C, H, W)`` through a Conv2d of the spatial patch (stride = kernel, no padding, so
    whole patches only); none without a ``ref_conv`` or a ``reference_latent``."""
    ref = call.get("reference_latent")
    if getattr(model, "ref_conv", None) is None or not hasattr(ref, "shape"):
        return 0
    ph, pw = (int(p) for p in model.patch_size[-2:])
    return (int(ref.shape[-2]) // ph) * (int(ref.shape[-1]) // pw)


def _time_concat_tokens(model: nn.Module, x, call, grid=None) -> int:
    """The tokens of Phantom's subject frames, exactly: ``time_dim_concat`` padded to whole patches and concatenated
    after the latent's frames before patchifying, so its tokens follow the video's (the output drops them)."""
    extra = call.get("time_dim_concat")
    return 0 if not hasattr(extra, "shape") else math.prod(_patched_grid(extra.shape, model.patch_size))


def _leading_frames(model: nn.Module, x, call, grid) -> int:
    """The tokens before the grid in a Wan VACE / Animate self-attention call, exactly: the latent's frames before
    the grid, and the ``reference_latent`` a ``ref_conv`` prepends (a call with tokens elsewhere runs ComfyUI's
    own attention)."""
    return math.prod(_wan_grid(model, x)) - math.prod(grid) + _ref_conv_tokens(model, x, call)


def _text_tokens(model: nn.Module, x, call, grid) -> Optional[int]:
    """The text tokens of a joint-attention call, exactly: ``context`` (and HunyuanImage's ByT5 tokens). Reference
    images on the grid's other side are counted apart (``Family.references``)."""
    context, byt5 = call.get("context"), call.get("txt_byt5")
    if not hasattr(context, "shape"):
        return None
    extra = int(byt5.shape[1]) if getattr(model, "byt5_in", None) is not None and hasattr(byt5, "shape") else 0
    return int(context.shape[1]) + extra


def _reference_images(model: nn.Module, x, call, grid) -> int:
    """The tokens FLUX Kontext and Qwen-Image-Edit append after the image, exactly: each latent of ``ref_latents``
    in list order, padded to whole patches and patchified as the image is (its last two axes; Qwen-Image's
    ``(B, C, 1, H, W)``). The ``ref_latents_method`` variants ("offset", "index", "uxo") change the references'
    position ids, not their place or count."""
    refs = call.get("ref_latents")
    if refs is None:
        return 0
    return sum(math.prod(_patched_grid((*r.shape[:2], *r.shape[-2:]), model.patch_size)) for r in refs)


def _reference_latent(model: nn.Module, x, call, grid) -> int:
    """The tokens of HunyuanVideo's ``ref_latent``, exactly: put before the video by the same patch embedding."""
    ref = call.get("ref_latent")
    return 0 if ref is None else math.prod(_patched_grid(ref.shape, model.patch_size))


def _image_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    return _patched_grid((*x.shape[:2], *x.shape[-2:]), model.patch_size)  # Qwen-Image: (B, C, 1, H, W)


def _qwen_layers(model: nn.Module) -> List[nn.Module]:
    return [block.attn for block in model.transformer_blocks]


def _lumina_layers(model: nn.Module) -> List[nn.Module]:
    # The image refiner (image alone), then the joint layers; the caption refiner is text alone: not a layer.
    return [*(b.attention for b in model.noise_refiner), *(b.attention for b in model.layers)]


def _lumina_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    mask = (call or {}).get("attention_mask")  # passed only when the caption is padded
    if hasattr(mask, "sum") and mask.dim() == 2 and len(set(mask.sum(dim=1).tolist())) > 1:
        raise ValueError(f"dit_accel: the samples of this Lumina 2 call have captions of different valid lengths "
                         f"{mask.sum(dim=1).tolist()}; the model puts each image after its own caption, at different "
                         "offsets, which dit_accel cannot place: use ComfyUI's own attention for this model")
    return _patched_grid(x.shape, model.patch_size)


def _lumina_alone(model: nn.Module) -> List[nn.Module]:
    return [b.attention for b in model.noise_refiner]


def _lumina_text(model: nn.Module, x, call, grid) -> Optional[int]:
    """The caption tokens before the image in Lumina 2's joint layers, exactly: the caption's valid length, the
    attention mask's count (the same in every sample: :func:`_lumina_grid` refuses other calls), else
    ``num_tokens`` (ComfyUI's count of it when no token is padded); None (any) without either."""
    mask, num_tokens = call.get("attention_mask"), call.get("num_tokens")
    if hasattr(mask, "sum") and mask.dim() == 2:
        return int(mask[0].sum())
    return int(num_tokens) if isinstance(num_tokens, (int, float)) and not isinstance(num_tokens, bool) else None


def _hunyuan_layers(model: nn.Module) -> List[nn.Module]:
    # Double-stream blocks, then single-stream blocks, as the Diffusers transformer orders its attention layers.
    return [*model.double_blocks, *model.single_blocks]


def _hunyuan_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    return _patched_grid(x.shape, model.patch_size)  # (also FLUX: an int patch on a (B, C, H, W) latent)


def _ltxv_layers(model: nn.Module) -> List[nn.Module]:
    return [block.attn1 for block in model.transformer_blocks]


def _ltxv_guide_frames(model: nn.Module, x, call) -> int:
    """The latent frames ComfyUI's ``LTXVAddGuide`` appended after the video (each call of the node appends at most
    its guide's first ``NUM_PREFIX_FRAMES`` latent frames, at the latent's spatial size, and adds their positions to
    ``keyframe_idxs`` ``(B, 3, tokens)``; the model puts those positions on the last ``tokens`` tokens): whole frames
    of the spatial grid, or the call is refused. None without ``keyframe_idxs``: 0."""
    keyframes = (call or {}).get("keyframe_idxs")
    if not hasattr(keyframes, "shape") or keyframes.dim() != 3:
        return 0
    frames, h, w = _patched_grid(x.shape, model.patchifier._patch_size)
    tokens = int(keyframes.shape[2])
    if tokens % (h * w) or tokens // (h * w) >= frames:
        raise ValueError(f"dit_accel: LTX-Video keyframe_idxs of {tokens} guide tokens are not whole frames of the "
                         f"{h} x {w} token grid before at least one video frame of the {frames} latent frames; use "
                         "ComfyUI's own attention for this model")
    return tokens // (h * w)


def _ltxv_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    frames, h, w = _patched_grid(x.shape, model.patchifier._patch_size)  # (1, p, p): its only record of the patch
    return frames - _ltxv_guide_frames(model, x, call), h, w  # the guide frames: dense tokens after the grid


def _ltxv_guide_tokens(model: nn.Module, x, call, grid) -> int:
    """The tokens of ``LTXVAddGuide``'s appended guide frames after the video, exactly: ``keyframe_idxs``'s count
    (0 without guides: a plain call holds the video alone)."""
    return _ltxv_guide_frames(model, x, call) * math.prod(grid[1:])


def _cosmos_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    return _patched_grid(x.shape, (model.patch_temporal, model.patch_spatial, model.patch_spatial))


def _cosmos1_layers(model: nn.Module) -> List[nn.Module]:
    # blocks["block0"], ...: each a sequence of building blocks ("FA-CA-MLP"); the "fa" ones are self-attention
    return [sub.block.attn for block in model.blocks.values() for sub in block.blocks
            if sub.block_type in ("fa", "full_attn")]


def _hidream_layers(model: nn.Module) -> List[nn.Module]:
    return [b.block.attn1 for b in (*model.double_stream_blocks, *model.single_stream_blocks)]


def _hidream_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    # HiDream E1's image_cond is concatenated on the width before patchifying: one wider row-major grid
    cond = (call or {}).get("image_cond")
    width = x.shape[-1] + (int(cond.shape[-1]) if hasattr(cond, "shape") else 0)
    return _patched_grid((*x.shape[:-1], width), model.patch_size)


def _hidream_text(model: nn.Module, x, call, grid) -> Optional[int]:
    """T5 tokens, then the Llama-3.1 tokens twice (the last listed layer's, kept with T5 through the double blocks,
    and each block's own layer), after the image in every block."""
    context, llama = call.get("context"), call.get("encoder_hidden_states_llama3")
    if not hasattr(context, "shape") or not hasattr(llama, "shape"):
        return None
    return int(context.shape[1]) + 2 * int(llama.shape[-2])


def _mochi_layers(model: nn.Module) -> List[nn.Module]:
    return [block.attn for block in model.blocks]


def _mochi_grid(model: nn.Module, x, call=None) -> Tuple[int, ...]:
    return _patched_grid(x.shape, (1, model.patch_size, model.patch_size))  # no temporal patch


def _mochi_text(model: nn.Module, x, call, grid) -> Optional[int]:
    """The text tokens of Mochi's joint attention: the first ``num_tokens`` of ``context`` (``crop_y``; ComfyUI's
    GenmoMochi sets it to the count of valid tokens, the forward's default where the mask is absent)."""
    context, num_tokens = call.get("context"), call.get("num_tokens")
    if not hasattr(context, "shape") or not isinstance(num_tokens, int):
        return None
    return min(num_tokens, int(context.shape[1]))


def _sd3_layers(model: nn.Module) -> List[nn.Module]:
    # Per joint block its joint attention, then SD3.5's image self-attention (x_block.attn2), as Diffusers'
    # SD3Transformer2DModel registers transformer_blocks.N.attn and then .attn2.
    layers = []
    for block in model.joint_blocks:
        layers.append(block.x_block.attn)
        if block.x_block.x_block_self_attn:
            layers.append(block.x_block.attn2)
    return layers


def _sd3_caller(frame, q) -> Optional[nn.Module]:
    """The layer module of a call made in ComfyUI's module-level ``_block_mixing(context, x, context_block,
    x_block, ...)``, where no module's ``forward`` names the attention: the ``x_block``'s ``attn2`` for the call on
    its own ``x_qkv2`` (SD3.5's image self-attention), its ``attn`` for the joint call. Under torch.compile the
    frame's locals hold the arguments alone (no ``x_qkv2``): then the call over ``x``'s tokens alone is ``attn2``."""
    if frame.f_code.co_name != "_block_mixing":
        return None
    local = frame.f_locals
    block, second, x = local.get("x_block"), local.get("x_qkv2"), local.get("x")
    if not isinstance(block, nn.Module):
        return None
    if "x_qkv2" not in local and block.x_block_self_attn and isinstance(q, torch.Tensor) and isinstance(x, torch.Tensor):
        return block.attn2 if q.shape[1] == x.shape[1] else block.attn
    return block.attn2 if second is not None and q is second[0] else block.attn


def _sd3_alone(model: nn.Module) -> List[nn.Module]:
    return [b.x_block.attn2 for b in model.joint_blocks if b.x_block.x_block_self_attn]


def _sd3_text(model: nn.Module, x, call, grid) -> int:
    """The tokens before the image in SD3's joint attention, exactly: the ``register_length`` register tokens, then
    ``context`` (ComfyUI's forward_core_with_concat)."""
    context = call.get("context")
    return int(getattr(model, "register_length", 0)) + (int(context.shape[1]) if hasattr(context, "shape") else 0)


def _auraflow(model: nn.Module) -> bool:
    return hasattr(model, "register_tokens") and hasattr(model, "double_layers")  # (a generic class name: MMDiT)


def _aura_layers(model: nn.Module) -> List[nn.Module]:
    return [*(b.attn for b in model.double_layers), *(b.attn for b in model.single_layers)]


def _aura_text(model: nn.Module, x, call, grid) -> Optional[int]:
    """AuraFlow's register tokens (``register_tokens``, 8) prepended to the ``context``: all before the image."""
    context = call.get("context")
    return None if not hasattr(context, "shape") else int(model.register_tokens.shape[1]) + int(context.shape[1])


def _omnigen2_layers(model: nn.Module) -> List[nn.Module]:
    # The image refiner (image alone), then the joint layers; the context and reference-image refiners are not layers.
    return [*(b.attn for b in model.noise_refiner), *(b.attn for b in model.layers)]


def _omnigen2_alone(model: nn.Module) -> List[nn.Module]:
    return [b.attn for b in model.noise_refiner]


def _omnigen2_text(model: nn.Module, x, call, grid) -> Optional[int]:
    """The tokens before the image in OmniGen2's joint layers, exactly: all of ``context`` (the joint layers run no
    mask), then the reference images (``ref_latents``, each padded to whole patches), as ComfyUI concatenates them."""
    context = call.get("context")
    if not hasattr(context, "shape"):
        return None
    return int(context.shape[1]) + _reference_images(model, x, call, grid)


def _hunyuan_video(model: nn.Module) -> bool:
    return len(model.patch_size) == 3 and getattr(model, "vector_in", None) is not None  # (CLIP's pooled vector)


def _hunyuan_image(model: nn.Module) -> bool:
    return len(model.patch_size) == 2


@dataclass(frozen=True)
class Family:
    """One ComfyUI model family.

    Attributes:
        name: what messages and the log call it.
        classes: the ComfyUI ``diffusion_model`` class names it covers (exact names).
        diffusers_class: the Diffusers transformer class of the same model (published settings, plan checks).
        text_position: where text tokens sit in a self-attention call: ``"none"`` (video only; text comes
            through cross-attention), ``"last"`` ([video, text]) or ``"first"`` ([text, video]). A family whose
            calls hold tokens off the grid only in some workflows (Wan's reference image) takes their side, with an
            exact ``off_grid`` that is 0 for the video-alone calls.
        layers: ``diffusion_model -> [module, ...]``: the modules whose ``forward`` makes the video self-attention
            call, in model order (layer ``i`` is the ``i``-th).
        grid: ``(diffusion_model, latent x, the call's arguments by name) -> token grid`` (the video frames only;
            tokens of other frames, as the reference frames of VACE and Animate, sit where ``text_position`` says).
        notes: one line for the docs and the log.
        off_grid: ``(diffusion_model, latent x, call arguments, grid) -> int``: the exact number of tokens off the
            grid (at ``text_position``) in each self-attention call, or None: any number (text, extra frames).
        when: ``diffusion_model -> bool``: for a ComfyUI class several models share (HunyuanVideo's class builds
            HunyuanImage 2.1 too), whether this model is this family's; None: every model of ``classes``.
        hook: the ComfyUI wrapper (``comfy.patcher_extension.WrappersMP``) around each model call that reads its
            grid and step: ``"diffusion_model"`` (the model's forward runs it) or ``"apply_model"`` (the
            ``BaseModel.apply_model`` that calls the model; for a forward that runs no wrapper, as Mochi's). The
            ``grid`` and ``off_grid`` functions get the diffusion model's arguments by name either way.
        references: ``(diffusion_model, latent x, call arguments, grid) -> int``: the exact number of tokens on the
            grid's other side from the text in each self-attention call (reference images: [text, grid, references]
            when text leads, [references, grid, text] when it trails), which run dense as text does; added to
            ``off_grid``'s count. None: none.
        alone: ``diffusion_model -> [module, ...]``: the layers (of ``layers``) whose calls hold the grid alone
            (SD3.5's image self-attention ``attn2``, the image refiners of OmniGen2 and Lumina 2): no token off the grid in their calls;
            ``off_grid`` and ``references`` count the other layers' calls. None: none.
        caller: ``(stack frame, q) -> module or None``: for a model that makes attention calls outside any module's
            ``forward`` (SD3's module-level ``_block_mixing``), the layer module a frame's call belongs to; the
            stack walk asks it before it reads a frame's ``self``. None: the innermost module decides.
        config_keys: ``((Diffusers config key, ComfyUI unet_config key or conversion), ...)``: the entries of the
            model's config that are one value on both hosts (Wan's ``in_channels``, ComfyUI's ``in_dim``), which a
            plan's recorded ``model_config`` is compared on. A conversion is ``get -> value or None`` (``get(name)``:
            the ComfyUI constructor argument ``name``) for an entry ComfyUI holds in another form (HunyuanVideo's
            ``[t, h, w]`` patch as Diffusers' ``patch_size_t`` and ``patch_size``). Empty: not compared.
    """

    name: str
    classes: Tuple[str, ...]
    diffusers_class: str
    text_position: str
    layers: Callable[[nn.Module], List[nn.Module]]
    grid: Callable[[nn.Module, object, dict], Tuple[int, ...]]
    notes: str = ""
    off_grid: Optional[Callable[[nn.Module, object, dict, Tuple[int, ...]], int]] = None
    when: Optional[Callable[[nn.Module], bool]] = None
    hook: str = "diffusion_model"
    references: Optional[Callable[[nn.Module, object, dict, Tuple[int, ...]], int]] = None
    alone: Optional[Callable[[nn.Module], List[nn.Module]]] = None
    caller: Optional[Callable[[object, object], Optional[nn.Module]]] = None
    config_keys: Tuple[Tuple[str, Union[str, Callable[[Callable[[str], object]], object]]], ...] = ()

    def __post_init__(self):
        if self.hook not in HOOKS:
            raise ValueError(f"Family {self.name!r}: hook={self.hook!r} is not one of {', '.join(HOOKS)}")
        if self.references is not None and (self.off_grid is None or self.text_position == "none"):
            raise ValueError(f"Family {self.name!r}: references need a text position and an exact off_grid count")


def _entry(name: str, index: int):
    """Entry ``index`` of ComfyUI's list-valued argument ``name`` (HunyuanVideo's ``[t, h, w]`` patch)."""
    return lambda get: get(name)[index] if isinstance(get(name), (list, tuple)) and len(get(name)) > index else None


def _per_head(width: str, heads: str):
    """The head size: ComfyUI's model width over its heads (Diffusers' ``attention_head_dim``)."""
    def size(get):
        w, h = get(width), get(heads)
        return w // h if is_int(w) and is_int(h) and h > 0 and w % h == 0 else None
    return size


def _listed(*names: str):
    """ComfyUI's arguments ``names`` as one list (Cosmos' patch and maximum sizes, one tuple in Diffusers)."""
    return lambda get: [get(n) for n in names] if all(get(n) is not None for n in names) else None


def _sorted(name: str):
    """ComfyUI's list ``name`` in order (SD3's x_block_self_attn_layers: model_detection lists the layers in the
    checkpoint's key order, "10" before "2"; Diffusers' dual_attention_layers count up)."""
    return lambda get: sorted(get(name)) if isinstance(get(name), (list, tuple)) else None


def _difference(total: str, part: str):
    """ComfyUI's ``total`` less its ``part`` (AuraFlow's single layers: all layers less the double ones)."""
    return lambda get: get(total) - get(part) if is_int(get(total)) and is_int(get(part)) else None


def _context_embedder(field: str):
    """SD3's text projection size ``field`` (in_features, out_features) of ComfyUI's ``context_embedder_config``."""
    def size(get):
        config = get("context_embedder_config")
        params = config.get("params") if isinstance(config, dict) else None
        return params.get(field) if isinstance(params, dict) else None
    return size


# Diffusers' Wan config entries that are ComfyUI's WanModel constructor arguments (its unet_config) one to one: the
# patch embedding's input channels (16 T2V, 36 I2V and Animate, 48 Wan 2.2 TI2V), the head's output channels, blocks,
# heads, their size (ComfyUI's dim over its heads), and the sizes both build the same way. Not compared: qk_norm (a
# norm name against a flag), image_dim and added_kv_proj_dim (ComfyUI tells I2V by model_type), VACE's vace_layers
# (a list of blocks against a count).
_WAN_CONFIG = (("in_channels", "in_dim"), ("out_channels", "out_dim"), ("num_layers", "num_layers"),
               ("num_attention_heads", "num_heads"), ("ffn_dim", "ffn_dim"), ("freq_dim", "freq_dim"),
               ("text_dim", "text_dim"), ("patch_size", "patch_size"), ("cross_attn_norm", "cross_attn_norm"),
               ("eps", "eps"), ("attention_head_dim", _per_head("dim", "num_heads")))


# The other families, each entry checked against ComfyUI's constructor and model_detection and Diffusers' __init__:
# the same quantity on both hosts. Not compared: an out_channels Diffusers defaults to None (FLUX, Chroma, HiDream,
# Lumina 2, Mochi: a record holds None where the model has a number), FLUX's in_channels and patch_size (Diffusers
# counts the 2x2-packed latent with a patch of 1), names of norms and flags that differ (qk_norm, use_adaln_lora),
# entries ComfyUI tells by model class (HunyuanVideo's image_condition_type), and Cosmos' rope_scale (three ratios
# ComfyUI's detection sets per model size). OmniGen2 maps none (no Diffusers class: a plan's record is Lumina 2's,
# another model's config), Chroma Radiance no in_channels (its pixels, not Chroma's packed latent).
_FLUX_BLOCKS = (("num_layers", "depth"), ("num_single_layers", "depth_single_blocks"),
                ("num_attention_heads", "num_heads"), ("attention_head_dim", _per_head("hidden_size", "num_heads")))
_HUNYUAN_CONFIG = (*_FLUX_BLOCKS, ("in_channels", "in_channels"), ("out_channels", "out_channels"),
                   ("mlp_ratio", "mlp_ratio"), ("text_embed_dim", "context_in_dim"), ("rope_theta", "theta"),
                   ("rope_axes_dim", "axes_dim"), ("guidance_embeds", "guidance_embed"))
_HUNYUAN_VIDEO_CONFIG = (*_HUNYUAN_CONFIG, ("patch_size", _entry("patch_size", -1)),
                         ("patch_size_t", _entry("patch_size", 0)), ("pooled_projection_dim", "vec_in_dim"))
_HUNYUAN_IMAGE_CONFIG = (*_HUNYUAN_CONFIG, ("patch_size", "patch_size"), ("use_meanflow", "meanflow"))
_COSMOS_CONFIG = (("in_channels", "in_channels"), ("out_channels", "out_channels"), ("num_layers", "num_blocks"),
                  ("num_attention_heads", "num_heads"), ("attention_head_dim", _per_head("model_channels", "num_heads")),
                  ("mlp_ratio", "mlp_ratio"), ("text_embed_dim", "crossattn_emb_channels"),
                  ("adaln_lora_dim", "adaln_lora_dim"), ("concat_padding_mask", "concat_padding_mask"),
                  ("patch_size", _listed("patch_temporal", "patch_spatial", "patch_spatial")),
                  ("max_size", _listed("max_frames", "max_img_h", "max_img_w")))
_FLUX_CONFIG = (*_FLUX_BLOCKS, ("joint_attention_dim", "context_in_dim"), ("pooled_projection_dim", "vec_in_dim"),
                ("guidance_embeds", "guidance_embed"), ("axes_dims_rope", "axes_dim"))
_CHROMA_RADIANCE_CONFIG = (*_FLUX_BLOCKS, ("joint_attention_dim", "context_in_dim"), ("axes_dims_rope", "axes_dim"),
                           ("approximator_num_channels", "in_dim"), ("approximator_hidden_dim", "hidden_dim"),
                           ("approximator_layers", "n_layers"))
_CHROMA_CONFIG = (*_CHROMA_RADIANCE_CONFIG, ("in_channels", "in_channels"))  # both the packed latent's channels
_SAME_NAMES = ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads")
_QWEN_CONFIG = tuple((k, k) for k in (*_SAME_NAMES, "out_channels", "joint_attention_dim", "axes_dims_rope"))
_HIDREAM_CONFIG = tuple((k, k) for k in (*_SAME_NAMES, "num_single_layers", "caption_channels", "text_emb_dim",
                                         "num_routed_experts", "num_activated_experts", "axes_dims_rope",
                                         "max_resolution", "llama_layers"))
_LUMINA_CONFIG = (("patch_size", "patch_size"), ("in_channels", "in_channels"), ("hidden_size", "dim"),
                  ("num_layers", "n_layers"), ("num_refiner_layers", "n_refiner_layers"),
                  ("num_attention_heads", "n_heads"), ("num_kv_heads", lambda get: get("n_kv_heads") or get("n_heads")),
                  ("multiple_of", "multiple_of"), ("ffn_dim_multiplier", "ffn_dim_multiplier"), ("norm_eps", "norm_eps"),
                  ("axes_dim_rope", "axes_dims"), ("axes_lens", "axes_lens"), ("cap_feat_dim", "cap_feat_dim"))
_LTXV_CONFIG = (("in_channels", "in_channels"), ("out_channels", "in_channels"), ("num_layers", "num_layers"),
                ("num_attention_heads", "num_attention_heads"), ("attention_head_dim", "attention_head_dim"),
                ("cross_attention_dim", "cross_attention_dim"), ("caption_channels", "caption_channels"))
_MOCHI_CONFIG = (("patch_size", "patch_size"), ("in_channels", "in_channels"), ("num_layers", "depth"),
                 ("num_attention_heads", "num_heads"), ("attention_head_dim", _per_head("hidden_size_x", "num_heads")),
                 ("pooled_projection_dim", "hidden_size_y"), ("text_embed_dim", "t5_feat_dim"))
# SD3: ComfyUI's MMDiT has ``depth`` blocks of ``depth`` heads (of 64: a hidden size of 64 * depth).
_SD3_CONFIG = (("in_channels", "in_channels"), ("out_channels", "out_channels"), ("patch_size", "patch_size"),
               ("num_layers", "depth"), ("num_attention_heads", "depth"), ("pooled_projection_dim", "adm_in_channels"),
               ("joint_attention_dim", _context_embedder("in_features")),
               ("caption_projection_dim", _context_embedder("out_features")),
               ("pos_embed_max_size", "pos_embed_max_size"), ("dual_attention_layers", _sorted("x_block_self_attn_layers")))
_AURAFLOW_CONFIG = (("in_channels", "in_channels"), ("out_channels", "out_channels"), ("patch_size", "patch_size"),
                    ("num_mmdit_layers", "n_double_layers"), ("num_single_dit_layers", _difference("n_layers",
                                                                                                  "n_double_layers")),
                    ("num_attention_heads", "n_heads"), ("attention_head_dim", _per_head("dim", "n_heads")),
                    ("joint_attention_dim", "cond_seq_dim"), ("caption_projection_dim", "dim"),
                    ("pos_embed_max_size", "max_seq"))

FAMILIES: Tuple[Family, ...] = (
    # [ref_conv reference, video, Phantom subject frames]: a plain call has neither, its calls the video alone
    Family("Wan", ("WanModel", "CameraWanModel"), "WanTransformer3DModel", "first", _wan_layers, _wan_grid,
           "Wan 2.1 and 2.2, T2V and I2V (the I2V image tokens go through cross-attention, which stays dense); "
           "Wan Fun Camera (CameraWanModel: camera conditions add to the patch embedding; no Diffusers class); "
           "Wan 2.2 Fun's reference image (ref_conv, before the video) and Phantom's subject frames "
           "(time_dim_concat, after it) dense", _ref_conv_tokens, references=_time_concat_tokens,
           config_keys=_WAN_CONFIG),
    Family("Wan HuMo", ("HumoWanModel",), "WanTransformer3DModel", "last", _wan_layers, _wan_grid,
           "Wan HuMo (no Diffusers class: Wan 2.1's settings): blocks.*.self_attn; the reference latent frames "
           "appended after the video run dense, audio cross-attention dense", config_keys=_WAN_CONFIG),
    Family("Wan VACE", ("VaceWanModel",), "WanVACETransformer3DModel", "first", _vace_layers, _vace_grid,
           "Wan VACE: blocks.*.self_attn then vace_blocks.*.self_attn (the control stream, same tokens); leading "
           "reference frames dense", _leading_frames,
           config_keys=(*_WAN_CONFIG, ("vace_in_channels", "vace_in_dim"))),
    Family("Wan Animate", ("AnimateWanModel",), "WanAnimateTransformer3DModel", "first", _wan_layers,
           _animate_grid, "Wan 2.2 Animate: blocks.*.self_attn; the leading reference frame dense, face adapter "
           "and CLIP/text cross-attention dense", _leading_frames, config_keys=_WAN_CONFIG),
    Family("HunyuanVideo", ("HunyuanVideo",), "HunyuanVideoTransformer3DModel", "last", _hunyuan_layers,
           _hunyuan_grid, "HunyuanVideo T2V and I2V: double blocks then single blocks, [video, text] with padded "
           "text masked; a ref_latent (before the video) dense", _text_tokens, _hunyuan_video,
           references=_reference_latent, config_keys=_HUNYUAN_VIDEO_CONFIG),
    Family("HunyuanImage 2.1", ("HunyuanVideo",), "HunyuanImageTransformer2DModel", "last", _hunyuan_layers,
           _hunyuan_grid, "HunyuanImage 2.1 (image; ComfyUI's HunyuanVideo class with a 2-D patch): double blocks "
           "then single blocks, [image, text] (Qwen2.5-VL tokens, then ByT5's), padded text masked", _text_tokens,
           _hunyuan_image, config_keys=_HUNYUAN_IMAGE_CONFIG),
    Family("Cosmos 1", ("GeneralDIT",), "CosmosTransformer3DModel", "none", _cosmos1_layers, _cosmos_grid,
           "Cosmos 1 (text/video to world): blocks.blockN's full-attention building blocks over video only",
           config_keys=_COSMOS_CONFIG),
    Family("HiDream", ("HiDreamImageTransformer2DModel",), "HiDreamImageTransformer2DModel", "last",
           _hidream_layers, _hidream_grid, "HiDream-I1 (image): double then single stream blocks, [image, T5, "
           "Llama-3.1 x 2]; MoE feed-forward untouched", _hidream_text, config_keys=_HIDREAM_CONFIG),
    Family("Cosmos", ("MiniTrainDIT",), "CosmosTransformer3DModel", "none", _wan_layers, _cosmos_grid,
           "Cosmos Predict2 (text/image to image and video): blocks.*.self_attn over video only",
           config_keys=_COSMOS_CONFIG),
    Family("FLUX", ("Flux",), "FluxTransformer2DModel", "first", _hunyuan_layers, _hunyuan_grid,
           "FLUX.1 dev, schnell and Kontext (image): double blocks then single blocks, [text, image]; Kontext's "
           "reference images (after the image) dense", _text_tokens, references=_reference_images,
           config_keys=_FLUX_CONFIG),
    Family("Chroma", ("Chroma",), "ChromaTransformer2DModel", "first", _hunyuan_layers, _hunyuan_grid,
           "Chroma (image): double blocks then single blocks, [text, image]", _text_tokens, config_keys=_CHROMA_CONFIG),
    Family("Qwen-Image", ("QwenImageTransformer2DModel",), "QwenImageTransformer2DModel", "first", _qwen_layers,
           _image_grid, "Qwen-Image and Qwen-Image-Edit (image): transformer_blocks.*.attn over [text, image]; "
           "Edit's reference images (after the image) dense", _text_tokens, references=_reference_images,
           config_keys=_QWEN_CONFIG),
    Family("Lumina 2", ("NextDiT",), "Lumina2Transformer2DModel", "first", _lumina_layers, _lumina_grid,
           "Lumina Image 2.0 (image): noise_refiner.*.attention (image alone), then layers.*.attention over "
           "[caption, image]; the caption refiner dense", _lumina_text, alone=_lumina_alone,
           config_keys=_LUMINA_CONFIG),
    # [video, guide frames]: LTXVAddGuide's appended frames (keyframe_idxs) dense; a plain call the video alone
    Family("LTX-Video", ("LTXVModel",), "LTXVideoTransformer3DModel", "last", _ltxv_layers, _ltxv_grid,
           "LTX-Video: transformer_blocks.*.attn1 over the video; LTXVAddGuide's guide frames (appended after "
           "the video, keyframe_idxs) dense", _ltxv_guide_tokens, config_keys=_LTXV_CONFIG),
    Family("Mochi", ("AsymmDiTJoint",), "MochiTransformer3DModel", "last", _mochi_layers, _mochi_grid,
           "Mochi 1 preview: blocks.*.attn over [video, valid text] (padded text cut off); grid read around "
           "apply_model", _mochi_text, hook="apply_model", config_keys=_MOCHI_CONFIG),
    # SD3's forward runs no diffusion-model wrapper: its grid is read around apply_model, as Mochi's
    Family("SD3", ("OpenAISignatureMMDITWrapper",), "SD3Transformer2DModel", "first", _sd3_layers, _hunyuan_grid,
           "Stable Diffusion 3 and 3.5 (image): joint_blocks.* over [text, image], each block's SD3.5 image "
           "self-attention (x_block.attn2) after it; grid read around apply_model", _sd3_text, hook="apply_model",
           alone=_sd3_alone, caller=_sd3_caller, config_keys=_SD3_CONFIG),
    Family("AuraFlow", ("MMDiT",), "AuraFlowTransformer2DModel", "first", _aura_layers, _hunyuan_grid,
           "AuraFlow (image): double_layers.*.attn then single_layers.*.attn over [8 register tokens, text, image]",
           _aura_text, _auraflow, config_keys=_AURAFLOW_CONFIG),
    Family("OmniGen2", ("OmniGen2Transformer2DModel",), "Lumina2Transformer2DModel", "first", _omnigen2_layers,
           _hunyuan_grid, "OmniGen2 (image; no Diffusers class: Lumina-Image 2.0's settings, the backbone it "
           "extends: an image refiner, then joint layers, a 2-D grid): noise_refiner.*.attn (image alone), then "
           "layers.*.attn over [text, reference images, image]; the text and reference-image refiners and the "
           "reference tokens dense; grid read around apply_model", _omnigen2_text, hook="apply_model",
           alone=_omnigen2_alone),
    Family("Chroma Radiance", ("ChromaRadiance",), "ChromaTransformer2DModel", "first", _hunyuan_layers,
           _hunyuan_grid, "Chroma Radiance (pixel-space Chroma, image; no Diffusers class: Chroma's settings, the same "
           "double and single blocks over [text, image], its pixels patchified by a Conv2d into the same row-major "
           "2-D grid)", _text_tokens, config_keys=_CHROMA_RADIANCE_CONFIG),
)


#: ComfyUI classes (and models of a shared class) dit_accel refuses, with why: ``(class name, when, reason)``.
REFUSED: Tuple[Tuple[str, Optional[Callable[[nn.Module], bool]], str], ...] = (
    ("WanModel_S2V", None, "its blocks do not pass transformer_options on to self-attention, so ComfyUI's attention "
                           "override never sees those calls"),
    ("HunyuanVideo", lambda m: len(m.patch_size) == 3 and getattr(m, "vector_in", None) is None,
     "a HunyuanVideo-class model with a 3-D patch and no CLIP vector input (HunyuanImage 2.1's refiner) is not "
     "tested: its token layout is not checked"),
    ("PixArtMS", None, "PixArt-alpha / Sigma: its self-attention (AttentionKVCompress) calls ComfyUI's attention "
                       "without transformer_options, so ComfyUI's attention override never sees those calls"),
    ("HunYuanDiT", None, "HunyuanDiT: its self-attention (hydit Attention) calls ComfyUI's attention without "
                         "transformer_options, so ComfyUI's attention override never sees those calls"),
    ("Hunyuan3Dv2", None, "Hunyuan3D 2.0 generates a 3-D shape latent, a set of tokens with no image or video grid"),
    ("HunYuanDiTPlain", None, "Hunyuan3D 2.1 generates a 3-D shape latent, a set of tokens with no image or video "
                              "grid"),
    ("ACEStepTransformer2DModel", None, "ACE-Step generates audio: its tokens are one sequence over time, no image "
                                        "or video grid"),
)

#: What to do about a model dit_accel does not cover (the end of its refusals).
WHAT_TO_DO = ("use ComfyUI's own attention for it: bypass or remove the dit_accel node on this model's path (the model "
              "runs as before)")


def supported() -> str:
    """The covered ComfyUI classes, for messages."""
    return ", ".join(f"{c} ({f.name})" for f in FAMILIES for c in f.classes)


def refusal(diffusion_model: nn.Module) -> Optional[str]:
    """Why dit_accel refuses this ComfyUI ``diffusion_model`` (a known class it cannot place), or None."""
    name = type(diffusion_model).__name__
    for cls, when, reason in REFUSED:
        if name == cls and (when is None or when(diffusion_model)):
            return f"dit_accel: the ComfyUI model {name} is not covered: {reason}; {WHAT_TO_DO}"
    return None


def family_for(diffusion_model: nn.Module) -> Optional[Family]:
    """The family of a ComfyUI ``diffusion_model`` (by exact class name and the family's ``when``), or None."""
    name = type(diffusion_model).__name__
    for family in FAMILIES:
        if name in family.classes and (family.when is None or family.when(diffusion_model)):
            return family
    return None
