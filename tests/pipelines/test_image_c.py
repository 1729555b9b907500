"""The image classes of Diffusers 0.42.1: LongCat-Image, Ovis-Image, Bria FIBO and Krea 2, each against the
masked-dense reference on its own layout (all four attend [text, image] jointly, text first); FIBO and Krea 2
with their bool text key mask; the edit calls of LongCat-Image and FIBO Edit with the input / reference images'
tokens after the generated image (exact rows and columns); grid readers that refuse ids they cannot place."""

import math

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.models.tiny.longcat_image import image_ids
from dit_accel.patterns import gna_mask
from dit_accel.pipelines import presets as P
from tests.pipelines.test_call_forms import SpanReference
from tests.utils import ReferenceAttention, method_mask, first_output as _run

NAMES = ("longcat_image", "ovis_image", "bria_fibo", "krea2")
LAYERS = 2  # wrapped attention modules of each tiny model (1 double + 1 single block; Krea 2: 2 blocks)
MASKED = {"bria_fibo", "krea2"}  # a padded prompt passes a bool key mask


@pytest.fixture(scope="module")
def models():
    return {name: T.build_tiny_transformer(name) for name in NAMES}


def _inputs(name, model, **kw):
    valid = [T.TRANSFORMER_TEXT[name], 3] if name in MASKED else None
    return T.tiny_transformer_inputs(name, model, batch=2, text_valid=valid, **kw)


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.GNA(kernel_size=(3, 5)), id="gna-3x5"),
    pytest.param(dit_accel.Tile(tile=(4, 4), window=(1, 3)), id="tile-4x4-w1x3"),
])
@pytest.mark.parametrize("name", NAMES)
def test_image_class_matches_the_masked_reference(models, name, method):
    model = models[name]
    preset = P.PRESETS[type(model).__name__]
    assert preset.text_position == "first" and preset.grid_dims == 2 and preset.min_diffusers == "0.42.1"
    kwargs = _inputs(name, model)
    grid = T.TRANSFORMER_GRIDS[name]
    assert preset.read_grid(model, kwargs) == P.GridInfo(grid, T.TRANSFORMER_TEXT[name])
    pattern = method_mask(method, grid)
    assert not pattern.all()
    dense = _run(model, kwargs)
    with ReferenceAttention(pattern, "first") as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == LAYERS and not handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert torch.equal(_run(model, kwargs), dense)


@pytest.mark.parametrize("name", sorted(MASKED))
def test_the_text_key_mask_changes_the_output_and_is_kept(models, name):
    """The padded prompt's keys are masked in the sparse run as in the dense one (full-window GNA is dense)."""
    model = models[name]
    padded, full = _inputs(name, model), T.tiny_transformer_inputs(name, model, batch=2)
    dense = _run(model, padded)
    assert (dense - _run(model, full)).abs().max() > 1e-3
    with dit_accel.apply(model, dit_accel.SLA(topk=1.0), backend="torch") as handle:
        out = _run(model, padded)
        assert handle.summary()["sparse_calls"] == LAYERS
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ edit calls: images after the generated one
def _check_after(model, kwargs, grid, after, method=dit_accel.GNA(kernel_size=(3, 5))):
    dense = _run(model, kwargs)
    with SpanReference(gna_mask(grid, method.kernel_size), after) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 2 and not handle.warnings, handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert out.shape[1] == math.prod(grid) + after


def test_longcat_edit_keeps_the_input_image_exact_and_the_image_sparse(models):
    """LongCatImageEditPipeline: [latents, image_latents] with ids at modality 1 and 2, both offset past the text."""
    model, name = models["longcat_image"], "longcat_image"
    kwargs, grid, text = _inputs(name, model), T.TRANSFORMER_GRIDS[name], T.TRANSFORMER_TEXT[name]
    source = (6, 7)
    g = torch.Generator().manual_seed(5)
    extra = torch.randn(2, math.prod(source), model.config.in_channels, generator=g)
    kwargs.update(hidden_states=torch.cat([kwargs["hidden_states"], extra], 1),
                  img_ids=torch.cat([kwargs["img_ids"], image_ids(*source, 2, text)]))
    info = P.PRESETS["LongCatImageTransformer2DModel"].read_grid(model, kwargs)
    assert info == P.GridInfo(grid, text + math.prod(source), num_after=math.prod(source))
    _check_after(model, kwargs, grid, math.prod(source))


def test_fibo_edit_keeps_reference_tokens_exact_and_the_image_sparse(models):
    """BriaFiboEditPipeline: each reference on its own RoPE plane (t = 1, 2) after the image, the key mask over
    [text, image, references] (1 on both images)."""
    model, name = models["bria_fibo"], "bria_fibo"
    kwargs, grid, text = _inputs(name, model), T.TRANSFORMER_GRIDS[name], T.TRANSFORMER_TEXT[name]
    refs, g = ((4, 5), (3, 3)), torch.Generator().manual_seed(5)
    ids, tokens = [kwargs["img_ids"]], [kwargs["hidden_states"]]
    for plane, (h, w) in enumerate(refs, start=1):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids.append(torch.stack([torch.full_like(rows, plane), rows, cols], -1).reshape(-1, 3).float())
        tokens.append(torch.randn(2, h * w, model.config.in_channels, generator=g))
    after = sum(h * w for h, w in refs)
    mask = kwargs["joint_attention_kwargs"]["attention_mask"]
    kwargs.update(img_ids=torch.cat(ids), hidden_states=torch.cat(tokens, 1), joint_attention_kwargs={
        "attention_mask": torch.cat([mask, torch.ones(2, 1, 1, after, dtype=torch.bool)], -1)})
    info = P.PRESETS["BriaFiboTransformer2DModel"].read_grid(model, kwargs)
    assert info == P.GridInfo(grid, text + after, num_after=after)
    _check_after(model, kwargs, grid, after)


# ------------------------------------------------------------------ what the readers refuse
@pytest.mark.parametrize("name, key, what", [
    ("longcat_image", "img_ids", "LongCat-Image image tokens of this call are not one"),
    ("ovis_image", "img_ids", "Ovis-Image image tokens of this call are not one"),
    ("bria_fibo", "img_ids", "Bria FIBO image tokens of this call are not one"),
    ("krea2", "position_ids", "Krea 2 image tokens of this call are not one"),
])
def test_ids_that_are_no_raster_are_refused_naming_the_image(models, name, key, what):
    model = models[name]
    kwargs = T.tiny_transformer_inputs(name, model)
    ids = kwargs[key].clone()
    ids[-3, 2] = 40  # one image token off its raster place
    with pytest.raises(ValueError, match=what):
        P.PRESETS[type(model).__name__].read_grid(model, dict(kwargs, **{key: ids}))


def test_krea2_position_ids_of_another_length_are_refused(models):
    model = models["krea2"]
    kwargs = T.tiny_transformer_inputs("krea2", model)
    with pytest.raises(ValueError, match=r"Krea 2 position_ids of shape \(136, 3\) do not describe the 7 text"):
        P.PRESETS["Krea2Transformer2DModel"].read_grid(model, dict(kwargs, position_ids=kwargs["position_ids"][1:]))


def test_fibo_2_ids_name_neither_bria_class():
    """FIBO 2 (``BriaFibo2Transformer2DModel``) is another class: its ids must not resolve to FIBO or Bria 3.x."""
    assert P.resolve_model_family("briaai/Fibo-2.0-dev")[0] == "BriaFibo2Transformer2DModel"
