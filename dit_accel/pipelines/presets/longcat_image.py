"""LongCat-Image (``LongCatImageTransformer2DModel``, FLUX.1's block layout): latents packed (B, N, C), one token
per 2x2 latent patch; position ids ``img_ids`` (modality, h, w), the generated image at modality 1 with its rows
and columns offset past the text positions; joint attention [text, image] (text first) in the double- and
single-stream blocks (``transformer_blocks.*.attn``, ``single_transformer_blocks.*.attn``; the single blocks
concatenate [text, image] before their attention), over a 2-D grid read from ``img_ids``.

The edit pipeline (``LongCatImageEditPipeline``) appends the input image's latents after the generated image's
tokens, at modality 2: the sequence is [text, image, input image]. The image is the grid (the leading run of
modality 1); the input image's tokens keep exact (dense) rows and columns, like the text
(``GridInfo.num_after``). ``LongCatImageAttnProcessor`` calls Diffusers' dispatcher, whose native backend ends in
SDPA, without a mask."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, leading_raster

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    return leading_raster(args, "LongCat-Image image")  # (B, N, C) latents; edit calls' images after the grid


PRESETS = (
    Preset(
        "LongCatImageTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for LongCat-Image
        notes="LongCat-Image; joint attention [text, image, input image], 2-D grid (H, W) from img_ids; the edit "
              "pipeline's input-image tokens exact like text",
        hub_words=((r"longcat[._-]?image", None),),
    ),
)
