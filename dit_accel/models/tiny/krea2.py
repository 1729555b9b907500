"""Tiny Krea 2 (``Krea2Transformer2DModel``): the bare ``"krea2"`` transformer, packed latents on a (10, 13) grid,
a stack of 2 text-encoder layers per text token, grouped-query attention (2 query heads, 1 key/value head) and
the combined (L + N, 3) position ids its pipeline builds; single-stream [text, image] with the text key mask."""

from __future__ import annotations

import torch

from ._common import TinyTransformer, image_ids

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels),
                encoder_hidden_states=rnd(batch, text, cfg.num_text_layers, cfg.text_hidden_dim), timestep=t / 1000,
                position_ids=torch.cat([torch.zeros(text, 3), image_ids(grid)]), encoder_attention_mask=mask.bool(),
                return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "krea2", "Krea2Transformer2DModel",
        dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
             text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
             num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
