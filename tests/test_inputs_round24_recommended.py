"""Round 24 (trust): what users ask dit_accel to choose for them: ``recommended``, ``published_settings`` and
``dit-accel info --model``. Each recommended setting runs on its class's tiny transformer at its default grid; bad
first arguments are named; ``info`` says which setting a printed density is of."""

import dataclasses
import json
import warnings

import pytest
import torch

import dit_accel
from dit_accel._util import DitAccelWarning
from dit_accel.cli import info
from dit_accel.methods import registered_methods
from dit_accel.models.tiny import TRANSFORMERS, build_tiny_transformer, tiny_transformer_inputs
from dit_accel.pipelines.presets import PRESETS, recommended, register_preset, unregister_preset

WAN = "WanTransformer3DModel"


# One class per kind (the round's audit ran all 54 tiny transformers the same way): the published families (Wan,
# HunyuanVideo), a video and an image model with preset defaults only, a 2-D model with frames (Latte: Radial
# refused), text first, last and none.
KINDS = ("wan", "hunyuan", "ltx2", "latte", "flux", "sd3", "hunyuandit", "qwenimage")


@pytest.mark.parametrize("tiny", KINDS)
def test_every_recommended_setting_runs_on_its_tiny_transformer(tiny):
    """recommended(model, method) for every method: refused with a ValueError naming the class or the method, or a
    setting that apply takes and that runs one forward at the model's own default grid, as the config it said."""
    assert set(KINDS) <= set(TRANSFORMERS)
    model = build_tiny_transformer(tiny)
    inputs = tiny_transformer_inputs(tiny, model)
    name = type(model).__name__
    for method in [m for m in registered_methods() if m != "dense"]:
        try:
            config, kwargs = recommended(model, method)
        except ValueError as err:
            assert name in str(err) or method == "tile_strategy", str(err)
            continue
        with warnings.catch_warnings(), dit_accel.apply(model, config, **kwargs) as handle:
            warnings.simplefilter("ignore")  # (fit notes: a published kernel longer than the tiny grid is clamped)
            handle.set_step(kwargs.get("dense_steps", 0), 50)  # (the first sparse step)
            with torch.no_grad():
                model(**inputs)
            assert handle.method == config and handle.summary()["config"] == config.ran_dict(), (tiny, method)


@pytest.mark.parametrize("fn", [recommended, dit_accel.published_settings], ids=["recommended", "published"])
@pytest.mark.parametrize("model", [None, "", "  ", 3, True, [WAN]], ids=repr)
def test_a_model_argument_that_names_no_class_is_named(fn, model):
    """None read as "no preset for NoneType; supported: <63 names>", "" as "no preset for ;"."""
    with pytest.raises(ValueError, match=r"transformer_or_class=.* is invalid: pass a transformer, its class or class "
                                         r"name .*or a pipeline"):
        fn(model, "radial")


@pytest.mark.parametrize("fn", [recommended, dit_accel.published_settings], ids=["recommended", "published"])
def test_a_method_config_in_the_model_place_says_to_swap(fn):
    """recommended(Radial(), "radial") read as "no preset for Radial; supported: ..."."""
    with pytest.raises(TypeError, match=rf"transformer_or_class=Radial\(.*\) is a method config; pass the model first "
                                        rf"and the method's name second: {fn.__name__}\(transformer, 'radial'\)"):
        fn(dit_accel.Radial(), "radial")


@pytest.fixture
def my_wan():
    """A registered preset (Wan's) whose defaults carry what fit=True refuses, and a list in its apply keywords."""
    preset = dataclasses.replace(PRESETS[WAN], class_name="MyRound24Wan", published=(), defaults={
        "tile": {"method": {"tile": (1, 8, 8), "window": (3, 1, 1), "block_size": 64}, "apply": {}},
        "gna": {"method": {"kernel_size": ((3, 8, 8), (5, 8, 8))}, "apply": {"dense_layers": [0]}}})
    register_preset(preset)
    yield preset
    unregister_preset(preset.class_name)


