"""Tiny Cosmos: the bare ``"cosmos"`` transformer (``CosmosTransformer3DModel``), token grid (4, 8, 8)
after the (1, 2, 2) patch; ``concat_padding_mask`` off (its resize needs torchvision)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    x = rnd(batch, cfg.in_channels, f * pt, h * ph, w * pw)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim),
                fps=24, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "cosmos", "CosmosTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8, max_size=(16, 32, 32), patch_size=(1, 2, 2),
             rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False),  # the padding-mask channel needs torchvision
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
