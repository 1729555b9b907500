"""A weights folder whose tensors cannot be the fine-tune's is refused before the model changes, naming the file
and the tensor or module: NaN/inf or non-float LoRA and SLA projections (they ran to NaN latents), LoRA on a
module LoRA cannot adapt (peft used to fail half-way and leave LoRA layers behind), LoRA of the wrong shape or
for modules the model lacks (dropped with a log line), weights of another method, a VSA gates file that is
missing or holds a gate twice. Corrupted copies get a new sha256 table, so the hash check does not catch them
first. And if peft fails anyway, the model gets its own layers back."""

import hashlib
import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.checkpoints import finetuned as W
from dit_accel.models.tiny import build_tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

SLA = dit_accel.SLA(topk=0.5)
VSA = dit_accel.VSA(sparsity=0.5)


def snapshot(model) -> dict:
    """What a failed load must leave as it was: tensors, module types, processors, hooks, peft's state."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "processors": {n: getattr(m, "processor", None) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "peft": sorted(getattr(model, "peft_config", None) or {}),
        "dict": sorted(model.__dict__),
        "grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for name, proc in before["processors"].items():
        assert after["processors"][name] is proc, name
    for key in ("types", "hooks", "peft", "dict", "grad"):
        assert after[key] == before[key], key


def _save(path, method, **tensors):
    model = build_tiny_transformer("wan", seed=3)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    with dit_accel.apply(model, method, backend="torch") as handle:
        model.add_adapter(lora)
        projections = handle.sla_projections() if method is SLA else None
        for p in (projections or {}).values():
            torch.nn.init.normal_(p.weight, std=0.3)
        W.save_trained_weights(path, transformer=model, method=method, lora_config=lora,
                               sla_projections=projections, **tensors)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A weights folder (LoRA + SLA projections) for the tiny Wan transformer."""
    return _save(tmp_path_factory.mktemp("weights"), SLA)


@pytest.fixture(scope="module")
def vsa_folder(tmp_path_factory):
    """A VSA weights folder (LoRA + to_gate_compress gates) for the tiny Wan transformer."""
    attn = build_tiny_transformer("wan", seed=3).blocks[0].attn1
    inner, dim = attn.to_q.weight.shape
    gates = {f"blocks.{i}.to_gate_compress.{p}": torch.randn(*((inner, dim) if p == "weight" else (inner,))) * 0.1
             for i in range(2) for p in ("weight", "bias")}
    return _save(tmp_path_factory.mktemp("vsa_weights"), VSA, vsa_gates=gates)


@pytest.fixture()
def model():
    return build_tiny_transformer("wan", seed=3)


def _copy(folder, tmp_path, name=None, edit=None, rehash=True):
    """A copy of ``folder`` with ``edit(tensors)`` written over file ``name``, its sha256 table recomputed."""
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    if name is not None:
        save_file(edit(load_file(str(out / name))), str(out / name))
    info = json.loads((out / W.METHOD_FILE).read_text())
    if rehash:
        info["sha256"] = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in info["sha256"]}
    else:
        info.pop("sha256")
    (out / W.METHOD_FILE).write_text(json.dumps(info))
    return out


def _refused(model, method, weights, error, match) -> str:
    before = snapshot(model)
    with pytest.raises(error, match=match) as err:
        dit_accel.apply(model, method, backend="torch", weights=weights)
    assert "\n" not in str(err.value)
    assert_unchanged(model, before)
    return str(err.value)


def _first(tensors, fn):
    key = sorted(tensors)[0]
    return {**tensors, key: fn(tensors[key])}


@pytest.mark.parametrize("name, fn, match", [
    (W.SLA_FILE, lambda t: torch.full_like(t, float("nan")),
     r"sla_projections.safetensors: blocks.0.attn1.bias has 12 non-finite values \(NaN or inf\); expected finite "
     r"float weights; the fine-tune diverged or the file is damaged: train or convert it again"),
    (W.SLA_FILE, lambda t: t.to(torch.int8),
     r"sla_projections.safetensors: blocks.0.attn1.bias is int8; expected float16, bfloat16 or float32 weights"),
    (W.LORA_FILE, lambda t: torch.full_like(t, float("inf")),
     r"pytorch_lora_weights.safetensors: transformer.blocks.0.attn1.to_q.lora_A.weight has \d+ non-finite values"),
    (W.LORA_FILE, lambda t: t > 0, r"pytorch_lora_weights.safetensors: transformer.blocks.0.attn1.to_q.lora_A.weight "
                                   r"is bool; expected float16, bfloat16 or float32 weights"),
], ids=["sla-nan", "sla-int8", "lora-inf", "lora-bool"])
def test_non_finite_or_non_float_tensors_are_refused(model, folder, tmp_path, name, fn, match):
    bad = _copy(folder, tmp_path, name, lambda t: _first(t, fn))
    _refused(model, SLA, bad, BadFileError, match)


def test_lora_on_a_module_lora_cannot_adapt_is_refused_before_peft_wraps_anything(model, folder, tmp_path):
    bad = _copy(folder, tmp_path, W.LORA_FILE, lambda t: {**t, "transformer.blocks.0.norm2.lora_A.weight":
                                                          torch.zeros(2, 24),
                                                          "transformer.blocks.0.norm2.lora_B.weight": torch.zeros(24, 2)})
    _refused(model, SLA, bad, ValueError, r"pytorch_lora_weights.safetensors: holds LoRA for blocks.0.norm2, a "
                                          r"FP32LayerNorm of this WanTransformer3DModel; LoRA adapts Linear and Conv")


