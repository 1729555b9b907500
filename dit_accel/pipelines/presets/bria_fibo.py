"""Bria FIBO (``BriaFiboTransformer2DModel``): FLUX.1's block layout with per-block text-encoder layers; latents
packed (B, N, C) (one token per latent pixel, or per 2x2 patch); position ids ``img_ids`` (t, h, w); joint
attention [text, image] (text first) in the double-stream (``transformer_blocks.*.attn``) and single-stream
(``single_transformer_blocks.*.attn``) blocks over a 2-D grid read from ``img_ids``. Its own module, not Bria
3.x's: another transformer (its own file and pipelines in Diffusers), call and hub ids.

The pipelines pad the prompt and, when a prompt is padded, pass a bool key-padding mask ``(B, 1, 1, S)`` through
``joint_attention_kwargs`` (1 on the image): padded text keys are excluded exactly. ``BriaFiboEditPipeline``
appends each reference image's tokens after the generated image's, on its own RoPE plane (t = 1, 2, ...): the
sequence is [text, image, references]. The image is the grid (the leading run of t = 0); the reference tokens
keep exact (dense) rows and columns, like the text (``GridInfo.num_after``)."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, leading_raster

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    return leading_raster(args, "Bria FIBO image")  # (B, N, C) latents; edit calls' images after the grid


PRESETS = (
    Preset(
        "BriaFiboTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for FIBO
        notes="Bria FIBO; joint attention [text, image, references], 2-D grid (H, W) from img_ids; padded text "
              "keys masked; FIBO Edit's reference-image tokens exact like text",
        # before Bria 3.x's "bria" (its ids hold it: "briaai/FIBO"); FIBO 2 ("briaai/Fibo-2.0-dev") is another class
        hub_words=((r"fibo(?![._-]?2)", None),),
    ),
)
