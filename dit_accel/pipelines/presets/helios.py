"""Helios (``HeliosTransformer3DModel``, autoregressive long video on a Wan-style backbone): latent
(B, C, F, H, W), patch (pt, ph, pw), token grid (F/pt, H/ph, W/pw) in (T, H, W) raster order; self-attention
``blocks.*.attn1`` (``attn2`` is text cross-attention and stays dense).

Each call of the pipeline packs clean history latents (short 1x, mid 2x, long 4x compressed) AHEAD of the new
chunk's tokens in the same self-attention sequence. They are no part of the chunk's grid, so the preset treats
them like text at the front (``text_position="first"``): history<->anything runs dense, only the new chunk's
video-video attention becomes sparse. The pyramid pipeline's stages each call one grid (read per call)."""

from __future__ import annotations

from ._common import LARGE_VIDEO_DEFAULTS, GridInfo, Preset, patched_video_grid

__all__ = ["PRESETS"]

# (latents, indices, the Conv3d that patches it, the padding Diffusers' pad_for_3d_conv applies first)
_HISTORY = (("latents_history_short", "indices_latents_history_short", "patch_short", (1, 1, 1)),
            ("latents_history_mid", "indices_latents_history_mid", "patch_mid", (2, 4, 4)),
            ("latents_history_long", "indices_latents_history_long", "patch_long", (4, 8, 8)))


def _history_tokens(model, args) -> int:
    total = 0
    for latents, indices, conv, pad in _HISTORY:
        x = args.get(latents)
        if x is None or args.get(indices) is None:  # the model skips a history without its indices
            continue
        stride = getattr(model, conv).stride
        n = 1
        for extent, k, s in zip(x.shape[2:], pad, stride):
            n *= (-(-extent // k) * k) // s
        total += n
    return total


def _grid(model, args) -> GridInfo:
    history = _history_tokens(model, args)
    parallel = getattr(model, "_parallel_config", None)
    if history and getattr(parallel, "context_parallel_config", None) is not None:
        # Diffusers splits [history, chunk] as one sequence, so a rank's share is not "its text, then its
        # video" as dit_accel's context-parallel path needs.
        raise ValueError("dit_accel: this Helios call packs a history ahead of the chunk and the model is context "
                         "parallel; dit_accel cannot place the history in each rank's share. Run context-parallel "
                         "Helios without dit_accel, or dit_accel without context parallelism")
    return GridInfo(patched_video_grid(model, args), history)


def _grid_key(args: dict):
    x = args.get("hidden_states")
    if not hasattr(x, "shape") or any(args.get(a) is not None for a, _, _, _ in _HISTORY):
        return None  # with a history: read every call (shapes only), so a model made context parallel is refused
    return x.shape


PRESETS = (
    Preset(
        "HeliosTransformer3DModel",
        attention=(r"blocks\.\d+\.attn1",),
        text_position="first",  # the packed history, not text: the text is cross-attention (attn2)
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published sparse-attention setting for Helios is known: dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="Helios autoregressive T2V/I2V/V2V; self-attention blocks.*.attn1; the packed multi-scale history "
              "ahead of the chunk runs dense like text",
        hub_words=((r"helios", None),),
    ),
)
