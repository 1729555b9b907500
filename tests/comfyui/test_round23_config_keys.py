"""ComfyUI, trust round 23: a plan's recorded model config is compared on every family whose entries map.

A calibrated plan records the Diffusers transformer config it was made on (``provenance.model_config``); the node
compares it with the MODEL's through ``Family.config_keys``. Only the Wan families had a mapping: a HunyuanVideo plan
calibrated on another model of the same class, layers and heads (I2V's 33 input channels on T2V, or 2 double blocks
and no single one on 1 + 1) ran without a word, and so on every other family. Each family case below is the tiny
ComfyUI model of tests/comfyui/models.py and its Diffusers twin (the same sizes, as Diffusers names them, built on
the meta device: no weights): the twin's plan is quiet on the model, a plan of a changed config warns naming the
entry, and every mapped entry is read from the MODEL (none silently missing).
"""

import pytest
import torch

import dit_accel
from dit_accel.comfyui import families, patch_model
from dit_accel.comfyui.patch import _model_config
from dit_accel.plans.model_config import model_config
from tests.comfyui.models import ALL_CASES, CASES, build

_TILE_3D = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))
_TILE_2D = dit_accel.Tile(tile=(2, 2), window=(1, 1))
_HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, guidance_embeds=False, text_embed_dim=32,
                rope_theta=256.0)
_COSMOS = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=2,
               mlp_ratio=4.0, text_embed_dim=32, adaln_lora_dim=16, max_size=(128, 240, 240), patch_size=(1, 2, 2),
               concat_padding_mask=True)
_CHROMA = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
               num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12), approximator_num_channels=64,
               approximator_hidden_dim=32, approximator_layers=1)

# case of tests/comfyui/models.py: (its Diffusers twin's config, a change of it that keeps the class, layers and
# heads, the entries the tiny ComfyUI model leaves unset (None: not compared))
TWINS = {
    "hunyuan-video": (dict(_HUNYUAN, patch_size=2, patch_size_t=1, pooled_projection_dim=8,
                           rope_axes_dim=(8, 12, 12)), dict(num_layers=2, num_single_layers=0), ()),
    "hunyuan-image21": (dict(_HUNYUAN, in_channels=64, out_channels=64, patch_size=(1, 1), rope_axes_dim=(16, 16),
                             text_embed_2_dim=16, use_meanflow=False), dict(in_channels=16), ()),
    "cosmos-predict2": (dict(_COSMOS, extra_pos_embed_type=None), dict(in_channels=17), ()),
    "cosmos1": (dict(_COSMOS, extra_pos_embed_type="learnable"), dict(text_embed_dim=64), ()),
    "flux": (dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, guidance_embeds=False,
                  axes_dims_rope=(8, 12, 12)), dict(guidance_embeds=True), ()),
    "chroma": (_CHROMA, dict(num_layers=2, num_single_layers=0), ()),
    "chroma-radiance": (_CHROMA, dict(approximator_layers=2), ()),
    "qwen-image": (dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12)),
                   dict(joint_attention_dim=48), ()),
    "lumina2": (dict(patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_refiner_layers=1,
                     num_attention_heads=2, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(8, 12, 12),
                     axes_lens=(64, 64, 64), cap_feat_dim=32), dict(cap_feat_dim=64), ("ffn_dim_multiplier",)),
    "hidream": (dict(patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                     attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 24], text_emb_dim=8,
                     num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(8, 12, 12),
                     max_resolution=(128, 128), llama_layers=[0, 1]), dict(num_routed_experts=4), ()),
    "ltx-video": (dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=2,
                       attention_head_dim=32, cross_attention_dim=64, num_layers=2, caption_channels=32),
                  dict(caption_channels=64), ()),
    "mochi": (dict(patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=32,
                   in_channels=12, text_embed_dim=32, max_sequence_length=8), dict(pooled_projection_dim=64), ()),
    "sd3": (dict(patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                 joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=8, out_channels=16,
                 dual_attention_layers=(0,), qk_norm="rms_norm"), dict(joint_attention_dim=64),
            ("pos_embed_max_size",)),
    "auraflow": (dict(patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2, attention_head_dim=32,
                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, out_channels=4,
                      pos_embed_max_size=256), dict(num_mmdit_layers=2, num_single_dit_layers=1), ()),
}


def _family(patcher):
    return families.family_for(patcher.model.diffusion_model)


def _diffusers(family, config):
    import diffusers

    with torch.device("meta"):  # the config is what a plan records; no weights needed
        return getattr(diffusers, family.diffusers_class)(**config)


