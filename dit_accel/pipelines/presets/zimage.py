"""Z-Image (``ZImageTransformer2DModel``): latents are a list of (C, F, H, W) tensors, one per sample, patched
``patch_size`` (spatial) by ``f_patch_size`` (frames), arguments of the call; raster grid (H/p, W/p).

The image tokens are padded to a multiple of the model's sequence unit with pad tokens, which every token
attends to. ``noise_refiner.*.attention`` is self-attention over [image, pad]; ``context_refiner.*.attention``
attends over the caption alone (left alone); the main ``layers.*.attention`` attend over [image, pad, caption,
caption pad] (image first: text position "last"), with a key mask where the samples' captions differ in padded
length. The pad and caption tokens are handled densely as text.

Omni calls (nested lists: condition images and SigLIP tokens in the sequence) and batches of images of different
sizes are not one grid: they are refused with the reason (dense works)."""

from __future__ import annotations

import inspect

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, split_patch

__all__ = ["PRESETS"]


def _arg(model, args, name):
    """A forward argument, or its default (pipelines call with keywords only: defaults are not bound)."""
    if name in args:
        return args[name]
    return inspect.signature(type(model).forward).parameters[name].default


def _unit() -> int:
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    return SEQ_MULTI_OF


def _grid(model, args) -> GridInfo:
    x, caps = args.get("x"), args.get("cap_feats")
    if not isinstance(x, (list, tuple)) or not x or not isinstance(caps, (list, tuple)) or not caps:
        raise ValueError("dit_accel: the Z-Image transformer was called without lists x and cap_feats; cannot read "
                         "the token grid")
    if isinstance(x[0], (list, tuple)):
        raise ValueError("dit_accel: this is a Z-Image Omni call (condition images and SigLIP tokens beside the "
                         "target image in one sequence), which is not one token grid; dit_accel cannot place it: "
                         "use the dense model (plain text-to-image calls work)")
    shapes = [tuple(t.shape) for t in x]
    if any(s != shapes[0] for s in shapes) or len(shapes[0]) != 4:
        raise ValueError(f"dit_accel: the images of this Z-Image call have shapes {shapes}; dit_accel needs one "
                         "(C, F, H, W) latent size for the whole batch: call each size separately, or use the "
                         "dense model")
    p, pf = int(_arg(model, args, "patch_size")), int(_arg(model, args, "f_patch_size"))
    _, f, h, w = shapes[0]
    if split_patch(f, pf, "frames") != 1:
        raise ValueError(f"dit_accel: Z-Image latents of {f} frames (f_patch_size {pf}) are not one image grid; "
                         "use the dense model")
    grid = (split_patch(h, p, "height"), split_patch(w, p, "width"))
    unit, n = _unit(), grid[0] * grid[1]
    pad = -n % unit
    caption = max(len(c) + (-len(c) % unit) for c in caps)
    return GridInfo(grid, pad + caption)  # tokens beside the image: its pad and the (padded) caption


def _key(args):
    x, caps = args.get("x"), args.get("cap_feats")
    if not isinstance(x, (list, tuple)) or not isinstance(caps, (list, tuple)) or not x or \
            isinstance(x[0], (list, tuple)):
        return None
    return (tuple(tuple(t.shape) for t in x), tuple(len(c) for c in caps), args.get("patch_size"),
            args.get("f_patch_size"))


PRESETS = (
    Preset(
        "ZImageTransformer2DModel",
        attention=(r"noise_refiner\.\d+\.attention", r"layers\.\d+\.attention"),
        text_position="last",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for Z-Image
        notes="Z-Image; image refiner self-attention and joint attention [image, pad, caption] (caption key mask), "
              "2-D grid (H, W); caption refiner dense; Omni calls and mixed sizes refused",
        hub_words=((r"(^|[/_-])z[._-]?image", None),),
    ),
)
