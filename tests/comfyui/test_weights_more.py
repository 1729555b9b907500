"""``dit-accel finetune`` folders on Wan's ComfyUI subclasses (HuMo, Animate, VACE): their ``blocks.N`` (and VACE's
``vace_blocks.N``) carry the Diffusers transformer's modules one to one, so the LoRA through the node is the LoRA
merged by hand, and each SLA projection lands in the layer of its Diffusers name; modules off those blocks are
refused by name."""

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.comfyui.weights import _wan_module, layer_names
from tests.comfyui.models import MORE_CASES, build, sample
from tests.comfyui.test_weights import ALPHA, RANK, _folder

FAMILIES = ["wan21-humo", "wan22-animate", "wan21-vace"]
# Diffusers module -> ComfyUI module, per family: the attention of both blocks, a feed-forward layer, and what
# each adds (Animate's I2V image keys, VACE's control block with its input and output projections)
TARGETS = {
    "wan21-humo": {"blocks.0.attn1.to_q": "blocks.0.self_attn.q", "blocks.1.attn1.to_v": "blocks.1.self_attn.v",
                   "blocks.1.attn2.to_out.0": "blocks.1.cross_attn.o", "blocks.0.ffn.net.0.proj": "blocks.0.ffn.0"},
    "wan22-animate": {"blocks.0.attn1.to_q": "blocks.0.self_attn.q", "blocks.1.attn1.to_v": "blocks.1.self_attn.v",
                      "blocks.0.attn2.add_k_proj": "blocks.0.cross_attn.k_img", "blocks.1.ffn.net.2": "blocks.1.ffn.2"},
    "wan21-vace": {"blocks.0.attn1.to_q": "blocks.0.self_attn.q", "blocks.1.attn1.to_v": "blocks.1.self_attn.v",
                   "vace_blocks.0.attn1.to_k": "vace_blocks.0.self_attn.k",
                   "vace_blocks.0.ffn.net.0.proj": "vace_blocks.0.ffn.0",
                   "vace_blocks.0.proj_in": "vace_blocks.0.before_proj",
                   "vace_blocks.0.proj_out": "vace_blocks.0.after_proj"},
}
LAYERS = {"wan21-humo": ["blocks.0.attn1", "blocks.1.attn1"], "wan22-animate": ["blocks.0.attn1", "blocks.1.attn1"],
          "wan21-vace": ["blocks.0.attn1", "blocks.1.attn1", "vace_blocks.0.attn1"]}



