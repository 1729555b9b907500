"""Tiny models of both hosts for tests/comfyui/test_weights_families.py: per family, a ComfyUI config and a Diffusers
transformer config of the same sizes, and the oracle, written out here from the two models' code and Diffusers'
``scripts/convert_*_to_diffusers.py`` (not from dit_accel's maps): Diffusers module -> (ComfyUI weight, its first row,
whether the rows come in swapped halves). The modules listed are the LoRA's targets; the LoRA through the node must
land there and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tests.comfyui.models import (CHROMA, COSMOS, COSMOS1, HIDREAM, HUNYUAN_IMAGE21, IMAGE_CASES, LTXV, LUMINA2,
                                  MOCHI, QWEN, Case)


@dataclass
class Pair:
    """One family on both hosts."""

    comfy: Case
    diffusers_class: str
    diffusers_config: dict
    oracle: dict  # Diffusers module -> (ComfyUI weight, first row, halves swapped)
    layers: list  # the Diffusers self-attention layer names (the SLA file's), in dit_accel.apply's order
    head_dim: int
    refused: dict = field(default_factory=dict)  # Diffusers module -> a phrase of the refusal


def _same(*names):
    return {n: (n, 0, False) for n in names}


def _rows(pairs: dict) -> dict:
    return {d: (c, r, False) for d, (c, r) in pairs.items()}


def _case(name, model, config):
    return Case(name, model, config, (1, 16, 3, 8, 8), lambda: [])


def _flux_blocks(h: int) -> dict:
    """FLUX-style double and single blocks (Diffusers transformer_blocks.0 / single_transformer_blocks.0, ComfyUI
    double_blocks.0 / single_blocks.0: q, k, v the thirds of qkv; linear1 is q, k, v and the MLP input)."""
    double = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", h), "attn.to_v": ("img_attn.qkv", 2 * h),
              "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_v_proj": ("txt_attn.qkv", 2 * h),
              "attn.to_out.0": ("img_attn.proj", 0), "attn.to_add_out": ("txt_attn.proj", 0),
              "ff.net.0.proj": ("img_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0)}
    single = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", h), "attn.to_v": ("linear1", 2 * h),
              "proj_mlp": ("linear1", 3 * h), "proj_out": ("linear2", 0)}
    return {**{f"transformer_blocks.0.{k}": (f"double_blocks.0.{w}", r) for k, (w, r) in double.items()},
            **{f"single_transformer_blocks.0.{k}": (f"single_blocks.0.{w}", r) for k, (w, r) in single.items()}}


_QWEN_BLOCK = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1"]
_HIDREAM = ["double_stream_blocks.0.block.attn1." + m for m in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_out_t")]
_HIDREAM += ["single_stream_blocks.0.block.attn1." + m for m in ("to_q", "to_k", "to_v", "to_out")]
_HIDREAM += ["double_stream_blocks.0.block.ff_i.experts.0.w1", "double_stream_blocks.0.block.ff_t.w2",
             "single_stream_blocks.0.block.adaLN_modulation.1", "caption_projection.1.linear", "x_embedder.proj",
             "final_layer.linear"]


def _lumina_block(at: str) -> dict:
    q, kv = 64, 32  # 2 query heads, 1 key-value head, of 32
    rows = {"attn.to_q": ("attention.qkv", 0), "attn.to_k": ("attention.qkv", q), "attn.to_v": ("attention.qkv", q + kv),
            "attn.to_out.0": ("attention.out", 0), "feed_forward.linear_1": ("feed_forward.w1", 0),
            "feed_forward.linear_2": ("feed_forward.w2", 0), "feed_forward.linear_3": ("feed_forward.w3", 0)}
    if not at.startswith("context_refiner"):
        rows["norm1.linear"] = ("adaLN_modulation.1", 0)
    return {f"{at}.{d}": (f"{at}.{c}", r) for d, (c, r) in rows.items()}


def _mochi_block(i: int, last: bool) -> dict:
    at, to, d = f"transformer_blocks.{i}", f"blocks.{i}", 64
    rows = {"attn1.to_q": ("attn.qkv_x", 0), "attn1.to_k": ("attn.qkv_x", d), "attn1.to_v": ("attn.qkv_x", 2 * d),
            "attn1.add_q_proj": ("attn.qkv_y", 0), "attn1.add_k_proj": ("attn.qkv_y", d),
            "attn1.add_v_proj": ("attn.qkv_y", 2 * d), "attn1.to_out.0": ("attn.proj_x", 0), "norm1.linear": ("mod_x", 0),
            ("norm1_context.linear_1" if last else "norm1_context.linear"): ("mod_y", 0)}
    if not last:
        rows["attn1.to_add_out"] = ("attn.proj_y", 0)
    return {f"{at}.{k}": (f"{to}.{c}", r) for k, (c, r) in rows.items()}


def _cosmos1_block(n: int) -> dict:
    at, to = f"transformer_blocks.{n}", f"blocks.block{n}.blocks"
    return {f"{at}.attn1.to_q": (f"{to}.0.block.attn.to_q.0", 0), f"{at}.attn1.to_k": (f"{to}.0.block.attn.to_k.0", 0),
            f"{at}.attn1.to_v": (f"{to}.0.block.attn.to_v.0", 0), f"{at}.attn1.to_out.0": (f"{to}.0.block.attn.to_out.0", 0),
            f"{at}.attn2.to_v": (f"{to}.1.block.attn.to_v.0", 0), f"{at}.ff.net.0.proj": (f"{to}.2.block.layer1", 0),
            f"{at}.ff.net.2": (f"{to}.2.block.layer2", 0), f"{at}.norm1.linear_1": (f"{to}.0.adaLN_modulation.1", 0),
            f"{at}.norm3.linear_2": (f"{to}.2.adaLN_modulation.2", 0)}


def _cosmos2_block(n: int) -> dict:
    at, to = f"transformer_blocks.{n}", f"blocks.{n}"
    return {f"{at}.attn1.to_q": (f"{to}.self_attn.q_proj", 0), f"{at}.attn1.to_k": (f"{to}.self_attn.k_proj", 0),
            f"{at}.attn1.to_v": (f"{to}.self_attn.v_proj", 0), f"{at}.attn1.to_out.0": (f"{to}.self_attn.output_proj", 0),
            f"{at}.attn2.to_k": (f"{to}.cross_attn.k_proj", 0), f"{at}.ff.net.0.proj": (f"{to}.mlp.layer1", 0),
            f"{at}.ff.net.2": (f"{to}.mlp.layer2", 0), f"{at}.norm1.linear_1": (f"{to}.adaln_modulation_self_attn.1", 0),
            f"{at}.norm2.linear_2": (f"{to}.adaln_modulation_cross_attn.2", 0),
            f"{at}.norm3.linear_1": (f"{to}.adaln_modulation_mlp.1", 0)}


def _sd3_block(i: int, dual: bool, last: bool) -> dict:
    """SD3 joint block i (Diffusers transformer_blocks.i, ComfyUI joint_blocks.i): the image stream is x_block, the
    text stream context_block; q, k, v the thirds of each qkv (hidden 128). The last block's context_block is pre-only:
    no proj, no mlp, and its 2-way modulation is (shift, scale) where Diffusers' AdaLayerNormContinuous is (scale,
    shift)."""
    h, at, to = 128, f"transformer_blocks.{i}", f"joint_blocks.{i}"
    rows = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", h),
            "attn.to_v": ("x_block.attn.qkv", 2 * h), "attn.add_q_proj": ("context_block.attn.qkv", 0),
            "attn.add_k_proj": ("context_block.attn.qkv", h), "attn.add_v_proj": ("context_block.attn.qkv", 2 * h),
            "attn.to_out.0": ("x_block.attn.proj", 0), "ff.net.0.proj": ("x_block.mlp.fc1", 0),
            "ff.net.2": ("x_block.mlp.fc2", 0), "norm1.linear": ("x_block.adaLN_modulation.1", 0)}
    if dual:  # SD3.5's image self-attention
        rows.update({"attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", h),
                     "attn2.to_v": ("x_block.attn2.qkv", 2 * h), "attn2.to_out.0": ("x_block.attn2.proj", 0)})
    if not last:
        rows.update({"attn.to_add_out": ("context_block.attn.proj", 0), "ff_context.net.2": ("context_block.mlp.fc2", 0),
                     "ff_context.net.0.proj": ("context_block.mlp.fc1", 0)})
    out = {f"{at}.{d}": (f"{to}.{c}", r, False) for d, (c, r) in rows.items()}
    out[f"{at}.norm1_context.linear"] = (f"{to}.context_block.adaLN_modulation.1", 0, last)
    return out


# AuraFlow: ComfyUI's DoubleAttention projects the text with w1*, the image with w2*; SingleAttention has w1* only
_AURA_DOUBLE = {"attn.to_q": "attn.w2q", "attn.to_k": "attn.w2k", "attn.to_v": "attn.w2v", "attn.to_out.0": "attn.w2o",
                "attn.add_q_proj": "attn.w1q", "attn.add_k_proj": "attn.w1k", "attn.add_v_proj": "attn.w1v",
                "attn.to_add_out": "attn.w1o", "ff.linear_1": "mlpX.c_fc1", "ff.linear_2": "mlpX.c_fc2",
                "ff.out_projection": "mlpX.c_proj", "ff_context.linear_1": "mlpC.c_fc1",
                "ff_context.out_projection": "mlpC.c_proj", "norm1.linear": "modX.1", "norm1_context.linear": "modC.1"}
_AURA_SINGLE = {"attn.to_q": "attn.w1q", "attn.to_k": "attn.w1k", "attn.to_v": "attn.w1v", "attn.to_out.0": "attn.w1o",
                "ff.linear_1": "mlp.c_fc1", "ff.linear_2": "mlp.c_fc2", "ff.out_projection": "mlp.c_proj",
                "norm1.linear": "modCX.1"}
_AURAFLOW = {**{f"joint_transformer_blocks.0.{d}": (f"double_layers.0.{c}", 0) for d, c in _AURA_DOUBLE.items()},
             **{f"single_transformer_blocks.1.{d}": (f"single_layers.1.{c}", 0) for d, c in _AURA_SINGLE.items()},
             "pos_embed.proj": ("init_x_linear", 0), "context_embedder": ("cond_seq_linear", 0),
             "time_step_proj.linear_1": ("t_embedder.mlp.0", 0), "time_step_proj.linear_2": ("t_embedder.mlp.2", 0),
             "proj_out": ("final_linear", 0)}

_COSMOS_DIFFUSERS = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                         mlp_ratio=4.0, text_embed_dim=32, adaln_lora_dim=16, max_size=(128, 240, 240),
                         patch_size=(1, 2, 2), concat_padding_mask=True)
_COSMOS_TOP = {"patch_embed.proj": ("x_embedder.proj.1", 0), "time_embed.t_embedder.linear_1": ("t_embedder.1.linear_1", 0),
               "proj_out": ("final_layer.linear", 0)}
_REFINER = {"attn.to_q": ("self_attn.qkv", 0), "attn.to_k": ("self_attn.qkv", 32), "attn.to_v": ("self_attn.qkv", 64),
            "attn.to_out.0": ("self_attn.proj", 0), "ff.net.0.proj": ("mlp.0", 0), "norm_out.linear": ("adaLN_modulation.1", 0)}
# FLUX-style ComfyUI configs with the tiny Diffusers blocks' sizes (hidden 32 in 2 heads of 16, feed-forward 4x)
CHROMA_AS_DIFFUSERS = dict(CHROMA, hidden_size=32, mlp_ratio=4.0, context_in_dim=16, axes_dim=[4, 6, 6], out_dim=32)
HUNYUAN_IMAGE21_AS_DIFFUSERS = dict(HUNYUAN_IMAGE21, hidden_size=32, mlp_ratio=4.0, context_in_dim=16, axes_dim=[8, 8])
LUMINA2_GQA = dict(LUMINA2, n_kv_heads=1)  # one key-value head: k and v are narrower rows of qkv than q

PAIRS = {
    "qwen-image": Pair(
        _case("qwen-image", "QwenImage", QWEN), "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
             joint_attention_dim=32, axes_dims_rope=(8, 12, 12)),
        _same(*(f"transformer_blocks.{i}.{m}" for i in range(2) for m in _QWEN_BLOCK), "img_in", "txt_in",
              "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"),
        ["transformer_blocks.0.attn", "transformer_blocks.1.attn"], 32),
    "hidream": Pair(
        _case("hidream", "HiDream", HIDREAM), "HiDreamImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
             num_attention_heads=2, caption_channels=[32, 24], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=1, axes_dims_rope=(8, 12, 12), max_resolution=(128, 128), llama_layers=[0, 1]),
        _same(*_HIDREAM), ["double_stream_blocks.0.block.attn1", "single_stream_blocks.0.block.attn1"], 32),
    "ltx-video": Pair(
        _case("ltx-video", "LTXV", LTXV), "LTXVideoTransformer3DModel",
        dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=2,
             attention_head_dim=32, cross_attention_dim=64, num_layers=2, caption_channels=32),
        {**_same(*(f"transformer_blocks.{i}.attn1.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")),
                 "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                 "caption_projection.linear_1", "proj_out"),
         **_rows({"proj_in": ("patchify_proj", 0), "time_embed.linear": ("adaln_single.linear", 0),
                  "time_embed.emb.timestep_embedder.linear_1": ("adaln_single.emb.timestep_embedder.linear_1", 0)})},
        ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 32),
    "cosmos-predict2": Pair(
        _case("cosmos-predict2", "CosmosT2IPredict2", COSMOS), "CosmosTransformer3DModel",
        dict(_COSMOS_DIFFUSERS, extra_pos_embed_type=None),
        _rows({**_cosmos2_block(0), **_cosmos2_block(1), **_COSMOS_TOP,
               "norm_out.linear_2": ("final_layer.adaln_modulation.2", 0)}),
        ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 32),
    "cosmos1": Pair(
        _case("cosmos1", "CosmosT2V", COSMOS1), "CosmosTransformer3DModel",
        dict(_COSMOS_DIFFUSERS, extra_pos_embed_type="learnable"),
        _rows({**_cosmos1_block(0), **_cosmos1_block(1), **_COSMOS_TOP,
               "norm_out.linear_1": ("final_layer.adaLN_modulation.1", 0)}),
        ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 32),
    "chroma": Pair(
        _case("chroma", "Chroma", CHROMA_AS_DIFFUSERS), "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=64,
             approximator_hidden_dim=32, approximator_layers=1),
        _rows({**_flux_blocks(32), "x_embedder": ("img_in", 0), "context_embedder": ("txt_in", 0),
               "proj_out": ("final_layer.linear", 0), "distilled_guidance_layer.in_proj": ("distilled_guidance_layer.in_proj", 0),
               "distilled_guidance_layer.layers.0.linear_1": ("distilled_guidance_layer.layers.0.in_layer", 0),
               "distilled_guidance_layer.layers.0.linear_2": ("distilled_guidance_layer.layers.0.out_layer", 0)}),
        ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"], 16),
    "lumina2": Pair(
        _case("lumina2", "Lumina2", LUMINA2_GQA), "Lumina2Transformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
             num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12), axes_lens=(64, 64, 64),
             cap_feat_dim=32),
        _rows({**_lumina_block("noise_refiner.0"), **_lumina_block("context_refiner.0"), **_lumina_block("layers.1"),
               "x_embedder": ("x_embedder", 0), "time_caption_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0),
               "time_caption_embed.caption_embedder.1": ("cap_embedder.1", 0),
               "norm_out.linear_1": ("final_layer.adaLN_modulation.1", 0), "norm_out.linear_2": ("final_layer.linear", 0)}),
        ["noise_refiner.0.attn", "layers.0.attn", "layers.1.attn"], 32),
    "mochi": Pair(
        _case("mochi", "GenmoMochi", MOCHI), "MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=32,
             in_channels=12, text_embed_dim=32, max_sequence_length=8),
        {**_rows({**_mochi_block(0, False), **_mochi_block(1, True), "time_embed.pooler.to_q": ("t5_y_embedder.to_q", 0),
                  "time_embed.caption_proj": ("t5_yproj", 0), "proj_out": ("final_layer.linear", 0)}),
         "norm_out.linear": ("final_layer.mod", 0, True)},  # Diffusers' (scale, shift) is Mochi's (shift, scale)
        ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 32,
        refused={"transformer_blocks.0.ff.net.0.proj": "applies SiLU to the first half",
                 "transformer_blocks.1.ff.net.0.proj": "applies SiLU to the first half"}),
    "hunyuan-image21": Pair(
        _case("hunyuan-image21", "HunyuanImage21", HUNYUAN_IMAGE21_AS_DIFFUSERS), "HunyuanImageTransformer2DModel",
        dict(in_channels=64, out_channels=64, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(8, 8)),
        _rows({**_flux_blocks(32), **{f"context_embedder.token_refiner.refiner_blocks.1.{k}":
                                      (f"txt_in.individual_token_refiner.blocks.1.{w}", r) for k, (w, r) in _REFINER.items()}}),
        ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"], 16),
    # SD3 as tests/comfyui/models.py builds it (hidden 64 x depth 2, 2 heads; SD3.5's attn2 in block 0)
    "sd3": Pair(
        IMAGE_CASES["sd3"], "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
             joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=8, out_channels=16,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        {**_sd3_block(0, dual=True, last=False), **_sd3_block(1, dual=False, last=True),
         **_rows({"pos_embed.proj": ("x_embedder.proj", 0), "context_embedder": ("context_embedder", 0),
                  "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0),
                  "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", 0),
                  "proj_out": ("final_layer.linear", 0)}),
         "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, True)},  # Diffusers' (scale, shift): (shift, scale)
        ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"], 64),
    # AuraFlow as tests/comfyui/models.py builds it (dim 64 in 2 heads; 1 double layer, 2 single layers)
    "auraflow": Pair(
        IMAGE_CASES["auraflow"], "AuraFlowTransformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
             attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
             out_channels=4, pos_embed_max_size=256),
        {**_rows(_AURAFLOW), "norm_out.linear": ("modF.1", 0, True)},  # Diffusers' (scale, shift): (shift, scale)
        ["joint_transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"],
        32),
}


def build_diffusers(pair: Pair, seed: int = 0):
    """The Diffusers transformer of ``pair`` (fp32, random weights)."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(diffusers, pair.diffusers_class)(**pair.diffusers_config).eval()


def save_random_finetune(path, transformer, config, head_dim: int, seed: int) -> list:
    """Write ``path`` as ``dit-accel finetune`` would: the peft LoRA ``config`` on ``transformer`` and an SLA
    projection per attention module (``dit_accel.apply``'s names, which it returns), every LoRA and projection
    tensor drawn at random from ``seed``."""
    import dit_accel
    from dit_accel.checkpoints.finetuned import save_trained_weights
    from dit_accel.pipelines.presets import preset_for
    from dit_accel.pipelines.transformer_hook import attention_modules

    transformer.add_adapter(config)
    names = [n for n, _ in attention_modules(transformer, "", preset_for(transformer))]
    projections = {n: torch.nn.Linear(head_dim, head_dim) for n in names}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*transformer.named_parameters(), *((n, p) for m in projections.values()
                                                            for n, p in m.named_parameters())]:
            if "lora_" in name or name in ("weight", "bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_trained_weights(path, transformer=transformer, method=dit_accel.SLA(topk=0.5), lora_config=config,
                         sla_projections=projections)
    return names
