"""Tiny image DiTs still in wide use (issue 38): PixArt-Sigma, HunyuanDiT, AuraFlow, CogView3-Plus and Bria,
bare transformers only (``"pixart"``, ``"hunyuandit"``, ``"auraflow"``, ``"cogview3plus"``, ``"bria"``), each
on a (10, 13) image token grid. Sana and OmniGen are refused by their presets (no tiny model)."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

GRID = (10, 13)


def _pixart(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w),
                encoder_hidden_states=rnd(batch, text, cfg.caption_channels), timestep=t.long(),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, encoder_attention_mask=mask,
                return_dict=False)


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


def _auraflow(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w),
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), timestep=t / 1000, return_dict=False)


def _cogview3plus(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    size = torch.tensor([[8.0 * p * h, 8.0 * p * w]] * batch)
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2), return_dict=False)


def _bria(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=img_ids,
                txt_ids=torch.zeros(text, 3), return_dict=False)


def _louder_attention(model) -> None:
    # AuraFlow's small random adaLN gates leave attention a 1e-4 share of the tiny model's output: louder
    # attention outputs, so a sparse pattern shows in the result.
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            module.to_out[0].weight.mul_(30)
            if getattr(module, "to_add_out", None) is not None:
                module.to_add_out.weight.mul_(30)


TRANSFORMERS = (
    TinyTransformer(
        "pixart", "PixArtTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=32, caption_channels=16, sample_size=32, patch_size=2, norm_num_groups=2,
             use_additional_conditions=False),
        grid=GRID, text=7, inputs=_pixart,
    ),
    TinyTransformer(
        "hunyuandit", "HunyuanDiT2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=32,
             hidden_size=32, num_layers=2, mlp_ratio=2.0, cross_attention_dim=16, cross_attention_dim_t5=24,
             pooled_projection_dim=16, text_len=7, text_len_t5=9, learn_sigma=False),
        grid=GRID, text=7, inputs=_hunyuandit,
    ),
    TinyTransformer(
        "auraflow", "AuraFlowTransformer2DModel",
        dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
             out_channels=4, pos_embed_max_size=256),
        grid=GRID, text=7, inputs=_auraflow, tune=_louder_attention,
    ),
    TinyTransformer(
        "cogview3plus", "CogView3PlusTransformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2, out_channels=4,
             text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=32),
        grid=GRID, text=7, inputs=_cogview3plus,
    ),
    TinyTransformer(
        "bria", "BriaTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[4, 6, 6]),
        grid=GRID, text=7, inputs=_bria,
    ),
)
