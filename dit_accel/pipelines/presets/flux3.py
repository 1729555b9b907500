"""FLUX.3 (``Flux3Transformer2DModel``): latents packed (B, N, C), one token per latent patch; position ids
``(t, h, w, l)``; the grid (H, W) is the rows x cols of ``img_ids``.

Each token mode first runs per-mode blocks that attend within that mode only: ``mode_blocks.image.*.attn``
(self-attention over the image grid, wrapped), ``txt_mode_blocks.*.attn`` (text only, left alone) and
``mode_blocks.image_cond.*.attn`` (reference images only, left alone). The joint blocks
``single_transformer_blocks.*.attn`` attend over [text, image] (text first).

Calls with reference images (``image_cond_hidden_states``, image-to-image) append the reference tokens after
the image in the joint sequence ([text, image, reference]): they keep exact (dense) rows and columns, like the
text (``GridInfo.num_after``); the reference-mode blocks attend within the references and are left alone."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    h, w = raster_ids(tensor_arg(args, "img_ids"), x.shape[1], "FLUX.3 image")
    cond = args.get("image_cond_hidden_states")  # (B, M, C'): the reference tokens, after the image when joint
    after = int(cond.shape[1]) if isinstance(cond, torch.Tensor) else 0
    return GridInfo((h, w), text_len(args) + after, num_after=after)


PRESETS = (
    Preset(
        "Flux3Transformer2DModel",
        attention=(r"mode_blocks\.image\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for FLUX.3
        notes="FLUX.3; image-mode self-attention and joint attention [text, image], 2-D grid (H, W) from img_ids; "
              "text-mode blocks dense; reference images (image_cond_hidden_states) exact like text",
        hub_words=((r"flux[._-]?3", None),),
    ),
)
