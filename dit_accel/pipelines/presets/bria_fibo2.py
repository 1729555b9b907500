"""Bria FIBO 2 (``BriaFibo2Transformer2DModel``): Z-Image's single-stream blocks, not FIBO's. Latent (B, C, H, W),
patch p (``_patchify``: row-major patches): grid (H/p, W/p) in raster order. ``context_latents`` (edit calls) are more
images of their own sizes, patchified the same way and appended after the generated image.

The text never enters the self-attention: the Perceiver (``perceiver``, left dense) squeezes the first text bundle
into gist tokens, whose count ``compute_gist_count`` takes from the prompts' text lengths, and the injection blocks
read the other bundles by cross-attention (``layers.*.cross_attention``, dense). Self-attention sees:

- ``noise_refiner.*.attention``: [image, context images], no mask;
- ``layers.*.attention``: [gist, image, context images], no mask, when every prompt of the batch gets the same
  gist count. The gist is the text here (text first); the context images' tokens run exact like it
  (``GridInfo.num_after``). A batch whose prompts get different gist counts pads the gist and moves it last,
  [image, context images, gist] under a key mask: those calls are refused (``BriaFibo2Pipeline`` runs its negative
  prompt as a pass of its own, so one prompt per call always places)."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, split_patch, tensor_arg

__all__ = ["PRESETS"]


def _gist_counts(model, args, text: torch.Tensor) -> list:
    from diffusers.models.transformers.transformer_bria_fibo2 import compute_gist_count

    mask = args.get("encoder_attention_mask")
    lengths = mask.sum(dim=1).tolist() if isinstance(mask, torch.Tensor) else [text.shape[2]] * text.shape[0]
    c = model.config
    return compute_gist_count(lengths, min_gist=c.min_num_gist_tokens, max_gist=c.max_num_gist_tokens,
                              gist_step=c.gist_step, min_text_len=c.gist_min_text_len,
                              max_text_len=c.gist_max_text_len)


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W)
    text = tensor_arg(args, "encoder_hidden_states")  # (B, 1 + injection blocks, L, D)
    p = model.config.patch_size
    grid = (split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width"))
    counts = _gist_counts(model, args, text)
    if min(counts) != max(counts):
        raise ValueError(f"dit_accel: the prompts of this Bria FIBO 2 call get different gist token counts "
                         f"({counts}, from their text lengths), so the model pads the gist and moves it after the "
                         "image and context tokens, [image, context, gist] under a key mask, where dit_accel places "
                         "this class's gist first; call with prompts of one gist count (one prompt per call, as "
                         "BriaFibo2Pipeline runs its negative prompt) or use the dense model")
    after = sum(split_patch(c.shape[-2], p, "context height") * split_patch(c.shape[-1], p, "context width")
                for c in args.get("context_latents") or ())
    return GridInfo(grid, counts[0] + after, num_after=after)


def _key(args):
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    if not isinstance(x, torch.Tensor) or not isinstance(text, torch.Tensor) or \
            args.get("encoder_attention_mask") is not None:
        return None  # (a text mask's values set the gist counts: read every call)
    return x.shape, text.shape, tuple(tuple(c.shape) for c in args.get("context_latents") or ())


PRESETS = (
    Preset(
        "BriaFibo2Transformer2DModel",
        attention=(r"noise_refiner\.\d+\.attention", r"layers\.\d+\.attention"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for FIBO 2
        notes="Bria FIBO 2; self-attention [gist, image, context images] (the gist: the Perceiver's summary of the "
              "text), 2-D grid (H, W) from the latent; noise refiner sparse too; context images exact; text "
              "cross-attention and Perceiver dense; batches whose prompts get different gist counts refused",
        hub_words=((r"fibo[._-]?2", None),),  # briaai/Fibo-2.0-dev (FIBO's word excludes it)
    ),
)
