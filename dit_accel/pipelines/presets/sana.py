"""Sana (``SanaTransformer2DModel``): refused. Its self-attention (``transformer_blocks.*.attn1``) is *linear*
attention (``SanaLinearAttnProcessor2_0``: ReLU feature maps, no softmax and no SDPA call), already linear in
the token count, so there is no softmax attention to make block-sparse; the text reaches the image through
softmax cross-attention (``attn2``), which is not self-attention."""

from __future__ import annotations

from ._common import Preset

__all__ = ["PRESETS"]

PRESETS = (
    Preset.refusing(
        "SanaTransformer2DModel",
        "its self-attention is linear attention (SanaLinearAttnProcessor2_0: ReLU features, no softmax and no "
        "scaled_dot_product_attention call), already linear in the number of tokens: there is no softmax "
        "attention for GNA, Tile, Radial or SLA to make sparse. Run Sana as it is",
        min_diffusers="0.42.1",
        notes="Sana: refused (linear self-attention, nothing to sparsify)",
        hub_words=((r"sana(?!-?video)", None),),
    ),
)
