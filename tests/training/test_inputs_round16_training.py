"""Round 16 of the input audit: fine-tuning (what a step trains on, and models refused before they load)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit_accel.models import loading
from dit_accel.training import finetune
from dit_accel.training import data as data_mod
from dit_accel.training.loop import _Trainer
from tests.training import tiny_config as _config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


@pytest.fixture
def no_model(monkeypatch):
    """The model loader refuses: a test passes only if the input was refused before any model loaded."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_a_bf16_step_tells_the_model_the_timestep_of_its_noise_level():
    """Before: the timesteps were cast to bf16 with the latents, so the transformer was told t=788 for a sample
    noised at sigma 0.7874 (bf16 steps by 4 above 512; the pipelines pass the scheduler's fp32 timesteps), and a
    plan's step was chosen from the rounded value. The noise levels are drawn here as a step draws them."""
    config = SimpleNamespace(seed=3, batch_size=2, frames=9, height=64, width=128)
    io = SimpleNamespace(latent_shape=lambda b, f, h, w: (b, 4, 3, 8, 16))
    trainer = SimpleNamespace(config=config, dataset=None, rank=0, world=1, io=io, texts=["a", "b"], device="cpu",
                              weight_dtype=torch.bfloat16, embeds={"encoder_hidden_states": torch.zeros(2, 16, 8)})
    noisy, timesteps, _, target = _Trainer.batch(trainer, 5)
    g = data_mod.step_generator(3, 5, 0)  # step 5, rank 0: sigma, the clean latents, the prompts, the noise
    sigma = torch.rand(2, generator=g)
    clean = torch.randn(2, 4, 3, 8, 16, generator=g)
    torch.randint(2, (2,), generator=g)
    noise = torch.randn(clean.shape, generator=g)
    assert timesteps.dtype == torch.float32
    torch.testing.assert_close(timesteps, sigma * 1000.0, rtol=0, atol=1e-4)
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy, ((1 - s) * clean + s * noise).bfloat16())
    torch.testing.assert_close(target, noise - clean)


@pytest.mark.parametrize("model, mode, says", [
    ("tiny-sd3", "distill", r"--model tiny-sd3: fine-tuning supports pipelines whose transformer is one of .*this "
                            r"model has SD3Transformer2DModel"),
    ("tiny-wan-vace", "distill", r"this model has WanVACETransformer3DModel \(its transformer needs the pipeline's "
                                 r"control_hidden_states"),
    ("tiny-flux", "data", r"--model tiny-flux: --mode data supports Wan models only \(FLUX needs its own VAE"),
])
def test_a_model_the_trainer_cannot_call_is_refused_before_it_loads(model, mode, says, prompts_file, tmp_path,
                                                                    no_model):
    """Before: these loaded the model (minutes for a real one) and were refused only then, by the trainer."""
    kw = dict(prompts=str(prompts_file)) if mode == "distill" else dict(prompts=None, data=str(tmp_path))
    with pytest.raises(ValueError, match=says):
        finetune(_config(tmp_path, prompts_file, model=model, mode=mode, frames=1, height=64, width=64, **kw))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, says", [
    ({"overwrite": "no"}, r"overwrite='no' is invalid: True or False"),
    ({"resume": "false"}, r"resume='false' is invalid: True or False"),
    ({"gradient_checkpointing": 1}, r"gradient_checkpointing=1 is invalid: True or False"),
    ({"backend": "cuda"}, r"--backend 'cuda' is invalid: choose one of auto, triton"),
])
def test_switches_and_backends_of_the_wrong_kind_are_refused_before_the_model_loads(change, says, prompts_file,
                                                                                    tmp_path, no_model):
    """Before: a string was truthy, so overwrite="no" (a config read from text) replaced the run in the output folder
    and resume="false" resumed it; a backend that is no backend was refused only once the model had loaded."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "finetune_run.json").write_text("{}")
    with pytest.raises(ValueError, match=says):
        finetune(_config(tmp_path, prompts_file, **change))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["finetune_run.json"]


def test_a_numpy_bool_switch_is_taken(prompts_file, tmp_path, no_model):
    config = _config(tmp_path, prompts_file, overwrite=np.bool_(False), progress=np.bool_(False))
    with pytest.raises(AssertionError, match="a model was loaded"):  # (accepted: it reached the loader)
        finetune(config)
    assert config.overwrite is False and config.progress is False


def test_a_16_bit_pipeline_without_mixed_precision_is_refused_naming_the_setting(prompts_file, tmp_path):
    """Before: WanPipeline.from_pretrained(..., torch_dtype=torch.bfloat16) passed as model= with the default
    mixed_precision="no" (float32, nothing cast) failed at the first forward with a raw RuntimeError "Input type
    (float) and bias type (c10::BFloat16) should be the same"."""
    pipe = SimpleNamespace(transformer=torch.nn.Linear(4, 4).to(torch.bfloat16))  # (refused before any use of it)
    with pytest.raises(ValueError, match=r"holds torch.bfloat16 weights, and mixed_precision='no' trains in float32 "
                                         r"\(nothing is cast\): pass mixed_precision='bf16'"):
        finetune(_config(tmp_path, prompts_file, model=pipe))
    assert not (tmp_path / "out").exists() and pipe.transformer.weight.dtype == torch.bfloat16


def test_a_parameter_no_process_has_a_gradient_for_keeps_none_and_adamw_leaves_it():
    """Before: with two processes, ``_sync_grads`` gave a parameter without a gradient on any rank a zero gradient,
    which AdamW (momentum from earlier steps, weight decay) still moved; one process left it untouched. Two ranks
    are stood in for by a reduce that averages this rank's flat gradients with another rank's."""
    import types

    from dit_accel.training.loop import _sync_grads

    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    used.grad = torch.tensor([1.0, 2.0, 3.0])
    def reduce(flat, reduction):  # the other rank: a gradient for `used` only (and its flags, if any are sent)
        assert reduction == "mean"
        other = torch.zeros_like(flat)
        other[:3] = torch.tensor([3.0, 2.0, 1.0])
        if flat.numel() == 7:
            other[5] = 1.0
        return (flat + other) / 2

    _sync_grads([used, unused], types.SimpleNamespace(num_processes=2, reduce=reduce))
    assert torch.equal(used.grad, torch.tensor([2.0, 2.0, 2.0])) and unused.grad is None
    opt = torch.optim.AdamW([unused], lr=0.1, weight_decay=0.1)
    opt.step()
    assert torch.equal(unused.detach(), torch.ones(2))  # skipped, as in one process
