"""DiT (``DiTTransformer2DModel``, Peebles and Xie's class-conditional DiT): latent (B, C, H, W), patch p, grid
(H/p, W/p) in raster order (``PatchEmbed``: a strided conv, flattened row-major). Each block
(``BasicTransformerBlock`` with ``ada_norm_zero``) has one attention, ``transformer_blocks.*.attn1``: self-attention
over the image tokens only. There is no text: the class label and timestep condition the blocks through adaLN-Zero.
``AttnProcessor2_0`` ends in ``F.scaled_dot_product_attention``.

The model unpatchifies its output as a square (``height = width = sqrt(N)``), so its pipeline's calls are square
latents; the attention itself is the (H/p, W/p) raster of whatever latent it gets."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, Preset, image_only_grid_2d, shapes_key

__all__ = ["PRESETS"]

PRESETS = (
    Preset(
        "DiTTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="none",
        grid_dims=2,
        read_grid=image_only_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        # dit_accel defaults: no published sparse setting for DiT. At DiT's own sizes the grids are small
        # (256 px: 16x16, 512 px: 32x32 tokens), where these windows cover most or all of the grid.
        defaults=dict(IMAGE_DEFAULTS),
        notes="DiT (class-conditional, ImageNet); self-attention transformer_blocks.*.attn1 over the image only "
              "(no text; class label by adaLN-Zero); grids 16x16 / 32x32 at 256 / 512 px",
        hub_words=((r"(^|/)dit[._-]", None),),  # facebook/DiT-XL-2-256 (the DiTPipeline docstring)
    ),
)
