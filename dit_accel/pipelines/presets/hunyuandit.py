"""HunyuanDiT (``HunyuanDiT2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p) in raster order; self-
attention ``blocks.*.attn1`` over the image tokens only (CLIP and T5 text reach the image through ``attn2``,
cross-attention, which stays dense). ``HunyuanAttnProcessor2_0`` ends in ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, shapes_key, split_patch, tensor_arg

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W)
    p = model.config.patch_size
    return GridInfo((split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")), 0)


PRESETS = (
    Preset(
        "HunyuanDiT2DModel",
        attention=(r"blocks\.\d+\.attn1",),
        text_position="none",
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for HunyuanDiT
        notes="HunyuanDiT; self-attention blocks.*.attn1 over the image only (CLIP + T5 text by cross-attention, "
              "dense)",
        hub_words=((r"hunyuan-?dit", None),),
    ),
)
