"""Wan VACE (``WanVACETransformer3DModel``): latent (B, C, F, H, W), patch (pt, ph, pw); self-attention
``blocks.*.attn1`` and ``vace_blocks.*.attn1`` (the control stream, padded to the same length and order).

The VACE pipeline prepends its reference-image latents as leading frames of both ``hidden_states`` and
``control_hidden_states``; in the control stream a reference frame carries zeros in every channel after the
first ``in_channels`` (its "reactive" latent and its mask). Those leading frames are read from the call and
run densely, like text placed first; the sparse grid is the frames after them."""

from __future__ import annotations

import torch

from ._common import RADIAL_VIDEO, WAN_DEFAULTS, GridInfo, Preset, split_patch, video_latent

__all__ = ["PRESETS"]


def _reference_frames(model, control) -> int:
    """Leading latent frames of ``control_hidden_states`` that are reference images (all-zero beyond the
    first ``in_channels`` channels, in every sample)."""
    if not isinstance(control, torch.Tensor) or control.dim() != 5 or control.shape[1] <= model.config.in_channels:
        return 0
    tail = control[:, model.config.in_channels:]
    zero = (tail == 0).flatten(3).all(dim=-1).all(dim=1).all(dim=0)  # (F,) a frame is all-zero in every sample
    nonzero = (~zero).nonzero()
    return int(zero.shape[0] if nonzero.numel() == 0 else nonzero[0, 0])


def _grid(model, args) -> GridInfo:
    x = video_latent(args)  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    frames = split_patch(x.shape[2], pt, "frames")
    h, w = split_patch(x.shape[3], ph, "height"), split_patch(x.shape[4], pw, "width")
    refs = _reference_frames(model, args.get("control_hidden_states"))
    if refs % pt:
        raise ValueError(f"dit_accel: {refs} reference frames are not a multiple of the temporal patch {pt}")
    refs //= pt
    if refs >= frames:
        raise ValueError("dit_accel: every latent frame of the call reads as a VACE reference frame; no video grid")
    return GridInfo((frames - refs, h, w), refs * h * w)


PRESETS = (
    Preset(
        "WanVACETransformer3DModel",
        attention=(r"blocks\.\d+\.attn1", r"vace_blocks\.\d+\.attn1"),  # attn2: cross-attention, dense
        text_position="first",  # the leading reference frames (if any) run dense
        grid_dims=3,
        read_grid=_grid,
        grid_key=None,  # the reference count is read from the control values: read every call
        min_diffusers="0.42.1",
        defaults={**WAN_DEFAULTS, "radial": RADIAL_VIDEO},  # Wan 2.1's: nothing published for VACE
        notes="Wan VACE; self-attention of the main and control blocks; leading reference frames dense",
        hub_words=((r"vace", None),),
    ),
)
