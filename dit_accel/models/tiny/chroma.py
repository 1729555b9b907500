"""Tiny Chroma: the ``tiny-chroma`` pipeline and the bare ``"chroma"`` transformer (double- and single-stream
blocks, FLUX.1-style ids).

tiny-chroma: as tiny-flux without CLIP (Chroma conditions on T5 only): 64x64 -> latent 32x32 (VAE 2x) ->
packed 2x2 -> image grid (16, 16) = 256 image tokens, joint attention with the T5 text tokens first.
"""

from __future__ import annotations

import torch

from ._common import (TINY_IMAGE_CALL, TINY_IMAGE_METHODS, TinyPipeline, TinyTransformer, image_ids, t5_tokenizer,
                      tiny_image_vae, tiny_t5_settings)

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(**tiny_t5_settings(tokenizer))).eval()
    latent_channels = 4
    vae = tiny_image_vae(latent_channels)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4,  # 2x2 packed latents
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
        approximator_hidden_dim=32, approximator_layers=1,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    img_ids = image_ids(grid)
    # ChromaPipeline's attention_mask: 1 on the valid text tokens and the first padding one (its rule), and on
    # every image token, in the latents' float dtype (the blocks add m_i * m_j to the scores).
    valid = mask.sum(1, keepdim=True)
    text_mask = (torch.arange(text)[None, :] <= valid).float()
    attention_mask = torch.cat([text_mask, torch.ones(batch, h * w)], 1)
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), img_ids=img_ids,
                txt_ids=torch.zeros(text, 3), attention_mask=attention_mask, return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-chroma",
        summary="ChromaPipeline with a 1+1-layer ChromaTransformer2DModel (joint text-image attention), tiny "
        "AutoencoderKL and T5 encoder; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_IMAGE_CALL,
        method_defaults=TINY_IMAGE_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "chroma", "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
             approximator_hidden_dim=32, approximator_layers=1),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
