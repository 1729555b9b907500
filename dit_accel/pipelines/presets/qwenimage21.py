"""Qwen-Image 2.1 (``QwenImage21Transformer2DModel``): one single-stream sequence, the prompt (with any
condition images' latents in place of the encoder's image slots) first and the target image's latents last,
in raster order of ``img_shapes[0][-1] = (1, H, W)``.

Attention is block-causal: the prefix (text causal, each condition image bidirectional within itself) never
sees the target, and the target's queries attend to every key. ``QwenImage21AttnProcessor`` runs the prefix
in SDPA calls of its own and the target as one SDPA call of the target's queries against [prefix, target]
keys (in the prefill, and in the KV-cached steps against the cached prefix): dit_accel makes that call sparse
among the target's tokens, every prefix key (text and condition images) dense, the padded prompt keys
masked. The prefix calls stay as they are. ``GridInfo.num_text`` is the exact prefix length, which tells the
target's call from a prefix segment's. ``QwenImage21FlexAttnProcessor`` (one flex_attention call with a
BlockMask, no SDPA) is refused with the reason."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, tensor_arg

__all__ = ["PRESETS"]

_SLOT = 4  # latent tokens per image slot of the vision-language sequence (2x2), as the model expands them


def _check_processors(model) -> None:
    for block in getattr(model, "transformer_blocks", ()):
        processor = block.attn.processor
        if type(getattr(processor, "original", processor)).__name__ == "QwenImage21FlexAttnProcessor":
            raise ValueError("dit_accel: this Qwen-Image 2.1 transformer runs QwenImage21FlexAttnProcessor, whose "
                             "prefill is one flex_attention call (no SDPA) that dit_accel cannot make sparse; set "
                             "QwenImage21AttnProcessor (transformer.set_attn_processor(QwenImage21AttnProcessor())) "
                             "before dit_accel.apply, or use the dense model")


def _grid(model, args) -> GridInfo:
    _check_processors(model)
    x = tensor_arg(args, "hidden_states")  # (B, N, C): condition images first, the target last
    img_mask = tensor_arg(args, "img_mask")  # (B, slots of the joint sequence); the model reads row 0
    shapes = args.get("img_shapes")
    if not isinstance(shapes, (list, tuple)) or not shapes or not shapes[0]:
        raise ValueError("dit_accel: the Qwen-Image 2.1 transformer was called without img_shapes; cannot read the "
                         "grid")
    target = shapes[0][-1]
    if not (isinstance(target, (list, tuple)) and len(target) == 3):  # (a flat [(F, H, W)] failed as a bare TypeError)
        raise ValueError(f"dit_accel: the Qwen-Image 2.1 transformer was called with img_shapes {shapes!r}; it reads "
                         "img_shapes[0][-1], the target image's (F, H, W), from a list per sample of (F, H, W) "
                         "shapes (the target last): pass [[(1, H, W)]] per sample, as QwenImage21Pipeline does")
    f, h, w = (int(v) for v in target)
    if f != 1:
        raise ValueError(f"dit_accel: the Qwen-Image 2.1 target image of this call has {f} frames; dit_accel needs "
                         "one (H, W) grid: use the dense model")
    joint = int(img_mask.shape[1]) + (_SLOT - 1) * int(img_mask[0].sum())  # one host sync, as the model's own
    if h * w > min(joint, x.shape[1]):
        raise ValueError(f"dit_accel: the Qwen-Image 2.1 target image {h}x{w} does not fit the call's {x.shape[1]} "
                         "latent tokens; cannot read the grid")
    return GridInfo((h, w), joint - h * w)


PRESETS = (
    Preset(
        "QwenImage21Transformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn",),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for Qwen-Image 2.1
        notes="Qwen-Image 2.1; the target image's queries against [prompt and condition images, target], 2-D grid "
              "from img_shapes; prefix (block-causal) calls dense; QwenImage21FlexAttnProcessor refused",
        hub_words=((r"qwen[._-]?image[._-]?2[._]?1", None),),
    ),
)
