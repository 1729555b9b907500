"""Fine-tuning: what a refused plan or layer list says (round 9 of the input audit)."""

from pathlib import Path

import pytest

import dit_accel
from dit_accel.training import FinetuneConfig, finetune

pytestmark = pytest.mark.usefixtures("one_thread")

PLANS = Path(dit_accel.__file__).parent / "models" / "plans"


def _config(tmp_path, **kw):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    base = dict(model="tiny-wan", output=str(tmp_path / "out"), prompts=str(tmp_path / "p.txt"), steps=1, rank=2,
                max_sequence_length=8, progress=False, eval_batches=1, gradient_accumulation_steps=1)
    return FinetuneConfig(**{**base, **kw})


def test_a_plan_for_another_model_is_said_to_be_one_before_its_size_is_checked(tmp_path):
    """Before: tiny-shapes-63's plan on tiny-wan (same class, 4 layers against 2) was refused as "--frames 63 is
    invalid for this model", a size the user never gave (the plan's own, taken as the run's default)."""
    plan = PLANS / "tiny-shapes-63.json"
    with pytest.raises(ValueError, match=r"is for 4 attention layers .*this model has 2") as err:
        finetune(_config(tmp_path, plan=str(plan), frames=63, height=48, width=48))
    assert "--frames" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_dense_layers_past_the_model_are_listed_in_short(tmp_path):
    """Before: --dense-layers 99 on the 2-layer tiny-wan listed all 97 indices past the end in the message."""
    with pytest.raises(ValueError, match=r"dense_layers has layer indices 2, 3, 4, 5, 6, 7, \.\.\. 98 \(97 in all\) "
                                         r"but the model has 2 attention layers") as err:
        finetune(_config(tmp_path, method=dit_accel.SLA(topk=0.5), dense_layers=99, frames=5, height=32, width=64))
    assert len(str(err.value)) < 200
