"""Qwen-Image (``QwenImageTransformer2DModel``): latents packed (B, N, C) in 2x2 patches; the grid is
``img_shapes`` (frames, H, W) per sample; joint attention [text, image] with a text padding mask
(``encoder_hidden_states_mask``).

Qwen-Image-Edit and Qwen-Image-Layered append more images (further ``img_shapes`` entries) after the
generated one: the sequence is [text, image, more images]. The first image is the grid; the tokens of the
others sit in mid-sequence after it and keep exact (dense) rows and columns, like the text
(``GridInfo.num_after``)."""

from __future__ import annotations

import math

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, tensor_arg, text_len

__all__ = ["PRESETS"]


def _shapes(args) -> tuple:
    """The (F, H, W) shapes of the first sample's images (``img_shapes``: one shape, one shape per sample, or a list of
    shapes per sample)."""
    shapes = args.get("img_shapes")
    if shapes is None:
        raise ValueError("dit_accel: the Qwen-Image transformer was called without img_shapes; cannot read the grid")
    if isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)) and shapes[0] \
            and isinstance(shapes[0][0], (list, tuple)):
        per_sample = [tuple(tuple(int(v) for v in s) for s in sample) for sample in shapes]
        if any(sample != per_sample[0] for sample in per_sample):
            raise ValueError("dit_accel: the samples of this Qwen-Image call have different img_shapes; use the dense "
                             "model")
        return per_sample[0]
    if isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
        # A flat list of (F, H, W) is one image per sample (the form Diffusers' QwenImagePipeline passed before
        # nesting it): the model's rotary reads the first entry alone, as its one image, whatever the batch.
        per_sample = [tuple(int(v) for v in s) for s in shapes]
        if any(s != per_sample[0] for s in per_sample):
            raise ValueError(f"dit_accel: the samples of this Qwen-Image call have different img_shapes {per_sample}; "
                             "use the dense model")
        return (per_sample[0],)
    return (tuple(int(v) for v in shapes),)


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    shapes = _shapes(args)
    f, h, w = shapes[0]
    total = sum(math.prod(s) for s in shapes)
    if f != 1 or total != x.shape[1]:
        raise ValueError(f"dit_accel: this {type(model).__name__} call's img_shapes {list(shapes)} ({total} tokens, "
                         f"first image of {f} frames) do not describe its {x.shape[1]} image tokens; dit_accel cannot "
                         "place them: use the dense model")
    after = total - h * w
    return GridInfo((h, w), text_len(args) + after, num_after=after)


def _key(args):
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    shapes = args.get("img_shapes")
    try:
        shapes = _shapes(args)
    except (ValueError, TypeError):
        return None
    return (x.shape if x is not None else None), (text.shape if text is not None else None), shapes


PRESETS = (
    Preset(
        "QwenImageTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn",),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for Qwen-Image
        notes="Qwen-Image; joint attention [text, image] with padded-text key mask, 2-D grid from img_shapes; "
              "Edit/Layered images after the first exact like text",
        hub_words=((r"qwen-?image", None),),
    ),
)
