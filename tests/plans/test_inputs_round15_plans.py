"""Plans and checkpoints, round 15: each test pins one fault found by handing plans, weights folders and VSA gate
checkpoints hand-edited files or another model (a silent wrong answer, a raw traceback, before the fix).
Expectations are written out by hand, not read back from the code under test."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dit_accel
from dit_accel import Phase, SparsePlan
from dit_accel.atomic_files import BadFileError
from dit_accel.checkpoints import finetuned as W
from dit_accel.checkpoints.vsa_gates import gate_keys, read_gates

pytestmark = pytest.mark.usefixtures("one_thread")

GATE = "blocks.0.to_gate_compress.weight"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


# ------------------------------------------------------------------ VSA gate checkpoints
@pytest.mark.parametrize("weight_map", [["a.safetensors"], None, {GATE: 3}, {GATE: ""}],
                         ids=["list", "null", "number", "empty-name"])
def test_a_shard_index_whose_weight_map_is_no_table_of_files_is_one_line(weight_map, tmp_path):
    """Before: ``AttributeError: 'list' object has no attribute 'values'`` (or a TypeError of ``Path / 3``) when
    VSA looked for the gates of a checkpoint whose index was damaged."""
    save_file({GATE: torch.zeros(4, 4)}, str(tmp_path / "a.safetensors"))
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(BadFileError, match=rf"{INDEX}: its weight_map is .*not an object naming each tensor's shard"):
        gate_keys(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {GATE: "a.safetensors"}}))
    assert gate_keys(tmp_path) == {GATE: tmp_path / "a.safetensors"}


def test_float8_gates_are_checked_for_nan_and_read(tmp_path):
    """Before: a float8 gate (a quantized checkpoint) raised a raw ``NotImplementedError: "isfinite" not implemented
    for 'Float8_e4m3fn'``, NaN or not."""
    weight = torch.tensor([[0.5, -1.0], [2.0, 0.25]]).to(torch.float8_e4m3fn)
    save_file({GATE: weight}, str(tmp_path / "a.safetensors"))
    got = read_gates(tmp_path)[0]["weight"]
    assert got.dtype == torch.float8_e4m3fn and got.float().tolist() == [[0.5, -1.0], [2.0, 0.25]]
    bad = weight.clone()
    bad.view(torch.uint8)[0, 1] = 0x7F  # e4m3fn's NaN
    save_file({GATE: bad}, str(tmp_path / "a.safetensors"))
    with pytest.raises(BadFileError, match=r"a.safetensors: the to_gate_compress weight of block 0 .* has 1 non-fin"):
        read_gates(tmp_path)


# ------------------------------------------------------------------ a LoRA trained on a shallower model
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, rope_max_seq_len=64)  # the tiny "wan" transformer's config


def _wan(layers: int, seed: int = 3):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**_WAN, num_layers=layers).eval()


def test_a_lora_trained_on_a_model_with_fewer_layers_is_refused_and_the_model_is_unchanged(tmp_path):
    """Before: a LoRA folder trained on a 2-layer model loaded into a 3-layer one of the same width with only peft's
    RuntimeWarning; layer 2 ran without its LoRA. (LoRA for layers the model lacks was already refused.)"""
    from peft import LoraConfig

    tile = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))
    trained = _wan(2)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    trained.add_adapter(lora)
    W.save_trained_weights(tmp_path / "w", transformer=trained, method=tile, lora_config=lora)

    deeper = _wan(3)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors: its adapter metadata says the LoRA "
                                         r"adapts target_modules=\['to_q', 'to_v'\], but it holds no LoRA for 4 such "
                                         r"module\(s\) of this WanTransformer3DModel \(blocks.2.attn1.to_q, "
                                         r"blocks.2.attn1.to_v, blocks.2.attn2.to_q, blocks.2.attn2.to_v\): it was "
                                         r"trained on another model"):
        dit_accel.apply(deeper, tile, backend="torch", weights=tmp_path / "w")
    assert not getattr(deeper, "peft_config", None) and deeper.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in deeper.state_dict().items())
    assert all(type(m).__module__.startswith(("torch.", "diffusers.")) for m in deeper.modules())

    same = _wan(2)  # the model it was trained on loads it: 2 layers x (attn1, attn2) x (to_q, to_v) adapted
    with dit_accel.apply(same, tile, backend="torch", weights=tmp_path / "w"):
        assert sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in same.modules()) == 8


# ------------------------------------------------------------------ a plan edited in a weights folder
_PLAN_LORA = Path(dit_accel.__file__).parent / "models" / "plans" / "tiny-shapes-63-lora"


def test_a_plan_edited_in_the_weights_folder_is_refused(tmp_path):
    """Before: ``finetune --plan`` records the plan's content hash (plan_sha256), but a plan changed in the method
    file afterwards loaded (load_method, apply(weights=)) and its LoRA ran under it, without a word."""
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(_PLAN_LORA / W.METHOD_FILE, folder / W.METHOD_FILE)
    assert W.load_method(folder).content_hash() == json.loads((folder / W.METHOD_FILE).read_text())["plan_sha256"]
    info = json.loads((folder / W.METHOD_FILE).read_text())
    layer = info["method"]["plan"]["phases"][1]["layers"]["0"]
    assert layer["window"] == [3, 1, 1]
    layer["window"] = [5, 1, 1]
    (folder / W.METHOD_FILE).write_text(json.dumps(info))
    with pytest.raises(BadFileError, match=rf"{W.METHOD_FILE}: its plan has content sha256 [0-9a-f]{{12}}, but the "
                                           r"weights were trained under the plan of content sha256 964183e8eba1 .*"
                                           "the plan was changed after training"):
        W.load_method(folder)


# ------------------------------------------------------------------ exporting an image plan as a strategy
def test_an_image_plan_with_one_window_exports_two_values_per_window(tmp_path):
    """Before: ``Tile(tile=(4, 4), window=3)`` was written as ``[3, 3, 3]`` (a video window) into the strategy of a
    2-D plan, which SparsePlan.from_tile_strategy(tile=(4, 4)) then refused."""
    plan = SparsePlan([Phase(0, 2, {1: dit_accel.Tile(tile=(4, 4), window=3)})], num_layers=2, num_heads=2)
    out = plan.to_tile_strategy(tmp_path / "s.json")
    assert out == {f"{s}_1_{h}": [3, 3] for s in range(2) for h in range(2)}
    back = SparsePlan.from_tile_strategy(tmp_path / "s.json", tile=(4, 4))
    assert back.for_layer_step(1, 1) == dit_accel.Tile(tile=(4, 4), window=((3, 3), (3, 3)))
    video = SparsePlan([Phase(0, 1, {0: dit_accel.Tile(tile=(1, 4, 4), window=3)})], num_layers=1, num_heads=1)
    assert video.to_tile_strategy() == {"0_0_0": [3, 3, 3]}


# ------------------------------------------------------------------ PerHead given one config or a name
@pytest.mark.parametrize("methods", [dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3)), "dense"], ids=["config", "name"])
def test_per_head_given_one_config_instead_of_one_per_head_says_so(methods):
    """Before: ``PerHead(Tile(...))`` raised a raw ``TypeError: 'Tile' object is not iterable``, and
    ``PerHead("dense")`` complained of ``methods[0]='d'``, one head per letter."""
    from dit_accel.plans.per_head import PerHead

    with pytest.raises(TypeError, match=r"PerHead.methods=.* is invalid: expected a tuple or list of method "
                                        r"configs, one per attention head"):
        PerHead(methods)
    assert PerHead([dit_accel.Dense(), dit_accel.SLA(topk=0.5)]).heads == 2


# ------------------------------------------------------------------ a schedule inside a phase
def test_a_phase_holding_a_schedule_is_refused_when_built(tmp_path):
    """Before: ``Phase(0, None, {0: <a TileStrategy or another plan>})`` built, and the plan ran until its first
    attention call, which failed with "dit_accel.apply resolves it per call" (save failed too)."""
    (tmp_path / "s.json").write_text(json.dumps({f"0_{layer}_{h}": [1, 1, 3] for layer in range(2) for h in range(2)}))
    strategy = dit_accel.Tile.from_strategy(tmp_path / "s.json", tile=(1, 4, 4))
    inner = SparsePlan([Phase(0, None, {0: dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))})]).as_method()
    with pytest.raises(TypeError, match=r"Phase.layers\[0\]=TileStrategy\(...\) is a schedule .*from_tile_strategy"):
        Phase(0, None, {0: strategy})
    with pytest.raises(TypeError, match=r"Phase.default=PlanMethod\(...\) is a schedule"):
        Phase(0, None, default=inner)
    # the strategy's windows, imported, are a plan of Tile configs
    assert SparsePlan.from_tile_strategy(strategy).for_layer_step(1, 0) == dit_accel.Tile(
        tile=(1, 4, 4), window=((1, 1, 3), (1, 1, 3)))


# ------------------------------------------------------------------ LoRA tensors Diffusers' loader would skip
def _rehashed(folder: Path, edit) -> None:
    """``folder``'s LoRA file with ``edit`` applied to its tensors (metadata kept), its sha256 recorded again."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / W.LORA_FILE
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    info = json.loads((folder / W.METHOD_FILE).read_text())
    info["sha256"][W.LORA_FILE] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / W.METHOD_FILE).write_text(json.dumps(info))


