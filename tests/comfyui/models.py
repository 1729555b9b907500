"""Tiny models of ComfyUI's own classes (random weights, fp32, CPU), their inputs, a short ComfyUI sampling
run, and the masked-dense reference attention the tests compare against (one, for a fixed pattern and for one chosen
per call), written here from the definition (METHODS.md "Text tokens"): video queries see the pattern's video keys
plus every valid text key, text queries every valid key."""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# (ComfyUI supported-model class, its unet config, latent shape, positive conditioning builder)
WAN = dict(image_model="wan2.1", model_type="t2v", dim=64, num_heads=2, num_layers=2, ffn_dim=64, in_dim=16,
           out_dim=16, text_len=8, freq_dim=32, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
           cross_attn_norm=True, eps=1e-6)
HUNYUAN = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=32,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
               theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False)
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=32, hidden_size=64,
            mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256, patch_size=2,
            qkv_bias=True, guidance_embed=False)
COSMOS = dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
              out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64, num_blocks=2, num_heads=2,
              crossattn_emb_channels=32, pos_emb_cls="rope3d", use_adaln_lora=True, adaln_lora_dim=16,
              concat_padding_mask=True, extra_per_block_abs_pos_emb=False)
LTXV = dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2,
            caption_channels=32, num_layers=2)

VACE = dict(WAN, model_type="vace", vace_layers=1, vace_in_dim=96)  # one control block (after main block 0)
WAN_CAMERA = dict(WAN, model_type="camera", in_dim=32, in_dim_control_adapter=24)
HUMO = dict(WAN, model_type="humo", audio_token_num=4)
ANIMATE = dict(WAN, model_type="animate", in_dim=36)
QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
CHROMA = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
              num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256, patch_size=2, qkv_bias=True,
              in_dim=64, out_dim=64, hidden_dim=32, n_layers=1)
HUNYUAN_IMAGE21 = dict(HUNYUAN, in_channels=64, out_channels=64, vec_in_dim=None, patch_size=[1, 1], axes_dim=[16, 16],
                       byt5=True)  # ComfyUI's HunyuanVideo class with a 2-D patch
COSMOS1 = dict(image_model="cosmos", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
               patch_spatial=2, patch_temporal=1, model_channels=64, num_blocks=2, num_heads=2, block_config="FA-CA-MLP",
               crossattn_emb_channels=32, concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False,
               pos_emb_interpolation="crop", block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True,
               adaln_lora_dim=16, extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="learnable")
HIDREAM = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
               attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 24], text_emb_dim=8,
               num_routed_experts=2, num_activated_experts=1, axes_dims_rope=[8, 12, 12], max_resolution=[128, 128],
               llama_layers=[0, 1])  # caption_channels: [T5, Llama-3.1]
LUMINA2 = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
               n_kv_heads=2, multiple_of=16, qk_norm=True, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 64, 64])


@dataclass
class Case:
    """One family's tiny model: how to build it and what to sample it with."""

    name: str
    model: str  # the class name in comfy.supported_models
    config: dict
    latent: tuple  # (B, C, T, H, W)
    cond: Callable[[], list]  # ComfyUI conditioning [[cross_attn, {extras}]]
    text: str = "none"  # where text sits in self-attention calls: none / last / first
    patch: tuple = (1, 2, 2)  # the model's patch size (LTX-Video patchifies 1 x 1 x 1)
    reference_frames: int = 0  # leading latent frames that are reference images, off the grid (VACE, Animate)
    scale: float = 0.05  # of the random weights (at 0.05 AuraFlow's and Chroma Radiance's attention barely shows)

    def grid(self):
        grid = tuple(-(-e // p) for e, p in zip(self.latent[2:], self.patch[-len(self.latent[2:]):]))
        return grid if not self.reference_frames else (grid[0] - self.reference_frames, *grid[1:])


def _wan_cond():
    return [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1)), {}]]


def _wan_i2v_cond():
    g = torch.Generator().manual_seed(2)
    clip = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 5, 1280, generator=g))
    return [[torch.randn(1, 8, 4096, generator=g), {"clip_vision_output": clip,
                                                   "concat_latent_image": torch.randn(1, 16, 3, 8, 8, generator=g)}]]


