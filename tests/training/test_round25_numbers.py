"""The numbers one fine-tuning step computes, recomputed here from docs/training.md's definitions and Diffusers'
flow-matching convention (x_t = (1 - sigma) x0 + sigma noise, timestep = 1000 sigma, target = noise - x0): the noisy
latents, timesteps and text the transformer receives, the target, the loss, the teacher of distillation, gradient
accumulation, the dtypes under bf16, and a model whose extra input channels the trainer cannot build."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.models.loading import load_pipeline
from dit_accel.training import FinetuneConfig, finetune, loop, model_io
from dit_accel.training import data as data_mod
from dit_accel.training.finetune import _accelerator, _Trainer
from tests.training import PROMPTS, SHAPE, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

SEED = 3


@pytest.fixture(scope="module")
def dense():
    """A fresh tiny-wan (fp32, no dit_accel, no LoRA): the teacher as the docs define it, and the text encoder."""
    return load_pipeline("tiny-wan", device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture
def calls(monkeypatch):
    """Every transformer call of the trainer: its inputs, output, whether it records gradients and whether every LoRA
    layer ran with its adapter disabled; and each micro-batch's loss."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen = {"forward": [], "loss": []}
    forward, loss = model_io.ModelIO.forward, loop._Trainer.loss

    def record_forward(self, transformer, latents, timesteps, text):
        out = forward(self, transformer, latents, timesteps, text)
        lora = [m.disable_adapters for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        seen["forward"].append(dict(x=latents.detach().clone(), t=timesteps.detach().clone(), out=out.detach().clone(),
                                    text={k: v.detach().clone() for k, v in text.items()},
                                    grad=torch.is_grad_enabled(), lora_off=bool(lora) and all(lora)))
        return out

    def record_loss(self, batch, *, grad):
        value = loss(self, batch, grad=grad)
        seen["loss"].append(value.detach().clone())
        return value

    monkeypatch.setattr(model_io.ModelIO, "forward", record_forward)
    monkeypatch.setattr(loop._Trainer, "loss", record_loss)
    return seen


def _dense_out(pipe, x, t, text):
    with torch.no_grad():
        return pipe.transformer(hidden_states=x.float(), timestep=t, return_dict=False,
                                **{k: v.float() for k, v in text.items()})[0]


@pytest.mark.parametrize("method, size", [(dit_accel.SLA(topk=0.5), dict(height=64, width=128)),
                                          (dit_accel.VSA(sparsity=0.5), dict(height=128, width=128))],
                         ids=["sla-9x64x128", "vsa-9x128x128"])
def test_distill_step_is_the_mse_to_the_dense_teacher_at_the_same_inputs(tmp_path, prompts_file, dense, calls,
                                                                         method, size):
    """One distillation step: the teacher is the dense model without LoRA (nor SLA projections, VSA gates), under
    no_grad, on the very latents, timestep and prompt the student gets; the latents are (1 - sigma) x0 + sigma noise,
    the timestep 1000 sigma (fp32) for sigma, x0, the prompt and the noise drawn from the step's generator; the loss
    is the mean squared error."""
    config = tiny_config(tmp_path, prompts_file, seed=SEED, method=method, **size,
                         **(dict(vsa_decay_steps=0) if isinstance(method, dit_accel.VSA) else {}))
    finetune(config)
    teacher, student = calls["forward"]
    g = data_mod.step_generator(SEED, 0, 0)  # (seed, micro-batch, rank): sigma, x0, prompt, noise in that order
    sigma = torch.rand(1, generator=g)
    x0 = torch.randn(1, 4, 3, size["height"] // 8, size["width"] // 8, generator=g)  # tiny-wan: 4 channels, VAE 4x8x8
    prompt = PROMPTS[int(torch.randint(len(PROMPTS), (1,), generator=g))]
    noise = torch.randn(x0.shape, generator=g)
    want_x = (1 - sigma) * x0 + sigma * noise
    text = {"encoder_hidden_states": dense.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                         max_sequence_length=16)[0]}
    for call in (teacher, student):
        torch.testing.assert_close(call["x"], want_x, rtol=0, atol=0)
        assert call["t"].dtype == torch.float32
        torch.testing.assert_close(call["t"], sigma * 1000.0, rtol=0, atol=0)
        torch.testing.assert_close(call["text"]["encoder_hidden_states"], text["encoder_hidden_states"],
                                   rtol=1e-5, atol=1e-5)
    assert not teacher["grad"] and teacher["lora_off"]
    assert student["grad"] and not student["lora_off"]
    torch.testing.assert_close(teacher["out"], _dense_out(dense, want_x, sigma * 1000.0, text), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(student["out"], teacher["out"])  # (the student runs sparse: a loss to train on)
    want_loss = ((student["out"].double() - teacher["out"].double()) ** 2).mean()
    torch.testing.assert_close(calls["loss"][0].double(), want_loss, rtol=1e-6, atol=0)


def _caption_folder(root, kind: str, height: int, width: int, frames: int):
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        pictures = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
                    for _ in range(frames if kind == "video" else 1)]
        name = f"{kind}{i}.{'gif' if kind == 'video' else 'png'}"
        pictures[0].save(root / name, **(dict(save_all=True, append_images=pictures[1:], duration=100)
                                         if kind == "video" else {}))
        rows.append({"file_name": name, "text": f"{kind} number {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("kind, frames, height, width", [("video", 9, 64, 128), ("image", 1, 128, 256)],
                         ids=["video-9x64x128", "image-1x128x256"])
def test_data_step_is_flow_matching_on_the_vae_latents(tmp_path, dense, calls, kind, frames, height, width):
    """One data-mode step, a video clip or an image (one frame): x0 is the clip's VAE latent (posterior mode,
    normalised by the VAE's latents_mean/std), the model gets (1 - sigma) x0 + sigma noise at timestep 1000 sigma,
    the same rule for both, and the loss is the mean squared error to noise - x0."""
    root = _caption_folder(tmp_path / "data", kind, height, width, frames)
    config = FinetuneConfig(model="tiny-wan", method=dit_accel.SLA(topk=0.5), mode="data", data=str(root),
                            output=str(tmp_path / "out"), steps=1, rank=2, frames=frames, height=height, width=width,
                            max_sequence_length=16, progress=False, eval_batches=0, seed=SEED)
    finetune(config)
    (call,) = calls["forward"]
    folder = data_mod.CaptionDataset(root, frames=frames, height=height, width=width)
    (i,) = data_mod.sample_indices(len(folder), seed=SEED, step=0, batch=1, rank=0, world=1)
    pixels, caption = folder.item(i)
    vae = dense.vae
    with torch.no_grad():
        x0 = vae.encode(pixels[None]).latent_dist.mode()
    shape = (1, -1, 1, 1, 1)
    x0 = (x0 - torch.tensor(vae.config.latents_mean).view(shape)) / torch.tensor(vae.config.latents_std).view(shape)
    assert x0.shape == (1, 4, (frames - 1) // 4 + 1, height // 8, width // 8)
    g = data_mod.step_generator(SEED, 0, 0)  # sigma, then the noise
    sigma = torch.rand(1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(call["x"], (1 - sigma) * x0 + sigma * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call["t"], sigma * 1000.0, rtol=0, atol=0)
    text = dense.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=16)[0]
    torch.testing.assert_close(call["text"]["encoder_hidden_states"], text, rtol=1e-5, atol=1e-5)
    want_loss = ((call["out"].double() - (noise - x0).double()) ** 2).mean()
    torch.testing.assert_close(calls["loss"][0].double(), want_loss, rtol=1e-5, atol=0)


def _trainer(tmp_path, prompts_file, name, **kw):
    config = tiny_config(tmp_path / name, prompts_file, seed=SEED, max_grad_norm=0.0, **kw)
    trainer = _Trainer(config, _accelerator(config), PROMPTS, None)
    torch.manual_seed(1)  # LoRA B is zero at the start: move every trainable tensor so each has a gradient
    for p in trainer.params.values():
        p.data.add_(torch.randn_like(p) * 0.05)
    return trainer


def _grads_of_one_step(trainer, batches, monkeypatch):
    """The gradients the optimizer step of ``trainer`` gets when its micro-batches are ``batches``."""
    grads = {}
    sync = loop._sync_grads

    def keep(params, accelerator, reduction="mean"):
        sync(params, accelerator, reduction)
        grads.update({k: p.grad.clone() for k, p in trainer.params.items() if p.grad is not None})

    monkeypatch.setattr(loop, "_sync_grads", keep)
    monkeypatch.setattr(trainer, "batch", lambda step, held_out=False: batches[step])
    loss = trainer.step(0, first=True)
    return loss, grads


def test_two_accumulated_micro_batches_give_the_gradient_of_one_batch_of_two(tmp_path, prompts_file, monkeypatch):
    """--gradient-accumulation-steps 2 at --batch-size 1 trains on the mean over the step's samples, as one batch of
    2 does: the same loss and the same gradient (up to fp32 rounding) on the same two samples."""
    two = _trainer(tmp_path, prompts_file, "accum", gradient_accumulation_steps=2)
    one = _trainer(tmp_path, prompts_file, "batch", batch_size=2)
    micro = [two.batch(0), two.batch(1)]
    both = (torch.cat([micro[0][0], micro[1][0]]), torch.cat([micro[0][1], micro[1][1]]),
            {k: torch.cat([micro[0][2][k], micro[1][2][k]]) for k in micro[0][2]}, torch.cat([micro[0][3], micro[1][3]]))
    loss_two, grads_two = _grads_of_one_step(two, micro, monkeypatch)
    loss_one, grads_one = _grads_of_one_step(one, [both], monkeypatch)
    assert two.accum == 2 and one.accum == 1
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    assert grads_two.keys() == grads_one.keys() and len(grads_one) == len(two.params)
    for k in grads_one:
        torch.testing.assert_close(grads_two[k], grads_one[k], rtol=1e-4, atol=1e-7, msg=k)
    two.undo(), one.undo()


def test_bf16_keeps_the_trained_tensors_and_the_loss_in_fp32(tmp_path, prompts_file):
    """--mixed-precision bf16: the frozen weights and the latents are bf16, the LoRA and SLA tensors fp32, the
    timesteps fp32, the loss computed in fp32."""
    config = tiny_config(tmp_path, prompts_file, seed=SEED, mixed_precision="bf16")
    trainer = _Trainer(config, _accelerator(config), PROMPTS, None)
    assert {p.dtype for p in trainer.params.values()} == {torch.float32}
    assert trainer.transformer.patch_embedding.weight.dtype == torch.bfloat16  # (frozen, not adapted)
    x, t, text, target = trainer.batch(0)
    assert x.dtype == torch.bfloat16 and t.dtype == torch.float32
    assert trainer.loss((x, t, text, target), grad=False).dtype == torch.float32
    trainer.undo()


def _image_to_video_pipe():
    """tiny-wan with an image-to-video transformer: 12 input channels (latents, mask, image latents), 4 predicted."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from dit_accel.models.tiny._common import TINY_WAN_TRANSFORMER, WAN_Z_DIM, tiny_wan_parts

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "in_channels": 3 * WAN_Z_DIM}).eval()
    return WanPipeline(**tiny_wan_parts(0), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer)


def test_a_model_conditioned_on_extra_input_channels_is_refused(tmp_path, prompts_file):
    """An image-to-video (or inpainting) transformer takes channels its pipeline builds per call from the image.
    Before: the trainer drew random values for them and trained on them without a word (loss 0.00018, weights
    written); now refused, before loading when its folder's configs say so, and the pipeline is left as it was."""
    pipe = _image_to_video_pipe()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError, match=r"takes 12 input channels but predicts 4.*image-to-video.*text-to-video"):
        finetune(tiny_config(tmp_path, prompts_file, model=pipe))
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    folder = tmp_path / "wan-i2v"  # the configs a Diffusers folder holds, read before the model loads
    for name, cfg in (("transformer", dict(pipe.transformer.config)), ("vae", dict(pipe.vae.config))):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(cfg, default=list))
    problem = model_io.geometry_error(folder, "WanTransformer3DModel", SHAPE["frames"], SHAPE["height"],
                                      SHAPE["width"])
    assert problem is not None and "takes 12 input channels but predicts 4" in problem
    flux = SimpleNamespace(in_channels=64, out_channels=None)  # FLUX's config: None means as many as in_channels
    assert model_io.image_conditioning_error(flux, "FLUX") is None
    fill = SimpleNamespace(in_channels=384, out_channels=64)  # FLUX Fill: masked image latents and mask
    assert "takes 384 input channels but predicts 64" in model_io.image_conditioning_error(fill, "FLUX")
    # HunyuanVideo I2V: the image's latents and a mask concatenated, or the image as its clean first latent frame
    concat = SimpleNamespace(in_channels=33, out_channels=16, image_condition_type="latent_concat")
    assert "takes 33 input channels but predicts 16" in model_io.image_conditioning_error(concat, "HunyuanVideo")
    replace = SimpleNamespace(in_channels=16, out_channels=16, image_condition_type="token_replace")
    assert "image_condition_type='token_replace'" in model_io.image_conditioning_error(replace, "HunyuanVideo")
    t2v = SimpleNamespace(in_channels=16, out_channels=16, image_condition_type=None)
    assert model_io.image_conditioning_error(t2v, "HunyuanVideo") is None


def test_a_micro_batch_draws_the_same_numbers_whatever_ran_before(tmp_path, prompts_file):
    """What --resume relies on: micro-batch k's sigma, x0, prompt and noise come from (seed, k, rank) alone, not from
    the global RNG or the steps before it, so step k of a resumed run draws what the uninterrupted run drew there."""
    first = _trainer(tmp_path, prompts_file, "a", gradient_accumulation_steps=2)
    want = [first.batch(k) for k in (2, 3)]
    first.undo()
    torch.manual_seed(1234), torch.rand(17)  # another global RNG state, and two optimizer steps run before
    second = _trainer(tmp_path, prompts_file, "b", gradient_accumulation_steps=2)
    second.step(0, first=True), second.step(1, first=False)
    for k, (x, t, text, target) in zip((2, 3), want):
        x2, t2, text2, target2 = second.batch(k)
        assert torch.equal(x, x2) and torch.equal(t, t2) and torch.equal(target, target2), k
        assert all(torch.equal(text[n], text2[n]) for n in text), k
    second.undo()
