"""Trust round 24, loading trained weights: VSA gates saved under torch.compile's or DDP's wrapper prefix load (they
were "no gates"); a to_gate_compress tensor under a key dit_accel does not read, gates with biases for some blocks only,
and a shard index naming gates its shards lack are refused naming the file (they loaded partly, without a word); the
gates of a ``.bin`` checkpoint load (VSA ran without them, calling the folder "no folder on this machine"); a weights
folder whose method file names tensors its method has no use for is refused (they were skipped). Every refusal
leaves the model exactly as it was."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dit_accel
from dit_accel.atomic_files import BadFileError
from dit_accel.checkpoints import finetuned as W
from dit_accel.checkpoints.vsa_gates import read_gates
from dit_accel.models import tiny as T
from tests.checkpoints.test_weights_refusals import SLA, VSA, _save, assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = (5, 6, 7)
KEY = "blocks.{}.to_gate_compress.{}"


def _gated(folder, key=KEY, layers=(0, 1), bias=True):
    """The tiny Wan transformer saved to ``folder`` with random gates under ``key``; returns its file and the gates."""
    model = T.build_tiny_transformer("wan")
    model.save_pretrained(folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state, gates = load_file(str(path)), {}
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(24)
    for i in layers:
        gates[i] = (torch.randn(dim, dim, generator=g) * 0.3, torch.randn(dim, generator=g) * 0.3)
        state[key.format(i, "weight")] = gates[i][0]
        if bias:
            state[key.format(i, "bias")] = gates[i][1]
    save_file(state, str(path), metadata={"format": "pt"})
    return path, gates


def _run(model, weights=None):
    """``(handle.vsa_gates, output)`` of the model under VSA with ``weights``, and the model exactly as before after
    ``remove()``."""
    before = snapshot(model)
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    with dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch", weights=weights) as handle, torch.no_grad():
        out = model(**kwargs)[0]
        gated = dict(handle.vsa_gates)
    assert_unchanged(model, before)
    return gated, out


def _refused(model, weights, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        dit_accel.apply(model, dit_accel.VSA(topk=2), backend="torch", weights=weights)
    assert "\n" not in str(err.value)
    assert_unchanged(model, before)
    return str(err.value)


# ----------------------------------------------------------------------------- gate checkpoints
@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "transformer._orig_mod."])
def test_gates_under_a_compile_or_ddp_prefix_load_as_the_plain_ones(tmp_path, prefix):
    # before: "holds neither to_gate_compress gates ... nor a dit-accel finetune output", of a folder holding them
    _gated(tmp_path / "plain")
    _, gates = _gated(tmp_path / "wrapped", key=prefix + KEY)
    read = read_gates(tmp_path / "wrapped")
    assert all(torch.equal(read[i]["weight"], w) and torch.equal(read[i]["bias"], b) for i, (w, b) in gates.items())
    model = T.build_tiny_transformer("wan")
    gated, out = _run(model, tmp_path / "wrapped")
    assert len(gated) == 2
    torch.testing.assert_close(out, _run(model, tmp_path / "plain")[1], rtol=0, atol=0)


@pytest.mark.parametrize("extra, key", [
    ({"model.diffusion_model.blocks.0.to_gate_compress.weight": torch.zeros(24, 24)},
     "model.diffusion_model.blocks.0.to_gate_compress.weight"),
    ({"blocks.0.to_gate_compress.weight_scale": torch.ones(1)}, "blocks.0.to_gate_compress.weight_scale"),
], ids=["comfyui-prefix", "fp8-scale"])
def test_a_gate_tensor_under_a_key_it_does_not_read_is_refused_naming_it(tmp_path, extra, key):
    # before: skipped; block 0's gate ran without its scale, or under another layout not at all, without a word
    path, _ = _gated(tmp_path)
    save_file({**load_file(str(path)), **extra}, str(path))
    message = _refused(T.build_tiny_transformer("wan"), tmp_path, rf"{path}: holds {key}, a to_gate_compress tensor "
                                                                  "under a key dit_accel does not read")
    assert "blocks.N.to_gate_compress.weight" in message and "save the gates again" in message


def test_gates_with_biases_for_some_blocks_only_are_refused(tmp_path):
    # before: block 1's gate ran without its bias, without a word
    path, _ = _gated(tmp_path)
    save_file({k: v for k, v in load_file(str(path)).items() if k != "blocks.1.to_gate_compress.bias"}, str(path))
    _refused(T.build_tiny_transformer("wan"), tmp_path, rf"{path}: holds to_gate_compress biases for 1 blocks but none "
                                                        r"for block\(s\) \[1\].*download or save it again")
    path, _ = _gated(tmp_path / "none", bias=False)  # no bias anywhere: a Linear without bias, loaded
    assert len(_run(T.build_tiny_transformer("wan"), tmp_path / "none")[0]) == 2


def test_a_shard_index_naming_gates_its_shards_lack_is_refused(tmp_path):
    # before: the gates that shard lacked were skipped (a shard of another download beside the index)
    path, _ = _gated(tmp_path)
    state = load_file(str(path))
    path.unlink()
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name, part in shards.items():
        save_file({k: state[k] for k in part if k != "blocks.1.to_gate_compress.bias"}, str(tmp_path / name))
    _refused(T.build_tiny_transformer("wan"), tmp_path,
             r"index.json: names blocks.1.to_gate_compress.bias in [ab].safetensors, which that shard does not hold.*"
             "download the checkpoint again")


def test_the_gates_of_a_bin_checkpoint_load(tmp_path):
    # before: weights= said the folder held no gates; loaded from it, VSA ran without them ("no folder on this machine")
    from diffusers import WanTransformer3DModel

    path, _ = _gated(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(load_file(str(path)), tmp_path / "bin" / "diffusion_pytorch_model.bin")
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    model = T.build_tiny_transformer("wan")
    want = _run(model, tmp_path / "st")[1]
    gated, out = _run(model, tmp_path / "bin")
    assert len(gated) == 2
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "bin").eval()  # its own folder: found there
    gated, out = _run(loaded)
    assert gated == {"blocks.0.attn1": str(tmp_path / "bin"), "blocks.1.attn1": str(tmp_path / "bin")}
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    (tmp_path / "bin" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    _refused(model, tmp_path / "bin", r"diffusion_pytorch_model.bin: is not a state dict torch.load can read with "
                                      "weights_only=True.*download it again, or save it as safetensors")


# ----------------------------------------------------------------------------- weights folders
def _edit_info(folder, edit):
    info = json.loads((folder / W.METHOD_FILE).read_text())
    edit(info)
    info["sha256"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in info["files"].values() if n}
    (folder / W.METHOD_FILE).write_text(json.dumps(info))


@pytest.fixture(scope="module")
def sla_folder(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("sla"), SLA)


def test_sla_projections_under_a_vsa_method_record_are_refused(sla_folder, tmp_path):
    # before: the record said VSA, so the LoRA loaded under VSA and the SLA projections it was trained with were skipped
    folder = tmp_path / "w"
    shutil.copytree(sla_folder, folder)
    _edit_info(folder, lambda info: info.update(method=VSA.to_dict()))
    model = T.build_tiny_transformer("wan", seed=3)
    before = snapshot(model)
    with pytest.raises(BadFileError, match=rf"{W.METHOD_FILE}: names SLA projections \({W.SLA_FILE}\) but records "
                                           r"the method 'vsa'.*its method and its tensors disagree"):
        dit_accel.apply(model, W.load_method(folder), backend="torch", weights=folder)
    assert_unchanged(model, before)


def test_vsa_gates_under_an_sla_method_record_are_refused(sla_folder, tmp_path):
    # before: the SLA run loaded, and the gates the folder names were skipped
    folder = tmp_path / "w"
    shutil.copytree(sla_folder, folder)
    save_file({"blocks.0.to_gate_compress.weight": torch.zeros(24, 24)}, str(folder / W.VSA_FILE))
    _edit_info(folder, lambda info: info["files"].update(vsa_gates=W.VSA_FILE))
    model = T.build_tiny_transformer("wan", seed=3)
    before = snapshot(model)
    with pytest.raises(BadFileError, match=rf"names VSA gates \({W.VSA_FILE}\) but records the method 'sla'"):
        dit_accel.apply(model, W.load_method(folder), backend="torch", weights=folder)
    assert_unchanged(model, before)


def test_remove_after_loading_a_weights_folder_twice_leaves_the_model_as_before(sla_folder):
    # before: peft froze the model's parameters when the LoRA loaded, and remove() left every one requires_grad=False
    model = T.build_tiny_transformer("wan", seed=3)
    kwargs = T.tiny_transformer_inputs("wan", model, grid=GRID)
    before = snapshot(model)
    with torch.no_grad():
        dense = model(**kwargs)[0]
    handle = dit_accel.apply(model, W.load_method(sla_folder), backend="torch", weights=sla_folder)
    with torch.no_grad():
        once = model(**kwargs)[0]
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    handle.load_weights(sla_folder)  # again: replaces, never stacks
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs)[0], once, rtol=0, atol=0)
    handle.remove()
    assert_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs)[0], dense, rtol=0, atol=0)
