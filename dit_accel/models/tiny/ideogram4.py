"""Tiny Ideogram 4 (``Ideogram4Transformer2DModel``): the bare ``"ideogram4"`` transformer on the packed sequence
``Ideogram4Pipeline`` builds, [left padding, text, image] per sample, image grid (10, 13) (packed (B, S, 8) latents,
zero on the text), text features zero on the image, ``position_ids`` with the image's raster offset past the text,
``segment_ids`` 1 on text and image and -1 on the padding (``text_valid``: the prompt's length, padded on the left)."""

from __future__ import annotations

import torch

from ._common import TinyTransformer, image_ids

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR,
                                                                     OUTPUT_IMAGE_INDICATOR)

    n = grid[0] * grid[1]
    s = text + n
    ids = torch.zeros(batch, s, 3, dtype=torch.long)
    ids[:, text:] = image_ids(grid).long() + IMAGE_POSITION_OFFSET
    segment = torch.full((batch, s), -1, dtype=torch.long)
    role = torch.zeros(batch, s, dtype=torch.long)
    role[:, text:] = OUTPUT_IMAGE_INDICATOR
    segment[:, text:] = 1
    for b, valid in enumerate(mask.sum(1).tolist()):  # left padding, as the pipeline
        ids[b, text - valid:text] = torch.arange(valid)[:, None]
        role[b, text - valid:text] = LLM_TOKEN_INDICATOR
        segment[b, text - valid:text] = 1
    latents = torch.cat([torch.zeros(batch, text, cfg.in_channels), rnd(batch, n, cfg.in_channels)], 1)
    features = torch.cat([rnd(batch, text, cfg.llm_features_dim), torch.zeros(batch, n, cfg.llm_features_dim)], 1)
    return dict(hidden_states=latents, timestep=t / 1000, encoder_hidden_states=features * (role != 0)[..., None],
                position_ids=ids, segment_ids=segment, indicator=role, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "ideogram4", "Ideogram4Transformer2DModel",
        dict(in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=64,
             adaln_dim=16, llm_features_dim=16, rope_theta=10000, mrope_section=(4, 2, 2)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