def _bare(tensors):
    for key in list(tensors):
        tensors[key[len("transformer."):]] = tensors.pop(key)


@pytest.mark.parametrize("edit, match", [
    (_bare, r"holds 16 LoRA tensor\(s\) without the \"transformer.\" prefix "
            r"\(e.g. blocks.0.attn1.to_q.lora_A.weight\)"),
    (lambda t: t.__setitem__("transformer.blocks.0.attn1.to_q.lora_B.bias", torch.ones(24)),
     r"holds transformer.blocks.0.attn1.to_q.lora_B.bias, but its adapter metadata says lora_bias=False"),
    (lambda t: t.__setitem__("transformer.blocks.0.attn1.to_q.lora_magnitude_vector", torch.ones(24)),
     r"holds transformer.blocks.0.attn1.to_q.lora_magnitude_vector, but its adapter metadata says use_dora=False"),
], ids=["no-prefix", "bias-not-in-config", "dora-not-in-config"])
def test_lora_tensors_that_diffusers_would_skip_are_refused(edit, match, tmp_path):
    """Before: keys without the ``transformer.`` prefix were all skipped by Diffusers' loader (a log line), and the
    model ran without its LoRA while ``handle.lora_adapter`` said ``"dit_accel"``; a lora_B bias or DoRA magnitude
    the adapter metadata makes no place for was dropped the same way."""
    from peft import LoraConfig

    tile = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))
    trained = _wan(2)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    trained.add_adapter(lora)
    W.save_trained_weights(tmp_path / "w", transformer=trained, method=tile, lora_config=lora)
    _rehashed(tmp_path / "w", edit)
    model = _wan(2)
    with pytest.raises(ValueError, match=rf"{W.LORA_FILE}: {match}"):
        dit_accel.apply(model, tile, backend="torch", weights=tmp_path / "w")
    assert not getattr(model, "peft_config", None)


# ------------------------------------------------------------------ a weights folder path that is a file
def test_saving_weights_onto_a_file_names_it_and_leaves_it(tmp_path):
    """Before: ``transformer.save_pretrained("model.safetensors")`` under apply (whose Diffusers save only logs
    "should be a directory") raised a raw ``FileExistsError``; so did write_weights_folder under a file."""
    from dit_accel.models.tiny import build_tiny_transformer

    file = tmp_path / "model.safetensors"
    file.write_text("mine")
    model = build_tiny_transformer("wan", seed=3)
    with dit_accel.apply(model, dit_accel.SLA(topk=0.5), backend="torch"):
        with pytest.raises(ValueError, match=r"save_directory='.*model.safetensors' is a file: save_pretrained writes "
                                             "the model to a folder"):
            model.save_pretrained(file)
    with pytest.raises(ValueError, match=r"'.*model.safetensors.w' lies under '.*model.safetensors', which is a file: "
                                         r"the weights are written to a folder \(e.g. '.*weights'\)"):
        W.write_weights_folder(file / "w", lambda staging: None, {"files": {}})
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
