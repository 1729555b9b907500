"""Chroma (``ChromaTransformer2DModel``): FLUX.1-style, latents packed (B, N, C) in 2x2 patches; the grid is
the rows x cols of ``img_ids``; joint attention [text, image] (text first).

Chroma's pipeline passes ``attention_mask`` ``m`` (B, S): 1 on the valid text tokens, the first padding one and every
image token, 0 on the rest of the padding, in the dtype of the prompt embeddings. The blocks turn it into the
float (B, 1, S, S) mask ``m_i * m_j``, which SDPA *adds* to the scores (a bias of 1, not a mask): an image query adds
1 to every image key and to the valid text keys. ``Preset.additive_mask`` runs that exactly: the image part sparse
without a bias, the padded text keys at -1 in the dense text branch, the text queries dense with their own rows.
A call whose ``m`` is not 1 on every image token runs dense (with a warning)."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg, text_len

__all__ = ["PRESETS"]


def _image_mask_ones(args, info: GridInfo) -> bool:
    """Whether the call's ``attention_mask`` is 1 on every image token (one device sync per transformer call)."""
    m = args.get("attention_mask")
    return (isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[1] == info.num_text + info.num_video
            and bool((m[:, info.num_text:] == 1).all()))


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C)
    h, w = raster_ids(tensor_arg(args, "img_ids"), x.shape[1], "Chroma image")
    return GridInfo((h, w), text_len(args))


PRESETS = (
    Preset(
        "ChromaTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Chroma
        notes="Chroma; joint attention [text, image], 2-D grid from img_ids; the pipeline's additive text mask "
              "runs exactly (text keys in the dense branch)",
        additive_mask=_image_mask_ones,
        hub_words=((r"chroma", None),),
    ),
)
