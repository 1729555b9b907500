"""Tiny JoyImage: the bare ``"joyimage"`` (``JoyImageEditTransformer3DModel``) and ``"joyimage_plus"``
(``JoyImageEditPlusTransformer3DModel``) transformers, called as their pipelines call them for a text-to-image
step: JoyImage Edit with ``(B, 1, C, 1, H, W)`` latents (one item, one frame), JoyImage Edit Plus with
pre-patchified ``(B, P, C, 1, 2, 2)`` latents, ``shape_list`` and the text mask. Dual-stream blocks, text last."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

# hidden 32 over 2 heads: head_dim 16 = the rotary split (t, h, w) of rope_dim_list
_CONFIG = dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
               mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6])


def _edit_inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    _, ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, 1, cfg.in_channels, 1, h * ph, w * pw), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)


def _plus_inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels, *cfg.patch_size), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_dim), encoder_hidden_states_mask=mask,
                shape_list=[[(1, h, w)] for _ in range(batch)], return_dict=False)


TRANSFORMERS = (
    TinyTransformer("joyimage", "JoyImageEditTransformer3DModel", dict(_CONFIG), grid=(10, 12), text=7,
                    inputs=_edit_inputs),
    TinyTransformer("joyimage_plus", "JoyImageEditPlusTransformer3DModel", dict(_CONFIG), grid=(10, 12), text=7,
                    inputs=_plus_inputs),
)
