"""Fine-tuning refuses the image families of models-image-b (issue 28) before any training, with the reason."""

from types import SimpleNamespace

import pytest

from dit_accel.models import tiny as T
from dit_accel.training.model_io import _NOT_YET, model_io_for

CLASSES = ("Flux3Transformer2DModel", "QwenImage21Transformer2DModel", "HiDreamImageTransformer2DModel",
           "Lumina2Transformer2DModel", "ZImageTransformer2DModel")


def test_each_class_has_a_reason():
    assert all(_NOT_YET.get(name) for name in CLASSES)


def test_finetune_refuses_lumina2_with_its_reason():
    pipe = SimpleNamespace(transformer=T.build_tiny_transformer("lumina2"))
    with pytest.raises(ValueError, match=r"this model has Lumina2Transformer2DModel \(the trainer does not yet "
                                         r"build its call .*\)\. Use a Wan, HunyuanVideo or FLUX model"):
        model_io_for(pipe)
