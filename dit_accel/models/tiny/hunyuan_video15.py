"""Tiny HunyuanVideo 1.5: the bare ``"hunyuan15"`` transformer (``HunyuanVideo15Transformer3DModel``), token grid
(4, 8, 8) after the 2x2 patch; joint [video, image + ByT5 + MLLM text] with the MLLM text padding mask (the
ByT5 projection's fixed 2048-wide hidden layer makes it the largest tiny model: about 4 M parameters)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

_BYT5, _IMAGE = 3, 2  # ByT5 and image tokens beside the `text` MLLM tokens


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    import torch

    f, h, w = grid
    p, pt = cfg.patch_size, cfg.patch_size_t
    return dict(hidden_states=rnd(batch, cfg.in_channels, f * pt, h * p, w * p), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                encoder_hidden_states_2=rnd(batch, _BYT5, cfg.text_embed_2_dim),
                encoder_attention_mask_2=torch.ones(batch, _BYT5, dtype=torch.long),
                image_embeds=rnd(batch, _IMAGE, cfg.image_embed_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "hunyuan15", "HunyuanVideo15Transformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
             text_embed_2_dim=12, image_embed_dim=8, rope_axes_dim=(4, 6, 6)),
        grid=(4, 8, 8), text=6, inputs=_inputs,
    ),
)
