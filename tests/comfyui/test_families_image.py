"""dit_accel.comfyui on more of ComfyUI's image model classes (tests/comfyui/models.py IMAGE_CASES): SD3 / SD3.5,
AuraFlow, OmniGen2 (with and without reference images) and Chroma Radiance, each on its own token layout. Dense
through the node is ComfyUI's own output bit for bit; a pattern equals the masked-dense reference on the family's
grid, with the tokens off the grid (text, register tokens, reference images) dense before it, and every
self-attention call of every model call took the sparse path (so no test passes by falling back to dense). The
classes dit_accel refuses fail with their reason; for PixArt and HunyuanDiT the reason (their attention calls never
reach ComfyUI's attention override) is checked on ComfyUI's own model."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import (COMMON_WIDGETS, IMAGE_CASES, Case, build, masked_reference, sample,
                                  with_override)

FAMILIES = list(IMAGE_CASES)
GRID = (4, 5)  # every case's image: 8 x 10 latent in 2 x 2 patches, Chroma Radiance's 16 x 20 pixels in 4 x 4
# ComfyUI class, dit_accel family, Diffusers class, self-attention layers, tokens of each self-attention call
EXPECTED = {
    # joint [text 6, image 20] in blocks 0 and 1, block 0's SD3.5 image self-attention (attn2) between them
    "sd3": ("OpenAISignatureMMDITWrapper", "SD3", "SD3Transformer2DModel", 3, {26, 20}),
    # [8 register tokens, text 6, image 20] in 1 double and 2 single layers
    "auraflow": ("MMDiT", "AuraFlow", "AuraFlowTransformer2DModel", 3, {34}),
    # the image refiner (image alone), then 2 joint layers over [text 6, image 20]
    "omnigen2": ("OmniGen2Transformer2DModel", "OmniGen2", "Lumina2Transformer2DModel", 3, {20, 26}),
    # ... over [text 6, references 12 + 20, image 20]; the reference refiner (32 tokens) is no layer
    "omnigen2-edit": ("OmniGen2Transformer2DModel", "OmniGen2", "Lumina2Transformer2DModel", 3, {20, 58}),
    "chroma-radiance": ("ChromaRadiance", "Chroma Radiance", "ChromaTransformer2DModel", 2, {26}),
}
PATTERNS = {  # a (H, W) grid
    "tile": (dit_accel.Tile(tile=(2, 2), window=(1, 1)), tile_mask(GRID, (2, 2), (1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(3, 3), stride=(1, 2)), gna_mask(GRID, (3, 3), (1, 2))),
}
STEPS = 2  # model calls per sample at cfg 1


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_is_the_right_one(models, family):
    cls, name, diffusers_class, layers = EXPECTED[family][:4]
    inner = models(family).model.diffusion_model
    found = family_for(inner)
    assert type(inner).__name__ == cls and found is not None
    assert (found.name, found.diffusers_class, len(found.layers(inner))) == (name, diffusers_class, layers)
    assert found.grid(inner, torch.zeros(IMAGE_CASES[family].latent), {}) == GRID


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_through_the_node_is_comfyuis_own_output(comfy, models, family):
    case, model = IMAGE_CASES[family], models(family)
    own = sample(comfy, model, case)
    patched = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(model, **COMMON_WIDGETS)[0]
    assert torch.equal(sample(comfy, patched, case), own)
    assert torch.equal(sample(comfy, model, case), own)  # and the original is as it was


@pytest.mark.parametrize("family, pattern", [(f, p) for f in FAMILIES for p in PATTERNS])
def test_a_pattern_equals_the_masked_dense_reference(comfy, models, sparse_calls, family, pattern):
    """The reference: the pattern on the image's pairs, every pair with a token before the image (text, register
    tokens, reference images) allowed, in the calls of the layout's lengths; every other call ComfyUI's own."""
    case, model = IMAGE_CASES[family], models(family)
    layers, tokens = EXPECTED[family][3:]
    method, mask = PATTERNS[pattern]
    assert not mask.all()  # a real pattern on this grid, not dense
    reference_calls = []
    reference = sample(comfy, with_override(model, masked_reference(mask, "first", reference_calls, tokens)), case)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    assert len(sparse_calls) == len(reference_calls) == layers * STEPS  # every self-attention call, sparse
    assert set(sparse_calls) == tokens
    assert (out - sample(comfy, model, case)).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batched_call_runs_sparse(comfy, models, sparse_calls, family):
    """At cfg > 1 the positive and negative prompts run as one call of batch 2 (OmniGen2's references too)."""
    case, model = IMAGE_CASES[family], models(family)
    layers, tokens = EXPECTED[family][3:]
    method, mask = PATTERNS["tile"]
    reference = sample(comfy, with_override(model, masked_reference(mask, "first", lengths=tokens)), case, cfg=2.0)
    out = sample(comfy, patch_model(model, method, backend="torch"), case, cfg=2.0)
    assert len(sparse_calls) == layers * STEPS and set(sparse_calls) == tokens
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_sd3_counts_its_layers_as_the_diffusers_transformer_does(comfy, models, caplog, sparse_calls):
    """Layer i is the same attention on both hosts: per block its joint attention, then SD3.5's attn2. ComfyUI
    makes both calls in one function outside any module's forward; the family tells them apart."""
    from diffusers import SD3Transformer2DModel

    from dit_accel.pipelines.presets import PRESETS
    from dit_accel.pipelines.transformer_hook import attention_modules

    twin = SD3Transformer2DModel(sample_size=32, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                                 joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=8,
                                 pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    names = [n for n, _ in attention_modules(twin, "", PRESETS["SD3Transformer2DModel"])]
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    case, model = IMAGE_CASES["sd3"], models("sd3")
    inner = model.model.diffusion_model
    blocks = inner.joint_blocks
    assert family_for(inner).layers(inner) == [blocks[0].x_block.attn, blocks[0].x_block.attn2, blocks[1].x_block.attn]
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        out = sample(comfy, patch_model(model, PATTERNS["tile"][0], dense_layers=[1], backend="torch"), case)
    assert sparse_calls == [26, 26] * STEPS  # attn2 (layer 1) dense: the joint calls alone sparse
    assert "OpenAISignatureMMDITWrapper grid (4, 5) step 0/2: 2 layers sparse" in caplog.text
    assert "1 layers dense (dense layer)" in caplog.text
    # the reference: the pattern in the joint calls only (attn2's 20 tokens run ComfyUI's attention)
    reference = sample(comfy, with_override(model, masked_reference(PATTERNS["tile"][1], "first", lengths={26})), case)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_sd3_without_dual_attention_has_one_layer_per_block(comfy, sparse_calls):
    """SD3 (3.0, 3.5 Large): no attn2, each block's joint attention is its layer."""
    case = Case("sd3-large", "SD3", dict(IMAGE_CASES["sd3"].config, x_block_self_attn_layers=[]), (1, 16, 8, 10),
                IMAGE_CASES["sd3"].cond, text="first", patch=(2, 2))
    model = build(comfy, case)
    inner = model.model.diffusion_model
    assert family_for(inner).layers(inner) == [b.x_block.attn for b in inner.joint_blocks]
    method, mask = PATTERNS["gna"]
    reference = sample(comfy, with_override(model, masked_reference(mask, "first", lengths={26})), case)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    assert sparse_calls == [26] * 2 * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_auraflow_counts_its_layers_and_registers_as_the_diffusers_transformer_does(models):
    from diffusers import AuraFlowTransformer2DModel

    from dit_accel.pipelines.presets import PRESETS
    from dit_accel.pipelines.transformer_hook import attention_modules

    twin = AuraFlowTransformer2DModel(sample_size=16, num_mmdit_layers=1, num_single_dit_layers=2,
                                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                      caption_projection_dim=64, pos_embed_max_size=256)
    names = [n for n, _ in attention_modules(twin, "", PRESETS["AuraFlowTransformer2DModel"])]
    assert names == ["joint_transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                     "single_transformer_blocks.1.attn"]
    inner = models("auraflow").model.diffusion_model
    assert inner.register_tokens.shape[1] == twin.register_tokens.shape[1] == 8
    family, x = family_for(inner), torch.zeros(1, 4, 8, 10)
    assert family.off_grid(inner, x, {"context": torch.zeros(1, 6, 32)}, GRID) == 8 + 6


@pytest.mark.parametrize("extras, off_grid", [
    ({}, 6),
    ({"ref_latents": [torch.zeros(1, 16, 6, 7), torch.zeros(1, 16, 8, 10)]}, 6 + 12 + 20),  # 6 x 7 -> 3 x 4 tokens
])
def test_omnigen2_counts_its_text_and_reference_tokens_before_the_image(models, extras, off_grid):
    inner = models("omnigen2").model.diffusion_model
    family, x = family_for(inner), torch.zeros(1, 16, 8, 10)
    assert family.off_grid(inner, x, {"context": torch.zeros(1, 6, 32), **extras}, GRID) == off_grid
    assert [type(m).__name__ for m in family.alone(inner)] == ["Attention"]  # the image refiner's: image alone
    assert family.hook == "apply_model" and family.references is None  # the references lead the image, as text


def test_omnigen2_with_references_logs_its_grid_and_runs_the_refiners_dense(comfy, models, caplog, sparse_calls):
    case, model = IMAGE_CASES["omnigen2-edit"], models("omnigen2-edit")
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        sample(comfy, patch_model(model, PATTERNS["tile"][0], backend="torch"), case)
    assert "OmniGen2Transformer2DModel grid (4, 5) step 0/2: 3 layers sparse" in caplog.text
    assert "layers dense" not in caplog.text and "does not match" not in caplog.text
    assert sorted(sparse_calls) == sorted([20, 58, 58] * STEPS)  # not the text (6) or reference (32) refiners


def test_chroma_radiance_reads_its_grid_in_pixel_patches(models):
    inner = models("chroma-radiance").model.diffusion_model
    family = family_for(inner)
    assert inner.patch_size == 4 and family.grid(inner, torch.zeros(1, 3, 15, 18), {}) == (4, 5)  # padded
    assert family.off_grid(inner, torch.zeros(1, 3, 16, 20), {"context": torch.zeros(1, 6, 32)}, GRID) == 6


# PixArt-alpha and HunyuanDiT of ComfyUI's own classes (PixArt's grid base size needs a 64 x 64 latent)
PIXART = Case("pixart", "PixArtAlpha", dict(image_model="pixart_alpha", input_size=8, patch_size=2, in_channels=4,
                                            hidden_size=64, depth=1, num_heads=2, caption_channels=32,
                                            model_max_length=6, micro_condition=False, pe_interpolation=1.0),
              (1, 4, 64, 64), lambda: [[torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(54)), {}]])
HUNYUAN_DIT = Case("hunyuan-dit", "HunyuanDiT1", dict(
    image_model="hydit1", input_size=(8, 8), patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
    mlp_ratio=2.0, text_states_dim=32, text_states_dim_t5=24, text_len=6, text_len_t5=5, size_cond=False,
    use_style_cond=False), (1, 4, 8, 8), lambda: [[torch.randn(1, 6, 32), {
        "attention_mask": torch.ones(1, 6), "conditioning_mt5xl": torch.randn(1, 5, 24),
        "attention_mask_mt5xl": torch.ones(1, 5)}]])


@pytest.mark.parametrize("case, cls", [(PIXART, "PixArtMS"), (HUNYUAN_DIT, "HunYuanDiT")], ids=["pixart", "hunyuan-dit"])
def test_a_model_whose_attention_the_override_never_sees_is_refused(comfy, case, cls):
    """Their attention calls pass no transformer_options, so an override set on the model never runs: the node
    would silently run dense. It refuses them instead, saying why and what to do."""
    model = build(comfy, case)
    calls = []
    seen = lambda func, *args, **kwargs: calls.append(args[0].shape) or func(*args, **kwargs)
    out = sample(comfy, with_override(model, seen), case, steps=1)
    assert calls == [] and out.shape == case.latent  # ComfyUI ran the model; the override saw no call
    assert type(model.model.diffusion_model).__name__ == cls
    with pytest.raises(ValueError, match=rf"^dit_accel: the ComfyUI model {cls} is not covered: .*without "
                                         r"transformer_options.*bypass or remove the dit_accel node") as err:
        NODE_CLASS_MAPPINGS["DitAccelTile"]().patch(model, tile="2,2", window="1,1", block_size="", fit=False,
                                                    **COMMON_WIDGETS)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cls, reason", [
    ("Hunyuan3Dv2", "3-D shape latent"), ("HunYuanDiTPlain", "3-D shape latent"),
    ("ACEStepTransformer2DModel", "audio"), ("WanModel_S2V", "transformer_options"),
])
def test_refused_classes_name_themselves_their_reason_and_what_to_do(models, cls, reason):
    clone = models("sd3").clone()
    clone.model = type("BaseModel", (), {"diffusion_model": type(cls, (torch.nn.Module,), {})()})()
    with pytest.raises(ValueError, match=rf"^dit_accel: the ComfyUI model {cls} is not covered: .*{reason}.*use "
                                         r"ComfyUI's own attention for it: bypass or remove the dit_accel node"):
        patch_model(clone, dit_accel.Dense())


def test_an_unknown_class_names_the_covered_ones_and_what_to_do(models):
    clone = models("sd3").clone()
    clone.model = type("BaseModel", (), {"diffusion_model": type("UNetModel", (torch.nn.Module,), {})()})()
    with pytest.raises(ValueError, match=r"^dit_accel: the ComfyUI model UNetModel is not covered .*"
                                         r"OpenAISignatureMMDITWrapper \(SD3\).*MMDiT \(AuraFlow\).*"
                                         r"bypass or remove the dit_accel node"):
        NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(clone, **COMMON_WIDGETS)
    clone.model.diffusion_model = type("MMDiT", (torch.nn.Module,), {})()  # AuraFlow's name, not its layout
    with pytest.raises(ValueError, match=r"^dit_accel: the ComfyUI model MMDiT is not covered \("):
        patch_model(clone, dit_accel.Dense())
