"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``): latent (B, C, H, W), patch ``config.patch_size``, raster
grid (H/p, W/p).

``noise_refiner.*.attn`` is self-attention over the image tokens alone; ``context_refiner.*.attn`` attends over
the caption alone (left alone); the main ``layers.*.attn`` attend over [caption, image] (text first), where the
caption is each sample's *valid* tokens only (``encoder_attention_mask``): the model puts each sample's image
right after its own caption. Samples whose prompts have different valid lengths therefore have their images
at different offsets: such calls are refused with the reason (``Lumina2Pipeline`` runs the conditional and the
unconditional prompt in separate calls, so one prompt, or prompts of one token length, per call works)."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, latent_grid_2d, tensor_arg

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    grid = latent_grid_2d(model, args).grid
    lengths = tensor_arg(args, "encoder_attention_mask").sum(dim=1).tolist()  # the model syncs on this too
    if len(set(lengths)) > 1:
        raise ValueError(f"dit_accel: the samples of this Lumina-Image 2.0 call have prompts of different valid "
                         f"lengths {lengths}; the model puts each image after its own caption, at different offsets, "
                         "which dit_accel cannot place: call the transformer with one prompt per call (or prompts "
                         "of one token length), or use the dense model")
    return GridInfo(grid, int(lengths[0]))


PRESETS = (
    Preset(
        "Lumina2Transformer2DModel",
        attention=(r"noise_refiner\.\d+\.attn", r"layers\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for Lumina-Image 2.0
        notes="Lumina-Image 2.0; image refiner self-attention and joint attention [caption, image], 2-D grid "
              "(H, W); caption refiner dense; calls whose prompts differ in valid length refused",
        hub_words=((r"lumina[._-]?(image[._-]?)?2", None),),
    ),
)
