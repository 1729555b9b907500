"""Round 15 of the nodes: a dit_accel node on the second model of ComfyUI's merge nodes (ModelMergeSimple,
ModelMergeAdd, ModelMergeSubtract, ModelMergeBlocks and its per-architecture forms) was dropped by the merge, unsaid:
the merged model ran dense attention. The merge now says so in ComfyUI's log, with what to do; the merge itself is
unchanged."""

import importlib.util
import logging
import sys
import types

import pytest

import dit_accel
from dit_accel.comfyui import patch_model
from dit_accel.comfyui.merges import watch_merges
from dit_accel.comfyui.patch import patched_by

TILE = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))


@pytest.fixture(scope="module")
def registry(comfy):
    """ComfyUI's node registry as a running ComfyUI holds it: the merge files loaded by file path, as
    ``nodes.init_builtin_extra_nodes`` loads them (their classes are not those of ``import comfy_extras...``)."""
    from tests.comfyui.comfy_env import snapshot, torchvision_stand_in

    mappings = {}
    with torchvision_stand_in():
        for name in ("nodes_model_merging", "nodes_model_merging_model_specific"):
            path = snapshot() / "comfy_extras" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(str(path.with_suffix("")), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            mappings.update(module.NODE_CLASS_MAPPINGS)
    return mappings


@pytest.fixture
def running(registry, monkeypatch):
    """``nodes`` in sys.modules as in a running ComfyUI (the real one where it was imported)."""
    if not isinstance(getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", None), dict):
        monkeypatch.setitem(sys.modules, "nodes", types.SimpleNamespace(NODE_CLASS_MAPPINGS=registry))
    return registry


def _merge(registry, name, model1, model2, **widgets):
    node = registry[name]
    return getattr(node(), node.FUNCTION)(model1=model1, model2=model2, **widgets)[0]


@pytest.mark.parametrize("name,widgets", [("ModelMergeSimple", dict(ratio=0.5)), ("ModelMergeAdd", {}),
                                          ("ModelMergeSubtract", dict(multiplier=1.0)),
                                          ("ModelMergeWAN2_1", dict(**{"time_embedding.": 1.0}))])
def test_the_node_on_the_second_model_alone_is_said_to_be_dropped(running, wan, caplog, name, widgets):
    patched = patch_model(wan, TILE, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        merged = _merge(running, name, wan, patched, **widgets)
    assert patched_by(merged) is None  # (what the message says: the merge kept model1's options alone)
    said = [r.getMessage() for r in caplog.records if r.name == "dit_accel.comfyui"]
    assert len(said) == 1 and f"dit_accel: {name} merges in the weights of a second model" in said[0], said
    assert "Tile" in said[0] and "Put the dit_accel node after the merge node" in said[0]


def test_the_node_on_the_first_model_or_on_both_or_neither_is_not(running, wan, caplog):
    patched = patch_model(wan, TILE, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        for model1, model2 in ((patched, wan), (patched, patch_model(wan, TILE, backend="torch")), (wan, wan)):
            merged = _merge(running, "ModelMergeSimple", model1, model2, ratio=0.5)
            assert (patched_by(merged) is None) == (model1 is wan)
    assert "merges in the weights" not in caplog.text


def test_every_node_with_two_model_inputs_is_watched_once(running):
    count = watch_merges(patched_by)
    assert count == watch_merges(patched_by) >= 8  # Simple, Add, Subtract, Blocks and the per-architecture forms
    merge = running["ModelMergeSimple"].merge
    assert watch_merges(patched_by) and running["ModelMergeSimple"].merge is merge  # not wrapped twice


def test_only_nodes_whose_function_takes_two_models_are_asked_their_inputs_once(registry, monkeypatch):
    """A loader's INPUT_TYPES lists model folders on disk: the watch, run by every dit_accel node, reads a node's
    inputs only when its function takes ``model1`` and ``model2``, and each class once per process."""
    asked = []

    class Loader:
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            asked.append("loader")
            return {"required": {"ckpt_name": (["a.safetensors"],)}}

        def load(self, ckpt_name):
            return (ckpt_name,)

    class Merge:
        FUNCTION = "merge"

        @classmethod
        def INPUT_TYPES(cls):
            asked.append("merge")
            return {"required": {"model1": ("MODEL",), "model2": ("MODEL",)}}

        def merge(self, model1, model2):
            return (model1,)

    monkeypatch.setitem(sys.modules, "nodes", types.SimpleNamespace(
        NODE_CLASS_MAPPINGS={**registry, "TestLoader": Loader, "TestMerge": Merge}))
    watch_merges(patched_by)
    watch_merges(patched_by)
    assert asked == ["merge"] and getattr(Merge.merge, "__dit_accel_watched__", False)
