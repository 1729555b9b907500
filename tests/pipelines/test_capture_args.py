"""``dit_accel.apply``'s capture_layers/capture_steps without ``capture=``: a ValueError before the model changes
(they used to be accepted and capture nothing)."""
import pytest

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.hooks import SparseAttnProcessor


@pytest.fixture(scope="module")
def wan():
    return T.build_tiny_transformer("wan")


def _processors(model):
    return [getattr(m, "processor", None) for m in model.modules()]


def _patched(model):
    return any(isinstance(p, SparseAttnProcessor) for p in _processors(model))


@pytest.mark.parametrize("kwargs", [dict(capture_layers=[0]), dict(capture_steps=[1]), dict(capture_layers=[]),
                                    dict(capture_layers=[0], capture_steps=[0])],
                         ids=["layers", "steps", "layers-empty", "both"])
def test_capture_indices_without_a_folder_are_refused_and_the_model_is_unchanged(wan, kwargs):
    before = _processors(wan)
    with pytest.raises(ValueError) as err:
        dit_accel.apply(wan, dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), **kwargs)
    assert str(err.value).startswith("capture_layers/capture_steps need capture=FOLDER (where the captured q/k/v go)")
    assert not _patched(wan) and all(a is b for a, b in zip(_processors(wan), before))
    assert not wan._forward_pre_hooks and not wan._forward_pre_hooks_with_kwargs


def test_capture_indices_with_a_folder_are_taken(wan, tmp_path):
    with dit_accel.apply(wan, dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), capture=tmp_path,
                         capture_layers=[0]):
        assert _patched(wan)
    assert not _patched(wan)
