"""ComfyUI, trust round 22 of the nodes' inputs, and leftovers of the plans API.

- A plan records the Diffusers config it was calibrated on (``provenance.model_config``); ``dit_accel.apply`` warns
  when the transformer's differs (Wan 2.1 I2V's plan on T2V: same class, layers and heads). The ComfyUI node did not
  compare: it now compares the entries that map one to one to ComfyUI's unet_config (the Wan families), and warns
  the same way; a family whose mapping is not known (FLUX) compares nothing.
- ComfyUI converts a typed widget value to its type, not a value linked from another node's output (an any-type
  switch, a math node): an INT of 2.7 ran as 2 and None or text failed in int(); a number in dense_layers failed
  with "'int' object has no attribute 'strip'"; None in a path widget was looked for as the file "None"; a text
  "false" in allow_other_grid turned it on.
- SparsePlan.check_call and the for_layer_step of SparsePlan and TileStrategy took text and floats (int() errors,
  a grid of 3.5 frames as 3, layer "0" as an unnamed layer).
"""

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.plans.model_config import model_config
from tests.comfyui.models import CASES, build, override_of

TILE = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))


def _diffusers_wan(**changes):
    """The Diffusers twin of the tiny ComfyUI Wan of tests/comfyui/models.py (WAN): 2 layers of 2 heads of 32."""
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                  eps=1e-6)
    return WanTransformer3DModel(**{**config, **changes})


def _plan_of(transformer, model_class="WanTransformer3DModel"):
    return dit_accel.SparsePlan([dit_accel.Phase(0, None, default=TILE)], num_layers=2,
                                provenance={"model_class": model_class, "model_id": "calib-model",
                                            "model_config": model_config(transformer)})


def _config_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "calibrated on another model" in r.getMessage()]


def test_a_plan_of_another_wan_config_warns_on_the_comfyui_model(comfy, wan, caplog):
    """Wan 2.1 I2V's plan (in_channels 36, image_dim 1280) on the T2V MODEL (in_dim 16): the node said nothing."""
    i2v = _plan_of(_diffusers_wan(in_channels=36, image_dim=1280, added_kv_proj_dim=64))
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(wan, i2v)
    said = _config_warnings(caplog)
    assert said == ["dit_accel: the plan was calibrated on another model (calib-model) of this class, layers and "
                    "heads: its transformer's config differs (in_channels=36 in the plan, 16 here). The plan runs, but "
                    "its quality was measured on that model: calibrate a plan for this one (dit-accel calibrate)"], said


def test_a_plan_of_the_same_wan_config_is_quiet_and_so_is_the_other_way(comfy, wan, caplog):
    """The T2V plan on the T2V MODEL: no warning (patch_size, eps, ... compare equal across hosts); the T2V plan
    on the I2V MODEL (ComfyUI's in_dim 36), through the plan node, warns."""
    t2v = _plan_of(_diffusers_wan())
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(wan, t2v)
    assert _config_warnings(caplog) == []
    i2v_model = build(comfy, CASES["wan21-i2v"])
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(i2v_model, t2v)
    assert [m for m in _config_warnings(caplog) if "(in_channels=16 in the plan, 36 here)" in m], caplog.text


def test_a_plan_node_file_warns_too(comfy, wan, tmp_path, caplog):
    path = _plan_of(_diffusers_wan(in_channels=36)).save(tmp_path / "plan.json")
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        NODE_CLASS_MAPPINGS["DitAccelPlan"]().patch(wan, str(path))
    assert [m for m in _config_warnings(caplog) if "in_channels=36 in the plan, 16 here" in m], caplog.text


def test_a_family_without_a_known_mapping_compares_nothing(models, caplog):
    """FLUX's Diffusers in_channels counts 2x2-packed channels (64), ComfyUI's the latent's (16): not compared."""
    flux = models("flux")
    config = {"in_channels": 1, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}
    plan = dit_accel.SparsePlan([dit_accel.Phase(0, None, default=dit_accel.Tile(tile=(2, 2), window=(1, 1)))],
                                num_layers=2, provenance={"model_class": "FluxTransformer2DModel",
                                                          "model_config": config})
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patch_model(flux, plan)
    assert _config_warnings(caplog) == []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ inputs linked from another node's output
def _tile_node(wan, **widgets):
    values = dict(tile="1,2,2", window="1,1,1", block_size="", fit=False, dense_steps=0, dense_last_steps=0,
                  dense_above_sigma=0.0, dense_layers="", backend="auto")
    return NODE_CLASS_MAPPINGS["DitAccelTile"]().patch(wan, **{**values, **widgets})[0]


@pytest.mark.parametrize("value", [2.7, "abc", None], ids=["float", "text", "none"])
@pytest.mark.parametrize("widget", ["dense_steps", "dense_last_steps"])
def test_an_int_widget_linked_to_a_non_int_is_refused_naming_it(comfy, wan, widget, value):
    with pytest.raises(ValueError) as err:
        _tile_node(wan, **{widget: value})
    assert str(err.value) == (f"dit_accel: widget {widget}={value!r} is invalid: a whole number of steps >= 0 "
                              "(0: none)")
    assert override_of(_tile_node(wan, **{widget: 2.0})).patch.schedule is not None  # (a whole float is that int)