def _hunyuan_cond():
    g = torch.Generator().manual_seed(3)
    # two of six text tokens padded: the model masks them with an additive (1, 1, S) key mask
    return [[torch.randn(1, 6, 32, generator=g), {"pooled_output": torch.randn(1, 8, generator=g),
                                                  "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}]]


def _flux_cond():
    g = torch.Generator().manual_seed(6)
    return [[torch.randn(1, 6, 32, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]


def _cosmos_cond():
    return [[torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(8)), {}]]


def _hunyuan_i2v_cond():
    cond = _hunyuan_cond()
    cond[0][1]["concat_latent_image"] = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    return cond


def _ltxv_cond():
    return [[torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4)), {"attention_mask": torch.ones(1, 6)}]]


def _vace_cond():
    """WanVaceToVideo's conditioning with a reference image: its latent leads the control frames, with a reactive
    half that is zero after process_latent_in (ComfyUI's process_out of zeros) and a zero mask."""
    # (ComfyUI is the snapshot the `comfy` fixture put on sys.path, not a package the test extra installs)
    latent_formats = importlib.import_module("comfy.latent_formats")

    g = torch.Generator().manual_seed(10)
    frames = torch.randn(1, 32, 4, 8, 8, generator=g)
    frames[:, 16:, :1] = latent_formats.Wan21().process_out(torch.zeros(1, 16, 1, 8, 8))
    mask = torch.rand(1, 64, 4, 8, 8, generator=g)
    mask[:, :, :1] = 0
    return [[torch.randn(1, 8, 4096, generator=g), {"vace_frames": [frames], "vace_mask": [mask],
                                                   "vace_strength": [1.0]}]]


def _camera_cond():
    cond = _wan_i2v_cond()
    cond[0][1]["camera_conditions"] = torch.randn(1, 24, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    return cond


def _humo_cond():
    g = torch.Generator().manual_seed(12)  # one reference frame: 16 tokens appended after the video
    return [[torch.randn(1, 8, 4096, generator=g), {"reference_latents": [torch.randn(1, 16, 1, 8, 8, generator=g)]}]]


def _animate_cond():
    g = torch.Generator().manual_seed(13)  # WanAnimateToVideo: the reference frame, then 3 frames with pose
    cond = _wan_i2v_cond()
    cond[0][1]["concat_latent_image"] = torch.randn(1, 16, 4, 8, 8, generator=g)
    cond[0][1]["pose_video_latent"] = torch.randn(1, 16, 3, 8, 8, generator=g)
    return cond


def _hidream_cond():
    g = torch.Generator().manual_seed(17)  # T5 (5 tokens), pooled CLIP, 3 Llama-3.1 layers of 4 tokens
    return [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 8, generator=g),
                                                 "conditioning_llama3": torch.randn(1, 3, 4, 24, generator=g)}]]


def _text_cond(seed: int, **extras):
    return lambda: [[torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(seed)), dict(extras)]]


CASES = {
    "wan21-t2v": Case("wan21-t2v", "WAN21_T2V", WAN, (1, 16, 3, 8, 8), _wan_cond),
    "wan21-i2v": Case("wan21-i2v", "WAN21_I2V", dict(WAN, model_type="i2v", in_dim=36), (1, 16, 3, 8, 8),
                      _wan_i2v_cond),
    "wan22-ti2v": Case("wan22-ti2v", "WAN22_T2V", dict(WAN, in_dim=48, out_dim=48), (1, 48, 3, 8, 8), _wan_cond),
    "hunyuan-video": Case("hunyuan-video", "HunyuanVideo", HUNYUAN, (1, 16, 3, 8, 8), _hunyuan_cond, text="last"),
    "hunyuan-video-i2v": Case("hunyuan-video-i2v", "HunyuanVideoI2V", dict(HUNYUAN, in_channels=33),
                              (1, 16, 3, 8, 8), _hunyuan_i2v_cond, text="last"),
    "cosmos-predict2": Case("cosmos-predict2", "CosmosT2IPredict2", COSMOS, (1, 16, 3, 8, 8), _cosmos_cond),
    "flux": Case("flux", "FluxSchnell", FLUX, (1, 16, 8, 10), _flux_cond, text="first", patch=(2, 2)),
    "ltx-video": Case("ltx-video", "LTXV", LTXV, (1, 128, 3, 4, 4), _ltxv_cond, patch=(1, 1, 1)),
}

