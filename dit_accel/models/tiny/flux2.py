"""Tiny FLUX.2: the ``tiny-flux2`` pipeline and the bare ``"flux2"`` transformer (double- and single-stream
blocks, 4-axis position ids).

tiny-flux2: FLUX.2 [klein]'s pipeline (``Flux2KleinPipeline``: a Qwen3 text encoder whose layers 9, 18 and 27
are stacked into the text embedding, so the tiny encoder keeps 27 layers of width 16; a byte tokenizer with a
chat template), 64x64 -> latent 32x32 (VAE 2x) -> packed 2x2 -> image grid (16, 16) = 256 image tokens, text
first. FLUX.2 [dev]'s ``Flux2Pipeline`` takes a Mistral-3 processor (a vision processor too): not built here.
"""

from __future__ import annotations

import torch

from ._common import (TINY_IMAGE_CALL, TINY_IMAGE_METHODS, TinyPipeline, TinyTransformer, byte_tokenizer,
                      four_axis_image_inputs)

__all__ = ["TRANSFORMERS", "PIPELINES"]

_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _build(seed: int):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|unk|>", model_max_length=1024)
    tokenizer.chat_template = _CHAT_TEMPLATE
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
        num_hidden_layers=27,  # the pipeline reads hidden states 9, 18 and 27
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    latent_channels = 4
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent_channels,  # one downsample: 2x
        norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=latent_channels * 4,  # 2x2 packed latents
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16,  # three encoder layers side by side
        timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)


PIPELINES = (
    TinyPipeline(
        "tiny-flux2",
        summary="Flux2KleinPipeline (FLUX.2 [klein]) with a 1+1-layer Flux2Transformer2DModel (joint text-image "
        "attention), tiny AutoencoderKLFlux2 and Qwen3 encoder; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_IMAGE_CALL,
        method_defaults=TINY_IMAGE_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "flux2", "Flux2Transformer2DModel",
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16, mlp_ratio=2.0,
             axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
        grid=(10, 13), text=7, inputs=four_axis_image_inputs,
    ),
)
