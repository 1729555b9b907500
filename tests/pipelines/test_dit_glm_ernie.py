"""DiT, GLM-Image and ERNIE-Image beyond the generic matrix of test_apply.py: DiTPipeline's positional latent, GLM-Image's
additive text mask and its image-to-image (kv_caches) calls refused with the reason, ERNIE-Image's padded text
[image, text] under its bool key mask. References are ``tests.utils.ReferenceAttention`` on the unmodified model."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines import presets as P
from tests.utils import ReferenceAttention

NAMES = ("dit", "glm_image", "ernie_image")
METHOD = dit_accel.GNA(kernel_size=(3, 5))


@pytest.fixture(scope="module")
def models():
    return {name: T.build_tiny_transformer(name) for name in NAMES}


def _run(model, kwargs, *args):
    with torch.no_grad():
        return model(*args, **kwargs)[0]


def _check(model, kwargs, *args):
    """GNA on ``model`` matches the masked reference of its preset's layout, sparse in every layer."""
    preset = P.PRESETS[type(model).__name__]
    assert preset.grid_dims == 2 and preset.min_diffusers == "0.42.1"
    grid = preset.read_grid(model, kwargs if not args else dict(kwargs, hidden_states=args[0])).grid
    dense = _run(model, kwargs, *args)
    with ReferenceAttention(gna_mask(grid, METHOD.kernel_size), preset.text_position) as ref_mode:
        ref = _run(model, kwargs, *args)
    with dit_accel.apply(model, METHOD, backend="torch") as handle:
        out = _run(model, kwargs, *args)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 2 and not handle.warnings, handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    return dense


def test_dit_takes_the_latent_positionally_as_its_pipeline_passes_it(models):
    model = models["dit"]
    kwargs = T.tiny_transformer_inputs("dit", model, batch=2)
    _check(model, kwargs, kwargs.pop("hidden_states"))


def test_glm_image_additive_text_mask_runs_exactly(models):
    """GLM-Image turns a (B, text) attention_mask into the float m_i * m_j SDPA adds (Chroma's form)."""
    model = models["glm_image"]
    kwargs = T.tiny_transformer_inputs("glm_image", model, batch=2)
    assert "attention_mask" not in kwargs  # GlmImagePipeline passes none; the tiny inputs follow it
    padded = dict(kwargs, attention_mask=torch.tensor([[1] * 7, [1] * 3 + [0] * 4]))
    assert (_run(model, padded) - _run(model, kwargs)).abs().max() > 1e-4
    _check(model, padded)


def _glm_cache(model, kwargs, mode):
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    caches = GlmImageKVCache(num_layers=model.config.num_layers)
    caches.set_mode("write")
    condition = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"][:1, :0], kv_caches=caches)
    for key in ("hidden_states", "prior_token_id", "prior_token_drop", "timestep", "target_size", "crop_coords"):
        condition[key] = kwargs[key][:1]
    _run(model, condition)  # dense: the condition image's keys and values, as the pipeline writes them
    caches.set_mode(mode)
    return condition, caches


def test_glm_image_to_image_calls_are_refused_and_text_to_image_ones_run(models):
    model = models["glm_image"]
    kwargs = T.tiny_transformer_inputs("glm_image", model, batch=2)
    condition, caches = _glm_cache(model, kwargs, "read")
    with dit_accel.apply(model, METHOD, backend="torch") as handle:
        with pytest.raises(ValueError, match=r"GLM-Image call reads kv_caches \(image-to-image\): its attention gets "
                                             r"the condition images' cached keys and values"):
            _run(model, dict(kwargs, kv_caches=caches))
        caches.set_mode("write")
        with pytest.raises(ValueError, match="writes a condition image's keys and values into kv_caches"):
            _run(model, condition)
        caches.set_mode("skip")  # the unconditional half of an image-to-image step: a plain [text, image] call
        _run(model, dict(kwargs, kv_caches=caches))
        assert handle.summary()["sparse_calls"] == 2
    _check(model, dict(kwargs, kv_caches=caches))


def test_ernie_image_padded_text_follows_the_image_under_its_key_mask(models):
    model = models["ernie_image"]
    padded = T.tiny_transformer_inputs("ernie_image", model, batch=2, text_valid=[7, 3])
    assert P.PRESETS["ErnieImageTransformer2DModel"].read_grid(model, padded) == P.GridInfo((10, 13), 7)
    dense = _check(model, padded)
    assert (dense - _run(model, T.tiny_transformer_inputs("ernie_image", model, batch=2))).abs().max() > 1e-4
