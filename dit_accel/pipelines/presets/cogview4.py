"""CogView4 (``CogView4Transformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p); joint
self-attention ``transformer_blocks.*.attn1`` over [text, image] (text first).

A call with ``attention_mask`` (the text's padding mask (B, text), batched prompts of different lengths) gets a
float (B, 1, S, S) mask ``m_i * m_j`` of 0 / 1 from the processor, *added* to the scores, with ``m`` the text
mask followed by ones on the image: ``Preset.additive_mask``, so those calls run sparse and exact (the text
keys' bias in the dense text branch, the text queries' own rows dense)."""

from __future__ import annotations

from ._common import (
    IMAGE_DEFAULTS,
    Preset,
    latent_grid_2d,
    shapes_key,
)

__all__ = ["PRESETS"]


PRESETS = (
    Preset(
        "CogView4Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        grid_dims=2,
        read_grid=latent_grid_2d,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for CogView4
        notes="CogView4; joint attention [text, image], 2-D grid (H, W); the text attention_mask (an additive "
              "0 / 1 square mask) runs exactly",
        additive_mask=lambda args, info: True,  # the processor's m is 1 on every image token by construction
        hub_words=((r"cogview-?4", None),),
    ),
)
