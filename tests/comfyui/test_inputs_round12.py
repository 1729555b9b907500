"""Round 12 of the node's inputs: a LoRA on a module of the Diffusers transformer that the node does not patch was
said as such for Wan and HunyuanVideo / HunyuanImage 2.1 only (a hand list per family); every other family said "the
weights are for another model" for a real module of its own. The modules are now those of the family's Diffusers
transformer itself (dit_accel's tiny config of it, built on the meta device), block indices aside. And a LoRA of
another model whose first key happened to be such a module (``proj_out``) was told to train without that module;
another model's keys now come first. A self-attention call that does not match the token grid was said once per call:
every layer of every step, thousands of lines in ComfyUI's log for one video; now once per kind of call."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import patch_model
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import CASES, masked_reference, sample, with_override
from tests.comfyui.test_wan_extras import LAYERS, _four_more_tokens
from tests.comfyui.test_weights import RANK, _folder, _lora

NOT_PATCHED = r"that the node does not patch on ComfyUI's {model} \(it maps .*\): train without it \(--target-modules\)"


def _lora_on(*modules) -> dict:
    out = {}
    for module in modules:
        out[f"transformer.{module}.lora_A.weight"] = torch.zeros(RANK, 8)
        out[f"transformer.{module}.lora_B.weight"] = torch.zeros(8, RANK)
    return out


# one module per family that has one: a module of its Diffusers transformer no map of the node has (in the families
# whose maps cover every Linear of it, FLUX, Qwen-Image, HiDream and SD3 have none left, the others their norms)
@pytest.mark.parametrize("case, module, diffusers_class, model", [
    ("wan21-humo", "condition_embedder.time_proj", "WanTransformer3DModel", "HumoWanModel"),
    ("wan21-vace", "vace_patch_embedding", "WanVACETransformer3DModel", "VaceWanModel"),
    ("wan22-animate", "face_adapter.0.to_q", "WanAnimateTransformer3DModel", "AnimateWanModel"),
    ("hunyuan-video", "context_embedder.time_text_embed.text_embedder.linear_1", "HunyuanVideoTransformer3DModel",
     "HunyuanVideo"),
    ("hunyuan-image21", "context_embedder_2.linear_3", "HunyuanImageTransformer2DModel", "HunyuanVideo"),
    ("cosmos-predict2", "transformer_blocks.1.attn1.norm_q", "CosmosTransformer3DModel", "MiniTrainDIT"),
    ("cosmos1", "time_embed.norm", "CosmosTransformer3DModel", "GeneralDIT"),
    ("ltx-video", "transformer_blocks.0.attn2.norm_k", "LTXVideoTransformer3DModel", "LTXVModel"),
    ("lumina2", "layers.1.ffn_norm1", "Lumina2Transformer2DModel", "NextDiT"),
    ("chroma", "distilled_guidance_layer.norms.0", "ChromaTransformer2DModel", "Chroma"),
    ("mochi", "transformer_blocks.0.attn1.norm_added_q", "MochiTransformer3DModel", "AsymmDiTJoint"),
    ("auraflow", "pos_embed", "AuraFlowTransformer2DModel", "MMDiT"),
])
def test_a_lora_on_a_module_of_the_family_the_node_does_not_patch_says_so(models, tmp_path, case, module,
                                                                          diffusers_class, model):
    """Before, for Cosmos, LTX-Video, Lumina 2, Chroma, Mochi and AuraFlow: "has LoRA tensors for modules ComfyUI's
    LTXVModel does not have (...): the weights are for another model than this LTX-Video"."""
    patcher = models(case)
    patches = dict(patcher.patches)
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=_lora_on(module))
    with pytest.raises(ValueError, match=rf"has a LoRA on {module.replace('.', '[.]')} \(transformer[.].*\), a module of "
                                         rf"Diffusers' {diffusers_class} " + NOT_PATCHED.format(model=model)) as err:
        patch_model(patcher, dit_accel.Dense(), weights=folder)
    assert "another model" not in str(err.value) and "\n" not in str(err.value)
    assert patcher.patches == patches


@pytest.mark.parametrize("case, module", [
    ("wan21-t2v", "transformer_blocks.0.attn.to_q"),  # a FLUX LoRA that trained proj_out too, on Wan
    ("hunyuan-video", "blocks.0.attn1.to_q"),  # a Wan LoRA that trained proj_out too, on HunyuanVideo
])
def test_another_models_lora_that_also_holds_a_module_of_this_family_is_another_models(models, tmp_path, case, module):
    """Its first key was this family's ``proj_out``: the node said "a module ... that the node does not patch ...:
    train without it", and trained without it the folder was refused again, now as another model's."""
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=_lora_on("proj_out", module))
    with pytest.raises(ValueError, match=rf"does not have \(transformer[.]{module.replace('.', '[.]')}[.]lora_A[.]weight,"
                                         r" .*the weights are for another model than this"):
        patch_model(models(case), dit_accel.Dense(), weights=folder)


