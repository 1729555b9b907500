"""dit_accel.comfyui on more of ComfyUI's model classes (tests/comfyui/models.py MORE_CASES), each on its own token
layout: Dense through the node is ComfyUI's own output bit for bit; a pattern equals the masked-dense reference on
the family's grid, with the tokens off the grid (reference frames) where the family says, and every
self-attention call of every model call took the sparse path (so no test passes by falling back to dense)."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import CASES, COMMON_WIDGETS, MORE_CASES, build, masked_reference, sample, with_override

FAMILIES = list(MORE_CASES)
# ComfyUI class, dit_accel family, Diffusers class, self-attention layers, token grid, tokens of each sparse call
EXPECTED = {
    "wan21-vace": ("VaceWanModel", "Wan VACE", "WanVACETransformer3DModel", 3, (3, 4, 4), {64}),  # + control block
    "wan21-camera": ("CameraWanModel", "Wan", "WanTransformer3DModel", 2, (3, 4, 4), {48}),
    "wan21-humo": ("HumoWanModel", "Wan HuMo", "WanTransformer3DModel", 2, (3, 4, 4), {64}),  # + reference frame
    "wan22-animate": ("AnimateWanModel", "Wan Animate", "WanAnimateTransformer3DModel", 2, (3, 4, 4), {64}),
    "qwen-image": ("QwenImageTransformer2DModel", "Qwen-Image", "QwenImageTransformer2DModel", 2, (4, 5), {26}),
    "chroma": ("Chroma", "Chroma", "ChromaTransformer2DModel", 2, (4, 5), {26}),  # 1 double + 1 single block
    "lumina2": ("NextDiT", "Lumina 2", "Lumina2Transformer2DModel", 3, (4, 5), {20, 26}),  # + image refiner
    "hunyuan-image21": ("HunyuanVideo", "HunyuanImage 2.1", "HunyuanImageTransformer2DModel", 2, (4, 5), {26}),
    "cosmos1": ("GeneralDIT", "Cosmos 1", "CosmosTransformer3DModel", 2, (3, 4, 4), {48}),
    "hidream": ("HiDreamImageTransformer2DModel", "HiDream", "HiDreamImageTransformer2DModel", 2, (4, 5),
                {33}),  # [image, T5 (5), Llama-3.1 (4) twice]
}
PATTERNS = {
    "tile": (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), lambda g: tile_mask(g, (1, 2, 2), (3, 1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2)), lambda g: gna_mask(g, (2, 3, 3), (1, 1, 2))),
}
IMAGE_PATTERNS = {  # a (H, W) grid
    "tile": (dit_accel.Tile(tile=(2, 2), window=(1, 1)), lambda g: tile_mask(g, (2, 2), (1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(3, 3), stride=(1, 2)), lambda g: gna_mask(g, (3, 3), (1, 2))),
}
STEPS = 2  # model calls per sample at cfg 1



@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_is_the_right_one(models, family):
    cls, name, diffusers_class, layers = EXPECTED[family][:4]
    inner = models(family).model.diffusion_model
    found = family_for(inner)
    assert type(inner).__name__ == cls and found is not None
    assert (found.name, found.diffusers_class, len(found.layers(inner))) == (name, diffusers_class, layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_through_the_node_is_comfyuis_own_output(comfy, models, family):
    case, model = MORE_CASES[family], models(family)
    own = sample(comfy, model, case)
    patched = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(model, **COMMON_WIDGETS)[0]
    assert torch.equal(sample(comfy, patched, case), own)
    assert torch.equal(sample(comfy, model, case), own)  # and the original is as it was


@pytest.mark.parametrize("family, pattern", [(f, "tile") for f in FAMILIES]
                         + [(f, "gna") for f in ("wan21-vace", "wan22-animate", "qwen-image", "lumina2",
                                                 "hunyuan-image21", "cosmos1")])
def test_a_pattern_equals_the_masked_dense_reference(comfy, models, sparse_calls, family, pattern):
    case, model = MORE_CASES[family], models(family)
    _, _, _, layers, grid, tokens = EXPECTED[family]
    method, mask_of = (PATTERNS if len(grid) == 3 else IMAGE_PATTERNS)[pattern]
    mask = mask_of(grid)
    assert not mask.all()  # a real pattern on this grid, not dense
    reference_calls = []
    reference = sample(comfy, with_override(model, masked_reference(mask, case.text, reference_calls)), case)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    assert len(sparse_calls) == len(reference_calls) == layers * STEPS  # every self-attention call, sparse
    assert set(sparse_calls) == tokens
    assert (out - sample(comfy, model, case)).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


def test_vace_counts_its_layers_as_the_diffusers_transformer_does(comfy, models, caplog):
    """Layer i of a plan or strategy is the same module on both hosts: the main blocks, then the control blocks."""
    from diffusers import WanVACETransformer3DModel

    from dit_accel.pipelines.presets import PRESETS
    from dit_accel.pipelines.transformer_hook import attention_modules

    twin = WanVACETransformer3DModel(num_attention_heads=2, attention_head_dim=32, num_layers=2, ffn_dim=64,
                                     text_dim=32, freq_dim=32, vace_layers=[0])
    names = [n for n, _ in attention_modules(twin, "", PRESETS["WanVACETransformer3DModel"])]
    assert names == ["blocks.0.attn1", "blocks.1.attn1", "vace_blocks.0.attn1"]
    case, model = MORE_CASES["wan21-vace"], models("wan21-vace")
    inner = model.model.diffusion_model
    assert family_for(inner).layers(inner) == [inner.blocks[0].self_attn, inner.blocks[1].self_attn,
                                               inner.vace_blocks[0].self_attn]
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        sample(comfy, patch_model(model, PATTERNS["tile"][0], dense_layers=[2], backend="torch"), case)
    assert "VaceWanModel grid (3, 4, 4)" in caplog.text  # the reference frame is off the grid
    assert "2 layers sparse" in caplog.text and "1 layers dense (dense layer)" in caplog.text


def test_vace_reads_its_reference_frames_from_the_control_frames(models):
    inner = models("wan21-vace").model.diffusion_model
    family = family_for(inner)
    x = torch.zeros(1, 16, 4, 8, 8)
    control = torch.randn(1, 1, 96, 4, 8, 8)
    assert family.grid(inner, x, {"vace_context": control}) == (4, 4, 4)  # no reference image: every frame
    assert family.grid(inner, x, {}) == (4, 4, 4)
    control[:, :, 16:, :2] = 0  # two reference images (their reactive half and mask are zero)
    assert family.grid(inner, x, {"vace_context": control}) == (2, 4, 4)
    control[:, :, 16:] = 0
    with pytest.raises(ValueError, match="every latent frame of the call reads as a VACE reference frame"):
        family.grid(inner, x, {"vace_context": control})


def _run(comfy, patcher, case, **extras):
    """A sample with ``extras`` in the conditioning's options (None: removed)."""
    cond = case.cond()
    for key, value in extras.items():
        cond[0][1].pop(key, None) if value is None else cond[0][1].__setitem__(key, value)
    noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
    return comfy.sample.sample(patcher, noise, STEPS, 1.0, "euler", "simple", cond, cond, torch.zeros(case.latent),
                               seed=0, disable_pbar=True)


