"""Tiny Nucleus-Image (``NucleusMoEImageTransformer2DModel``): the bare ``"nucleusmoe_image"`` transformer, packed
latents on a (10, 13) grid with ``img_shapes`` as its pipeline passes them (one (1, H, W) per sample), grouped-query
attention (2 query heads, 1 key/value head) and the text mask; the image's queries against [image, text] keys.
Its MLPs are dense (``moe_enabled=False``): the experts route tokens, they never change the attention's layout."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), img_shapes=[(1, h, w)] * batch,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), encoder_hidden_states_mask=mask.bool(),
                timestep=t / 1000, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "nucleusmoe_image", "NucleusMoEImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             num_key_value_heads=1, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), mlp_ratio=6.0,
             moe_enabled=False),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
