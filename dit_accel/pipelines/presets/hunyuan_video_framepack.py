"""HunyuanVideo FramePack (``HunyuanVideoFramepackTransformer3DModel``): refused (no single token grid)."""

from __future__ import annotations

from ._common import Preset

__all__ = ["PRESETS"]

PRESETS = (
    Preset.refusing(
        "HunyuanVideoFramepackTransformer3DModel",
        "each call packs clean history latents at three resolutions (1x, 2x, 4x compressed: "
        "indices_latents_history_*) and an image-conditioning frame ahead of the new section's frames, so the "
        "joint sequence is not one regular (T, H, W) grid; run it dense. What would work: a preset whose grid is "
        "the new section only, with the packed history handled densely like text (not implemented)",
        hub_words=((r"framepack", None),),
    ),
)
