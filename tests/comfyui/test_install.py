"""The one install step: ``python -m dit_accel.comfyui install /path/to/ComfyUI`` writes a custom_nodes folder
whose ``__init__.py`` only imports the package's nodes. Loaded here the way ComfyUI loads a custom node folder
(``nodes.load_custom_node``: ``spec_from_file_location`` under the folder's path as the module name); ComfyUI's
``nodes`` module itself is not imported (it needs PyAV)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import dit_accel.comfyui
from dit_accel.comfyui.install import main

ROOT = Path(__file__).resolve().parents[2]


def _comfyui(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    return root


def _load_like_comfyui(folder: Path):
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_install_writes_a_shim_that_loads_the_packages_nodes(tmp_path):
    root = _comfyui(tmp_path)
    result = subprocess.run([sys.executable, "-m", "dit_accel.comfyui", "install", str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shim = root / "custom_nodes" / "dit_accel" / "__init__.py"
    assert str(shim) in result.stdout
    module = _load_like_comfyui(shim.parent)
    assert module.NODE_CLASS_MAPPINGS is dit_accel.comfyui.NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS is dit_accel.comfyui.NODE_DISPLAY_NAME_MAPPINGS
    assert main(["install", str(root)]) == 0  # again: its own file is rewritten
    assert sorted(p.name for p in shim.parent.iterdir()) == ["__init__.py"]


def test_install_refuses_a_folder_that_is_not_comfyui_and_a_foreign_node_pack(tmp_path, capsys):
    assert main(["install", str(tmp_path)]) == 2
    assert "is not a ComfyUI folder" in capsys.readouterr().err
    root = _comfyui(tmp_path)
    foreign = root / "custom_nodes" / "dit_accel"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    assert main(["install", str(root)]) == 2
    assert "was not written by this command" in capsys.readouterr().err
    assert (foreign / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n"  # left as it was


@pytest.mark.parametrize("node", sorted(dit_accel.comfyui.NODE_CLASS_MAPPINGS))
def test_every_node_declares_what_comfyui_reads(node):
    cls = dit_accel.comfyui.NODE_CLASS_MAPPINGS[node]
    assert cls.RETURN_TYPES == ("MODEL",) and callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY == "dit_accel"
    assert node in dit_accel.comfyui.NODE_DISPLAY_NAME_MAPPINGS
    inputs = cls.INPUT_TYPES()["required"]
    assert inputs["model"] == ("MODEL",)
    for name, spec in inputs.items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):  # a list widget: its default is one of its values
            assert options["default"] in kind, name
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], name
