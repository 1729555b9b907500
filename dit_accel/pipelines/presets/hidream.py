"""HiDream-I1 (``HiDreamImageTransformer2DModel``): latent (B, C, H, W), patch ``config.patch_size``, raster
grid (H/p, W/p); joint attention [image, text] (text last) in the double-stream
(``double_stream_blocks.*.block.attn1``) and single-stream (``single_stream_blocks.*.block.attn1``) blocks.
The text is the T5 tokens plus two Llama-3 layers' tokens.

A non-square latent is padded to the model's ``max_resolution`` with pad tokens after the image (their keys
zeroed, not masked: every query still attends to them), so the sequence is [image, pad, text]; the pad is
handled densely as text. A call with pre-patched latents (``hidden_states_masks``) works when all samples
have one size (``img_sizes``) and the mask marks the image then the pad; other calls (packed batches of
different sizes) are refused with the reason (dense works)."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, split_patch, tensor_arg

__all__ = ["PRESETS"]


def _text(model, args) -> int:
    t5 = tensor_arg(args, "encoder_hidden_states_t5")
    llama = args.get("encoder_hidden_states_llama3")
    if llama is None:
        raise ValueError("dit_accel: the HiDream transformer was called without encoder_hidden_states_llama3; "
                         "cannot read the text length")
    # Every block sees the T5 tokens, the last Llama layer's tokens and its own Llama layer's tokens.
    return int(t5.shape[1]) + 2 * int(llama[model.config.llama_layers[0]].shape[-2])


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")
    p = model.config.patch_size
    masks = args.get("hidden_states_masks")
    if masks is None:  # (B, C, H, W): the model patches it, padding non-square latents to max_resolution
        if x.dim() != 4:
            raise ValueError(f"dit_accel: HiDream hidden_states of shape {tuple(x.shape)} without hidden_states_masks; "
                             "cannot read the token grid")
        h, w = split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")
        res = model.config.max_resolution
        pad = (res[0] * res[1] // (p * p) - h * w) if h != w else 0
        return GridInfo((h, w), pad + _text(model, args))
    sizes = args.get("img_sizes")
    sizes = [tuple(int(v) for v in s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes or ())]
    if not sizes or any(s != sizes[0] for s in sizes):
        raise ValueError(f"dit_accel: this HiDream call packs latents of sizes {sizes} (img_sizes); dit_accel needs one "
                         "size for the whole batch: call each size separately, or use the dense model")
    h, w = sizes[0]
    n = h * w
    want = torch.zeros(masks.shape[-1], dtype=torch.bool, device=masks.device)
    want[:n] = True
    if x.shape[1] < n or not bool((masks.reshape(masks.shape[0], -1).bool() == want).all()):
        raise ValueError(f"dit_accel: the hidden_states_masks of this HiDream call do not mark the {h}x{w} image "
                         "tokens followed by padding in every sample; dit_accel cannot place them: use the dense model")
    return GridInfo((h, w), int(x.shape[1]) - n + _text(model, args))


def _key(args):
    if args.get("hidden_states_masks") is not None:
        return None  # the reader checks the mask's contents
    x, t5, llama = (args.get(k) for k in ("hidden_states", "encoder_hidden_states_t5", "encoder_hidden_states_llama3"))
    if not all(isinstance(v, torch.Tensor) for v in (x, t5, llama)):
        return None
    return tuple(x.shape), tuple(t5.shape), tuple(llama.shape)


PRESETS = (
    Preset(
        "HiDreamImageTransformer2DModel",
        attention=(r"double_stream_blocks\.\d+\.block\.attn1", r"single_stream_blocks\.\d+\.block\.attn1"),
        text_position="last",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for HiDream-I1
        notes="HiDream-I1; joint attention [image, pad, text] (T5 + Llama-3 tokens), 2-D grid (H, W); pad of "
              "non-square latents dense; packed batches of different sizes refused",
        hub_words=((r"hidream", None),),
    ),
)
