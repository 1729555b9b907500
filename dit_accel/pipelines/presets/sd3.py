"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): latent (B, C, H, W), patch p, grid (H/p, W/p);
joint attention ``transformer_blocks.*.attn`` over [image, text] (text last) and, in SD3.5's dual-attention
blocks, self-attention ``attn2`` over the image only."""

from __future__ import annotations

from ._common import SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W)
    p = model.config.patch_size
    return GridInfo((split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")), text_len(args))


PRESETS = (
    Preset(
        "SD3Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"transformer_blocks\.\d+\.attn2"),
        text_position="last",
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults={  # dit_accel defaults: no published setting for SD3
            "tile": {"method": {"tile": (8, 8), "window": (3, 3)}, "apply": {"dense_steps": 7}},
            "gna": {"method": {"kernel_size": (32, 32)}, "apply": {"dense_steps": 7}},
            "sla": SLA_DEFAULT},
        notes="Stable Diffusion 3 / 3.5; joint attention [image, text] (+ SD3.5 image self-attention attn2), "
              "2-D grid (H, W)",
        hub_words=((r"stable-diffusion-3|sd3", None),),
    ),
)
