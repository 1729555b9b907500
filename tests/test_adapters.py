"""Adapters that survive Diffusers' loaders (issue 38): a ``dit-accel finetune`` folder's LoRA loaded with
``pipe.load_lora_weights`` beside ``apply(weights=)``, and ``save_pretrained`` while dit_accel is applied."""

import os

import pytest
import torch
from safetensors.torch import load_file

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.training import FinetuneConfig, finetune, load_method
from dit_accel.checkpoints.finetuned import LORA_FILE, METHOD_FILE, SLA_FILE


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2-step SLA fine-tune of tiny-wan: LoRA and SLA projections both away from their zero start."""
    root = tmp_path_factory.mktemp("adapters")
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox in snow\nwaves at sunset\n")
    finetune(FinetuneConfig(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(root / "ft"),
                            prompts=str(prompts), steps=2, lr=2e-3, rank=4, seed=0, progress=False, eval_batches=0,
                            gradient_accumulation_steps=1, frames=9, height=64, width=128, max_sequence_length=16))
    return root / "ft"


def _probe(transformer, seed=123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 8, 16, generator=g)
    emb = torch.randn(1, 16, transformer.config.text_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=emb,
                           return_dict=False)[0]


@pytest.fixture(scope="module")
def reference(folder):
    """Today's path: apply(weights=) loads the LoRA itself (adapter "dit_accel") and the projections."""
    pipe = build_tiny_pipeline("tiny-wan")
    base = _probe(pipe.transformer)
    with dit_accel.apply(pipe, load_method(folder), weights=folder) as handle:
        assert handle.lora_adapter == "dit_accel"
        out = _probe(pipe.transformer)
    assert not torch.allclose(out, base)
    return base, out


def _processors(transformer):
    return [type(m.processor).__name__ for m in transformer.modules() if hasattr(m, "processor")]


def test_load_lora_weights_then_apply_adds_only_the_sla_projections(folder, reference):
    pipe = build_tiny_pipeline("tiny-wan")
    t = pipe.transformer
    pipe.load_lora_weights(str(folder))  # Diffusers alone: adapter "default_0"
    lora_only = _probe(t)
    handle = dit_accel.apply(pipe, load_method(folder), weights=folder)
    assert handle.lora_adapter == "default_0"
    assert list(t.peft_config) == ["default_0"]  # nothing loaded a second time
    assert not handle.warnings
    torch.testing.assert_close(_probe(t), reference[1], rtol=0, atol=0)
    # The SLA projections are the folder's.
    sla = load_file(str(folder / SLA_FILE))
    for name, proj in handle.sla_projections().items():
        assert torch.equal(proj.weight, sla[f"{name}.weight"]) and torch.equal(proj.bias, sla[f"{name}.bias"])
    handle.remove()
    # remove() leaves the user's adapter: the model is the Diffusers-loaded one again.
    assert list(t.peft_config) == ["default_0"] and t.active_adapters() == ["default_0"]
    torch.testing.assert_close(_probe(t), lora_only, rtol=0, atol=0)


def _refused(pipe, folder, match):
    t = pipe.transformer
    before = (list(t.peft_config), _processors(t), {k: v.clone() for k, v in t.state_dict().items()})
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(pipe, load_method(folder), weights=folder)
    after = (list(t.peft_config), _processors(t), t.state_dict())
    assert before[:2] == after[:2]  # no adapter added, no processor left wrapped
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])


def test_a_folder_whose_lora_is_loaded_twice_is_refused(folder):
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.load_lora_weights(str(folder))
    pipe.load_lora_weights(str(folder), adapter_name="again")
    pipe.set_adapters(["default_0", "again"])
    _refused(pipe, folder, r"loaded twice .* \['default_0', 'again'\]")


def test_a_folder_whose_lora_is_not_the_loaded_one_is_refused(folder):
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.load_lora_weights(str(folder), adapter_name="other")
    with torch.no_grad():  # another run's LoRA over the same modules: the folder's LoRA is not loaded
        next(p for n, p in pipe.transformer.named_parameters() if "lora_B.other" in n).add_(0.01)
    _refused(pipe, folder, r"adapter 'other' .* other values, so the folder's LoRA is not the one loaded")


@pytest.mark.parametrize("case", ["inactive", "weight"])
def test_a_loaded_lora_that_does_not_run_as_trained_is_refused(folder, case):
    from peft import LoraConfig

    pipe = build_tiny_pipeline("tiny-wan")
    pipe.load_lora_weights(str(folder))
    if case == "inactive":
        pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="user")
        pipe.transformer.set_adapters(["user"])
        _refused(pipe, folder, "'default_0', but that adapter is not active")
    else:
        pipe.set_adapters(["default_0"], adapter_weights=[0.5])
        _refused(pipe, folder, r"at weight \[0.5\] instead of 1.0")


