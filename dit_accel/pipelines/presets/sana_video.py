"""Sana-Video (``SanaVideoTransformer3DModel``): refused. Every self-attention layer
(``transformer_blocks.*.attn1``) runs ``SanaLinearAttnProcessor3_0``: ReLU-kernel linear attention computed
with matrix products, with no softmax and no SDPA call; the only SDPA calls are the text cross-attention
(``attn2``). There is no softmax attention over the video tokens for a sparse pattern to replace."""

from __future__ import annotations

from ._common import Preset

__all__ = ["PRESETS"]

PRESETS = (
    Preset.refusing(
        "SanaVideoTransformer3DModel",
        "its self-attention is linear attention (SanaLinearAttnProcessor3_0: ReLU feature maps, no softmax, no "
        "SDPA call), already linear in the token count, so there is no softmax attention over the video grid to "
        "make sparse; its only softmax attention is the text cross-attention, which stays dense. Run it dense "
        "(it is already linear-time) or use a softmax-attention video model (Wan, HunyuanVideo, Cosmos)",
        min_diffusers="0.42.1",
        hub_words=((r"sana-?video", None),),
        notes="Sana-Video: refused (linear attention)",
    ),
)