#: ComfyUI classes added later (tests/comfyui/test_families_more.py); a text position "first" / "last" here is
#: where the tokens off the grid sit (reference frames).
MORE_CASES = {
    "wan21-vace": Case("wan21-vace", "WAN21_Vace", VACE, (1, 16, 4, 8, 8), _vace_cond, text="first",
                       reference_frames=1),
    "wan21-camera": Case("wan21-camera", "WAN21_Camera", WAN_CAMERA, (1, 16, 3, 8, 8), _camera_cond),
    "wan21-humo": Case("wan21-humo", "WAN21_HuMo", HUMO, (1, 16, 3, 8, 8), _humo_cond, text="last"),
    "wan22-animate": Case("wan22-animate", "WAN22_Animate", ANIMATE, (1, 16, 4, 8, 8), _animate_cond, text="first",
                          reference_frames=1),
    "qwen-image": Case("qwen-image", "QwenImage", QWEN, (1, 16, 1, 8, 10), _text_cond(14), text="first"),
    "chroma": Case("chroma", "Chroma", CHROMA, (1, 16, 8, 10), _text_cond(15, pooled_output=torch.zeros(1, 8)),
                   text="first", patch=(2, 2)),
    "lumina2": Case("lumina2", "Lumina2", LUMINA2, (1, 16, 8, 10), _text_cond(16, attention_mask=torch.ones(1, 6, dtype=torch.long)),
                    text="first", patch=(2, 2)),
    "hunyuan-image21": Case("hunyuan-image21", "HunyuanImage21", HUNYUAN_IMAGE21, (1, 64, 4, 5),
                            _text_cond(18, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])), text="last", patch=(1, 1)),
    "cosmos1": Case("cosmos1", "CosmosT2V", COSMOS1, (1, 16, 3, 8, 8), _cosmos_cond),
    "hidream": Case("hidream", "HiDream", HIDREAM, (1, 16, 8, 10), _hidream_cond, text="last", patch=(2, 2)),
}


def build(comfy, case: Case, seed: int = 0):
    """A ModelPatcher of ``case``'s ComfyUI class with random fp32 weights on the CPU."""
    config = getattr(comfy.supported_models, case.model)(dict(case.config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * case.scale)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sample(comfy, patcher, case: Case, steps: int = 2, sampler: str = "euler", latent=None, cfg: float = 1.0):
    """ComfyUI's own sampling (comfy.sample.sample), a fixed noise; cfg 1 makes one model call per step, a higher
    cfg batches the positive and negative conditioning into one call of batch 2."""
    shape = latent or case.latent
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    cond = case.cond()
    negative = [[torch.flip(c, dims=(1,)), extra] for c, extra in cond]  # same length, other text
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, "simple", cond, negative, torch.zeros(shape),
                               seed=0, disable_pbar=True)


def masked_reference(mask, text: str, calls: Optional[list] = None, lengths=None, *, n: Optional[int] = None,
                     batches: Optional[list] = None):
    """An ``optimized_attention_override``: calls of ``N + text`` queries and keys run fp64 softmax attention with
    the allowed video pairs ``mask`` gives, every valid text key and every text row whole; every other call runs
    ComfyUI's own attention. ``mask``: an ``(N, N)`` bool tensor (``N`` its side), or ``select(q_video, k_video)``,
    the pairs of each call, batch and head from the call's own q and k (VSA, SLA), with ``n`` = ``N``.
    ``lengths``: the only query lengths that are such calls (None: any of at least ``N``). ``calls`` gets each such
    call's query length, ``batches`` its batch size."""
    select = mask if callable(mask) else None
    if select is None:
        n = mask.shape[-1]
    elif n is None:
        raise TypeError("masked_reference(select, ...) needs n, the number of video tokens")

    def override(func, *args, **kwargs):
        call = dict(zip(("q", "k", "v", "heads", "mask"), args))
        call.update(kwargs)
        q, k, v, heads, key_mask = call["q"], call["k"], call["v"], call["heads"], call.get("mask")
        axis = 2 if call.get("skip_reshape") else 1
        s = q.shape[axis]
        if k.shape[axis] != s or s < n or (text == "none" and s != n) or (lengths is not None and s not in lengths):
            return func(*args, **kwargs)
        if not call.get("skip_reshape"):
            q, k, v = (t.view(t.shape[0], s, heads, -1).transpose(1, 2) for t in (q, k, v))
        if calls is not None:
            calls.append(s)
        if batches is not None:
            batches.append(q.shape[0])
        video = slice(s - n, s) if text == "first" else slice(0, n)
        allowed = torch.ones(*q.shape[:2], s, s, dtype=torch.bool)  # text rows and columns stay allowed
        allowed[..., video, video] = mask if select is None else select(q[..., video, :].double(),
                                                                        k[..., video, :].double())
        scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
        if key_mask is not None and key_mask.dtype == torch.bool:  # (ComfyUI's bool masks: True attends)
            scores = scores.masked_fill(~key_mask.reshape(-1, 1, 1, s), float("-inf"))
        elif key_mask is not None:
            scores = scores + key_mask.double().reshape(-1, 1, 1, s)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v.double()).to(q.dtype)
        return out if call.get("skip_output_reshape") else out.transpose(1, 2).reshape(out.shape[0], s, -1)

    return override


