"""Kandinsky 6 (``Kandinsky6Transformer3DModel``, text/image to video and audio): latent (B, F, H, W, C)
channels last, token grid (F/pt, H/ph, W/pw) in (T, H, W) raster order; video self-attention
``visual_transformer_blocks.*.video_dec_block.self_attention`` over video only. The audio stream's
self-attention, the text cross-attentions and the video<->audio cross-attentions stay dense.

Image conditioning appends the clean reference frame as an extra last frame whose rotary time position is 0
(``visual_rope_pos``): it is no part of the video's grid, so it is handled densely like text at the end of the
sequence (``text_position="last"``); the grid is then the frames before it. Other ``visual_rope_pos`` are refused.

Kandinsky 6 video super-resolution (``Kandinsky6SRTransformer3DModel``, the same Diffusers family folder and hub
ids with "VSR") is refused: it has no dense call; every self-attention call is its own NABLA on flex (see the
reason)."""

from __future__ import annotations

import torch

from ._common import LARGE_VIDEO_DEFAULTS, GridInfo, Preset, channels_last_grid

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    t, h, w = channels_last_grid(model, args)
    pos = args.get("visual_rope_pos")
    if pos is None:
        return GridInfo((t, h, w), 0)
    pt, ph, pw = (p.detach().long().cpu() if isinstance(p, torch.Tensor) else torch.as_tensor(p) for p in pos)
    plain = torch.arange(t)
    if ph.equal(torch.arange(h)) and pw.equal(torch.arange(w)):
        if pt.equal(plain):
            return GridInfo((t, h, w), 0)
        if t > 1 and pt.equal(torch.cat([plain[:t - 1], plain[:1]])):  # reference frame appended at position 0
            return GridInfo((t - 1, h, w), h * w)
    raise ValueError("dit_accel: this Kandinsky 6 call's visual_rope_pos is neither arange over each axis nor the "
                     "pipeline's appended reference frame (time positions 0..T-2 then 0), so its video tokens are "
                     "not one regular (T, H, W) grid; run it dense or call it with the pipeline's positions")


def _grid_key(args: dict):
    x = args.get("hidden_states")
    return x.shape if hasattr(x, "shape") and args.get("visual_rope_pos") is None else None


_SR_REASON = (
    "it has no dense self-attention call to make sparse: Kandinsky6SRAttnProcessor, its only processor, runs "
    "every call of visual_transformer_blocks.*.self_attention as NABLA, a flex_attention call (no SDPA) under a "
    "BlockMask built per call from the block means of that call's queries and keys (the blocks holding "
    "nabla_threshold of the attention mass) united with a sliding-tile prior (nabla_window), over tokens "
    "reordered into 1x8x8 local blocks. Its sparsity is the model's own and depends on the activations; run it "
    "as it is (compiled, e.g. transformer.compile_repeated_blocks(), as Diffusers documents)")

PRESETS = (
    Preset(
        "Kandinsky6Transformer3DModel",
        attention=(r"visual_transformer_blocks\.\d+\.video_dec_block\.self_attention",),
        text_position="last",  # only the appended reference frame sits there (text is cross-attention)
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published sparse-attention setting for Kandinsky 6 is known: dit_accel defaults.
        defaults=dict(LARGE_VIDEO_DEFAULTS),
        notes="Kandinsky 6 T2VA/I2VA; video self-attention visual_transformer_blocks.*.video_dec_block."
              "self_attention; an appended I2V reference frame runs dense like text",
        hub_words=((r"kandinsky-?6(?!.*vsr)", None),),  # the VSR ids hold Kandinsky6SRTransformer3DModel
    ),
    Preset.refusing(
        "Kandinsky6SRTransformer3DModel", _SR_REASON, min_diffusers="0.42.1", grid_dims=3,
        notes="Kandinsky 6 VSR (text-free video super-resolution); refused (every call is its own NABLA on flex)",
        hub_words=((r"kandinsky-?6[^/]*vsr", None),),
    ),
)