# ------------------------------------------------------------------ save_pretrained while applied
@pytest.mark.parametrize("how", ["apply_loads", "diffusers_loaded"])
def test_save_pretrained_while_applied_round_trips(folder, reference, tmp_path, how):
    from diffusers import WanTransformer3DModel

    pipe = build_tiny_pipeline("tiny-wan")
    t = pipe.transformer
    plain = {k: v.clone() for k, v in t.state_dict().items()}
    if how == "diffusers_loaded":
        pipe.load_lora_weights(str(folder))
    handle = dit_accel.apply(pipe, load_method(folder), weights=folder)
    out = tmp_path / "saved"
    t.save_pretrained(out)
    handle.remove()
    assert "save_pretrained" not in t.__dict__  # the class's save_pretrained again
    for name in ("config.json", "diffusion_pytorch_model.safetensors", LORA_FILE, SLA_FILE, METHOD_FILE):
        assert (out / name).is_file(), name
    # The model file holds the base model by its plain names: no base_layer, no LoRA keys.
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in plain)
    loaded = WanTransformer3DModel.from_pretrained(out).eval()
    assert all(torch.equal(v, plain[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(_probe(loaded), reference[0], rtol=0, atol=1e-5)
    # ... and beside it a weights folder that gives the applied model back.
    with dit_accel.apply(loaded, load_method(out), weights=out):
        torch.testing.assert_close(_probe(loaded), reference[1], rtol=0, atol=1e-5)
    # Its LoRA loads with Diffusers too.
    fresh = build_tiny_pipeline("tiny-wan")
    fresh.load_lora_weights(str(out))
    assert list(fresh.transformer.peft_config) == ["default_0"]


def test_pipeline_save_pretrained_while_applied(folder, reference, tmp_path):
    from diffusers import WanPipeline

    pipe = build_tiny_pipeline("tiny-wan")
    with dit_accel.apply(pipe, load_method(folder), weights=folder):
        pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(os.listdir(tmp_path / "pipe" / "transformer")) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors", LORA_FILE, SLA_FILE, METHOD_FILE])
    again = WanPipeline.from_pretrained(tmp_path / "pipe")
    torch.testing.assert_close(_probe(again.transformer), reference[0], rtol=0, atol=1e-5)
    with dit_accel.apply(again, load_method(folder), weights=tmp_path / "pipe" / "transformer"):
        torch.testing.assert_close(_probe(again.transformer), reference[1], rtol=0, atol=1e-5)


def test_save_pretrained_with_a_merged_lora_is_refused_and_writes_nothing(tmp_path):
    from peft import LoraConfig

    pipe = build_tiny_pipeline("tiny-wan")
    t = pipe.transformer
    t.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), adapter_name="user")
    t.fuse_lora(adapter_names=["user"])
    with dit_accel.apply(pipe, dit_accel.SLA(topk=0.5)):
        with pytest.raises(RuntimeError, match=r"adapters \['user'\] are merged .* nothing was written"):
            t.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_pretrained_without_weights_writes_the_projections_and_the_method(tmp_path):
    pipe = build_tiny_pipeline("tiny-wan")
    method = dit_accel.SLA(topk=0.5)
    with dit_accel.apply(pipe, method) as handle:
        with torch.no_grad():
            for proj in handle.sla_projections().values():
                proj.weight.normal_(0, 0.1)
        trained = _probe(pipe.transformer)
        pipe.transformer.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / LORA_FILE).exists()
    fresh = build_tiny_pipeline("tiny-wan")
    with dit_accel.apply(fresh, load_method(tmp_path / "s"), weights=tmp_path / "s"):
        torch.testing.assert_close(_probe(fresh.transformer), trained, rtol=0, atol=1e-6)


def test_save_pretrained_records_the_dense_layers_the_weights_were_trained_beside(tmp_path):
    """A student trained with dense layers and saved while applied wrote no dense_layers, so its folder reloaded with
    apply(pipe, load_method(DIR), weights=DIR) ran those layers sparse, unlike the trained model."""
    import json

    pipe = build_tiny_pipeline("tiny-wan")
    method = dit_accel.SLA(topk=0.5)
    with dit_accel.apply(pipe, method, dense_layers=[0]) as handle:
        with torch.no_grad():
            for proj in handle.sla_projections().values():
                proj.weight.normal_(0, 0.1)
        trained = _probe(pipe.transformer)
        pipe.transformer.save_pretrained(tmp_path / "s")
    assert json.loads((tmp_path / "s" / METHOD_FILE).read_text())["dense_layers"] == [0]
    fresh = build_tiny_pipeline("tiny-wan")
    with pytest.raises(ValueError, match=r"trained with dense_layers=\[0\] .* layer\(s\) \[0\] run sla here"):
        dit_accel.apply(fresh, load_method(tmp_path / "s"), weights=tmp_path / "s")
    with dit_accel.apply(fresh, load_method(tmp_path / "s"), weights=tmp_path / "s", dense_layers=[0]):
        torch.testing.assert_close(_probe(fresh.transformer), trained, rtol=0, atol=1e-6)