@pytest.mark.parametrize("a, b, match", [
    ((2, 8, 1, 2, 2), (24, 2, 1, 1, 1), r"lora_A of patch_embedding has shape \(2, 8, 1, 2, 2\), but that Conv3d of "
                                        r"this WanTransformer3DModel takes lora_A of shape \(r, 4, 1, 2, 2\)"),
    ((2, 4 * 4), (24, 2), r"lora_A of patch_embedding has shape \(2, 16\)"),
    ((2, 4, 1, 2, 2), (24, 2), r"lora_B of patch_embedding has shape \(24, 2\), .* takes lora_B of shape "
                               r"\(24, r, 1, 1, 1\)"),
], ids=["conv-in-channels", "linear-shaped", "conv-b-2d"])
def test_conv_lora_of_the_wrong_shape_is_refused_naming_the_module(model, folder, tmp_path, a, b, match):
    extra = {"transformer.patch_embedding.lora_A.weight": torch.zeros(a),
             "transformer.patch_embedding.lora_B.weight": torch.zeros(b)}
    bad = _copy(folder, tmp_path, W.LORA_FILE, lambda t: {**t, **extra})
    _refused(model, SLA, bad, ValueError, "pytorch_lora_weights.safetensors: " + match)


def test_lora_for_modules_the_model_lacks_is_refused_naming_them(model, folder, tmp_path):
    extra = {"transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(2, 24),
             "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(24, 2)}
    bad = _copy(folder, tmp_path, W.LORA_FILE, lambda t: {**t, **extra})
    message = _refused(model, SLA, bad, ValueError, "holds LoRA for 1 module")
    assert message.startswith(f"{bad / W.LORA_FILE}: holds LoRA for 1 module this WanTransformer3DModel lacks "
                              "(blocks.9.attn1.to_q): trained on another (deeper) model?")


@pytest.mark.parametrize("users", [False, True], ids=["plain-model", "with-users-adapter"])
def test_peft_failing_part_way_leaves_the_model_as_it_was(model, folder, tmp_path, monkeypatch, users):
    """The last line of defence: with the pre-check out of the way, peft wraps the attention linears and then
    raises on the LayerNorm. Every wrapped layer must be the original module again, a user's adapter as it was."""
    if users:
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q"], init_lora_weights=False),
                          adapter_name="mine")
    bad = _copy(folder, tmp_path, W.LORA_FILE, lambda t: {**t, "transformer.blocks.1.norm2.lora_A.weight":
                                                          torch.zeros(2, 24),
                                                          "transformer.blocks.1.norm2.lora_B.weight": torch.zeros(24, 2)})
    monkeypatch.setattr(W, "check_lora_modules", lambda *args: {})
    active = model.active_adapters() if users else None
    _refused(model, SLA, bad, ValueError, r"pytorch_lora_weights.safetensors: peft could not load this LoRA into the "
                                          r"WanTransformer3DModel \(ValueError: Target module FP32LayerNorm")
    if users:
        assert model.active_adapters() == active
        assert all("dit_accel" not in m.lora_A for n, m in model.named_modules() if hasattr(m, "lora_A"))
    with dit_accel.apply(model, SLA, backend="torch", weights=folder) as handle:  # and it still loads a good one
        assert handle.lora_adapter == "dit_accel"


def test_weights_of_another_method_say_which_method_to_apply(model, folder):
    _refused(model, VSA, folder, ValueError,
             r"were trained for SLA\(topk=0.5, .*\) but apply was given VSA\(.*sparsity=0.5.*\); pass "
             r"dit_accel.load_method\(.*\)")


def test_check_method_fits_names_both_methods(vsa_folder):
    """What ``apply``'s early folder check calls (dit_accel.pipelines.apply_checks) to refuse VSA weights under SLA
    before it asks for sla_projections.safetensors."""
    saved = json.loads((vsa_folder / W.METHOD_FILE).read_text())["method"]
    with pytest.raises(ValueError, match=r"were trained for VSA\(.*sparsity=0.5.*\) but apply was given "
                                         r"SLA\(topk=0.5.*\); pass dit_accel.load_method"):
        W.check_method_fits(vsa_folder, saved, SLA)
    W.check_method_fits(vsa_folder, saved, VSA)  # the same method with other settings: load_into compares those
    W.check_method_fits(vsa_folder, saved, dit_accel.VSA(sparsity=0.9))


def test_vsa_folder_loads(model, vsa_folder):
    with dit_accel.apply(model, W.load_method(vsa_folder), backend="torch", weights=vsa_folder) as handle:
        assert handle.lora_adapter == "dit_accel"


def test_a_missing_gates_file_is_refused_without_a_hash_table(model, vsa_folder, tmp_path):
    bad = _copy(vsa_folder, tmp_path, rehash=False)
    (bad / W.VSA_FILE).unlink()
    _refused(model, W.load_method(bad), bad, BadFileError,
             r"vsa_gates.safetensors: does not exist, though dit_accel_method.json names it as the folder's vsa_gates")


def test_a_gate_under_two_keys_is_refused_naming_both(model, vsa_folder, tmp_path):
    bad = _copy(vsa_folder, tmp_path, W.VSA_FILE, lambda t: {
        **t, "blocks.0.attn1.to_gate_compress.weight": torch.ones_like(t["blocks.0.to_gate_compress.weight"])})
    _refused(model, W.load_method(bad), bad, BadFileError,
             r"vsa_gates.safetensors: holds two to_gate_compress weights for block 0: "
             r"blocks.0.attn1.to_gate_compress.weight and blocks.0.to_gate_compress.weight")
