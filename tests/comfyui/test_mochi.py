"""dit_accel.comfyui on Mochi (ComfyUI's ``AsymmDiTJoint``), whose forward runs no diffusion-model wrapper: the grid is
read around ``BaseModel.apply_model`` (``Family.hook``). Dense through the node is ComfyUI's own output bit for bit;
a pattern equals the masked-dense reference on [video, valid text], every self-attention call of every model call
sparse; the layers are the Diffusers ``MochiTransformer3DModel``'s in its order."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.comfyui.override import _as_model_call
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask
from tests.comfyui.models import (CASES, COMMON_WIDGETS, MOCHI_CASES, build, masked_reference, sample, with_override)

CASE = MOCHI_CASES["mochi"]
GRID, LAYERS, STEPS = (3, 4, 4), 2, 2
TOKENS = 48 + 4  # the video, then the 4 valid of 6 text tokens (ComfyUI cuts the padded 2 off)
PATTERNS = {
    "tile": (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), tile_mask(GRID, (1, 2, 2), (3, 1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2)), gna_mask(GRID, (2, 3, 3), (1, 1, 2))),
}


@pytest.fixture(scope="module")
def mochi(comfy):
    return build(comfy, CASE)


def test_mochi_is_its_own_family_read_around_apply_model(mochi):
    inner = mochi.model.diffusion_model
    family = family_for(inner)
    assert type(inner).__name__ == "AsymmDiTJoint" and family is not None
    assert (family.name, family.diffusers_class, family.text_position, family.hook) == (
        "Mochi", "MochiTransformer3DModel", "last", "apply_model")
    assert family.layers(inner) == [block.attn for block in inner.blocks]
    assert inner.hidden_size_y != inner.hidden_size_x  # the text stream is narrower: projected to the video's heads


def test_mochi_counts_its_layers_as_the_diffusers_transformer_does(mochi):
    """Layer i of a plan or strategy is the same module on both hosts: one joint attention per block."""
    from diffusers import MochiTransformer3DModel

    from dit_accel.pipelines.presets import PRESETS
    from dit_accel.pipelines.transformer_hook import attention_modules

    twin = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=LAYERS,
                                   pooled_projection_dim=32, in_channels=12, text_embed_dim=32, time_embed_dim=16,
                                   max_sequence_length=8)
    preset = PRESETS["MochiTransformer3DModel"]
    assert [n for n, _ in attention_modules(twin, "", preset)] == [f"transformer_blocks.{i}.attn1"
                                                                   for i in range(LAYERS)]
    assert preset.text_position == family_for(mochi.model.diffusion_model).text_position == "last"


def test_only_mochi_takes_the_apply_model_wrapper(comfy, mochi):
    """The families that run a diffusion-model wrapper keep it (and only it); a second node is refused on Mochi
    too."""
    wrappers = comfy.patcher_extension.WrappersMP
    wan = patch_model(build(comfy, CASES["wan21-t2v"]), dit_accel.Dense())
    assert len(wan.get_wrappers(wrappers.DIFFUSION_MODEL, "dit_accel")) == 1
    assert wan.get_wrappers(wrappers.APPLY_MODEL, "dit_accel") == []
    patched = patch_model(mochi, dit_accel.Dense())
    assert len(patched.get_wrappers(wrappers.APPLY_MODEL, "dit_accel")) == 1
    assert patched.get_wrappers(wrappers.DIFFUSION_MODEL, "dit_accel") == []
    assert mochi.get_wrappers(wrappers.APPLY_MODEL, "dit_accel") == []  # the model given is unchanged
    with pytest.raises(ValueError, match="already comes out of a dit_accel node"):
        patch_model(patched, dit_accel.Dense())


@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["cfg1", "cfg3-batched"])
def test_dense_through_the_node_is_comfyuis_own_output(comfy, mochi, caplog, cfg):
    own = sample(comfy, mochi, CASE, cfg=cfg)
    patched = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(mochi, **COMMON_WIDGETS)[0]
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        assert torch.equal(sample(comfy, patched, CASE, cfg=cfg), own)
    assert f"AsymmDiTJoint grid {GRID} step 0/{STEPS}: {LAYERS} layers dense" in caplog.text  # the grid was read
    assert torch.equal(sample(comfy, mochi, CASE, cfg=cfg), own)  # and the original is as it was


@pytest.mark.parametrize("pattern, cfg", [("tile", 1.0), ("gna", 1.0), ("tile", 3.0)],
                         ids=["tile", "gna", "tile-cfg3-batched"])
def test_a_pattern_equals_the_masked_dense_reference(comfy, mochi, sparse_calls, pattern, cfg):
    method, mask = PATTERNS[pattern]
    assert not mask.all()  # a real pattern on this grid, not dense
    reference_calls = []
    reference = sample(comfy, with_override(mochi, masked_reference(mask, "last", reference_calls)), CASE, cfg=cfg)
    out = sample(comfy, patch_model(mochi, method, backend="torch"), CASE, cfg=cfg)
    assert len(sparse_calls) == len(reference_calls) == LAYERS * STEPS  # every self-attention call, sparse
    assert set(sparse_calls) == {TOKENS}
    assert (out - sample(comfy, mochi, CASE, cfg=cfg)).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


def test_the_step_comes_from_apply_models_options(comfy, mochi, sparse_calls):
    """dense_steps needs the sampler's sigmas, which reach the apply_model wrapper as they reach a model's own."""
    patched = NODE_CLASS_MAPPINGS["DitAccelTile"]().patch(
        mochi, tile="1,2,2", window="3,1,1", block_size="", fit=False, **dict(COMMON_WIDGETS, dense_steps=1))[0]
    sample(comfy, patched, CASE, steps=3)
    assert sparse_calls == [TOKENS] * LAYERS * 2  # steps 1 and 2 of 3


def test_the_text_tokens_are_the_first_num_tokens_of_the_context(mochi):
    """The exact number of text tokens a call holds: num_tokens (the valid ones), at most the context's length,
    the forward's default (256) where ComfyUI passes none."""
    inner = mochi.model.diffusion_model
    family, x = family_for(inner), torch.zeros(1, 12, 3, 8, 8)
    context = torch.zeros(1, 6, 32)
    assert family.grid(inner, x, {}) == GRID
    assert family.off_grid(inner, x, {"context": context, "num_tokens": 4}, GRID) == 4
    call = _as_model_call(inner, {"x": x, "c_crossattn": context, "c_concat": None})
    assert call["num_tokens"] == 256 and call["context"] is context and "c_crossattn" not in call
    assert family.off_grid(inner, x, call, GRID) == 6


def test_prompts_of_other_valid_lengths_each_keep_their_own_text(comfy, mochi, sparse_calls):
    """A negative prompt with 2 valid tokens: ComfyUI cannot batch its num_tokens with the positive's 4, so each
    runs its own model call, and each call's text is its own prompt's valid tokens."""
    method, mask = PATTERNS["tile"]
    positive = CASE.cond()
    negative = [[torch.flip(positive[0][0], dims=(1,)), {"attention_mask": torch.tensor([[1, 1, 0, 0, 0, 0]])}]]
    noise = torch.randn(CASE.latent, generator=torch.Generator().manual_seed(5))

    def run(patcher):
        return comfy.sample.sample(patcher, noise, STEPS, 3.0, "euler", "simple", positive, negative,
                                   torch.zeros(CASE.latent), seed=0, disable_pbar=True)

    reference = run(with_override(mochi, masked_reference(mask, "last")))
    out = run(patch_model(mochi, method, backend="torch"))
    assert sorted(sparse_calls) == sorted([48 + 4, 48 + 2] * LAYERS * STEPS)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
