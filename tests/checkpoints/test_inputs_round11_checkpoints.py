"""``dit-accel convert``, trust round 11: checkpoints laid out as real ones are (Diffusers-named LoRA with its alphas,
a ``transformer.`` prefix, an ffn-only LoRA, EMA copies, a layer missing) either convert to a folder that computes
what the checkpoint's tensors compute, set by hand on the tiny Wan, or are refused before anything is written."""

import copy
import hashlib

import pytest
import torch
from safetensors.torch import load_file

import dit_accel
from dit_accel.checkpoints.convert import convert_checkpoint
from dit_accel.checkpoints.finetuned import SLA_FILE, load_method
from dit_accel.cli.main import main
from dit_accel.models import tiny as T
from tests.utils import first_output as _run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

D = 12  # tiny Wan: 2 layers, 2 heads of 12, model dim 24
PROJ = "blocks.{i}.self_attn.attn_op.local_attn.proj_l.{part}"
METHOD = dit_accel.SLA.reference(topk=0.5)


@pytest.fixture(scope="module")
def model():
    return T.build_tiny_transformer("wan")


def _projections(prefix="net.", seed=0, layers=(0, 1)):
    g = torch.Generator().manual_seed(seed)
    return {prefix + PROJ.format(i=i, part=part): torch.randn(*((D, D) if part == "weight" else (D,)), generator=g)
            * (0.3 if part == "weight" else 0.1) for i in layers for part in ("weight", "bias")}


