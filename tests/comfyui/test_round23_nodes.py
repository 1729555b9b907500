"""Round 23 (trust): the nodes and the install command as a ComfyUI user drives them, at their bad inputs: a None
linked into a method widget, a preset linked as a list, a custom_nodes/dit_accel that is a link or whose __init__.py
is a folder, and a ComfyUI whose own Python lacks dit_accel."""

import importlib.util
import sys

import pytest

from dit_accel.comfyui import NODE_CLASS_MAPPINGS
from dit_accel.comfyui.install import SHIM, main
from tests.comfyui.models import COMMON_WIDGETS as COMMON, run_node


def _comfyui(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    return root


@pytest.mark.parametrize("node, widgets, name", [
    ("DitAccelTile", dict(tile=None, window="3,1,1", block_size=""), "tile"),
    ("DitAccelGNA", dict(kernel_size=None, stride="1", dilation="1", is_causal=False, tile="", fit=False),
     "kernel_size"),
    ("DitAccelSLA", dict(topk=None, negligible=0.0, block_q="64", block_k="64", feature_map="softmax",
                         linear_tokens="marginal", rounding="ceil", linear_eps=1e-6), "topk"),
], ids=["tile", "gna-kernel", "sla-topk"])
def test_a_none_linked_into_a_widget_with_a_default_is_refused_naming_it(node, widgets, name):
    """An any-type node's None in a widget that has a default (not blank): it ran the default without a word."""
    with pytest.raises(ValueError) as err:
        run_node(node, None, **widgets, **COMMON)
    text = str(err.value)
    assert text.startswith(f"dit_accel: widget {name}=None is invalid: ") and "link a value, or type one" in text
    assert "\n" not in text


def test_a_preset_linked_as_a_list_is_refused_naming_the_choices():
    presets = NODE_CLASS_MAPPINGS["DitAccelTile"].INPUT_TYPES()["required"]["preset"][0]
    with pytest.raises(ValueError, match=r"^dit_accel: preset \['x'\] is not one of this node's: .*or custom$"):
        run_node("DitAccelTile", None, preset=["x"], tile="1,2,2", window="3,1,1", block_size="", **COMMON)
    assert len(presets) > 1


def test_install_refuses_a_link_in_custom_nodes_saying_what_it_is(tmp_path, capsys):
    """A dangling custom_nodes/dit_accel link was said as "File exists: run the command as a user who may write"."""
    root = _comfyui(tmp_path)
    link = root / "custom_nodes" / "dit_accel"
    link.symlink_to(tmp_path / "gone")
    assert main(["install", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{link} is a link to {tmp_path / 'gone'}, which does not exist: remove the link" in err
    assert "may write" not in err and link.is_symlink() and not (tmp_path / "gone").exists()


def test_install_refuses_an_init_that_is_a_folder(tmp_path, capsys):
    root = _comfyui(tmp_path)
    (root / "custom_nodes" / "dit_accel" / "__init__.py").mkdir(parents=True)
    assert main(["install", str(root)]) == 2
    err = capsys.readouterr().err
    assert "__init__.py exists and is not a file this command wrote: move the folder" in err
    assert "Errno" not in err and (root / "custom_nodes" / "dit_accel" / "__init__.py").is_dir()


def test_install_says_where_comfyuis_own_python_needs_dit_accel(tmp_path, capsys):
    """The Windows portable runs ComfyUI on python_embeded: dit_accel installed into another Python leaves the nodes
    unloaded, while the command said "restart ComfyUI and the nodes are there"."""
    root = _comfyui(tmp_path)
    python = tmp_path / "python_embeded" / "python.exe"
    python.parent.mkdir()
    python.touch()
    assert main(["install", str(root)]) == 0
    err = capsys.readouterr().err
    assert f"ComfyUI there has its own Python ({python})" in err and f"{python} -m pip install dit-accel" in err


def test_the_shim_says_how_to_install_dit_accel_into_comfyuis_python(tmp_path, monkeypatch):
    """ComfyUI's Python without dit_accel: the shim's import failure says which Python and the command, not a bare
    "No module named 'dit_accel'"."""
    shim = tmp_path / "dit_accel_shim" / "__init__.py"
    shim.parent.mkdir()
    shim.write_text(SHIM)
    assert sys.executable not in SHIM  # (the Python that runs the shim, ComfyUI's: not the installer's, baked in)
    monkeypatch.setitem(sys.modules, "dit_accel.comfyui", None)  # (import dit_accel.comfyui raises, as if absent)
    spec = importlib.util.spec_from_file_location("dit_accel_shim_x", shim)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError) as err:
        spec.loader.exec_module(module)
    assert f"in the Python that runs ComfyUI ({sys.executable})" in str(err.value)
    assert f"{sys.executable} -m pip install dit-accel" in str(err.value)


def test_a_layer_a_strategy_leaves_out_is_not_said_as_a_dense_step(comfy, wan, tmp_path):
    """A strategy (or plan) that runs a layer dense was logged as "dense step" at steps the dense_steps widget
    (0) leaves sparse: the log read as if the widgets had made it dense."""
    from tests.comfyui.models import CASES, override_of, sample

    strategy = tmp_path / "strategy.json"
    strategy.write_text('{"0_0_0": [3, 1, 1], "0_0_1": [3, 1, 1], "1_0_0": [3, 1, 1], "1_0_1": [3, 1, 1]}')
    patched = run_node("DitAccelTileStrategy", wan, path=str(strategy), tile="1,2,2", **COMMON)
    sample(comfy, patched, CASES["wan21-t2v"])
    lines = list(override_of(patched).patch.report.lines)
    assert lines and all("1 layers dense (dense in the plan or strategy here)" in line for line in lines), lines
    patched = run_node("DitAccelTileStrategy", wan, path=str(strategy), tile="1,2,2", **dict(COMMON, dense_steps=1))
    sample(comfy, patched, CASES["wan21-t2v"])
    assert "2 layers dense (dense step)" in override_of(patched).patch.report.lines[0]


@pytest.mark.parametrize("names", [("lora_down", "lora_up"), ("lora_A.default", "lora_B.default")],
                         ids=["kohya", "named-adapter"])
def test_a_lora_of_other_names_says_to_convert_it(wan, tmp_path, names):
    """kohya's lora_down/lora_up (or a peft adapter's named tensors) was said as "ComfyUI's LoRA loader does not
    apply" with "train without it": dit-accel convert renames them."""
    import torch

    import dit_accel
    from tests.comfyui.test_weights import _folder, _lora

    lora = {k.replace("lora_A", names[0]).replace("lora_B", names[1]): v
            for k, v in _lora(torch.Generator().manual_seed(1)).items()}
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=lora)
    with pytest.raises(ValueError) as err:
        run_node("DitAccelFinetuned", wan, weights_path=str(folder))
    text = str(err.value)
    assert f"has transformer.blocks.0.attn1.to_q.{names[0]}.weight: LoRA names of kohya" in text
    assert "convert the LoRA with dit-accel convert" in text


@pytest.mark.parametrize("meta", ["{", "[]", '{"transformer.r": 2, "transformer.lora_alpha": 4.0, '
                                             '"transformer.use_rslora": "yes"}'], ids=["not-json", "list", "rslora-text"])
def test_lora_metadata_that_is_no_config_is_refused_not_read_as_none(wan, tmp_path, meta):
    """Adapter metadata that is no JSON object was read as none: the LoRA trained at alpha 4 / rank 2 ran at scale 1
    without a word (and a use_rslora of "yes" without rsLoRA), where Diffusers' loader fails on the file."""
    import torch
    from safetensors.torch import save_file

    from dit_accel.checkpoints.finetuned import LORA_FILE, write_weights_folder
    from tests.comfyui.test_weights import _lora

    info = {"format": 1, "method": {"method": "dense"}, "files": {"lora": LORA_FILE, "sla_projections": None},
            "lora": {"rank": 2, "alpha": 4.0}}
    lora = _lora(torch.Generator().manual_seed(1))
    folder = write_weights_folder(tmp_path / "ft", lambda staging: save_file(
        lora, str(staging / LORA_FILE), metadata={"lora_adapter_metadata": meta}), info)
    with pytest.raises(ValueError) as err:
        run_node("DitAccelFinetuned", wan, weights_path=str(folder))
    text = str(err.value)
    assert text.startswith(f"{folder / LORA_FILE}: its ") and text.endswith("train or convert it again")
    assert ("lora_adapter_metadata is not a JSON object" in text) != ("use_rslora='yes'" in text)