@pytest.mark.parametrize("case, module", [
    ("ltx-video", "transformer_blocks.7.attn1.to_q"), ("mochi", "transformer_blocks.5.attn1.to_out.0"),
    ("wan21-t2v", "blocks.9.attn1.to_q"),
])
def test_a_block_past_the_models_stays_another_models(models, tmp_path, case, module):
    """What the Diffusers module names must not turn into "not patched": a module the map has at another index (a
    larger model's block)."""
    lora = _lora(torch.Generator().manual_seed(3)) if case == "wan21-t2v" else {}
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora={**lora, **_lora_on(module)})
    with pytest.raises(ValueError, match=r"the weights are for another model than this"):
        patch_model(models(case), dit_accel.Dense(), weights=folder)


def test_calls_that_do_not_match_the_grid_are_said_once(comfy, wan, caplog, sparse_calls):
    """A Wan block that attends over 4 tokens no rule counts (tests/comfyui/test_wan_extras.py): each of its calls,
    2 layers x 3 steps here (cond and uncond in one batch), logged the same warning; once now, each still dense."""
    extended = wan.clone()
    for block in range(LAYERS):
        extended.set_model_patch_replace(_four_more_tokens, "dit", "double_block", block)
    patched = patch_model(extended, dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), backend="torch")
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=3, cfg=2.0)
    said = [r for r in caplog.records if "does not match the token grid" in r.getMessage()]
    assert len(said) == 1 and "52 queries / 52 keys" in said[0].getMessage() and not sparse_calls
    lines = list(patched.model_options["transformer_options"]["optimized_attention_override"].patch.report.lines)
    assert len(lines) == 3 and all(f"{LAYERS} layers dense (call does not match the grid)" in line for line in lines)


# What the hunt of this round checked and found right, kept: the grid, text and step state of one patched MODEL
# follow each call (a batch whose negative text is shorter, a second latent size, a clone by another node).
TILE, TILE_MASK = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), lambda g: tile_mask(g, (1, 2, 2), (3, 1, 1))


def _shorter_negative(comfy, patcher, case, latent=None):
    """cfg 2 with a negative 2 text tokens shorter: ComfyUI batches both, repeating each text to a common length."""
    latent = latent or case.latent
    cond = case.cond()
    negative = [[torch.flip(c, dims=(1,))[:, :-2], dict(extra)] for c, extra in cond]
    noise = torch.randn(latent, generator=torch.Generator().manual_seed(5))
    return comfy.sample.sample(patcher, noise, 2, 2.0, "euler", "simple", cond, negative, torch.zeros(latent), seed=0,
                               disable_pbar=True)


@pytest.mark.parametrize("case", ["flux", "wan21-t2v"])
def test_a_batch_whose_negative_text_is_shorter_equals_the_masked_reference(comfy, models, case):
    case, model = CASES[case], models(case)
    grid = case.grid()
    method, mask = (dit_accel.Tile(tile=(2, 2), window=(1, 1)), tile_mask(grid, (2, 2), (1, 1))) if len(grid) == 2 \
        else (TILE, TILE_MASK(grid))
    reference = _shorter_negative(comfy, with_override(model, masked_reference(mask, case.text)), case)
    torch.testing.assert_close(_shorter_negative(comfy, patch_model(model, method), case), reference, rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(_shorter_negative(comfy, patch_model(model, dit_accel.Dense()), case),
                       _shorter_negative(comfy, model, case))


def _shifted(patcher):
    """A clone with its sampling shift set (as ModelSamplingSD3 leaves a MODEL: ``add_object_patch``)."""
    clone = patcher.clone()
    sampling = type(patcher.get_model_object("model_sampling"))(patcher.model.model_config)
    sampling.set_parameters(shift=3.0)
    clone.add_object_patch("model_sampling", sampling)
    return clone


def test_one_patched_model_at_two_latent_sizes_and_cloned_by_another_node(comfy, wan, sparse_calls):
    """The same patched MODEL sampled at a second size and back, then cloned by a ModelSamplingSD3-like node: each run
    equals the masked reference at its own grid and sigmas."""
    case, patched = CASES["wan21-t2v"], patch_model(wan, TILE)
    for latent, grid in (((1, 16, 4, 8, 12), (4, 4, 6)), ((1, 16, 3, 8, 8), (3, 4, 4))):
        reference = sample(comfy, with_override(wan, masked_reference(TILE_MASK(grid), "none")), case, latent=latent)
        torch.testing.assert_close(sample(comfy, patched, case, latent=latent), reference, rtol=1e-5, atol=1e-5)
    reference = sample(comfy, _shifted(with_override(wan, masked_reference(TILE_MASK((3, 4, 4)), "none"))), case)
    torch.testing.assert_close(sample(comfy, _shifted(patched), case), reference, rtol=1e-5, atol=1e-5)
    assert sparse_calls == [96] * 4 + [48] * 8  # 2 layers x 2 steps per run


def test_a_folders_setting_spelt_out_per_dimension_runs_without_the_trained_with_warning(comfy, wan, tmp_path,
                                                                                           caplog):
    """patch_model compared a folder's method with ``==``: a folder trained with Tile(window=3) warned "was trained
    with ...; running ..." under Tile(window=(3, 3, 3)), the same setting, as apply no longer does."""
    folder = _folder(tmp_path / "ft", dit_accel.Tile(tile=(1, 2, 2), window=3), lora=_lora(torch.Generator()
                                                                                             .manual_seed(3)))
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(3, 3, 3)), weights=folder, backend="torch")
    assert "was trained with" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), weights=folder, backend="torch")
    assert "was trained with" in caplog.text
