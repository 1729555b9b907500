"""``dit-accel convert`` / :func:`dit_accel.checkpoints.convert.convert_checkpoint` on synthetic checkpoints in the
reference key layout (TurboDiffusion: ``blocks.{i}.self_attn.attn_op.local_attn.proj_l.*`` next to the
original Wan model's own keys, ``net.`` prefix, ``{"state_dict": ...}`` wrapper), run on a tiny Wan
transformer: the converted folder must give exactly the outputs of setting the projections (and the
LoRA) by hand.
"""

import copy
import json
import types

import pytest
import torch

import dit_accel
from dit_accel.cli.main import main
from dit_accel.checkpoints.convert import convert_checkpoint, split_checkpoint
from dit_accel.models import tiny as T
from dit_accel.checkpoints.finetuned import METHOD_FILE, SLA_FILE, load_method
from tests.utils import first_output as _run

D = 12  # tiny Wan: 2 layers, 2 heads of 12


@pytest.fixture(scope="module")
def model():
    return T.build_tiny_transformer("wan")


def _turbo_state(layers=2, seed=0, base=True):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight"] = torch.randn(D, D, generator=g) * 0.3
        state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.bias"] = torch.randn(D, generator=g) * 0.1
        if base:  # the model's own tensors (original Wan names), as TurboDiffusion saves them
            state[f"net.blocks.{i}.self_attn.q.weight"] = torch.randn(2 * D, 2 * D, generator=g)
            state[f"net.blocks.{i}.ffn.0.weight"] = torch.randn(4, 2 * D, generator=g)
            state[f"net.blocks.{i}.modulation"] = torch.randn(1, 6, 2 * D, generator=g)
    if base:
        state["net.patch_embedding.weight"] = torch.randn(2 * D, 4, 1, 2, 2, generator=g)
        state["net.head.head.weight"] = torch.randn(16, 2 * D, generator=g)
    return state


def _save(tmp_path, state, name="turbo.pth"):
    path = tmp_path / name
    torch.save({"state_dict": state}, path)
    return path


def _projection(state, i, part):
    return state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.{part}"]


def test_converted_projections_land_in_their_layers_and_match_setting_them_by_hand(model, tmp_path):
    state = _turbo_state()
    out = convert_checkpoint(_save(tmp_path, state), tmp_path / "w", method=dit_accel.SLA.reference(topk=0.5),
                             base_weights="skip")
    method = load_method(out)
    assert method == dit_accel.SLA.reference(topk=0.5)
    info = json.loads((out / METHOD_FILE).read_text())
    assert info["files"] == {"lora": None, "sla_projections": SLA_FILE} and info["dense_layers"] is None
    assert info["converted_from"]["model_tensors_not_converted"] == 8
    kwargs = T.tiny_transformer_inputs("wan", model)
    with dit_accel.apply(model, method, backend="torch", weights=out) as handle:
        got = _run(model, kwargs)
        for i in range(2):
            proj = handle.sla_projections()[f"blocks.{i}.attn1"]
            assert torch.equal(proj.weight, _projection(state, i, "weight"))
            assert torch.equal(proj.bias, _projection(state, i, "bias"))
    with dit_accel.apply(model, dit_accel.SLA.reference(topk=0.5), backend="torch") as handle:
        zero = _run(model, kwargs)
        with torch.no_grad():
            for i in range(2):
                handle.sla_projections()[f"blocks.{i}.attn1"].weight.copy_(_projection(state, i, "weight"))
                handle.sla_projections()[f"blocks.{i}.attn1"].bias.copy_(_projection(state, i, "bias"))
        want = _run(model, kwargs)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got - zero).abs().max() > 1e-3  # the projections matter


