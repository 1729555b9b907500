"""PRX (``PRXTransformer2DModel``, Photoroom's text-to-image DiT, latent and pixel-space variants): latent or image
(B, C, H, W), patch p (``img2seq``: p x p patches flattened row-major), grid (H/p, W/p) in raster order.

Only the image has queries: each block's ``blocks.*.attention`` (``PRXAttnProcessor2_0``) attends the image's queries
against [text, image] keys (text first: the block's key and value projections of the prompt before the image's),
through ``dispatch_attention_fn`` (native SDPA). The call's ``attention_mask`` (B, L) becomes a bool key-padding mask
(B, 1, 1, L + N), 1 on the image: padded text keys are excluded exactly."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, Preset, latent_grid_2d, shapes_key

__all__ = ["PRESETS"]

PRESETS = (
    Preset(
        "PRXTransformer2DModel",
        attention=(r"blocks\.\d+\.attention",),
        text_position="first",
        grid_dims=2,
        read_grid=latent_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for PRX
        notes="PRX; the image's queries against [text, image] keys (text first), 2-D grid (H, W); padded text keys "
              "masked",
        # Photoroom/prx-512-t2i-sft, Photoroom/prxpixel-t2i (the PRXPipeline and PRXPixelPipeline docstrings)
        hub_words=((r"(^|/)prx", None),),
    ),
)
