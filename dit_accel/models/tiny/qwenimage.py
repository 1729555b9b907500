"""Tiny Qwen-Image: the ``tiny-qwenimage`` pipeline and the bare ``"qwenimage"`` transformer (dual-stream
blocks, text padding mask).

tiny-qwenimage: a 2-layer Qwen2.5-VL text encoder (its 1-block vision tower is built from the config and never
called for a text prompt; byte tokenizer), a 2x AutoencoderKLQwenImage, 64x64 -> latent 32x32 -> packed 2x2 ->
image grid (16, 16) = 256 image tokens, text first.
"""

from __future__ import annotations

import torch

from ._common import TINY_IMAGE_CALL, TINY_IMAGE_METHODS, TinyPipeline, TinyTransformer, byte_tokenizer

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|unk|>", model_max_length=1024)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         # head_dim 8: the multimodal RoPE sections sum to head_dim / 2
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1,
                                 temperal_downsample=[False],  # one downsample: 2x spatial
                                 latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192,
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), encoder_hidden_states_mask=mask,
                img_shapes=[[(1, h, w)]] * batch, return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-qwenimage",
        summary="QwenImagePipeline with a 2-layer QwenImageTransformer2DModel (joint text-image attention), tiny "
        "AutoencoderKLQwenImage and Qwen2.5-VL encoder; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_IMAGE_CALL,
        method_defaults=TINY_IMAGE_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "qwenimage", "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