@pytest.mark.parametrize("extras", ["no reference", "appended frames"])
def test_humos_trailing_tokens_stay_dense_and_the_video_leads(comfy, models, sparse_calls, extras):
    """Without a reference the calls are the video alone; frames that time_dim_concat appends come after the video
    and before the reference frame, so they stay dense with it."""
    case, model = MORE_CASES["wan21-humo"], models("wan21-humo")
    method, mask_of = PATTERNS["tile"]
    if extras == "no reference":
        extras, tokens = dict(reference_latents=None), 48
    else:
        extras, tokens = dict(time_dim_concat=torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(7))), 80
    reference = _run(comfy, with_override(model, masked_reference(mask_of(case.grid()), "last")), case, **extras)
    out = _run(comfy, patch_model(model, method, backend="torch"), case, **extras)
    assert sparse_calls == [tokens] * 2 * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_animate_needs_a_video_frame_after_its_reference(models):
    inner = models("wan22-animate").model.diffusion_model
    assert family_for(inner).grid(inner, torch.zeros(1, 16, 4, 8, 8), {}) == (3, 4, 4)
    with pytest.raises(ValueError, match="hold the reference frame only"):
        family_for(inner).grid(inner, torch.zeros(1, 16, 1, 8, 8), {})


def _four_more_tokens(args):
    """A FLUX ``post_input`` patch (ComfyUI's hook after the input projections) that appends 4 image tokens."""
    img, ids = args["img"], args["img_ids"]
    return dict(args, img=torch.cat([img, img[:, :4]], dim=1), img_ids=torch.cat([ids, ids[:, :4]], dim=1))