def with_override(patcher, override):
    """A clone of ``patcher`` with ``override`` as its attention override (ComfyUI's own mechanism)."""
    clone = patcher.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return clone


#: The widgets every method node shares, at their defaults.
COMMON_WIDGETS = dict(dense_steps=0, dense_last_steps=0, dense_above_sigma=0.0, dense_layers="", backend="auto")


def run_node(name: str, model, **widgets):
    """The MODEL the node ``name`` returns for ``model`` and ``widgets``, called as a workflow calls it."""
    from dit_accel.comfyui import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS[name]
    return getattr(node(), node.FUNCTION)(model, **widgets)[0]


def override_of(patcher):
    """The attention override set on a patched MODEL (dit_accel's, or the one set before it)."""
    return patcher.model_options["transformer_options"]["optimized_attention_override"]


def report_steps(patched):
    """``(step, total, sparse or dense)`` of each model call of a patched MODEL, in order (its report lines)."""
    out = []
    for line in override_of(patched).patch.report.lines:
        step, total = line.split(" step ")[1].split(":")[0].split("/")
        out.append((int(step), int(total), "sparse" if "sparse" in line else "dense"))
    return out


# Mochi (tests/comfyui/test_mochi.py): ComfyUI's AsymmDiTJoint asserts hidden_size_x * mlp_ratio_x == 1536 * 8; the
# text stream is narrower than the video's (32 vs 64), as in Mochi (1536 vs 3072)
MOCHI = dict(image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=64, hidden_size_y=32,
             mlp_ratio_x=192.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
             out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True, timestep_mlp_bias=True,
             attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=32, t5_token_length=8,
             rope_theta=10000.0)


def _mochi_cond():
    g = torch.Generator().manual_seed(20)  # two of six T5 tokens padded: GenmoMochi's num_tokens is 4
    return [[torch.randn(1, 6, 32, generator=g), {"attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}]]


MOCHI_CASES = {
    "mochi": Case("mochi", "GenmoMochi", MOCHI, (1, 12, 3, 8, 8), _mochi_cond, text="last"),
}


# FLUX and HunyuanVideo with the blocks of dit_accel's tiny Diffusers transformers (build_tiny_transformer("flux") /
# ("hunyuan"): hidden size 32 in 2 heads of 16, feed-forward 4x, one double and one single block), so a LoRA written
# in Diffusers names and shapes fits them (tests/comfyui/test_weights_flux_hunyuan.py)
FLUX_AS_DIFFUSERS = dict(FLUX, hidden_size=32, mlp_ratio=4.0, context_in_dim=16, axes_dim=[4, 6, 6])
HUNYUAN_AS_DIFFUSERS = dict(HUNYUAN, hidden_size=32, mlp_ratio=4.0, context_in_dim=16, axes_dim=[4, 6, 6])


def _as_diffusers_cond(**extras):
    """16-wide text (as the tiny Diffusers transformers take it) and the pooled vector."""
    def cond():
        g = torch.Generator().manual_seed(21)
        return [[torch.randn(1, 6, 16, generator=g), {"pooled_output": torch.randn(1, 8, generator=g), **extras}]]

    return cond


AS_DIFFUSERS_CASES = {
    "flux": Case("flux", "FluxSchnell", FLUX_AS_DIFFUSERS, (1, 16, 8, 10), _as_diffusers_cond(), text="first",
                 patch=(2, 2)),
    "hunyuan-video": Case("hunyuan-video", "HunyuanVideo", HUNYUAN_AS_DIFFUSERS, (1, 16, 3, 8, 8),
                          _as_diffusers_cond(attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])), text="last"),
}


# Wan's own class with tokens off the video grid (tests/comfyui/test_wan_extras.py): Wan 2.2 Fun Control with a
# ref_conv (52 input channels: the latent, then Wan22FunControlToVideo's control latent, 4 mask channels at index 16
# and its start-image latent), and a T2V model with a ref_conv for a call with both kinds of extra tokens
WAN_FUN = dict(WAN, in_dim=52, in_dim_ref_conv=16)
WAN_REF = dict(WAN, in_dim_ref_conv=16)


def _fun_cond():
    """Wan22FunControlToVideo's conditioning with a ref_image: ``reference_latents`` (one latent frame)."""
    g = torch.Generator().manual_seed(40)
    return [[torch.randn(1, 8, 4096, generator=g), {
        "concat_latent_image": torch.randn(1, 32, 3, 8, 8, generator=g), "concat_mask": torch.ones(1, 4, 3, 8, 8),
        "concat_mask_index": 16, "reference_latents": [torch.randn(1, 16, 1, 8, 8, generator=g)]}]]


def _phantom_cond():
    """WanPhantomSubjectToVideo's positive conditioning: two subject images' latents, concatenated on time."""
    g = torch.Generator().manual_seed(41)
    return [[torch.randn(1, 8, 4096, generator=g), {"time_dim_concat": torch.randn(1, 16, 2, 8, 8, generator=g)}]]


def _ref_and_phantom_cond():
    cond = _phantom_cond()
    cond[0][1]["reference_latents"] = [torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(42))]
    return cond


