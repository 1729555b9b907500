"""GLM-Image (``GlmImageTransformer2DModel``): latent (B, C, H, W), patch p (``GlmImageImageProjector``: p x p
patches flattened row-major), grid (H/p, W/p) in raster order. Each block's ``transformer_blocks.*.attn1``
(``GlmImageAttnProcessor``) attends jointly over [glyph text, image] (text first), through Diffusers'
``dispatch_attention_fn`` (native SDPA).

The transformer's optional ``attention_mask`` (B, text) becomes the float (B, 1, S, S) mask ``m_i * m_j`` with ``m``
1 on every image token, which SDPA *adds* to the scores (Chroma's form): ``Preset.additive_mask`` runs it exactly.

Image-to-image runs are refused at the call: ``GlmImagePipeline`` first calls the transformer on each condition
image with ``kv_caches`` in "write" mode, storing that call's keys and values, then runs its conditional denoising
calls in "read" mode, where every attention gets those cached keys and values ahead of its own [text, image] keys
(more keys than queries, of other images): no single grid dit_accel can place. Text-to-image calls (no cache, or a
cache in "skip" mode) work."""

from __future__ import annotations

import torch

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, latent_grid_2d

__all__ = ["PRESETS"]


def _cache_state(args):
    """``(mode, holds keys)`` of the call's ``kv_caches`` (a ``GlmImageKVCache``: one mode for every layer)."""
    caches = getattr(args.get("kv_caches"), "caches", None)
    if not caches:
        return None, False
    return caches[0].mode, any(c.k_caches for c in caches)


def _grid(model, args) -> GridInfo:
    mode, cached = _cache_state(args)
    if mode == "write":
        raise ValueError("dit_accel: this GLM-Image call writes a condition image's keys and values into "
                         "kv_caches for image-to-image: the denoising calls that follow attend to them ahead of "
                         "their own [text, image] keys, which is no single token grid dit_accel can place; use the "
                         "dense model for image-to-image (text-to-image calls work)")
    if mode == "read" and cached:
        raise ValueError("dit_accel: this GLM-Image call reads kv_caches (image-to-image): its attention gets the "
                         "condition images' cached keys and values ahead of its own [text, image] keys, which is no "
                         "single token grid dit_accel can place; use the dense model for image-to-image "
                         "(text-to-image calls work)")
    return latent_grid_2d(model, args)


def _key(args):
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    if not isinstance(x, torch.Tensor) or not isinstance(text, torch.Tensor):
        return None
    return x.shape, text.shape, _cache_state(args)


def _image_mask_ones(args, info: GridInfo) -> bool:
    # The processor sets m to 1 on every image token itself: a (B, text) mask always qualifies.
    m = args.get("attention_mask")
    return isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[1] == info.num_text


PRESETS = (
    Preset(
        "GlmImageTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for GLM-Image
        notes="GLM-Image; joint attention [glyph text, image], 2-D grid (H, W); its additive text mask runs "
              "exactly; image-to-image calls (kv_caches write / read) refused",
        additive_mask=_image_mask_ones,
        hub_words=((r"glm[._-]?image", None),),  # zai-org/GLM-Image (the GlmImagePipeline docstring)
    ),
)