def test_recommended_keeps_a_tile_that_fit_refuses(my_wan):
    """A preset default Tile with a block_size (or per-head windows) failed every recommended(): "Tile.fit=True is
    invalid with block_size=64 ... pass one of them", a fit=True the user never passed."""
    config, kwargs = recommended("MyRound24Wan", "tile")
    assert config == dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1), block_size=64) and kwargs == {}
    per_head = dataclasses.replace(my_wan, defaults={"tile": {"method": {"window": ((3, 3, 3), (1, 3, 3))},
                                                              "apply": {}}})
    register_preset(per_head)
    assert recommended("MyRound24Wan", "tile")[0].fit is False


def test_recommended_default_apply_keywords_are_a_copy(my_wan):
    """A caller's edit of a list in the answer (dense_layers) changed the preset's default for every later call."""
    _, kwargs = recommended("MyRound24Wan", "gna")
    kwargs["dense_layers"].append(5)
    assert recommended("MyRound24Wan", "gna")[1] == {"dense_layers": [0]}
    assert PRESETS["MyRound24Wan"].defaults["gna"]["apply"] == {"dense_layers": [0]}


def test_info_says_which_tile_a_fitted_density_is_of():
    """A fit=True Tile on a grid its tile does not divide printed tile=(6, 8, 8) beside the density of the tile that
    runs there ((10, 8, 8) with window (1, 3, 3) on 10x24x40): the density now comes with the tile it is of."""
    grid = (10, 24, 40)
    entry = info._setting(dit_accel.Tile(fit=True), {}, grid, "a test grid", "a test")
    assert entry["runs_as"] == {"tile": (10, 8, 8), "window": (1, 3, 3)}
    assert entry["density"] == round(dit_accel.Tile(**entry["runs_as"]).plan(grid).density, 4)
    assert "runs_as" not in info._setting(dit_accel.Tile(fit=True), {}, (12, 24, 40), "divides", "a test")
    assert "runs_as" not in info._setting(dit_accel.Tile(), {}, grid, "not fitted", "a test")
    with pytest.warns(DitAccelWarning, match="clamped to"):
        gna = info._setting(dit_accel.GNA(kernel_size=(3, 32, 8), fit=True), {}, grid, "clamped", "a test")
    assert gna["runs_as"] == {"kernel_size": (3, 24, 8)}


@pytest.fixture
def quick_densities(monkeypatch):
    """model_settings without the layouts of the published (big) grids: the settings are under test, not densities."""
    monkeypatch.setattr(info, "_densities", lambda method, grid: (0.5, None))
    return info.model_settings


def test_info_prints_the_fitted_tile_of_wan22(quick_densities, capsys):
    """`info --model "Wan 2.2"`: Tile(6, 8, 8) on 20 frames runs as (5, 8, 8); the line said (6, 8, 8) alone."""
    settings = quick_densities("Wan 2.2")
    tile = settings["methods"]["tile"][0]
    assert tile["runs_as"] == {"tile": (5, 8, 8), "window": (3, 3, 3)} and tile["grid"] == [20, 48, 80]
    info._print_settings(settings)
    assert "runs there as tile=(5, 8, 8), window=(3, 3, 3) (fit=True: fitted to the grid; the density is of that " \
           "layout)" in capsys.readouterr().out
    json.dumps(settings, default=str)  # (--json)


def test_info_lists_the_method_defaults_generate_runs(quick_densities):
    """VSA on Wan (no published setting, no preset default) was missing from `info --model`, though `generate
    --method vsa` runs recommended()'s answer: the method's own defaults."""
    for model in ("Wan 2.1", "HunyuanVideo"):
        methods = quick_densities(model)["methods"]
        class_name = quick_densities(model)["transformer"]
        assert methods["vsa"][0]["config"] == recommended(class_name, "vsa", model)[0].to_dict()
        assert "the method's own defaults" in methods["vsa"][0]["source"]
        assert "dense" not in methods and "tile_strategy" not in methods
    flux = quick_densities("FluxTransformer2DModel")["methods"]  # (image model: no VSA or Radial to list)
    assert set(flux) == {"tile", "gna", "sla"}
