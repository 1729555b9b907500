"""EasyAnimate (``EasyAnimateTransformer3DModel``): latent (B, C, F, H, W), a per-frame 2-D patch ``p``
(no temporal patch), token grid (F, H/p, W/p) in (T, H, W) raster order; joint attention [text, video] in
``transformer_blocks.*.attn1`` (MMDiT blocks and the single-stream blocks after them alike), no text mask.
The text is the first encoder's tokens followed by the optional T5 tokens; inpaint and control latents are
extra input channels, not tokens."""

from __future__ import annotations

from ._common import LARGE_VIDEO_DEFAULTS, GridInfo, Preset, split_patch, text_len, video_latent

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = video_latent(args)
    p = model.config.patch_size
    t5 = args.get("encoder_hidden_states_t5")
    extra = int(t5.shape[1]) if hasattr(t5, "shape") and t5.dim() == 3 else 0
    return GridInfo((x.shape[2], split_patch(x.shape[3], p, "height"), split_patch(x.shape[4], p, "width")),
                    text_len(args) + extra)


def _grid_key(args: dict):
    x = args.get("hidden_states")
    if not hasattr(x, "shape"):
        return None
    return tuple(getattr(args.get(n), "shape", None) for n in ("hidden_states", "encoder_hidden_states",
                                                                "encoder_hidden_states_t5"))


PRESETS = (
    Preset(
        "EasyAnimateTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published sparse-attention setting for EasyAnimate is known: dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="EasyAnimate V5/V5.1; joint attention [text (+ T5), video] in transformer_blocks.*.attn1",
        hub_words=((r"easy-?animate", None),),
    ),
)
