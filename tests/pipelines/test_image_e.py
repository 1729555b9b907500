"""Nucleus-Image and PRX beyond the generic matrix of test_apply.py (which runs both against the masked reference,
their text padded): the presets read the grid their calls lay out, Nucleus-Image's calls through Diffusers' text
KV cache run as its plain calls do, and the calls it cannot place are refused at the call with the reason."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines import presets as P
from tests.utils import first_output as _run

NAMES = ("nucleusmoe_image", "prx")
METHOD = dit_accel.GNA(kernel_size=(3, 5))


@pytest.fixture(scope="module")
def models():
    return {name: T.build_tiny_transformer(name) for name in NAMES}


@pytest.mark.parametrize("name, position", [("nucleusmoe_image", "last"), ("prx", "first")])
def test_the_presets_read_the_grid_and_text_of_the_call(models, name, position):
    model = models[name]
    preset = P.PRESETS[type(model).__name__]
    assert (preset.grid_dims, preset.min_diffusers, preset.text_position) == (2, "0.42.1", position)
    kwargs = T.tiny_transformer_inputs(name, model, batch=2, grid=(6, 9), text_valid=[7, 3])
    assert preset.read_grid(model, kwargs) == P.GridInfo((6, 9), 7)


def test_nucleus_text_kv_cache_calls_run_as_the_plain_ones(models):
    """Diffusers' TextKVCacheConfig hands the blocks cached text keys and values: the same [image, text] keys."""
    from diffusers import TextKVCacheConfig

    model = T.build_tiny_transformer("nucleusmoe_image")
    kwargs = T.tiny_transformer_inputs("nucleusmoe_image", model, batch=2, text_valid=[7, 3])
    with dit_accel.apply(models["nucleusmoe_image"], METHOD, backend="torch"):
        plain = _run(models["nucleusmoe_image"], kwargs)
    model.enable_cache(TextKVCacheConfig())
    try:
        with dit_accel.apply(model, METHOD, backend="torch") as handle:
            for _ in range(2):  # the first call fills the cache, the second reads it
                torch.testing.assert_close(_run(model, kwargs), plain, atol=1e-5, rtol=1e-5)
            assert handle.summary()["sparse_calls"] == 4 and not handle.warnings
    finally:
        model.disable_cache()


@pytest.mark.parametrize("img_shapes, tokens, match", [
    ([[(1, 10, 13), (1, 10, 13)]] * 2, 260, r"img_shapes \[\(1, 10, 13\), \(1, 10, 13\)\] are not one image of one "
                                            r"frame over its 260 image tokens"),
    ([(2, 10, 13)] * 2, 260, r"img_shapes \[\(2, 10, 13\)\] are not one image of one frame"),
    ([(1, 10, 13), (1, 13, 10)], 130, r"samples of this NucleusMoE-Image call have different img_shapes .* lays out "
                                      r"every sample by the first one's"),
], ids=["two-images", "two-frames", "mixed-sizes"])
def test_nucleus_calls_it_cannot_place_are_refused_at_the_call(models, img_shapes, tokens, match):
    model = models["nucleusmoe_image"]
    kwargs = T.tiny_transformer_inputs("nucleusmoe_image", model, batch=2)
    kwargs.update(img_shapes=img_shapes, hidden_states=torch.randn(2, tokens, model.config.in_channels))
    with dit_accel.apply(model, METHOD, backend="torch"):
        with pytest.raises(ValueError, match=match):
            _run(model, kwargs)
