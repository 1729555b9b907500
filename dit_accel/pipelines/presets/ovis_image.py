"""Ovis-Image (``OvisImageTransformer2DModel``, FLUX.1's block layout): latents packed (B, N, C), one token per
2x2 latent patch; position ids ``img_ids`` (0, h, w); joint attention [text, image] (text first) in the double-
and single-stream blocks (``transformer_blocks.*.attn``, ``single_transformer_blocks.*.attn``) over a 2-D grid
read from ``img_ids``. ``OvisImageAttnProcessor`` calls Diffusers' dispatcher, whose native backend ends in SDPA;
the pipeline passes no mask (the prompt embeddings are zeroed where padded)."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    h, w = raster_ids(tensor_arg(args, "img_ids"), x.shape[1], "Ovis-Image image")
    return GridInfo((h, w), text_len(args))


PRESETS = (
    Preset(
        "OvisImageTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Ovis-Image
        notes="Ovis-Image; joint attention [text, image], 2-D grid (H, W) from img_ids",
        hub_words=((r"ovis[._-]?image", None),),
    ),
)