def _plan(patcher, case, config):
    """A plan of ``config`` (a Diffusers twin's) for the tiny model ``patcher`` of ``case``: its class and layers."""
    family, inner = _family(patcher), patcher.model.diffusion_model
    video = len(ALL_CASES[case].latent) == 5 and case != "qwen-image"  # (Qwen-Image's (B, C, 1, H, W): an image)
    return dit_accel.SparsePlan([dit_accel.Phase(0, None, default=_TILE_3D if video else _TILE_2D)],
                                num_layers=len(family.layers(inner)),
                                provenance={"model_class": family.diffusers_class, "model_id": "calib-model",
                                            "model_config": model_config(_diffusers(family, config))})


def _config_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "calibrated on another model" in r.getMessage()]


@pytest.mark.parametrize("case", sorted(TWINS))
def test_the_twins_plan_is_quiet_and_a_changed_config_warns(models, case, caplog):
    """(a) the Diffusers twin's plan: no warning (every mapped entry compares equal across hosts); (b) the plan of a
    config changed in one entry, same class, layers and heads: the warning names the entry and says to calibrate."""
    patcher = models(case)
    config, change, _ = TWINS[case]
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(patcher, _plan(patcher, case, config))
    assert _config_warnings(caplog) == [], case
    caplog.clear()
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(patcher, _plan(patcher, case, {**config, **change}))
    said = _config_warnings(caplog)
    assert len(said) == 1, (case, caplog.text)
    for key, value in change.items():
        if value != config[key]:
            assert f"{key}={list(value) if isinstance(value, tuple) else value!r} in the plan, " in said[0], said
    assert said[0].endswith("calibrate a plan for this one (dit-accel calibrate)"), said


@pytest.mark.parametrize("case", sorted(TWINS))
def test_every_mapped_entry_is_read_from_the_model(models, case):
    """A mapped entry the MODEL does not give (a misspelt ComfyUI name, a conversion that fails) is silently not
    compared: each one is read here, as the Diffusers twin's value."""
    patcher = models(case)
    family = _family(patcher)
    config, _, unset = TWINS[case]
    read = _model_config(patcher, patcher.model.diffusion_model, family)
    assert sorted(read) == sorted(k for k, _ in family.config_keys if k not in unset), case
    twin = model_config(_diffusers(family, config))
    assert {k: v for k, v in twin.items() if k in read} == model_config(read), case  # (as JSON: tuples as lists)


def test_hunyuan_video_i2v_plan_on_t2v_warns(models, comfy, caplog):
    """HunyuanVideo I2V (33 input channels) and T2V are one ComfyUI class of the same layers and heads."""
    config = TWINS["hunyuan-video"][0]
    i2v = build(comfy, CASES["hunyuan-video-i2v"])
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(i2v, _plan(models("hunyuan-video"), "hunyuan-video", config))
    assert [m for m in _config_warnings(caplog) if "(in_channels=16 in the plan, 33 here)" in m], caplog.text


def test_unset_entries_take_comfyuis_constructor_default(models):
    """A real checkpoint's unet_config holds what model_detection reads (Qwen-Image: in_channels and num_layers);
    ComfyUI builds the model as cls(**unet_config), so the rest are the constructor's defaults, not unknown."""
    patcher = models("qwen-image")
    unet = patcher.model.model_config.unet_config
    saved = dict(unet)
    try:
        for key in ("patch_size", "out_channels", "attention_head_dim"):
            unet.pop(key)
        read = _model_config(patcher, patcher.model.diffusion_model, _family(patcher))
    finally:
        unet.clear()
        unet.update(saved)
    assert (read["patch_size"], read["out_channels"], read["attention_head_dim"]) == (2, 16, 128)


def test_sd3_dual_attention_layers_compare_in_order(models):
    """ComfyUI's model detection lists SD3.5's attn2 layers in the checkpoint's key order ([0, 1, 10, 11, 12, 2,
    ...]); Diffusers' dual_attention_layers count up: the same layers compare equal."""
    patcher = models("sd3")
    unet = patcher.model.model_config.unet_config
    saved = unet["x_block_self_attn_layers"]
    try:
        unet["x_block_self_attn_layers"] = [0, 1, 10, 11, 12, 2]
        read = _model_config(patcher, patcher.model.diffusion_model, _family(patcher))
    finally:
        unet["x_block_self_attn_layers"] = saved
    assert read["dual_attention_layers"] == [0, 1, 2, 10, 11, 12]


def test_wan_compares_the_head_size_too(wan, caplog):
    """Wan's attention_head_dim was not compared (ComfyUI has dim, not a head size): now dim over its heads."""
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6)
    family = _family(wan)
    assert _model_config(wan, wan.model.diffusion_model, family)["attention_head_dim"] == 32
    for head_dim, warned in ((32, []), (16, ["attention_head_dim=16 in the plan, 32 here"])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
            patch_model(wan, _plan(wan, "wan21-t2v", dict(config, attention_head_dim=head_dim)))
        assert [w for w in warned if w in " ".join(_config_warnings(caplog))] == warned, caplog.text
        assert bool(_config_warnings(caplog)) == bool(warned), caplog.text
