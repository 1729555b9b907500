"""JoyImage Edit (``JoyImageEditTransformer3DModel``) and JoyImage Edit Plus (``JoyImageEditPlusTransformer3DModel``):
dual-stream blocks with WAN-style modulation whose joint attention (``double_blocks.*.attn``) runs one SDPA call over
[image tokens, text] (text last, ``JoyImageAttnProcessor`` / ``JoyImageEditPlusAttnProcessor`` through Diffusers'
dispatcher), patch (pt, ph, pw) = (1, 2, 2).

JoyImage Edit is called with ``(B, N, C, T, H, W)`` latents of N items (``JoyImageEditPipeline``: the noise alone, or
[reference image, noise]); ``forward`` moves the last item (the generated image) first and concatenates the items
along time, so its image tokens are one (N*T, H, W) raster under one rotary grid: [image, reference, text]. The
pipelines give every item one latent frame, so the generated image is the (H, W) grid; the reference image's tokens
after it keep exact (dense) rows and columns like the text (``text_position="last"``: everything after the grid).

JoyImage Edit Plus takes pre-patchified ``(B, P, C, pt, ph, pw)`` latents and ``shape_list``, per sample the
``(t, h, w)`` of [generated image, references...] laid end to end (each in raster order, its own rotary grid at a
growing time offset), padded to P; ``encoder_hidden_states_mask`` becomes a bool (B, 1, 1, S) key mask over [image
patches (1 on the real ones), text]. The first entry (the generated image, one frame) is the (H, W) grid; the
references, the padding and the text follow it and run exact, the mask kept on their keys.

Calls whose generated image has more than one latent frame are refused: they are videos, not the (H, W) grid."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, split_patch, tensor_arg, text_len

__all__ = ["PRESETS"]


def _one_frame(model, t: int, h: int, w: int, where: str) -> None:
    if t != 1:
        raise ValueError(f"dit_accel: this {type(model).__name__} call's generated image ({where}) has {t} latent "
                         f"frames of {h}x{w} tokens; dit_accel places JoyImage's image as one (H, W) grid of one "
                         "frame, as JoyImage's pipelines call it: use the dense model for this call")


def _edit_grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, T, H, W), or (B, N, C, T, H, W) with the generated item last
    if x.dim() not in (5, 6):
        raise ValueError(f"dit_accel: hidden_states of shape {tuple(x.shape)} is neither a (B, C, T, H, W) nor a "
                         "(B, N, C, T, H, W) JoyImage latent")
    items = x.shape[1] if x.dim() == 6 else 1
    pt, ph, pw = tuple(model.config.patch_size)
    t, h, w = (split_patch(x.shape[-3], pt, "frames"), split_patch(x.shape[-2], ph, "height"),
               split_patch(x.shape[-1], pw, "width"))
    _one_frame(model, t, h, w, "the last item of hidden_states")
    after = (items - 1) * h * w  # the reference items, behind the generated one in forward's order
    return GridInfo((h, w), text_len(args) + after)


def _parsed(shapes) -> tuple:
    """``shape_list`` as a tuple per sample of tuples of ints (``()`` when it is not nested so)."""
    try:
        return tuple(tuple(tuple(int(v) for v in thw) for thw in sample) for sample in shapes)
    except TypeError:
        return ()


def _shape_list(model, args) -> tuple:
    """``shape_list`` as a tuple per sample of ``(t, h, w)`` tuples; ValueError when it cannot be read."""
    shapes = args.get("shape_list")
    per_sample = _parsed(shapes)
    if not per_sample or any(not sample or any(len(thw) != 3 for thw in sample) for sample in per_sample):
        raise ValueError(f"dit_accel: this {type(model).__name__} call has no shape_list of (t, h, w) per item and "
                         f"sample ({shapes!r}); cannot read the token grid")
    return per_sample


def _plus_grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, P, C, pt, ph, pw): patches of [image, references..., padding]
    shapes = _shape_list(model, args)
    targets = {sample[0] for sample in shapes}
    if x.dim() != 6 or len(shapes) != x.shape[0] or len(targets) != 1:
        raise ValueError(f"dit_accel: this {type(model).__name__} call's shape_list ({len(shapes)} samples, "
                         f"generated images of (t, h, w) {sorted(targets)}) does not give the samples of its "
                         f"hidden_states of shape {tuple(x.shape)} one generated-image size; use the dense model")
    t, h, w = targets.pop()
    _one_frame(model, t, h, w, "the first entry of shape_list")
    if max(sum(a * b * c for a, b, c in sample) for sample in shapes) > x.shape[1]:
        raise ValueError(f"dit_accel: this {type(model).__name__} call's shape_list names more tokens than its "
                         f"{x.shape[1]} patches; use the dense model")
    return GridInfo((h, w), text_len(args) + x.shape[1] - h * w)


def _plus_key(args):
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    shapes = _parsed(args.get("shape_list"))
    return (getattr(x, "shape", None), getattr(text, "shape", None), shapes) if shapes else None


def _edit_key(args):
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    return (x.shape, getattr(text, "shape", None)) if hasattr(x, "shape") else None


PRESETS = (
    Preset(
        "JoyImageEditTransformer3DModel",
        attention=(r"double_blocks\.\d+\.attn",),
        text_position="last",  # [image, reference image, text]: all after the grid runs exact
        grid_dims=2,
        read_grid=_edit_grid,
        grid_key=_edit_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for JoyImage
        notes="JoyImage Edit; joint attention [image, reference image, text], 2-D grid (H, W) of the generated "
              "image (one latent frame); the reference image's tokens exact like text",
        hub_words=((r"joyai-?image-?edit(?!-?plus)", None),),
    ),
    Preset(
        "JoyImageEditPlusTransformer3DModel",
        attention=(r"double_blocks\.\d+\.attn",),
        text_position="last",  # [image, references, padding, text] under a bool key mask
        grid_dims=2,
        read_grid=_plus_grid,
        grid_key=_plus_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for JoyImage
        notes="JoyImage Edit Plus; joint attention [image, references, padding, text] with a key mask, 2-D grid "
              "(H, W) of the generated image from shape_list; the references' tokens exact like text",
        hub_words=((r"joyai-?image-?edit-?plus", None),),
    ),
)
