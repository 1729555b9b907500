"""ERNIE-Image (``ErnieImageTransformer2DModel``): a single-stream DiT. Latent (B, C, H, W), patch p (a strided
conv, flattened row-major): grid (H/p, W/p) in raster order. The padded text ``text_bth`` (B, Tmax, D) follows the
image in one sequence, [image, text] (text last), and every block's ``layers.*.self_attention`` attends over all of
it. The per-sample ``text_lens`` become a bool key-padding mask (B, 1, 1, N + Tmax), 1 on the image: the padded text
keys are excluded exactly (the rows of padded text queries attend the valid keys, as in the dense model).
``ErnieImageSingleStreamAttnProcessor`` calls Diffusers' ``dispatch_attention_fn`` (native SDPA)."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, split_patch, tensor_arg

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W)
    text = tensor_arg(args, "text_bth")  # (B, Tmax, D), padded
    p = model.config.patch_size
    return GridInfo((split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")), int(text.shape[1]))


def _key(args):
    x, text = args.get("hidden_states"), args.get("text_bth")
    if not isinstance(x, torch.Tensor) or not isinstance(text, torch.Tensor):
        return None
    return x.shape, text.shape


PRESETS = (
    Preset(
        "ErnieImageTransformer2DModel",
        attention=(r"layers\.\d+\.self_attention",),
        text_position="last",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published sparse setting for ERNIE-Image
        notes="ERNIE-Image; single-stream joint attention [image, text], 2-D grid (H, W); padded text keys masked",
        # no hub words: Diffusers names no ERNIE-Image hub id
    ),
)
