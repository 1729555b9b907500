"""apply() beside what users do with Diffusers models (round 17): LoRA loaded after apply. Tiny models on the CPU,
one process; each test names what was wrong before its fix."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T

from tests.pipelines.lora_folders import TILE, wan_lora_folder
from tests.pipelines.lora_folders import lora_config as _lora


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# ------------------------------------------------------------------ the user's LoRA beside apply(weights=)
@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A dit_accel weights folder for tiny Wan (seed 3) holding a LoRA of to_q and to_v."""
    return wan_lora_folder(tmp_path_factory.mktemp("round17") / "w")


def test_remove_keeps_a_lora_the_user_loaded_after_apply_with_weights(lora_folder):
    """Before: apply(model, TILE, weights=DIR) on a model without LoRA, then the user's own adapter
    (``pipe.load_lora_weights`` / ``add_adapter``) while applied: ``handle.remove()`` took every peft layer out
    (``unload_lora``), so the user's adapter was gone without a word, against the docs ("remove() deletes only
    dit_accel's adapter"). Now only dit_accel's adapter goes; the user's stays, active, on its modules."""
    model = T.build_tiny_transformer("wan", seed=3)
    inputs = T.tiny_transformer_inputs("wan", model)
    handle = dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    model.add_adapter(_lora(["to_k"]), adapter_name="mine")
    model.set_adapters(["mine"])
    with handle.bypassed():  # dense attention with the user's adapter alone: the model remove() must leave
        expected = _run(model, inputs)
    handle.remove()

    assert list(model.peft_config) == ["mine"]
    assert model.active_adapters() == ["mine"]
    adapted = sorted(name for name, m in model.named_modules() if hasattr(m, "lora_A"))
    assert adapted and all(name.endswith("to_k") for name in adapted)
    assert torch.equal(_run(model, inputs), expected)


def test_the_users_lora_keeps_its_weight_beside_apply_with_weights_and_after_remove(lora_folder):
    """Before: the user's adapter set to weight 0.5 (``set_adapters(["mine"], [0.5])``) ran at 1.0 once
    apply(weights=DIR) loaded dit_accel's LoRA beside it, and still at 1.0 after ``remove()`` (which activates the
    user's adapters again with ``set_adapters(names)``, every weight 1.0): the model after remove() was not the
    model before apply (0.05 off on tiny Wan), without a word. Now the user's weight stays 0.5 throughout, and
    remove() gives back the model as it was, bit for bit."""
    model = T.build_tiny_transformer("wan", seed=3)
    inputs = T.tiny_transformer_inputs("wan", model)
    model.add_adapter(_lora(["to_q", "to_k"]), adapter_name="mine")
    model.set_adapters(["mine"], [0.5])
    before = _run(model, inputs)
    with pytest.warns(dit_accel.DitAccelWarning, match="beside the active adapters") as said:
        handle = dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    query = model.blocks[0].attn1.to_q
    assert query.scaling == {"mine": 0.5, "dit_accel": 1.0}
    assert "['mine'] at the weights you set" in str(said[0].message)
    handle.remove()
    assert query.scaling == {"mine": 0.5} and model.active_adapters() == ["mine"]
    assert torch.equal(_run(model, inputs), before)


def test_remove_after_handle_fuse_lora_keeps_a_lora_the_user_fused_since(lora_folder):
    """Before: ``handle.fuse_lora()``, then the user fused their own adapter too
    (``transformer.fuse_lora(adapter_names=["mine"])``, allowed: it is not dit_accel's): ``remove()`` put back the
    weight copy taken before its own fuse, which holds none of the user's LoRA, while peft still counted "mine" as
    merged. The model after remove() ran without the user's LoRA (0.106 off on tiny Wan) and ``unfuse_lora()``
    then took it off a second time. Now the user's adapter is merged again onto the restored weights."""
    model = T.build_tiny_transformer("wan", seed=3)
    inputs = T.tiny_transformer_inputs("wan", model)
    model.add_adapter(_lora(["to_q", "to_k"]), adapter_name="mine")
    before = _run(model, inputs)
    with pytest.warns(dit_accel.DitAccelWarning, match="beside the active adapters"):
        handle = dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    assert handle.fuse_lora() > 0
    model.fuse_lora(adapter_names=["mine"])
    handle.remove()
    assert model.blocks[0].attn1.to_q.merged_adapters == ["mine"]
    torch.testing.assert_close(_run(model, inputs), before, atol=1e-5, rtol=1e-5)
    model.unfuse_lora()
    torch.testing.assert_close(_run(model, inputs), before, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ VSA gates on a model stored in float8
def test_vsa_gates_on_a_float8_layerwise_cast_model_keep_their_precision(tmp_path):
    """Before: apply(VSA, weights=<a gated checkpoint>) on a transformer after Diffusers'
    ``enable_layerwise_casting(storage_dtype=float8_e4m3fn)`` cast the to_gate_compress gates to the storage dtype of
    the attention's first weight (float8; packed GGUF/bitsandbytes ints would truncate them): the model ran 0.016
    off a plain fp32 copy of the same float8-rounded weights with the same gates, without a word. Now the gates
    take the module's compute dtype (fp32 here) and both run alike."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "transformer"
    model = T.build_tiny_transformer("wan", seed=0)
    model.save_pretrained(folder)
    path = next(folder.glob("*.safetensors"))
    state = load_file(str(path))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(10)
    for block in (0, 1):
        state[f"blocks.{block}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=g) * 0.3
    save_file(state, str(path), metadata={"format": "pt"})

    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    rounded = T.build_tiny_transformer("wan", seed=0)
    rounded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    inputs = T.tiny_transformer_inputs("wan", model)
    vsa = dit_accel.VSA(topk=1)
    with pytest.warns(dit_accel.DitAccelWarning, match="gates loaded for 2 of 2"):
        with dit_accel.apply(rounded, vsa, backend="torch", weights=folder):
            want = _run(rounded, inputs)
    with pytest.warns(dit_accel.DitAccelWarning, match="gates loaded for 2 of 2"):
        with dit_accel.apply(model, vsa, backend="torch", weights=folder) as handle:
            assert {gate.weight.dtype for gate in handle._gates.projections.values()} == {torch.float32}
            got = _run(model, inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ capture on a bare transformer without steps
def test_capture_on_a_bare_transformer_without_steps_says_that_later_calls_are_not_saved(tmp_path):
    """Before: apply(model, TILE, capture=DIR) on a bare transformer driven by the user's own loop (no scheduler=,
    no set_step) saved the first call's layers as step 0 and dropped every later call without a word (3 denoising
    calls, 2 files of step 0). Now the second such call says so and what to do; with set_step each call is saved
    under its step, silently."""
    model = T.build_tiny_transformer("wan", seed=3)
    inputs = T.tiny_transformer_inputs("wan", model)
    handle = dit_accel.apply(model, TILE, backend="torch", capture=tmp_path / "a")
    with pytest.warns(dit_accel.DitAccelWarning, match="every call counts as step 0, so only the first call of each "
                                                       "layer is saved. Pass scheduler=pipe.scheduler"):
        for _ in range(2):
            _run(model, inputs)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["layer000_step000.pt", "layer001_step000.pt"]
    handle.remove()

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dit_accel.apply(model, TILE, backend="torch", capture=tmp_path / "b") as handle:
            for step in range(2):
                handle.set_step(step, 2)
                _run(model, inputs)
    assert len(list((tmp_path / "b").iterdir())) == 4
