"""Nucleus-Image (``NucleusMoEImageTransformer2DModel``): a single-stream DiT with mixture-of-experts MLPs. Latents
packed (B, N, C) in 2x2 patches, row-major (the pipeline's ``_pack_latents``); the grid is ``img_shapes`` (frames, H,
W) per sample, as the model's ``NucleusMoEEmbedRope`` reads it (the first sample's shapes, for the whole batch).

Only the image has queries: each block's ``transformer_blocks.*.attn`` (``NucleusMoEAttnProcessor2_0``) attends the
image's queries against [image, text] keys (text last; the text keys and values are the block's own projections of
the prompt, or the same ones from Diffusers' text KV cache), through ``dispatch_attention_fn`` (native SDPA), with
grouped key/value heads repeated before it. ``encoder_hidden_states_mask`` becomes a bool key-padding mask
(B, N + L), 1 on the image: padded text keys are excluded exactly.

Calls whose ``img_shapes`` do not describe one 1-frame image of the call's N tokens (several images per sample,
several frames, samples of different sizes) are refused at the call with the reason."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, tensor_arg, text_len

__all__ = ["PRESETS"]


def _shape(value) -> tuple:
    """One ``(frames, height, width)`` entry as ints; ValueError for anything else."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or any(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(f"dit_accel: a NucleusMoE-Image img_shapes entry {value!r} is not one (frames, height, width) "
                         "shape; cannot read the token grid")
    return tuple(int(v) for v in value)


def _shapes(args) -> tuple:
    """The image shapes the model's RoPE lays out: ``img_shapes`` as one shape, or per sample (a shape, or a list of
    shapes per sample; the model reads the first sample's)."""
    shapes = args.get("img_shapes")
    if shapes is None:
        raise ValueError("dit_accel: the NucleusMoE-Image transformer was called without img_shapes; cannot read the "
                         "token grid")
    if not isinstance(shapes, list):  # (the model wraps anything but a list as one shape)
        return (_shape(shapes),)
    if not shapes:
        raise ValueError("dit_accel: the NucleusMoE-Image transformer was called with empty img_shapes; cannot read "
                         "the token grid")
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"dit_accel: the samples of this NucleusMoE-Image call have different img_shapes {shapes}; "
                         "the model lays out every sample by the first one's, so dit_accel cannot place the others: "
                         "call each size separately, or use the dense model")
    first = shapes[0]
    return tuple(_shape(s) for s in first) if isinstance(first, list) else (_shape(first),)


def _grid(model, args) -> GridInfo:
    n = int(tensor_arg(args, "hidden_states").shape[1])  # (B, N, C)
    shapes = _shapes(args)
    f, h, w = shapes[0]
    if len(shapes) != 1 or f != 1 or h * w != n:
        raise ValueError(f"dit_accel: this NucleusMoE-Image call's img_shapes {list(shapes)} are not one image of "
                         f"one frame over its {n} image tokens (several images or frames in one sequence); dit_accel "
                         "places one (H, W) grid: use the dense model for this call")
    return GridInfo((h, w), text_len(args))


def _key(args):
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    if not isinstance(x, torch.Tensor):
        return None
    try:
        shapes = _shapes(args)
    except (ValueError, TypeError):
        return None
    return x.shape, (text.shape if isinstance(text, torch.Tensor) else None), shapes


PRESETS = (
    Preset(
        "NucleusMoEImageTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn",),
        text_position="last",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Nucleus-Image
        notes="Nucleus-Image (MoE); the image's queries against [image, text] keys (text last), 2-D grid (H, W) "
              "from img_shapes; padded text keys masked; several images or frames per call refused",
        hub_words=((r"nucleus-?moe", None),),  # NucleusAI/NucleusMoE-Image (the NucleusMoEImagePipeline docstring)
    ),
)
