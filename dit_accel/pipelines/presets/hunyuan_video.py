"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): latent (B, C, F, H, W), token grid
(F/patch_size_t, H/p, W/p); joint attention [video, text] in the double- and single-stream blocks."""

from __future__ import annotations

from ._common import (
    latent_grid_3d,
    RADIAL_REPO,
    SLA_DEFAULT,
    Preset,
    Published,
    shapes_key,
)

__all__ = ["PRESETS"]


_PUBLISHED = (
    Published("HunyuanVideo", "radial", {"decay": 0.95, "block_size": 128, "sink_frames": (), "rule": "reference"},
              {"dense_steps": 12}, "768x1280, 117 frames, 50 steps", (30, 48, 80),
              f"{RADIAL_REPO} scripts/hunyuan_t2v_inference.sh (dense_layers 0); no sink: radial_attn/attn_mask.py"),
    Published("HunyuanVideo", "tile", {"tile": (6, 8, 8), "window": (3, 3, 3)}, {"dense_steps": 15},
              "768x1280, 117 frames, 50 steps", (30, 48, 80),
              "STA paper (Zhang et al., arXiv:2502.04507) as calibrated in docs/METHODS.md; the searched per-head "
              "windows: FastVideo assets/mask_strategy_hunyuan.json through Tile.from_strategy"),
)

PRESETS = (
    Preset(
        "HunyuanVideoTransformer3DModel",
        # Double- and single-stream blocks; token_refiner (text only) is left alone.
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="last",
        grid_dims=3,
        read_grid=latent_grid_3d,
        grid_key=shapes_key,
        min_diffusers="0.35.0",
        defaults={  # radial and tile: see published
            "gna": {"method": {"kernel_size": (18, 24, 24), "stride": (6, 8, 8)}, "apply": {"dense_steps": 15}},
            "sla": SLA_DEFAULT,
        },
        notes="HunyuanVideo; joint attention [video, text] with padded-text key mask",
        published=_PUBLISHED,
        # HunyuanImage ids name their own family, also under the "hunyuanvideo-community" organisation
        hub_words=((r"^(?!.*hunyuan-?image).*hunyuan", "HunyuanVideo"),),
    ),
)
