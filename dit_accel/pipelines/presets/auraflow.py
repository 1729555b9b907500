"""AuraFlow (``AuraFlowTransformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p) in raster order;
joint attention [text, image] in the MMDiT blocks (``joint_transformer_blocks.*.attn``) and the single DiT blocks
(``single_transformer_blocks.*.attn``, one [text, image] sequence). The text slot holds the model's learned
register tokens followed by the prompt tokens; both run dense. ``AuraFlowAttnProcessor2_0`` ends in
``F.scaled_dot_product_attention``."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, shapes_key, split_patch, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W)
    p = model.config.patch_size
    registers = int(model.register_tokens.shape[1])  # prepended to the text in every call
    return GridInfo((split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")),
                    text_len(args) + registers)


PRESETS = (
    Preset(
        "AuraFlowTransformer2DModel",
        attention=(r"joint_transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for AuraFlow
        notes="AuraFlow; joint attention [register + text, image] in the MMDiT and single DiT blocks",
        hub_words=((r"auraflow", None),),
    ),
)
