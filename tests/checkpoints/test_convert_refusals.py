"""``dit-accel convert`` refuses tensors no folder should get, before it writes anything (a NaN ``proj_l`` used to
become a folder with valid hashes, an int8 one was cast silently), and reads a training checkpoint's state dict
from under ``"state_dict"`` / ``"model"`` beside its ``step`` and ``optimizer``, or says what the file holds."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_accel.checkpoints.convert import convert_checkpoint
from dit_accel.checkpoints.finetuned import SLA_FILE
from dit_accel.cli.main import main

D = 12  # tiny Wan: 2 layers, 2 heads of 12
PROJ = "blocks.{i}.self_attn.attn_op.local_attn.proj_l.{part}"


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {PROJ.format(i=i, part=part): torch.randn(*((D, D) if part == "weight" else (D,)), generator=g)
            for i in range(2) for part in ("weight", "bias")}


def _convert_refused(path, out, match):
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(path, out)
    assert not out.exists()  # nothing written, no folder with valid hashes over bad tensors
    assert main(["convert", str(path), "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("edit, match", [
    (lambda s: s[PROJ.format(i=0, part="weight")].fill_(float("nan")),
     r"proj_l.weight has 144 non-finite values \(NaN or inf\); expected finite float weights"),
    (lambda s: s.update({PROJ.format(i=1, part="bias"): torch.zeros(D, dtype=torch.int8)}),
     r"blocks.1.self_attn.attn_op.local_attn.proj_l.bias is int8; expected float16, bfloat16 or float32 weights"),
    (lambda s: s.update({"blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 2 * D, dtype=torch.bool),
                         "blocks.0.self_attn.q.lora_B.weight": torch.zeros(2 * D, 2)}),
     r"blocks.0.self_attn.q.lora_A.weight is bool; expected float16"),
    (lambda s: s.update({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 2 * D),
                         "blocks.0.self_attn.q.lora_B.weight": torch.full((2 * D, 2), float("-inf"))}),
     r"blocks.0.self_attn.q.lora_B.weight has 48 non-finite values"),
], ids=["nan-projection", "int8-projection", "bool-lora", "inf-lora"])
def test_bad_tensors_are_refused_before_anything_is_written(tmp_path, edit, match):
    state = _state()
    edit(state)
    path = tmp_path / "ck.safetensors"
    save_file(state, str(path))
    _convert_refused(path, tmp_path / "out", f"{path}: (blocks.0.self_attn.attn_op.local_attn.)?" + match)


def test_half_precision_projections_convert(tmp_path):
    state = {k: v.half() for k, v in _state().items()}
    path = tmp_path / "ck.safetensors"
    save_file(state, str(path))
    out = convert_checkpoint(path, tmp_path / "out")
    assert torch.equal(load_file(str(out / SLA_FILE))["blocks.0.attn1.weight"], state[PROJ.format(i=0, part="weight")].float())


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "step": 5},
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 2},
    lambda sd: {"state_dict": {"model": sd}, "step": 5},
], ids=["state_dict+step", "model+optimizer", "nested"])
def test_a_training_checkpoint_is_unwrapped(tmp_path, wrap):
    state = _state()
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(state), path)
    out = convert_checkpoint(path, tmp_path / "out")
    assert torch.equal(load_file(str(out / SLA_FILE))["blocks.1.attn1.bias"], state[PROJ.format(i=1, part="bias")])


@pytest.mark.parametrize("wrap, match", [
    (lambda sd: {"net": sd, "net_ema": sd}, r"holds a dict of 2 entries that is no flat state dict of tensors: 'net' "
                                            r"\(dict of 4 entries, 4 tensors\), 'net_ema' .*several state dicts"),
    (lambda sd: {"state_dict": sd, "scale": torch.ones(1)}, r"'state_dict' \(dict of 4 entries, 4 tensors\), "
                                                            r"'scale' \(tensor \(1,\)\)"),
    (lambda sd: {**sd, PROJ.format(i=0, part="weight"): [1, 2]}, r"proj_l.weight' \(list\)"),
    (lambda sd: [sd], r"holds a list"),
], ids=["two-state-dicts", "loose-tensor", "non-tensor-entry", "list"])
def test_other_containers_are_refused_listing_what_they_hold(tmp_path, wrap, match):
    path = tmp_path / "odd.pth"
    torch.save(wrap(_state()), path)
    _convert_refused(path, tmp_path / "out", f"{path}: .*" + match + r".*; expected a state dict \(keys -> tensors\), "
                                                                   r"alone or under one of 'state_dict', 'model'")
