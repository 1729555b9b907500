"""Motif-Video (``MotifVideoTransformer3DModel``): latent (B, C, F, H, W), token grid
(F/patch_size_t, H/p, W/p); joint attention [video, conditioning] in the dual- and single-stream blocks
(``transformer_blocks.*.attn``, ``single_transformer_blocks.*.attn``), where the conditioning is the image
embeddings (I2V, when ``image_embeds`` is given) followed by the text, with a boolean key-padding mask.
The conditioning tokens are handled densely like text; the optional ``cross_attn`` modules stay dense.
With ``num_decoder_layers > 0`` the last single-stream blocks are decoder blocks: their call is [video, encoder
output] (the encoder blocks' video output, as many tokens as the video, in the text slot, no mask). They run
sparse over their video-video pairs too, with the encoder-output slot kept exact like text."""

from __future__ import annotations

import math

from ._common import patched_video_grid, RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    grid = patched_video_grid(model, args)
    image = args.get("image_embeds")  # projected and put ahead of the text in the joint sequence
    extra = int(image.shape[1]) if hasattr(image, "shape") and image.dim() == 3 else 0
    num_text = text_len(args) + extra
    if getattr(model.config, "num_decoder_layers", 0):  # the decoder blocks' text slot: the encoder output
        num_text = max(num_text, math.prod(grid))
    return GridInfo(grid, num_text)


def _grid_key(args: dict):
    x, text, image = (args.get(k) for k in ("hidden_states", "encoder_hidden_states", "image_embeds"))
    if not hasattr(x, "shape"):
        return None
    return tuple(getattr(t, "shape", None) for t in (x, text, image))


PRESETS = (
    Preset(
        "MotifVideoTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="last",
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # No published sparse-attention setting for Motif-Video is known: dit_accel defaults.
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (4, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "gna": {"method": {"kernel_size": (8, 24, 24)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="Motif-Video T2V/I2V; joint attention [video, image embeds + text] with padded-text key mask; "
              "decoder blocks (num_decoder_layers) sparse over video, their encoder-output slot exact",
        hub_words=((r"motif-?video", None),),
    ),
)
