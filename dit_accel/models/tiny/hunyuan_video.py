"""Tiny HunyuanVideo: the bare ``"hunyuan"`` transformer (double- and single-stream blocks, text padding mask)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                pooled_projections=rnd(batch, cfg.pooled_projection_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "hunyuan", "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)),
        grid=(4, 8, 8), text=6, inputs=_inputs,
    ),
)
