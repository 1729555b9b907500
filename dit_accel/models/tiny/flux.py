"""Tiny FLUX: the ``tiny-flux`` pipeline and the bare ``"flux"`` transformer.

tiny-flux: 64x64 -> latent 32x32 (VAE 2x) -> packed 2x2 -> image grid (16, 16) = 256 image tokens,
joint attention with 64 T5 text tokens first.
"""

from __future__ import annotations

import torch

from ._common import (TINY_IMAGE_CALL, TINY_IMAGE_METHODS, TinyPipeline, TinyTransformer, byte_tokenizer, image_ids,
                      t5_tokenizer, tiny_image_vae, tiny_t5_settings)

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok = byte_tokenizer(
        bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<|unk|>", model_max_length=77
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    ).eval()
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(**tiny_t5_settings(t5_tok))).eval()
    latent_channels = 4
    vae = tiny_image_vae(latent_channels)  # 2x: 64x64 gives 16x16 packed tokens
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    img_ids = image_ids(grid)
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim),
                pooled_projections=rnd(batch, cfg.pooled_projection_dim), img_ids=img_ids,
                txt_ids=torch.zeros(text, 3), return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-flux",
        summary="FluxPipeline with a 1+1-layer FluxTransformer2DModel (joint text-image attention), "
        "tiny AutoencoderKL, CLIP and T5 encoders; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_IMAGE_CALL,
        method_defaults=TINY_IMAGE_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
