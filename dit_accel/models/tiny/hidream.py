"""Tiny HiDream-I1: the bare ``"hidream"`` transformer (a double- and a single-stream block, MoE feed-forward).

Its default grid is not square, so the model pads the image tokens to ``max_resolution`` (the pad the preset
handles as text)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, h * p, w * p), timesteps=t,
                encoder_hidden_states_t5=rnd(batch, text, cfg.caption_channels[0]),
                encoder_hidden_states_llama3=rnd(len(cfg.llama_layers), batch, text, cfg.caption_channels[1]),
                pooled_embeds=rnd(batch, cfg.text_emb_dim), return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "hidream", "HiDreamImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=1, axes_dims_rope=(4, 6, 6), max_resolution=(32, 32), llama_layers=[0, 1]),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
