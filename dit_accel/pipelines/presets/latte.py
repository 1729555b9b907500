"""Latte (``LatteTransformer3DModel``): latent (B, C, F, H, W); spatial and temporal blocks alternate.
A spatial block (``transformer_blocks.*.attn1``) attends over the (H/p, W/p) tokens of ONE frame (batch
B*F); a temporal block (``temporal_transformer_blocks.*.attn1``) over the F frames of one spatial position
(batch B*H*W/p^2). No call sees a 3-D (T, H, W) grid, so a 3-D pattern has no meaning here: dit_accel makes
the spatial self-attention sparse as a 2-D (H/p, W/p) grid (2-D windows / tiles) and leaves the short
temporal attention (F tokens) and the text cross-attention dense."""

from __future__ import annotations

from ._common import SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, video_latent

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args)  # (B, C, F, H, W)
    p = model.config.patch_size
    return GridInfo((split_patch(x.shape[3], p, "height"), split_patch(x.shape[4], p, "width")), 0)


PRESETS = (
    Preset(
        "LatteTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # spatial only: temporal_transformer_blocks stay dense
        text_position="none",
        grid_dims=2,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        # No published sparse-attention setting for Latte is known: dit_accel defaults (2-D, per frame).
        defaults={"tile": {"method": {"tile": (8, 8), "window": (3, 3)}, "apply": {"dense_steps": 10}},
                  "gna": {"method": {"kernel_size": (17, 17)}, "apply": {"dense_steps": 10}},
                  "sla": SLA_DEFAULT},
        notes="Latte T2V; spatial self-attention transformer_blocks.*.attn1 per frame as a 2-D grid "
              "(temporal attention dense); radial (a temporal rule) does not apply",
        hub_words=((r"latte", None),),
        refused_methods={"radial": "Radial is a rule over frames, and Latte's sparse calls (its spatial blocks) "
                                   "each see the (H, W) grid of one frame, never the frames together; use GNA or "
                                   "Tile (2-D windows per frame)"},
    ),
)
