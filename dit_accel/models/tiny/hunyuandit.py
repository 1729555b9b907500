"""Tiny HunyuanDiT (``HunyuanDiT2DModel``): the bare ``"hunyuandit"`` transformer, image grid (10, 13) after the
2x2 patch; CLIP and T5 text by cross-attention, 2-D rotary embeddings as the pipeline builds them."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

GRID = (10, 13)


def _hunyuandit(cfg, grid, batch, text, rnd, t, mask):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    h, w = grid
    p = cfg.patch_size
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotary = get_2d_rotary_pos_embed(head_dim, ((0, 0), (h, w)), (h, w), use_real=True)
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                encoder_hidden_states=rnd(batch, cfg.text_len, cfg.cross_attention_dim),
                text_embedding_mask=torch.ones(batch, cfg.text_len, dtype=torch.long),
                encoder_hidden_states_t5=rnd(batch, cfg.text_len_t5, cfg.cross_attention_dim_t5),
                text_embedding_mask_t5=torch.ones(batch, cfg.text_len_t5, dtype=torch.long),
                image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch),
                style=torch.zeros(batch, dtype=torch.long), image_rotary_emb=rotary, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "hunyuandit", "HunyuanDiT2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=32,
             hidden_size=32, num_layers=2, mlp_ratio=2.0, cross_attention_dim=16, cross_attention_dim_t5=24,
             pooled_projection_dim=16, text_len=7, text_len_t5=9, learn_sigma=False),
        grid=GRID, text=7, inputs=_hunyuandit,
    ),
)
