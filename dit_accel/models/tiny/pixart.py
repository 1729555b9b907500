"""Tiny PixArt-alpha / PixArt-Sigma (``PixArtTransformer2DModel``): the bare ``"pixart"`` transformer, image grid (10, 13)
after the 2x2 patch; the text by cross-attention."""

from __future__ import annotations

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


TRANSFORMERS = (
    TinyTransformer(
        "pixart", "PixArtTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=32, caption_channels=16, sample_size=32, patch_size=2, norm_num_groups=2,
             use_additional_conditions=False),
        grid=GRID, text=7, inputs=_pixart,
    ),
)
