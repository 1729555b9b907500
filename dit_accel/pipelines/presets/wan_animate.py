"""Wan Animate (``WanAnimateTransformer3DModel``, Wan 2.2 Animate 14B) and Wan Animate 2 (refused).

Wan Animate: latent (B, 2C + 4, 1 + T, H, W), patch (pt, ph, pw) = (1, 2, 2); self-attention ``blocks.*.attn1``
over the patched frames in (T, H, W) raster order (``patch_embedding`` then ``flatten``). The first patched frame
is the character reference (the pipeline's reference-image latent; the pose latents are added to the frames after
it only), so every call carries ``1 + T`` patched frames. The reference frame is not a time neighbour of frame 1
(it is an appearance reference that every frame needs), so it runs densely, like text placed first; the sparse
grid is the T frames after it. Text (and CLIP image tokens) are cross-attention (``attn2``) and the face motion
signal is the temporally aligned cross-attention of ``face_adapter``: both stay dense.

Wan Animate 2 (``WanAnimate2Transformer3DModel``) is refused: its generation pass does not reach SDPA over a token
grid (see the reason below)."""

from __future__ import annotations

from ._common import RADIAL_VIDEO, WAN_DEFAULTS, GridInfo, Preset, split_patch, video_latent

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args)  # (B, 2C + 4, 1 + T, H, W)
    pt, ph, pw = model.config.patch_size
    frames = split_patch(x.shape[2], pt, "frames")
    h, w = split_patch(x.shape[3], ph, "height"), split_patch(x.shape[4], pw, "width")
    if frames < 2:
        raise ValueError(f"dit_accel: Wan Animate latents of {x.shape[2]} frames hold the reference frame only; "
                         "the call needs the reference frame followed by at least one video frame")
    return GridInfo((frames - 1, h, w), h * w)  # the leading reference frame: dense extra tokens


def _grid_key(args: dict):
    x = args.get("hidden_states")
    return x.shape if hasattr(x, "shape") else None


_ANIMATE2_REASON = (
    "its denoising passes do not run self-attention over one token grid: the generation tokens are scattered "
    "into a buffer sized for the whole video (padded when a segment is smaller), the cached reference tokens are "
    "appended, and Diffusers runs its own flex BlockMask over them on the flex backend (each generation frame "
    "attends to every generation token and to the reference tokens of the same frame index), so there is no SDPA "
    "call a sparse pattern could replace. Use the dense model with its flex mask (compiled, as Diffusers "
    "documents), or WanAnimateTransformer3DModel (Wan 2.2 Animate), which dit_accel supports")

PRESETS = (
    # Wan Animate 2 first: its hub word ("animate-2") is more specific than Wan Animate's.
    Preset.refusing(
        "WanAnimate2Transformer3DModel", _ANIMATE2_REASON, min_diffusers="0.42.1",
        notes="Wan 2.2 Animate 2; refused (flex BlockMask over a packed [generation | reference] buffer)",
        hub_words=((r"wan[^/]*animate-?2(?!\d)", None),),
    ),
    Preset(
        "WanAnimateTransformer3DModel",
        attention=(r"blocks\.\d+\.attn1",),  # attn2: text/CLIP cross-attention; face_adapter: motion cross-attention
        text_position="first",  # the leading reference frame runs dense
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # Nothing published for Wan Animate: Wan 2.1's dit_accel defaults (its base model), radial as for the lineage.
        defaults={**WAN_DEFAULTS, "radial": RADIAL_VIDEO},
        notes="Wan 2.2 Animate; self-attention blocks.*.attn1; the leading reference frame dense, face/pose "
              "conditioning in cross-attention and channels (dense)",
        hub_words=((r"wan[^/]*animate", None),),
    ),
)