@pytest.mark.parametrize("extras, queries, references", [
    (dict(), 30, 0),  # [text 6, image 20, 4 more]
    (dict(reference_latents=[torch.ones(1, 16, 8, 10)]), 50, 20),  # FLUX Kontext: [text, image, reference, 4 more]
], ids=["flux", "flux-kontext"])
def test_tokens_off_the_layout_run_comfyuis_attention_and_say_so(comfy, models, caplog, sparse_calls, extras, queries,
                                                                  references):
    """Reference images are counted (tests/comfyui/test_reference_images.py); tokens a patch adds that no family
    counts would shift the grid, so those calls run ComfyUI's own attention, with a warning."""
    case, model = CASES["flux"], models("flux")
    method = IMAGE_PATTERNS["tile"][0]
    extended = model.clone()
    extended.set_model_patch(_four_more_tokens, "post_input")
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        out = _run(comfy, patch_model(extended, method, backend="torch"), case, **extras)
    assert f"{queries} queries" in caplog.text and "layers dense (call does not match the grid)" in caplog.text
    assert f"(20 tokens; off it: {6 + references}, of which {references} reference tokens)" in caplog.text
    assert not sparse_calls
    assert torch.equal(out, _run(comfy, extended, case, **extras))
    _run(comfy, patch_model(model, method, backend="torch"), case, **extras)  # without the patch: the sparse path
    assert sparse_calls


def test_lumina2_refuses_captions_of_different_lengths_in_one_call(models):
    inner = models("lumina2").model.diffusion_model
    family = family_for(inner)
    x = torch.zeros(2, 16, 8, 10)
    assert family.grid(inner, x, {"attention_mask": torch.ones(2, 6)}) == (4, 5)
    with pytest.raises(ValueError, match="captions of different valid lengths"):
        family.grid(inner, x, {"attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])})


def test_hunyuan_image21_with_byt5_tokens_after_its_text(comfy, models, sparse_calls):
    """HunyuanImage 2.1's glyph tokens (ByT5) join the text after the Qwen2.5-VL tokens: [image, text, byt5]."""
    case, model = MORE_CASES["hunyuan-image21"], models("hunyuan-image21")
    method, mask_of = IMAGE_PATTERNS["tile"]
    byt5 = torch.randn(1, 3, 1472, generator=torch.Generator().manual_seed(19))
    extras = dict(attention_mask=None, conditioning_byt5small=byt5)  # (ComfyUI fails on a padded mask with ByT5)
    reference = _run(comfy, with_override(model, masked_reference(mask_of(case.grid()), "last")), case, **extras)
    out = _run(comfy, patch_model(model, method, backend="torch"), case, **extras)
    assert sparse_calls == [20 + 6 + 3] * 2 * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_hunyuan_image21_takes_its_own_presets_not_hunyuan_videos(comfy, models):
    """One ComfyUI class, two families: the patch's rank decides; HunyuanVideo's published settings are refused on
    HunyuanImage 2.1, and its refiner (3-D patch, no CLIP vector) is refused until its layout is tested."""
    image, video = models("hunyuan-image21"), models("hunyuan-video")
    assert family_for(image.model.diffusion_model).name == "HunyuanImage 2.1"
    assert family_for(video.model.diffusion_model).name == "HunyuanVideo"
    tile = NODE_CLASS_MAPPINGS["DitAccelTile"]
    label = next(p for p in tile.INPUT_TYPES()["required"]["preset"][0] if p.startswith("HunyuanVideo"))
    with pytest.raises(ValueError, match=r"this MODEL is HunyuanVideo \(HunyuanImage 2\.1\)"):
        tile().patch(image, preset=label, tile="", window="", block_size="", fit=False, **COMMON_WIDGETS)
    from tests.comfyui.models import HUNYUAN_IMAGE21, Case

    refiner = build(comfy, Case("refiner", "HunyuanImage21Refiner", dict(HUNYUAN_IMAGE21, patch_size=[1, 1, 1],
                                                                          axes_dim=[8, 12, 12], byt5=False),
                                (1, 64, 1, 4, 5), lambda: []))
    assert family_for(refiner.model.diffusion_model) is None
    with pytest.raises(ValueError, match=r"^dit_accel: the ComfyUI model HunyuanVideo is not covered: .*refiner"):
        patch_model(refiner, dit_accel.Dense())


def test_hidream_places_e1s_condition_image_beside_the_latent(models):
    inner = models("hidream").model.diffusion_model
    family = family_for(inner)
    x = torch.zeros(1, 16, 8, 10)
    assert family.grid(inner, x, {}) == (4, 5)
    assert family.grid(inner, x, {"image_cond": torch.zeros(1, 16, 8, 10)}) == (4, 10)  # concatenated on the width
    call = {"context": torch.zeros(1, 5, 32), "encoder_hidden_states_llama3": torch.zeros(1, 3, 4, 24)}
    assert family.off_grid(inner, x, call, (4, 5)) == 13


def test_wan_s2v_is_refused_with_its_reason(models):
    for name, reason in (("WanModel_S2V", "transformer_options"),):
        clone = models("wan21-humo").clone()
        clone.model = type("BaseModel", (), {"diffusion_model": type(name, (torch.nn.Module,), {})()})()
        with pytest.raises(ValueError, match=rf"^dit_accel: the ComfyUI model {name} is not covered: .*{reason}"):
            patch_model(clone, dit_accel.Dense())
