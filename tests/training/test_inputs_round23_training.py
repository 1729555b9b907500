"""A model whose weights already hold NaN or inf is refused before the first step, naming a tensor: before, the run
trained on NaN losses and the divergence report blamed the learning rate ("lower --lr")."""

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training.finite import nonfinite_weights_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def _config(output, prompts, **kw):
    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(output), prompts=str(prompts), steps=1,
                lr=1e-3, rank=4, seed=0, progress=False, eval_batches=0, gradient_accumulation_steps=1, frames=9,
                height=64, width=128, max_sequence_length=16)
    base.update(kw)
    return FinetuneConfig(**base)


def _first_weight(pipe):
    return next(p for n, p in pipe.transformer.named_parameters() if n.endswith("weight") and p.dim() == 2)


def test_nan_in_the_base_weights_is_refused_naming_a_tensor(prompts_file, tmp_path):
    pipe = build_tiny_pipeline("tiny-wan")
    name = next(n for n, p in pipe.transformer.named_parameters() if n.endswith("weight") and p.dim() == 2)
    with torch.no_grad():
        _first_weight(pipe)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^the transformer of the pipeline passed in holds NaN or inf weights "
                                         rf"before training \(1 tensor\(s\), e\.g\. {name}\): .*re-download"):
        finetune(_config(tmp_path / "ft", prompts_file, model=pipe))
    assert not (tmp_path / "ft").exists()
    assert not getattr(pipe.transformer, "peft_config", None)


def test_an_fp16_cast_that_overflows_is_refused_with_bf16_advice(prompts_file, tmp_path):
    pipe = build_tiny_pipeline("tiny-wan")
    with torch.no_grad():
        _first_weight(pipe)[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match=r"NaN or inf weights before training .*--mixed-precision bf16\)$"):
        finetune(_config(tmp_path / "ft", prompts_file, model=pipe, mixed_precision="fp16"))
    weight = _first_weight(pipe)
    assert weight.dtype == torch.float32 and weight[0, 0].item() == 1e6  # the caller's tensors, as they were


def test_the_check_reads_float8_and_skips_integers():
    module = torch.nn.Module()
    module.register_buffer("scale", torch.ones(3).to(torch.float8_e4m3fn))
    module.register_buffer("index", torch.arange(3))
    assert nonfinite_weights_error(module, "m") is None
    module.scale[1] = float("nan")
    assert nonfinite_weights_error(module, "m").startswith("m holds NaN or inf weights before training (1 tensor(s), "
                                                           "e.g. scale)")