def _by_hand(model, state, prefix, edit, kwargs):
    """The reference: a copy of the model with the LoRA's update added to its weight by hand and each layer's
    projection copied from the raw checkpoint tensors."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        edit(ref)
    with dit_accel.apply(ref, METHOD, backend="torch") as handle:
        with torch.no_grad():
            for i in range(2):
                for part in ("weight", "bias"):
                    getattr(handle.sla_projections()[f"blocks.{i}.attn1"], part).copy_(
                        state[prefix + PROJ.format(i=i, part=part)])
        return _run(ref, kwargs)


g = torch.Generator().manual_seed(3)
A, B = torch.randn(4, 2 * D, generator=g) * 0.2, torch.randn(2 * D, 4, generator=g) * 0.2  # rank 4 on a 24-wide Linear
A_FFN, B_FFN = torch.randn(4, 2 * D, generator=g) * 0.2, torch.randn(32, 4, generator=g) * 0.2  # ffn.net.0.proj: 24->32


@pytest.mark.parametrize("prefix, lora, edit", [
    # Diffusers' names with a per-module alpha: scale alpha / rank = 0.5 (the folder failed to load: "a module this
    # model lacks", blocks.0.attn1.to_q.alpha)
    ("net.", {"net.blocks.0.attn1.to_q.lora_A.weight": A, "net.blocks.0.attn1.to_q.lora_B.weight": B,
              "net.blocks.0.attn1.to_q.alpha": torch.tensor(2.0)},
     lambda m: m.blocks[0].attn1.to_q.weight.add_(0.5 * B @ A)),
    # a Diffusers/PEFT-saved state dict: every key under transformer. (the folder failed to load: "the weights
    # belong to another model", transformer.blocks.0.attn1.to_q)
    ("transformer.", {"transformer.blocks.0.attn1.to_q.lora_A.weight": A,
                      "transformer.blocks.0.attn1.to_q.lora_B.weight": B},
     lambda m: m.blocks[0].attn1.to_q.weight.add_(B @ A)),
    # a LoRA on the feed-forward only, Diffusers' names (read as the original's: Diffusers' conversion refused it)
    ("net.", {"net.blocks.0.ffn.net.0.proj.lora_A.weight": A_FFN, "net.blocks.0.ffn.net.0.proj.lora_B.weight": B_FFN},
     lambda m: m.blocks[0].ffn.net[0].proj.weight.add_(B_FFN @ A_FFN)),
], ids=["diffusers-alpha", "transformer-prefix", "diffusers-ffn-only"])
def test_diffusers_named_lora_computes_what_the_checkpoint_does(model, tmp_path, prefix, lora, edit):
    state = {**_projections(prefix), **lora}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    assert main(["convert", str(path), "--out", str(tmp_path / "w"), "--topk", "0.5"]) == 0
    kwargs = T.tiny_transformer_inputs("wan", model)
    with dit_accel.apply(model, load_method(tmp_path / "w"), backend="torch", weights=tmp_path / "w"):
        got = _run(model, kwargs)
    want = _by_hand(model, state, prefix, edit, kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - _by_hand(model, state, prefix, lambda m: None, kwargs)).abs().max() > 1e-3  # the LoRA matters


def test_a_diffusers_alpha_of_no_lora_module_is_refused(tmp_path):
    state = {**_projections(), "net.blocks.0.attn1.to_q.lora_A.weight": A, "net.blocks.0.attn1.to_q.lora_B.weight": B,
             "net.blocks.0.attn1.to_q.alpha": torch.tensor([2.0, 3.0])}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"blocks.0.attn1.to_q.alpha is no LoRA scale .*one-element alpha"):
        convert_checkpoint(path, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def _tree(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _refused_leaving_the_folder(tmp_path, state, capsys, match):
    """Refused by the API and the CLI (one line, exit 2), a new folder not made, an existing one (--overwrite) as
    it was."""
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    good = tmp_path / "good.pth"
    torch.save(_projections(seed=7), good)
    old = convert_checkpoint(good, tmp_path / "old")
    before = _tree(old)
    capsys.readouterr()
    assert main(["convert", str(path), "--out", str(old), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dit-accel convert: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _tree(old) == before


def test_a_layer_without_its_projection_is_refused(tmp_path, capsys):
    # (before: converted; apply() then refused the folder as one trained with other dense_layers)
    state = _projections(layers=(0, 2))
    _refused_leaving_the_folder(tmp_path, state, capsys,
                                r"no SLA projection \(proj_l\) for layer\(s\) \[1\] but has them up to layer 2")


def test_projections_of_a_model_and_its_ema_copy_are_refused(tmp_path, capsys):
    # layer 0 from the model (net.), layer 1 from its EMA (net_ema.): before, converted as one model without a word
    state = {**_projections("net.", layers=(0,)), **_projections("net_ema.", seed=5, layers=(1,))}
    _refused_leaving_the_folder(tmp_path, state, capsys, r"come from a model and its EMA copy .*net\..*net_ema\.")


def test_the_ema_copy_alone_converts_with_the_model_weights_beside_it(tmp_path):
    # the EMA's projections, the model's own (never converted) weights under net.: the EMA's tensors land
    ema = _projections("net_ema.", seed=5)
    state = {**ema, "net.head.head.weight": torch.zeros(16, 2 * D), "net.blocks.0.self_attn.q.weight": torch.zeros(2 * D, 2 * D)}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    out = convert_checkpoint(path, tmp_path / "w", base_weights="skip")
    saved = load_file(str(out / SLA_FILE))
    for i in range(2):
        assert torch.equal(saved[f"blocks.{i}.attn1.weight"], ema["net_ema." + PROJ.format(i=i, part="weight")])


def test_one_tensor_tied_to_two_layers_converts_to_both(model, tmp_path, capsys):
    # torch.save keeps a tensor that two entries share as one; safetensors refused the two copies with a raw
    # RuntimeError traceback ("Some tensors share memory")
    w, b = torch.randn(D, D) * 0.3, torch.randn(D) * 0.1
    state = {"net." + PROJ.format(i=i, part=part): (w if part == "weight" else b) for i in range(2)
             for part in ("weight", "bias")}
    state.update({f"net.blocks.{i}.self_attn.q.lora_{side}.weight": (A if side == "A" else B) for i in range(2)
                  for side in ("A", "B")})
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    assert main(["convert", str(path), "--out", str(tmp_path / "w"), "--topk", "0.5"]) == 0, capsys.readouterr().err
    kwargs = T.tiny_transformer_inputs("wan", model)
    with dit_accel.apply(model, METHOD, backend="torch", weights=tmp_path / "w"):
        got = _run(model, kwargs)

    def edit(m):
        for i in range(2):
            m.blocks[i].attn1.to_q.weight.add_(B @ A)
    torch.testing.assert_close(got, _by_hand(model, state, "net.", edit, kwargs), atol=1e-5, rtol=1e-5)


def test_a_checkpoint_of_meta_tensors_is_one_line(tmp_path, capsys):
    # saved from a model built on the meta device: before, a raw "Tensor.item() cannot be called on meta tensors"
    state = {k: torch.empty(v.shape, device="meta") for k, v in _projections().items()}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    assert main(["convert", str(path), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "proj_l.bias is a meta tensor (a shape without values" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_two_experts_of_other_layer_counts_are_refused(tmp_path, capsys):
    # one head dim, other depths (Wan 2.1 1.3B and 14B both have heads of 128): before, converted; apply() then
    # refused the folder as one trained with other dense_layers
    high, low = tmp_path / "high.pth", tmp_path / "low.pth"
    torch.save(_projections(), high)
    torch.save(_projections(seed=1, layers=(0, 1, 2)), low)
    with pytest.raises(ValueError, match=r"has SLA projections for 2 layers and transformer_2 .* for 3: give the two "
                                         r"experts of one model"):
        convert_checkpoint(high, tmp_path / "w", transformer_2=low)
    assert not (tmp_path / "w").exists()
    assert main(["convert", str(high), "--transformer-2", str(low), "--out", str(tmp_path / "w")]) == 2
    assert "for 3: give the two experts" in capsys.readouterr().err and not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["ck.pth", "ck.bin", "ck.SAFETENSORS"])
def test_a_safetensors_file_under_another_name_is_read_as_one(tmp_path, capsys, name):
    # before: torch.load's "not a PyTorch checkpoint ... expected a .safetensors file", of a .safetensors file
    from safetensors.torch import save_file

    state = _projections()
    save_file(state, str(tmp_path / name))
    assert main(["convert", str(tmp_path / name), "--out", str(tmp_path / "w")]) == 0, capsys.readouterr().err
    saved = load_file(str(tmp_path / "w" / SLA_FILE))
    assert torch.equal(saved["blocks.1.attn1.bias"], state["net." + PROJ.format(i=1, part="bias")])


def test_a_wrapper_beside_a_second_copy_of_the_model_is_refused(tmp_path, capsys):
    # {"model": ..., "ema": ...}: before, the model's projections were converted and the EMA's dropped without a word
    ema = {k: v + 1.0 for k, v in _projections().items()}
    path = tmp_path / "ck.pth"
    torch.save({"model": _projections(), "ema": ema, "optimizer": {"state": {}, "param_groups": []}, "step": 3}, path)
    with pytest.raises(ValueError, match=r"holds two state dicts of one model, 'model' and 'ema' \(its EMA copy\?\).*"
                                         r"torch.save\(checkpoint\['ema'\], PATH\)"):
        convert_checkpoint(path, tmp_path / "w")
    assert main(["convert", str(path), "--out", str(tmp_path / "w")]) == 2
    assert "'model' and 'ema'" in capsys.readouterr().err and not (tmp_path / "w").exists()
    torch.save(ema, path)  # the copy alone converts
    out = convert_checkpoint(path, tmp_path / "w")
    assert torch.equal(load_file(str(out / SLA_FILE))["blocks.0.attn1.bias"], ema["net." + PROJ.format(i=0, part="bias")])