def test_dense_layers_linked_to_a_number_runs_it(comfy, wan):
    assert override_of(_tile_node(wan, dense_layers=1)).patch.schedule.dense_layers == {0}
    with pytest.raises(ValueError, match=r"^dit_accel: widget dense_layers=1\.5 is invalid: N \(the first N layers\)"):
        _tile_node(wan, dense_layers=1.5)


@pytest.mark.parametrize("node, widget", [("DitAccelPlan", "plan_path"), ("DitAccelFinetuned", "weights_path")])
def test_a_path_widget_linked_to_none_is_refused_naming_it(comfy, wan, node, widget):
    with pytest.raises(ValueError) as err:
        NODE_CLASS_MAPPINGS[node]().patch(wan, None)
    assert str(err.value) == (f"dit_accel: widget {widget}=None is invalid: a path (text); the node linked to it "
                              "gives NoneType")


def test_allow_other_grid_linked_to_text_is_refused_not_turned_on(comfy, wan, tmp_path):
    """bool("false") is True: the plan ran on any grid."""
    path = _plan_of(_diffusers_wan()).save(tmp_path / "plan.json")
    with pytest.raises(TypeError, match=r"^allow_other_grid='false' is invalid: expected True or False"):
        NODE_CLASS_MAPPINGS["DitAccelPlan"]().patch(wan, str(path), allow_other_grid="false")


# ------------------------------------------------------------------ leftovers of the plans API (no ComfyUI needed)
def _sparse_plan():
    return dit_accel.SparsePlan([dit_accel.Phase(0, None, default=TILE)], num_layers=2,
                                provenance={"grids": [[3, 4, 4]], "steps": 4})


@pytest.mark.parametrize("grid, total, exc, named", [
    ("abc", 4, TypeError, "grid='abc'"),  # (was: invalid literal for int() with base 10: 'a')
    ((3, "x", 4), 4, TypeError, "grid=(3, 'x', 4)"),
    ((3.5, 4, 4), 4, TypeError, "grid=(3.5, 4, 4)"),  # (was: taken as (3, 4, 4), no word)
    ((0, 4, 4), 4, ValueError, "grid=(0, 4, 4)"),
    ((3, 4, 4), "4", TypeError, "total_steps='4'"),  # (was: "calibrated for 4 steps; this run has 4")
    ((3, 4, 4), True, TypeError, "total_steps=True"),
], ids=["grid-text", "grid-text-entry", "grid-float", "grid-zero", "steps-text", "steps-bool"])
def test_check_call_names_a_bad_argument(grid, total, exc, named):
    with pytest.raises(exc) as err:
        _sparse_plan().check_call(grid, total)
    assert str(err.value).startswith(f"SparsePlan.check_call({named}) is invalid: "), str(err.value)
    assert _sparse_plan().check_call((3, 4, 4), 4) is None  # (the right call still passes, and a traced one's sizes)
    assert _sparse_plan().check_call((torch.tensor(3), 4, 4), torch.tensor(4)) is None


def test_check_call_names_a_bad_step_and_host():
    with pytest.raises(ValueError, match=r"^SparsePlan.check_call\(step=-1\) is invalid: an int >= 0"):
        _sparse_plan().check_call((3, 4, 4), None, step=-1)
    with pytest.raises(ValueError, match=r"^SparsePlan.check_call\(host='comfy'\) is invalid: choose one of "):
        _sparse_plan().check_call((3, 4, 4), 4, host="comfy")  # (was: KeyError: 'comfy')


@pytest.mark.parametrize("layer, step, exc, named", [
    ("0", "x", TypeError, "layer='0'"), (0, "x", TypeError, "step='x'"), (0, 1.5, TypeError, "step=1.5"),
    (-1, 0, ValueError, "layer=-1"), (0, -1, ValueError, "step=-1"),
], ids=["layer-text", "step-text", "step-float", "layer-negative", "step-negative"])
def test_for_layer_step_names_a_bad_argument(tmp_path, layer, step, exc, named):
    """SparsePlan: "0" ran the default (no layer is named "0"), "x" raised a bare comparison error, -1 and 1.5 were
    taken; TileStrategy: int() errors, and 1.5 looked up step 1."""
    path = tmp_path / "strategy.json"
    path.write_text('{"0_0_0": [1, 1, 1], "0_0_1": [1, 1, 1], "1_0_0": [3, 3, 3], "1_0_1": [3, 3, 3]}')
    strategy = dit_accel.TileStrategy(path=str(path), tile=(1, 2, 2))
    for owner, query in (("SparsePlan", _sparse_plan()), ("TileStrategy", strategy)):
        with pytest.raises(exc) as err:
            query.for_layer_step(layer, step)
        assert str(err.value).startswith(f"{owner}.for_layer_step({named}) is invalid: an int >= 0, "), str(err.value)
    assert strategy.for_layer_step(0, 1).window == ((3, 3, 3), (3, 3, 3))  # (a right query still answers)