def test_lora_in_the_checkpoint_is_converted(model, tmp_path):
    state = _turbo_state(base=False)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 2 * D, generator=g) * 0.2, torch.randn(2 * D, 4, generator=g) * 0.2
    state["net.blocks.0.self_attn.q.lora_A.weight"], state["net.blocks.0.self_attn.q.lora_B.weight"] = a, b
    out = convert_checkpoint(_save(tmp_path, state), tmp_path / "w", method=dit_accel.SLA.reference(topk=0.5))
    assert json.loads((out / METHOD_FILE).read_text())["lora"]["rank"] == 4
    kwargs = T.tiny_transformer_inputs("wan", model)
    with dit_accel.apply(model, load_method(out), backend="torch", weights=out):
        got = _run(model, kwargs)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.blocks[0].attn1.to_q.weight += b @ a  # no alpha: scale 1
    with dit_accel.apply(by_hand, dit_accel.SLA.reference(topk=0.5), backend="torch") as handle:
        with torch.no_grad():
            for i in range(2):
                handle.sla_projections()[f"blocks.{i}.attn1"].weight.copy_(_projection(state, i, "weight"))
                handle.sla_projections()[f"blocks.{i}.attn1"].bias.copy_(_projection(state, i, "bias"))
        want = _run(by_hand, kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not getattr(model, "peft_config", None)  # remove() took the LoRA out again


def test_wan22_second_expert(tmp_path):
    first, second = T.build_tiny_transformer("wan"), T.build_tiny_transformer("wan", seed=1)
    pipe = types.SimpleNamespace(transformer=first, transformer_2=second)
    s1, s2 = _turbo_state(base=False), _turbo_state(seed=1, base=False)
    out = convert_checkpoint(_save(tmp_path, s1, "high.pth"), tmp_path / "w",
                             transformer_2=_save(tmp_path, s2, "low.pth"), method=dit_accel.SLA.reference(topk=0.5))
    with dit_accel.apply(pipe, load_method(out), backend="torch", weights=out) as handle:
        projections = handle.sla_projections()
        assert torch.equal(projections["blocks.1.attn1"].weight, _projection(s1, 1, "weight"))
        assert torch.equal(projections["transformer_2.blocks.1.attn1"].weight, _projection(s2, 1, "weight"))


def test_safetensors_and_prefixes(tmp_path):
    from safetensors.torch import save_file

    state = {k.replace("net.", "model.diffusion_model."): v for k, v in _turbo_state(base=False).items()}
    path = tmp_path / "ckpt.safetensors"
    save_file(state, str(path))
    split = split_checkpoint(state)
    assert sorted(split.projections) == [0, 1] and not split.base and not split.lora
    out = convert_checkpoint(path, tmp_path / "w")
    assert load_method(out) == dit_accel.SLA.reference(topk=0.1)  # TurboDiffusion's default top-k


@pytest.mark.parametrize("extra, match", [
    ({"net.blocks.0.self_attn.mystery.weight": torch.zeros(2)},
     r"1 keys are neither.*blocks.0.self_attn.mystery.weight.*Expected blocks\.\{i\}\.self_attn"),
    ({"net.blocks.0.self_attn.q.int8_weight": torch.zeros(2, dtype=torch.int8)}, "quantized checkpoint"),
], ids=["unknown", "quantized"])
def test_bad_keys_are_clear_errors(tmp_path, extra, match):
    state = {**_turbo_state(base=False), **extra}
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(_save(tmp_path, state), tmp_path / "w")


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="carries the model's own weights.*--skip-base-weights"):
        convert_checkpoint(_save(tmp_path, _turbo_state()), tmp_path / "a")
    with pytest.raises(ValueError, match="has no SLA projections"):
        convert_checkpoint(_save(tmp_path, {"net.head.head.weight": torch.zeros(2, 2)}), tmp_path / "b",
                           base_weights="skip")
    bad = _turbo_state(base=False)
    bad["net.blocks.1.self_attn.attn_op.local_attn.proj_l.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(ValueError, match="layer 1's proj_l must be a Linear"):
        convert_checkpoint(_save(tmp_path, bad), tmp_path / "c")
    out = convert_checkpoint(_save(tmp_path, _turbo_state(base=False)), tmp_path / "d")
    with pytest.raises(ValueError, match="overwrite"):
        convert_checkpoint(_save(tmp_path, _turbo_state(base=False)), out)
    convert_checkpoint(_save(tmp_path, _turbo_state(base=False)), out, overwrite=True)
    with pytest.warns(UserWarning, match="trained with it on all tokens"):
        convert_checkpoint(_save(tmp_path, _turbo_state(base=False)), tmp_path / "e",
                           method=dit_accel.SLA(topk=0.1))


def test_loading_into_another_linear_token_rule_warns(model, tmp_path):
    out = convert_checkpoint(_save(tmp_path, _turbo_state(base=False)), tmp_path / "w",
                             method=dit_accel.SLA.reference(topk=0.5))
    with pytest.warns(UserWarning, match="linear_tokens='all' but the method runs linear_tokens='marginal'"):
        dit_accel.apply(model, dit_accel.SLA.reference(topk=0.5).replace(linear_tokens="marginal"),
                        weights=out).remove()
    with pytest.raises(ValueError, match="differs in \\['topk'\\]"):
        dit_accel.apply(model, dit_accel.SLA.reference(topk=0.25), weights=out)
    # A folder written before rounding/linear_eps existed still matches the config it names.
    info = json.loads((out / METHOD_FILE).read_text())
    info["method"] = {"method": "sla", "topk": 0.5, "negligible": 0.0, "block_q": 64, "block_k": 64,
                      "feature_map": "softmax", "linear_tokens": "all"}
    (out / METHOD_FILE).write_text(json.dumps(info))
    dit_accel.apply(model, dit_accel.SLA(topk=0.5, linear_tokens="all"), weights=out).remove()


def test_cli(tmp_path, capsys):
    ckpt = _save(tmp_path, _turbo_state())
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "w"), "--topk", "0.5", "--block-q", "128",
                 "--skip-base-weights"]) == 0
    assert load_method(tmp_path / "w") == dit_accel.SLA.reference(topk=0.5, block_q=128)
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "--skip-base-weights" in capsys.readouterr().err  # (errors on stderr, as every other command's)
