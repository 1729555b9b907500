"""Round 25 (trust), fine-tuning: what an out-of-memory error tells a user to do, a --resume takes."""

import pytest

from dit_accel.training import finetune, loop
from tests.training import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def test_out_of_memory_after_a_checkpoint_says_how_to_resume_and_the_resume_takes_checkpointing(
        tmp_path, prompts_file, monkeypatch):
    """Before: the error said "pass --gradient-checkpointing", the run's checkpoint was kept, and `--resume
    --gradient-checkpointing` was refused: "holds a different run (gradient_checkpointing: False -> True)"."""
    step = loop._Trainer.step

    def no_memory_at_the_second_step(self, i, first):
        if i == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes.")
        return step(self, i, first)

    monkeypatch.setattr(loop._Trainer, "step", no_memory_at_the_second_step)
    with pytest.raises(MemoryError) as caught:
        finetune(tiny_config(tmp_path, prompts_file, steps=2, checkpoint_every=1))
    said = str(caught.value)
    assert said.startswith("out of memory while fine-tuning (it tried to allocate 2.0 GiB): lower --batch-size")
    assert said.endswith("Its checkpoints are kept: --resume continues it with --gradient-checkpointing; another "
                         "size starts a new run (another --output, or --overwrite).")
    monkeypatch.setattr(loop._Trainer, "step", step)
    result = finetune(tiny_config(tmp_path, prompts_file, steps=2, checkpoint_every=1, resume=True,
                                  gradient_checkpointing=True))
    assert result["resumed_from"] == 1 and result["steps_this_session"] == 1


def test_out_of_memory_before_any_checkpoint_says_nothing_of_resuming(tmp_path, prompts_file):
    from dit_accel.training.finetune import _out_of_memory

    problem = _out_of_memory(tiny_config(tmp_path, prompts_file), RuntimeError("CUDA out of memory."))
    assert "--resume" not in str(problem)
