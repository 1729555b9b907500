"""Tiny SD3: the ``tiny-sd3`` pipeline and the bare ``"sd3"`` transformer (SD3.5-style: a dual-attention block,
then a context-pre-only one).

tiny-sd3: 64x64 -> latent 32x32 (VAE 2x) -> patch 2 -> image grid (16, 16) = 256 image tokens, joint
attention with [two CLIPs (16 + 16 channels side by side) then T5] text tokens last.
"""

from __future__ import annotations

import torch

from ._common import (TINY_IMAGE_CALL, TINY_IMAGE_METHODS, TinyPipeline, TinyTransformer, byte_tokenizer, t5_tokenizer,
                      tiny_image_vae, tiny_t5_settings)

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _clip(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()


def _build(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok = byte_tokenizer(
        bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<|unk|>", model_max_length=77
    )
    clip_1, clip_2 = _clip(clip_tok), _clip(clip_tok)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(**tiny_t5_settings(t5_tok))).eval()  # d_model 32 = the two CLIPs side by side
    latent_channels = 4
    vae = tiny_image_vae(latent_channels)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=latent_channels, out_channels=latent_channels, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=32,  # the two CLIPs' 16-channel projections side by side
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
        text_encoder=clip_1, tokenizer=clip_tok, text_encoder_2=clip_2, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim),
                pooled_projections=rnd(batch, cfg.pooled_projection_dim), return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-sd3",
        summary="StableDiffusion3Pipeline with a 2-layer SD3Transformer2DModel (SD3.5 dual attention), tiny "
        "AutoencoderKL, two CLIP and a T5 encoder; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_IMAGE_CALL,
        method_defaults=TINY_IMAGE_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "sd3", "SD3Transformer2DModel",
        dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
             pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
