"""Fine-tuning refuses transformer classes whose calls the trainer cannot build, with the reason (models-video-c)."""

import re
from types import SimpleNamespace

import pytest

from dit_accel.models import tiny as T
from dit_accel.training.model_io import SUPPORTED_TRANSFORMERS, model_io_for


@pytest.mark.parametrize("name, why", [
    ("helios", "packed multi-scale history"),
    ("kandinsky5", "channels-last latents"),
])
def test_finetune_refuses_with_the_reason(name, why):
    transformer = T.build_tiny_transformer(name)
    cls = type(transformer).__name__
    assert cls not in SUPPORTED_TRANSFORMERS
    with pytest.raises(ValueError, match=rf"this model has {cls} \(its .*{re.escape(why)}.*\)\. Use a Wan"):
        model_io_for(SimpleNamespace(transformer=transformer))
