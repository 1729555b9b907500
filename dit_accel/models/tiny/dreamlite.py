"""Tiny DreamLite (``DreamLiteTransformer2DModel``): the bare ``"dreamlite"`` spatial transformer on a (B, 32, 10, 13)
feature map (grid (10, 13)), with the released U-Net's knobs (RMS q/k norm, one key/value head) and the processor
the U-Net sets (``DreamLiteAttnProcessor2_0``: keys and values repeated to the query heads); text by
cross-attention."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    return dict(hidden_states=rnd(batch, cfg.in_channels, h, w),
                encoder_hidden_states=rnd(batch, text, cfg.cross_attention_dim), return_dict=False)


def _unet_processor(model) -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.unets.unet_dreamlite import DreamLiteAttnProcessor2_0

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(DreamLiteAttnProcessor2_0())


TRANSFORMERS = (
    TinyTransformer(
        "dreamlite", "DreamLiteTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2, norm_num_groups=8,
             cross_attention_dim=16, qk_norm="rms_norm", num_kv_heads=1, ff_mult=2),
        grid=(10, 13), text=7, inputs=_inputs, tune=_unet_processor,
    ),
)
