"""CogView4 (``CogView4Transformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p); joint
self-attention ``transformer_blocks.*.attn1`` over [text, image] (text first).

A call with ``attention_mask`` (batched prompts of different lengths) gets a full (S, S) float mask from
the processor, which is not a key padding mask: those calls run dense (with a warning)."""

from __future__ import annotations

from ._common import SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W)
    p = model.config.patch_size
    return GridInfo((split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")), text_len(args))


PRESETS = (
    Preset(
        "CogView4Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults={  # dit_accel defaults: no published setting for CogView4
            "tile": {"method": {"tile": (8, 8), "window": (3, 3)}, "apply": {"dense_steps": 7}},
            "gna": {"method": {"kernel_size": (32, 32)}, "apply": {"dense_steps": 7}},
            "sla": SLA_DEFAULT},
        notes="CogView4; joint attention [text, image], 2-D grid (H, W); calls with attention_mask run dense",
        hub_words=((r"cogview-?4", None),),
    ),
)
