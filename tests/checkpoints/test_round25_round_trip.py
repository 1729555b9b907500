"""What ``finetune`` trains runs the same after every way of loading it back (round 25): ``apply(weights=)`` on a
fresh pipeline, after Diffusers' ``load_lora_weights`` (and its ``fuse_lora``), ``handle.fuse_lora()``; a LoRA that
Diffusers fused and unloaded is refused instead of counting twice; a training checkpoint is refused naming the run."""

import warnings
from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune, load_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

METHOD = dit_accel.SLA(topk=0.5)
SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two SLA steps on tiny-wan at a large learning rate (LoRA and projections leave zero), with a checkpoint each
    step, and the live student's output on a fixed input."""
    root = tmp_path_factory.mktemp("round_trip")
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox in snow\nwaves at sunset\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = finetune(FinetuneConfig(model="tiny-wan", method=METHOD, output=str(root / "out"), prompts=str(prompts),
                                      steps=2, lr=1e-2, rank=4, seed=0, progress=False, eval_batches=0,
                                      gradient_accumulation_steps=1, checkpoint_every=1, **SHAPE))
    return res["output"], _probe(res["pipe"].transformer)


def _probe(transformer):
    g = torch.Generator().manual_seed(123)
    dtype = next(transformer.parameters()).dtype
    x = torch.randn(1, 4, 3, 8, 16, generator=g).to(dtype)
    emb = torch.randn(1, 16, transformer.config.text_dim, generator=g).to(dtype)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=emb,
                           return_dict=False)[0].float()


def test_every_load_reproduces_the_student(trained):
    out, student = trained
    assert (student - _probe(build_tiny_pipeline("tiny-wan").transformer)).abs().max() > 1e-2  # it trained
    pipe = build_tiny_pipeline("tiny-wan")
    with dit_accel.apply(pipe, load_method(out), weights=out) as handle:
        assert torch.equal(_probe(pipe.transformer), student)  # the same arithmetic: bit for bit
        handle.fuse_lora()  # W + BA in one matrix: rounding only
        torch.testing.assert_close(_probe(pipe.transformer), student, rtol=0, atol=1e-5)
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.load_lora_weights(str(out))
    with dit_accel.apply(pipe, METHOD, weights=out):
        assert torch.equal(_probe(pipe.transformer), student)
    pipe.fuse_lora()  # Diffusers' fuse with its adapter still there: apply finds the adapter, loads no second copy
    with dit_accel.apply(pipe, METHOD, weights=out):
        torch.testing.assert_close(_probe(pipe.transformer), student, rtol=0, atol=1e-5)


def test_a_lora_fused_and_unloaded_by_diffusers_is_refused_not_counted_twice(trained):
    out, student = trained
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # Diffusers' way to keep a fused LoRA: no adapter left, its delta in the weights
    torch.testing.assert_close(_probe(pipe.transformer), _probe(_dense_student(out)), rtol=0, atol=1e-5)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError, match=r"already merged into this WanTransformer3DModel's weights") as err:
        dit_accel.apply(pipe, METHOD, weights=out)  # (before: it loaded again, 0.026 off the student)
    assert str(out) in str(err.value) and "unfuse_lora()" in str(err.value) and "count it twice" in str(err.value)
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _dense_student(out):
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.load_lora_weights(str(out))
    return pipe.transformer


def test_other_base_weights_and_half_precision_are_not_taken_for_a_merge(trained):
    out, student = trained
    pipe = build_tiny_pipeline("tiny-wan")
    with torch.no_grad():  # another fine-tune of the base model: its LoRA applies, as before
        for name, p in pipe.transformer.named_parameters():
            if name.endswith("attn1.to_q.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    with dit_accel.apply(pipe, METHOD, weights=out):
        pass
    for dtype in (torch.bfloat16, torch.float16):  # rounding is no merge; the output stays near the student
        pipe = build_tiny_pipeline("tiny-wan").to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with dit_accel.apply(pipe, METHOD, weights=out):
                torch.testing.assert_close(_probe(pipe.transformer), student, rtol=0, atol=5e-2)


def test_a_training_checkpoint_is_refused_naming_the_run(trained):
    out, _ = trained
    step = sorted(Path(out, "checkpoints").iterdir())[-1]
    with pytest.raises(ValueError, match="training checkpoint") as err:
        dit_accel.apply(build_tiny_pipeline("tiny-wan"), METHOD, weights=step)
    assert f"weights={str(Path(out))!r}" in str(err.value)
