"""Trust round 18, checkpoints and file I/O: a deeply nested JSON file is the one-line error naming it (a raw
RecursionError before); ``dit-accel convert`` reads LoRA under peft's adapter names and kohya's lora_down/lora_up
in Diffusers' module names into folders that load (they loaded as no LoRA, or failed at load), refuses an alpha
that is not positive (a negative one hung, 0 became a LoRA of zeros) and an --out it cannot write in one line; a
weights folder whose LoRA keys carry an adapter name is refused (it loaded as no LoRA); a damaged VSA gates file
or shard index is the one-line error naming it."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dit_accel
from dit_accel.atomic_files import BadFileError, read_json
from dit_accel.checkpoints import finetuned as W
from dit_accel.checkpoints.convert import convert_checkpoint
from dit_accel.checkpoints.vsa_gates import GATES_FILE, gate_keys, read_gates
from dit_accel.cli.main import main
from dit_accel.models.tiny import build_tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

D = 12  # tiny Wan: 2 layers, 2 heads of 12, model dim 24
PROJ = "blocks.{i}.self_attn.attn_op.local_attn.proj_l.{part}"
g = torch.Generator().manual_seed(18)
A, B = torch.randn(4, 2 * D, generator=g) * 0.2, torch.randn(2 * D, 4, generator=g) * 0.2  # rank 4 on to_q (24->24)


def _projections(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {PROJ.format(i=i, part=part): torch.randn(*((D, D) if part == "weight" else (D,)), generator=gen) * 0.1
            for i in range(2) for part in ("weight", "bias")}


def _one_line_refusal(capsys, argv, match, code=2):
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


# ----------------------------------------------------------------------------- JSON nested too deeply
def test_deeply_nested_json_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BadFileError, match=r"deep.json: nests its arrays or objects too deeply to be read"):
        read_json(path, kind=None)
    folder = tmp_path / "w"  # a weights folder whose method file is such a file
    folder.mkdir()
    (folder / W.METHOD_FILE).write_text('{"method": ' + "[" * 100000)
    with pytest.raises(BadFileError, match=f"{W.METHOD_FILE}: nests its arrays or objects too deeply"):
        W.load_method(folder)


# ----------------------------------------------------------------------------- convert: LoRA names and alphas
def test_lora_under_a_peft_adapter_name_converts_to_a_folder_that_loads_it(tmp_path):
    # a peft model's state_dict() names the adapter: ...to_q.lora_A.default.weight. Before, the folder kept the name
    # and apply() loaded the LoRA as its initial values (lora_B zeros) with a log line about unexpected keys
    state = {**_projections(), "blocks.0.attn1.to_q.lora_A.default.weight": A,
             "blocks.0.attn1.to_q.lora_B.default.weight": B}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    out = convert_checkpoint(path, tmp_path / "w")
    lora = load_file(str(out / W.LORA_FILE))
    assert sorted(lora) == [f"transformer.blocks.0.attn1.to_q.lora_{side}.weight" for side in "AB"]
    model = build_tiny_transformer("wan")
    with dit_accel.apply(model, W.load_method(out), backend="torch", weights=out):
        layer = model.blocks[0].attn1.to_q
        assert torch.equal(layer.lora_A["dit_accel"].weight, A) and torch.equal(layer.lora_B["dit_accel"].weight, B)


def test_lora_of_two_peft_adapters_is_refused(tmp_path):
    state = {**_projections(), "blocks.0.attn1.to_q.lora_A.default.weight": A,
             "blocks.0.attn1.to_q.lora_B.default.weight": B, "blocks.0.attn1.to_q.lora_A.other.weight": A,
             "blocks.0.attn1.to_q.lora_B.other.weight": B}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"holds the LoRA of 2 peft adapters \(default, other\): convert takes one"):
        convert_checkpoint(path, tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (8.0, 2.0)], ids=["no-alpha", "alpha-8-rank-4"])
def test_lora_down_up_in_diffusers_names_converts_as_lora_a_b(tmp_path, alpha, scale):
    # kohya's names on Diffusers' modules: before, the folder kept lora_down/lora_up and failed to load ("peft could
    # not load this LoRA ... IndexError"); with an alpha, convert said it was "no LoRA scale of a module"
    state = {**_projections(), "blocks.0.attn1.to_q.lora_down.weight": A, "blocks.0.attn1.to_q.lora_up.weight": B}
    if alpha is not None:
        state["blocks.0.attn1.to_q.alpha"] = torch.tensor(alpha)
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    out = convert_checkpoint(path, tmp_path / "w")
    lora = load_file(str(out / W.LORA_FILE))
    assert torch.equal(lora["transformer.blocks.0.attn1.to_q.lora_B.weight"], B)
    torch.testing.assert_close(lora["transformer.blocks.0.attn1.to_q.lora_A.weight"], A * scale)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key, alpha", [
    ("blocks.0.self_attn.q.alpha", -8.0),  # original names: Diffusers' conversion looped for ever
    ("blocks.0.self_attn.q.alpha", 0.0),  # Diffusers: a LoRA of zeros; kohya: scale 1
    ("blocks.0.attn1.to_q.alpha", 0.0),  # Diffusers' names: folded into lora_A as zeros
], ids=["negative-original-names", "zero-original-names", "zero-diffusers-names"])
def test_an_alpha_that_is_not_positive_is_refused(tmp_path, capsys, key, alpha):
    module = key[:-len(".alpha")]
    state = {**_projections(), f"{module}.lora_A.weight": A, f"{module}.lora_B.weight": B, key: torch.tensor(alpha)}
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    err = _one_line_refusal(capsys, ["convert", str(path), "--out", str(tmp_path / "w")],
                            f"{path}: {key} is {alpha}, no positive LoRA alpha")
    assert "an alpha of 0 means scale 1 to kohya-style trainers" in err
    assert not (tmp_path / "w").exists()


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    # (this suite runs as root, where permissions do not bind: a folder that refuses its files, as a read-only mount)
    path = tmp_path / "ck.pth"
    torch.save(_projections(), path)
    locked = tmp_path / "locked"
    real = os.mkdir

    def mkdir(name, *args, **kwargs):
        if str(name).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    _one_line_refusal(capsys, ["convert", str(path), "--out", str(locked / "w")],
                      f"dit-accel convert: cannot write --out {locked / 'w'} (Permission denied: {locked}", code=1)
    assert not locked.exists()


# ----------------------------------------------------------------------------- a weights folder's LoRA keys
def test_a_weights_folder_whose_lora_keys_carry_an_adapter_name_is_refused(tmp_path):
    # before: loaded as the adapter's initial values (lora_B zeros), silently but for a log line
    out = convert_checkpoint(_saved(tmp_path, {**_projections(), "blocks.0.attn1.to_q.lora_A.weight": A,
                                               "blocks.0.attn1.to_q.lora_B.weight": B}), tmp_path / "w")
    lora = load_file(str(out / W.LORA_FILE))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in lora.items()}, str(out / W.LORA_FILE))
    info = json.loads((out / W.METHOD_FILE).read_text())
    info.pop("sha256")
    (out / W.METHOD_FILE).write_text(json.dumps(info))
    model = build_tiny_transformer("wan")
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors: holds blocks.0.attn1.to_q."
                                         r"lora_A.default.weight, a LoRA tensor under peft's adapter name "
                                         r"'default'"):
        dit_accel.apply(model, W.load_method(out), backend="torch", weights=out)
    assert not hasattr(model.blocks[0].attn1.to_q, "lora_A")


def _saved(tmp_path, state):
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- VSA gates files
def _gated_folder(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"proj_out.weight": torch.zeros(2, 2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    gates = {"blocks.0.to_gate_compress.weight": torch.randn(4, 4), "blocks.0.to_gate_compress.bias": torch.randn(4)}
    save_file(gates, str(folder / GATES_FILE), metadata={"format": "pt", "dit_accel_saved_with": json.dumps({})})
    return folder


@pytest.mark.parametrize("cut", [8, None], ids=["truncated", "empty"])
def test_a_damaged_gates_file_is_one_line_naming_it(tmp_path, cut):
    folder = _gated_folder(tmp_path)
    data = (folder / GATES_FILE).read_bytes()
    (folder / GATES_FILE).write_bytes(data[:-cut] if cut else b"")
    with pytest.raises(BadFileError, match=f"{GATES_FILE}: is (not a readable safetensors file|empty)"):
        read_gates(folder)


def test_a_gates_file_with_deeply_nested_metadata_is_one_line(tmp_path):
    folder = _gated_folder(tmp_path)
    gates = load_file(str(folder / GATES_FILE))
    save_file(gates, str(folder / GATES_FILE), metadata={"format": "pt", "dit_accel_saved_with": "[" * 100000})
    with pytest.raises(BadFileError, match="dit_accel_saved_with metadata is not a JSON table of files"):
        read_gates(folder)


def test_a_shard_index_is_read_as_the_project_reads_json(tmp_path):
    folder = _gated_folder(tmp_path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("[" * 100000)  # before: a raw RecursionError
    with pytest.raises(BadFileError, match=f"{index.name}: nests its arrays or objects too deeply"):
        gate_keys(folder)
    # a byte-order mark (Notepad): before, "is not a safetensors index"
    save_file({"blocks.1.to_gate_compress.weight": torch.zeros(4, 4)}, str(folder / "shard.safetensors"))
    index.write_bytes(b"\xef\xbb\xbf" + json.dumps({"weight_map": {"x": "shard.safetensors"}}).encode())
    assert sorted(gate_keys(folder)) == ["blocks.0.to_gate_compress.bias", "blocks.0.to_gate_compress.weight",
                                         "blocks.1.to_gate_compress.weight"]


# ----------------------------------------------------------------------------- readers and a failed write
def test_a_json_number_past_pythons_digit_limit_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"topk": ' + "1" * 5000 + "}")  # before: a ValueError about int_max_str_digits, no file named
    with pytest.raises(BadFileError, match=r"big.json: is not valid JSON \(Exceeds the limit"):
        read_json(path)


def test_a_folder_where_a_safetensors_file_should_be_is_called_a_folder(tmp_path):
    from dit_accel.atomic_files import load_safetensors

    with pytest.raises(BadFileError, match=r": is a folder, not a file; expected"):  # (before: "does not exist")
        load_safetensors(tmp_path)


def test_a_failed_write_takes_back_every_folder_it_made(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(_saved(tmp_path, _projections()), tmp_path / "new" / "deeper" / "w")
    assert not (tmp_path / "new").exists()  # before: new/deeper/ stayed, empty


def test_a_failed_atomic_write_takes_back_the_folders_it_made(tmp_path):
    from dit_accel.atomic_files import atomic_write

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "a" / "b" / "plan.json", fail)
    assert os.listdir(tmp_path) == []  # before: a/b/ stayed, empty


def test_lora_weight_differences_are_refused_not_skipped_as_model_weights(tmp_path):
    # musubi/ComfyUI-style .diff_b (a trained bias delta): before, taken for the model's own weights and dropped
    # without a word under base_weights="skip" (--skip-base-weights)
    state = {**_projections(), "blocks.0.self_attn.q.weight": torch.zeros(2 * D, 2 * D),
             "blocks.0.self_attn.q.diff_b": torch.ones(2 * D), "blocks.0.norm3.diff": torch.ones(2 * D)}
    with pytest.raises(ValueError, match=r"2 tensors are trained weight differences \(.diff / .diff_b, e.g. "
                                         r"\['blocks.0.self_attn.q.diff_b', 'blocks.0.norm3.diff'\]\)"):
        convert_checkpoint(_saved(tmp_path, state), tmp_path / "w", base_weights="skip")
    assert not (tmp_path / "w").exists()


def test_a_weights_folder_with_a_lora_alpha_says_so(tmp_path):
    # before: "holds LoRA for 1 module this WanTransformer3DModel lacks (blocks.0.attn1.to_q.alpha): trained on
    # another model?"
    out = convert_checkpoint(_saved(tmp_path, {**_projections(), "blocks.0.attn1.to_q.lora_A.weight": A,
                                               "blocks.0.attn1.to_q.lora_B.weight": B}), tmp_path / "w")
    lora = load_file(str(out / W.LORA_FILE))
    save_file({**lora, "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(8.0)}, str(out / W.LORA_FILE))
    info = json.loads((out / W.METHOD_FILE).read_text())
    info.pop("sha256")
    (out / W.METHOD_FILE).write_text(json.dumps(info))
    model = build_tiny_transformer("wan")
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors: holds blocks.0.attn1.to_q.alpha, a "
                                         r"kohya-style LoRA alpha, which Diffusers' loader does not apply"):
        dit_accel.apply(model, W.load_method(out), backend="torch", weights=out)
