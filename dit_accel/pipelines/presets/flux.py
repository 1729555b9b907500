"""FLUX.1 (``FluxTransformer2DModel``): latents packed (B, N, C) in 2x2 patches; the image grid is the
rows x cols of ``img_ids``; joint attention [text, image] over a 2-D grid (H, W). FLUX.1 Kontext calls are
[text, image, reference image]: the reference tokens keep exact rows and columns, like the text."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, leading_raster

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    # (B, N, C) packed 2x2 latent patches; img_ids (N, 3): (index, row, col). FLUX.1 Kontext appends its reference
    # image's tokens at index 1 after the generated image's (index 0): exact, like the text.
    return leading_raster(args, "FLUX.1 image")


PRESETS = (
    Preset(
        "FluxTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.35.0",
        defaults=dict(IMAGE_DEFAULTS),
        notes="FLUX.1 image model; joint attention [text, image], 2-D grid (H, W); Kontext's reference image "
              "after the image exact like text",
        hub_words=((r"flux", None),),
    ),
)
