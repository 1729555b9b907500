"""LTX-2 (``LTX2VideoTransformer3DModel``): an audio-video transformer. Video latents are packed (B, N, C) by the
pipeline (patch 1 x 1 x 1 in the released models); the token grid comes from the ``num_frames``/``height``/
``width`` kwargs (latent sizes before the patch, the sizes ``rope.prepare_video_coords`` takes), in (T, H, W)
raster order. Only the video self-attention ``transformer_blocks.*.attn1`` is wrapped: the audio self-attention
(``audio_attn1``), text cross-attention (``attn2``/``audio_attn2``) and the audio<->video cross-modal attention
(``audio_to_video_attn``/``video_to_audio_attn``) stay dense.

Conditioning pipelines (``LTX2ConditionPipeline``, the IC-LoRA and HDR-LoRA pipelines) append keyframe or
reference tokens after the grid (their positions in ``video_coords``, past ``num_frames * height * width``):
those run densely, like text placed last. Calls that break the grid are refused at the call: positions without
``num_frames``/``height``/``width`` (the DFR pipelines' tiles), positions that are not the grid's raster, a
``video_self_attention_mask`` (IC-LoRA's). Context parallelism splits ``[video | appended tokens]`` contiguously
(``Preset.split_whole``): Ulysses works, Ring is refused for calls with appended tokens."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import RADIAL_VIDEO, SLA_DEFAULT, GridInfo, Preset, shapes_key, split_patch, tensor_arg

__all__ = ["PRESETS"]

_DIMS = ("num_frames", "height", "width")


def _grid_key(args: dict) -> Optional[tuple]:
    """Shapes and sizes of a plain call (no positions or mask to check): read once per geometry."""
    if args.get("video_coords") is not None or args.get("video_self_attention_mask") is not None:
        return None
    key = shapes_key(args)
    dims = tuple(args.get(k) for k in _DIMS)
    return None if key is None or not all(type(d) is int for d in dims) else key + dims


def _check_coords(model, coords, sizes, frames: int, num_video: int, num_tokens: int) -> None:
    """``video_coords`` (B, 3, N, 2) must hold the grid's raster first: the spatial bounds that
    ``rope.prepare_video_coords`` gives for the latent ``sizes``, and one time per patched frame."""
    if not isinstance(coords, torch.Tensor) or coords.dim() != 4 or coords.shape[1] != 3 or coords.shape[2] != num_tokens:
        raise ValueError(f"dit_accel: LTX-2 video_coords of shape {tuple(getattr(coords, 'shape', ()))} do not "
                         f"describe the {num_tokens} video tokens of hidden_states; use the dense model")
    grid = coords[:, :, :num_video]
    want = model.rope.prepare_video_coords(1, *sizes, coords.device)[:, 1:].to(coords.dtype)
    t = grid[:, 0].reshape(grid.shape[0], frames, num_video // frames, 2)
    if not (torch.equal(grid[:, 1:], want.expand(grid.shape[0], -1, -1, -1)) and bool((t == t[:, :, :1]).all())):
        raise ValueError("dit_accel: the first num_frames*height*width LTX-2 video_coords are not the raster of "
                         f"the latent sizes {tuple(sizes)} (tiled or reordered positions); dit_accel cannot "
                         "place the tokens: use the dense model")


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C): packed by the pipeline
    dims = [args.get(k) for k in _DIMS]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError("dit_accel: LTX-2 transformer needs integer num_frames, height and width arguments (latent "
                         "sizes) to know the token grid, as LTX2Pipeline passes them; calls with positions only "
                         "(video_coords, the DFR pipelines' tiles) cannot be made sparse: use the dense model")
    if args.get("video_self_attention_mask") is not None:
        raise ValueError("dit_accel: this LTX-2 call passes video_self_attention_mask (IC-LoRA's attention strength "
                         "between the video and its reference tokens), which a sparse pattern cannot combine with; "
                         "use the dense model for it")
    pt, p = model.config.patch_size_t, model.config.patch_size
    grid = (split_patch(dims[0], pt, "frames"), split_patch(dims[1], p, "height"), split_patch(dims[2], p, "width"))
    num_video, num_tokens = grid[0] * grid[1] * grid[2], int(x.shape[1])
    if num_tokens < num_video:
        raise ValueError(f"dit_accel: LTX-2 num_frames/height/width {tuple(dims)} give {num_video} tokens, more than "
                         f"the {num_tokens} packed tokens of hidden_states")
    coords = args.get("video_coords")
    if coords is not None:
        _check_coords(model, coords, tuple(dims), grid[0], num_video, num_tokens)
    elif num_tokens != num_video:
        raise ValueError(f"dit_accel: LTX-2 hidden_states hold {num_tokens} tokens but num_frames/height/width "
                         f"{tuple(dims)} give {num_video}, and no video_coords place the others")
    return GridInfo(grid, num_tokens - num_video)


PRESETS = (
    Preset(
        "LTX2VideoTransformer3DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),  # video self-attention only: audio and cross-modal dense
        text_position="last",  # appended keyframe/reference tokens (conditioning pipelines) run dense
        grid_dims=3,
        read_grid=_grid,
        grid_key=_grid_key,
        min_diffusers="0.42.1",
        # Nothing published for LTX-2: LTX-Video's dit_accel defaults (same VAE stride, 32x32 pixels per token).
        defaults={"radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                  "tile": {"method": {"tile": (2, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                  "sla": SLA_DEFAULT},
        notes="LTX-2 audio-video; video self-attention transformer_blocks.*.attn1 only (audio, cross-modal and text "
              "attention dense); appended conditioning tokens dense",
        hub_words=((r"ltx-?2(?!\d)", None),),
        split_whole=True,  # its _cp_plan splits [video | appended tokens] contiguously (Ulysses; Ring refuses them)
        ring_unwrapped="audio, cross-modal and text attention",
    ),
)
