"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): Wan's layout: latent (B, C, F, H, W), patch (pt, ph, pw),
self-attention ``blocks.*.attn1`` over video only. Diffusion forcing with ``num_frame_per_block > 1`` adds a
block-causal mask to every self-attention: not one window pattern, so it is refused at the call."""

from __future__ import annotations

from ._common import (
    RADIAL_VIDEO,
    WAN_DEFAULTS,
    GridInfo,
    Preset,
    patched_video_grid,
    text_len,
)

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    if getattr(model.config, "num_frame_per_block", 1) > 1:
        raise ValueError("dit_accel: this SkyReels-V2 transformer has num_frame_per_block="
                         f"{model.config.num_frame_per_block}: its self-attention is block-causal (autoregressive "
                         "diffusion forcing), not one token grid; run it dense or with num_frame_per_block=1")
    grid = patched_video_grid(model, args)
    return GridInfo(grid, text_len(args))


PRESETS = (
    Preset(
        "SkyReelsV2Transformer3DModel",
        attention=(r"blocks\.\d+\.attn1",),  # attn2 is cross-attention: stays dense
        text_position="none",
        grid_dims=3,
        read_grid=_grid,
        # Read every call (shapes only): SkyReelsV2DiffusionForcingPipeline sets num_frame_per_block on the model
        # (_set_ar_attention) between calls of one shape, and a cached grid skipped the block-causal refusal
        grid_key=None,
        min_diffusers="0.42.1",
        defaults={**WAN_DEFAULTS, "radial": RADIAL_VIDEO},  # Wan 2.1's: nothing published for SkyReels-V2
        notes="SkyReels-V2 T2V/I2V (Wan layout); self-attention blocks.*.attn1; block-causal DF refused",
        hub_words=((r"skyreels", None),),
    ),
)