def _lora(inner, targets, seed):
    """Random LoRA tensors in Diffusers names for ``targets``, shaped after ComfyUI's modules."""
    g, modules, out = torch.Generator().manual_seed(seed), dict(inner.named_modules()), {}
    for diffusers_name, comfy_name in targets.items():
        out_f, in_f = modules[comfy_name].weight.shape
        out[f"transformer.{diffusers_name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.2
        out[f"transformer.{diffusers_name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.2
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_is_the_merged_weights_comfyui_runs(comfy, models, tmp_path, family):
    case, model = MORE_CASES[family], models(family)
    lora = _lora(model.model.diffusion_model, TARGETS[family], seed=21)
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=lora)
    before = sample(comfy, model, case)
    (patched,) = NODE_CLASS_MAPPINGS["DitAccelFinetuned"]().patch(model, weights_path=str(folder), lora_strength=1.0,
                                                                  allow_other_grid=False, backend="torch")
    out = sample(comfy, patched, case)
    merged = build(comfy, case)  # the same random weights, then W += alpha / rank * B @ A by hand
    modules = dict(merged.model.diffusion_model.named_modules())
    with torch.no_grad():
        for diffusers_name, comfy_name in TARGETS[family].items():
            a = lora[f"transformer.{diffusers_name}.lora_A.weight"]
            b = lora[f"transformer.{diffusers_name}.lora_B.weight"]
            modules[comfy_name].weight += ALPHA / RANK * b @ a
    torch.testing.assert_close(out, sample(comfy, merged, case), rtol=1e-5, atol=1e-5)
    assert (out - before).abs().max() > 1e-3
    assert torch.equal(sample(comfy, model, case), before)  # the model given keeps its weights


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sla_projections_land_in_the_layers_of_their_names(comfy, models, tmp_path, family):
    case, model = MORE_CASES[family], models(family)
    inner = model.model.diffusion_model
    layers = family_for(inner).layers(inner)
    assert layer_names(inner, layers) == LAYERS[family]  # dit_accel.apply's order of the Diffusers modules
    g = torch.Generator().manual_seed(22)
    sla = {}
    for name in LAYERS[family]:
        sla[f"{name}.weight"] = torch.randn(32, 32, generator=g) * 0.3
        sla[f"{name}.bias"] = torch.randn(32, generator=g) * 0.3
    method = dit_accel.SLA(topk=0.5)
    patched = patch_model(model, method, weights=_folder(tmp_path / "ft", method, sla=sla), backend="torch")
    patch = patched.model_options["transformer_options"]["optimized_attention_override"].patch
    assert sorted(patch.projections) == list(range(len(layers)))
    for i, name in enumerate(LAYERS[family]):
        assert torch.equal(patch.projections[i].weight, sla[f"{name}.weight"])
        assert torch.equal(patch.projections[i].bias, sla[f"{name}.bias"])
    if family != "wan21-vace":
        return  # (one sampled family: the projections' path through Plan.run is the Wan family's)
    untrained = sample(comfy, patch_model(model, method, backend="torch"), case)
    assert (sample(comfy, patched, case) - untrained).abs().max() > 1e-4  # the projections take part
    zero = _folder(tmp_path / "zero", method, sla={k: torch.zeros_like(v) for k, v in sla.items()})
    torch.testing.assert_close(sample(comfy, patch_model(model, method, weights=zero, backend="torch"), case),
                               untrained, rtol=1e-6, atol=1e-6)  # a zero projection is training-free SLA


@pytest.mark.parametrize("diffusers_class", ["WanVACETransformer3DModel", "WanAnimateTransformer3DModel"])
def test_every_block_module_of_the_diffusers_twin_has_its_comfyui_module(models, diffusers_class):
    """Names and shapes, module by module: each Linear of the Diffusers transformer's blocks (and VACE's control
    blocks) maps to a ComfyUI module of the same weight shape; the face adapter of Animate maps to none."""
    import diffusers

    small = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, ffn_dim=64, text_dim=32, freq_dim=32)
    if diffusers_class == "WanVACETransformer3DModel":
        twin, family, blocks = diffusers.WanVACETransformer3DModel(**small, vace_layers=[0]), "wan21-vace", (
            "blocks", "vace_blocks")
    else:
        twin = diffusers.WanAnimateTransformer3DModel(
            **small, image_dim=32, added_kv_proj_dim=64, motion_encoder_size=64, motion_style_dim=32, motion_dim=8,
            motion_encoder_dim=32, face_encoder_hidden_dim=32, face_encoder_num_heads=2, inject_face_latents_blocks=1)
        family, blocks = "wan22-animate", ("blocks",)
    comfy_modules = dict(models(family).model.diffusion_model.named_modules())
    linears = {n: m for n, m in twin.named_modules() if isinstance(m, torch.nn.Linear)}
    in_blocks = [n for n in linears if n.split(".")[0] in blocks]
    assert len(in_blocks) >= 24
    for name in in_blocks:
        target = _wan_module(name, blocks)
        assert target is not None and comfy_modules[target].weight.shape == linears[name].weight.shape, name
    assert [n for n in linears if n.startswith("face_adapter.") and _wan_module(n, blocks)] == []


@pytest.mark.parametrize("family, key, match", [
    ("wan22-animate", "transformer.face_adapter.0.to_q.lora_A.weight",
     "a LoRA on face_adapter.0.to_q .*, a module of Diffusers' WanAnimateTransformer3DModel that the node does not "
     "patch on ComfyUI's AnimateWanModel"),
    ("wan21-humo", "transformer.vace_blocks.0.attn1.to_q.lora_A.weight", "modules ComfyUI's HumoWanModel does not"),
    ("wan21-vace", "transformer.vace_blocks.1.attn1.to_q.lora_A.weight", "modules ComfyUI's VaceWanModel does not"),
], ids=["animate-face-adapter", "humo-control-block", "vace-missing-control-block"])
def test_lora_modules_off_the_mapped_blocks_are_one_line_errors(models, tmp_path, family, key, match):
    model = models(family)
    lora = _lora(model.model.diffusion_model, {"blocks.0.attn1.to_q": "blocks.0.self_attn.q"}, seed=23)
    lora[key] = torch.zeros(RANK, 64)
    with pytest.raises(ValueError, match=match):
        patch_model(model, dit_accel.Dense(), weights=_folder(tmp_path / "bad", dit_accel.Dense(), lora=lora))


def test_sla_projections_of_a_missing_layer_are_one_line_errors(models, tmp_path):
    method = dit_accel.SLA(topk=0.5)
    sla = {"vace_blocks.1.attn1.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match="no self-attention layer of this VaceWanModel"):
        patch_model(models("wan21-vace"), method, weights=_folder(tmp_path / "ft", method, sla=sla))
    with pytest.raises(ValueError, match="no self-attention layer of this HumoWanModel"):
        patch_model(models("wan21-humo"), method, weights=_folder(tmp_path / "humo", method,
                                                                   sla={"vace_blocks.0.attn1.weight": torch.zeros(32, 32)}))