WAN_EXTRA_CASES = {
    "wan22-fun-ref": Case("wan22-fun-ref", "WAN21_T2V", WAN_FUN, (1, 16, 3, 8, 8), _fun_cond, text="first"),
    "wan21-phantom": Case("wan21-phantom", "WAN21_T2V", WAN, (1, 16, 3, 8, 8), _phantom_cond, text="last"),
    "wan-ref-phantom": Case("wan-ref-phantom", "WAN21_T2V", WAN_REF, (1, 16, 3, 8, 8), _ref_and_phantom_cond,
                            text="first"),
}


# Image models (tests/comfyui/test_families_image.py). SD3 as ComfyUI's model detection writes it (hidden size
# 64 x depth, depth heads): SD3.5's image self-attention (x_block.attn2) in block 0 of 2. Without num_patches its
# position embedding is computed (sin-cos), not a pos_embed buffer, which random weights would leave uninitialised
SD3 = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=8,
           context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
           pos_embed_scaling_factor=None, qk_norm="rms", x_block_self_attn_layers=[0])
AURAFLOW = dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=3, n_double_layers=1, n_heads=2,
                global_conddim=64, cond_seq_dim=32, max_seq=256)  # 1 double layer, 2 single layers
OMNIGEN2 = dict(image_model="omnigen2", patch_size=2, in_channels=16, hidden_size=64, num_layers=2,
                num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12),
                axes_lens=(64, 64, 64), text_feat_dim=32)
CHROMA_RADIANCE = dict(CHROMA, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=4,
                       nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=0,
                       nerf_final_head_type="linear", nerf_embedder_dtype=None)  # pixels in 4 x 4 patches


def _omnigen2_cond(*refs):
    """OmniGen2's conditioning: an unpadded prompt (ComfyUI's model fails on a padded one: its rotary embedding
    covers the valid tokens, the joint layers every token), and reference latents (``reference_latents``)."""
    def cond():
        g = torch.Generator().manual_seed(50)
        extras = {"attention_mask": torch.ones(1, 6, dtype=torch.long)}
        if refs:
            extras["reference_latents"] = [torch.randn(1, 16, *shape, generator=g) for shape in refs]
        return [[torch.randn(1, 6, 32, generator=g), extras]]

    return cond


IMAGE_CASES = {
    "sd3": Case("sd3", "SD3", SD3, (1, 16, 8, 10), _text_cond(51, pooled_output=torch.zeros(1, 8)), text="first",
                patch=(2, 2)),
    "auraflow": Case("auraflow", "AuraFlow", AURAFLOW, (1, 4, 8, 10), _text_cond(52), text="first", patch=(2, 2),
                     scale=0.1),
    "omnigen2": Case("omnigen2", "Omnigen2", OMNIGEN2, (1, 16, 8, 10), _omnigen2_cond(), text="first", patch=(2, 2)),
    # two references of 12 (6 x 7, padded to 6 x 8) and 20 tokens: [text 6, references 32, image 20]
    "omnigen2-edit": Case("omnigen2-edit", "Omnigen2", OMNIGEN2, (1, 16, 8, 10), _omnigen2_cond((6, 7), (8, 10)),
                          text="first", patch=(2, 2)),
    "chroma-radiance": Case("chroma-radiance", "ChromaRadiance", CHROMA_RADIANCE, (1, 3, 16, 20),
                            _text_cond(53, pooled_output=torch.zeros(1, 8)), text="first", patch=(4, 4),
                            scale=0.3),  # its NeRF head multiplies weights the transformer's output makes
}


#: Every family case above by name (the `models` fixture's lookup).
ALL_CASES = {**CASES, **MORE_CASES, **WAN_EXTRA_CASES, **IMAGE_CASES, **MOCHI_CASES}


def patched_weights(patcher) -> dict:
    """The diffusion model's weights with the patcher's patches applied by ComfyUI (then taken off again)."""
    patcher.patch_model(torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model(torch.device("cpu"))
