"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): latent (B, C, F, H, W), token grid
(F/patch_size_t, H/p, W/p) in (T, H, W) raster order (a Conv3d patch embed, flattened); joint attention
[video, conditioning] in the dual-stream blocks ``transformer_blocks.*.attn`` (the token refiner's attention
is text only and stays dense). The conditioning is the image embeddings, the ByT5 glyph text and the MLLM text,
valid tokens first then padding; its processor builds a ``(B, 1, S, S)`` mask (query valid and key valid) in
which every video token is valid, so the preset sets ``square_mask``: the row of a video query is the key mask."""

from __future__ import annotations

from ._common import LARGE_VIDEO_DEFAULTS, GridInfo, Preset, patched_video_grid

__all__ = ["PRESETS"]

_CONDITIONING = ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")


def _seq(args: dict, name: str) -> int:
    x = args.get(name)
    return int(x.shape[1]) if hasattr(x, "shape") and x.dim() == 3 else 0


def _grid(model, args) -> GridInfo:
    # Every conditioning token (image, ByT5, MLLM) is in the joint sequence, padded or not.
    return GridInfo(patched_video_grid(model, args), sum(_seq(args, n) for n in _CONDITIONING))


def _grid_key(args: dict):
    x = args.get("hidden_states")
    if not hasattr(x, "shape"):
        return None
    return (x.shape,) + tuple(getattr(args.get(n), "shape", None) for n in _CONDITIONING)


PRESETS = (
    Preset(
        "HunyuanVideo15Transformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn",),  # context_embedder's token refiner: text only
        text_position="last",
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published setting wired in: HunyuanVideo 1.5's own SSTA (selective and sliding tile attention,
        # 720p) is a different rule whose per-head selection is not a fixed window; these are dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="HunyuanVideo 1.5 T2V/I2V; joint attention [video, image + ByT5 + MLLM text] with a padded "
              "(query x key) text mask",
        hub_words=((r"hunyuan-?video-?1[._-]?5", None),),  # before HunyuanVideo's general "hunyuan"
        square_mask=True,
    ),
)
