"""Krea 2 (``Krea2Transformer2DModel``): a single-stream DiT. Latents packed (B, N, C); the text arrives as a
stack of text-encoder layers (B, L, layers, D), fused by the model's own text-fusion blocks (attention over the
layer axis and over the text alone: left dense) and concatenated before the image: every block's self-attention
(``transformer_blocks.*.attn``) runs over [text, image] (text first). ``position_ids`` ``(L + N, 3)`` hold the
text at the origin and the image's (0, h, w) raster: the 2-D grid is read from its image rows.

The call's ``encoder_attention_mask`` becomes a bool key-padding mask ``(B, 1, 1, L + N)`` (1 on the image): padded
text keys are excluded exactly. Grouped-query heads are repeated by the processor before SDPA."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    text = tensor_arg(args, "encoder_hidden_states")  # (B, L, layers, D)
    ids = tensor_arg(args, "position_ids")  # (L + N, 3): text rows first
    n, num_text = int(x.shape[1]), int(text.shape[1])
    if ids.dim() != 2 or ids.shape[0] != num_text + n:
        raise ValueError(f"dit_accel: Krea 2 position_ids of shape {tuple(ids.shape)} do not describe the {num_text} "
                         f"text and {n} image tokens of the call; use the dense model")
    h, w = raster_ids(ids[num_text:], n, "Krea 2 image")
    return GridInfo((h, w), num_text)


PRESETS = (
    Preset(
        "Krea2Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn",),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Krea 2
        notes="Krea 2; single-stream joint attention [text, image], 2-D grid (H, W) from position_ids; padded text "
              "keys masked; text-fusion blocks dense",
        hub_words=((r"krea[._-]?2", None),),
    ),
)
