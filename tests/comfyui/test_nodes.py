"""The nodes as a ComfyUI workflow calls them: widget values in, a patched MODEL out."""

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.plans.sparse_plan import Phase, SparsePlan
from tests.comfyui.models import COMMON_WIDGETS as COMMON, CASES, override_of, run_node, sample


def test_the_tile_nodes_widgets_run_the_config_they_spell(comfy, wan):
    case = CASES["wan21-t2v"]
    patched = run_node("DitAccelTile", wan, preset="custom", tile="1,2,2", window="3,1,1", block_size="",
                    **dict(COMMON, dense_steps=1, dense_layers="1"))
    patch = override_of(patched).patch
    assert patch.schedule.method == dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))
    assert patch.schedule.dense_steps == 1 and patch.schedule.dense_layers == {0}  # "1": the first layer
    patched = run_node("DitAccelTile", wan, tile="1,2,2", window="3,1,1", block_size="", **COMMON)
    expected = sample(comfy, patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))), case)
    assert torch.equal(sample(comfy, patched, case), expected)


def test_a_preset_runs_the_published_setting(wan):
    presets = NODE_CLASS_MAPPINGS["DitAccelRadial"].INPUT_TYPES()["required"]["preset"][0]
    label = next(p for p in presets if p.startswith("Wan 2.1:"))
    patch = override_of(run_node("DitAccelRadial", wan, preset=label, decay=1.0, block_size="128", sink_frames="0",
                                 spatial="band", rule="union", **COMMON)).patch
    assert patch.schedule.method == dit_accel.Radial(decay=0.2, block_size=128, sink_frames=(0,), rule="reference")
    assert patch.schedule.dense_steps == 12 and patch.schedule.dense_layers == {0}


def test_a_bad_widget_is_one_line_naming_it(wan):
    with pytest.raises(ValueError, match=r"^dit_accel: widget tile='a,b' is invalid") as err:
        run_node("DitAccelTile", wan, tile="a,b", window="3,1,1", block_size="", **COMMON)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="widget dense_layers='x' is invalid"):
        run_node("DitAccelTile", wan, tile="1,2,2", window="3,1,1", block_size="", **dict(COMMON, dense_layers="x"))
    with pytest.raises(ValueError, match="SLA.topk=0.0 is invalid|topk"):
        run_node("DitAccelSLA", wan, topk=0.0, negligible=0.0, block_q="64", block_k="64", feature_map="softmax",
              linear_tokens="marginal", rounding="ceil", linear_eps=1e-6, **COMMON)


def test_the_plan_node_runs_a_calibrated_plan(comfy, wan, tmp_path):
    case = CASES["wan21-t2v"]
    tile = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))
    plan = SparsePlan([Phase(0, 1), Phase(1, None, default=tile)], num_layers=2,
                      provenance={"model_class": "WanTransformer3DModel", "steps": 2})
    path = plan.save(tmp_path / "plan.json")
    patched = run_node("DitAccelPlan", wan, plan_path=str(path), allow_other_grid=False, backend="auto")
    assert torch.equal(sample(comfy, patched, case), sample(comfy, patch_model(wan, plan), case))
    with pytest.raises(ValueError, match="plan_path is empty"):
        run_node("DitAccelPlan", wan, plan_path=" ", allow_other_grid=False, backend="auto")
    with pytest.raises((ValueError, FileNotFoundError), match="missing.json"):
        run_node("DitAccelPlan", wan, plan_path=str(tmp_path / "missing.json"), allow_other_grid=False, backend="auto")


@pytest.mark.parametrize("node, widgets, hint", [
    ("DitAccelVSA", dict(topk="abc"), "(e.g. 8, or blank for the default)"),
    ("DitAccelTile", dict(block_size="abc"), "(e.g. 8, or blank for the default)"),
    ("DitAccelVSA", dict(sparsity="most"), "(e.g. 0.5, or blank for the default)"),
    ("DitAccelGNA", dict(tile="a,b"), "(e.g. 4,4,4, or blank for the default)"),
    ("DitAccelTile", dict(tile="a,b"), "(e.g. 6,8,8)"),
    ("DitAccelRadial", dict(sink_frames="first"), "(e.g. 0; a comma-separated list of integers, or none)"),
], ids=["int-none", "int-none-tile", "float-none", "shape-none", "shape", "int-list"])
def test_an_invalid_widget_text_gets_an_example_of_its_kind(node, widgets, hint):
    """The hint shows the widget's own kind: an integer for an int, a shape only for a shape widget, and that
    blank means the default where the default is None (refused before the model is touched: model=None)."""
    with pytest.raises(ValueError) as err:
        run_node(node, None, **widgets, **COMMON)
    name, value = next(iter(widgets.items()))
    assert str(err.value).startswith(f"dit_accel: widget {name}={value!r} is invalid: ")
    assert str(err.value).endswith(hint), str(err.value)


@pytest.mark.parametrize("quoted", ['"{}"', "  '{}' ", ' "{}"\n'], ids=["copy-as-path", "single-spaced", "newline"])
def test_path_widgets_drop_one_pair_of_surrounding_quotes(comfy, wan, tmp_path, quoted):
    """Windows' "Copy as path" gives "C:\\x\\plan.json" with its quotes: the plan, tile-strategy and fine-tuned
    path widgets read the path inside them."""
    case = CASES["wan21-t2v"]
    tile = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))
    plan = SparsePlan([Phase(0, None, default=tile)], num_layers=2,
                      provenance={"model_class": "WanTransformer3DModel", "steps": 2})
    path = plan.save(tmp_path / "plan.json")
    patched = run_node("DitAccelPlan", wan, plan_path=quoted.format(path), allow_other_grid=False, backend="auto")
    assert torch.equal(sample(comfy, patched, case), sample(comfy, patch_model(wan, plan), case))

    strategy = tmp_path / "strategy.json"
    strategy.write_text('{"0_0_0": [3, 1, 1], "0_0_1": [3, 1, 1]}')
    patched = run_node("DitAccelTileStrategy", wan, path=quoted.format(strategy), tile="1,2,2", **COMMON)
    assert override_of(patched).patch.schedule.method.path == str(strategy)

    with pytest.raises(ValueError) as err:  # the folder named without its quotes
        run_node("DitAccelFinetuned", wan, weights_path=quoted.format(tmp_path / "gone"))
    assert f"widget weights_path={str(tmp_path / 'gone')!r} is not a folder" in str(err.value)


def test_tooltips_name_the_nodes_widgets_not_the_command_lines_flags():
    """A node has no flags: VSA's topk tooltip said "or --vsa-sparsity" where the widget beside it is sparsity."""
    import dataclasses
    import re

    from dit_accel.methods import registered_methods

    flags = {f.metadata["cli"].flag or "--" + f.name.replace("_", "-") for entry in registered_methods().values()
             for f in dataclasses.fields(entry.cls) if "cli" in f.metadata}
    assert "--vsa-sparsity" in flags
    for name, node in NODE_CLASS_MAPPINGS.items():
        for widget, spec in node.INPUT_TYPES()["required"].items():
            tip = spec[1].get("tooltip", "") if len(spec) > 1 and isinstance(spec[1], dict) else ""
            assert not flags & set(re.findall(r"--[a-z][a-z0-9-]*", tip)), (name, widget, tip)
    vsa = NODE_CLASS_MAPPINGS["DitAccelVSA"].INPUT_TYPES()["required"]
    assert vsa["topk"][1]["tooltip"].endswith("; or sparsity")
    assert "when topk is not given" in vsa["sparsity"][1]["tooltip"]
