"""Trust round 22, the public Python API's boundary: what a user calling it directly could get wrong and was
not told (an empty answer, a plan built for a grid no call has, an error from an inner function, an answer
whose edit changed later answers)."""
import pytest

import dit_accel
from dit_accel.patterns import gna_layout, gna_mask


def test_bench_layout_rows_refuses_a_method_it_does_not_report():
    """``layout_rows(methods=["tiles"])`` returned ``[]`` (as if nothing were published); the CLI refused it."""
    from dit_accel.eval.bench_layouts import layout_rows

    for methods in (["tiles"], "dense", ["tile", "nope"]):
        with pytest.raises(ValueError, match=r"not a method of bench layouts; choose from tile, gna, radial, sla, vsa"):
            layout_rows(["tiny-shapes-63"], methods)
    assert layout_rows(["tiny-shapes-63"], ["STA"])  # (aliases and case still read)


@pytest.mark.parametrize("call", [
    pytest.param(lambda: dit_accel.GNA(kernel_size=(((3, 3, 3),),)), id="GNA-config"),
    pytest.param(lambda: dit_accel.GNA(kernel_size=((3, 3, 3), ((5, 5, 5),))), id="GNA-second-head"),
    pytest.param(lambda: gna_mask((8, 8), ((3, 3), ((3, 3),))), id="gna_mask"),
    pytest.param(lambda: gna_layout((8, 8), ((3, 3), ((3, 3),))), id="gna_layout"),
])
def test_per_head_kernel_sizes_nested_twice_are_refused_naming_the_head(call):
    """A head's kernel size that is itself per-head was taken by ``GNA(...)`` and refused only at plan time by an
    inner function ("gna_relations takes one"), which named neither the field nor the head."""
    with pytest.raises(TypeError, match=r"kernel_size\[[01]\]=.* per-head kernel sizes are one level deep"):
        call()


def test_per_head_kernel_sizes_one_level_deep_still_run():
    config = dit_accel.GNA(kernel_size=[[3, 3], [5, 5]])
    assert config.heads == 2 and config.kernel_size == ((3, 3), (5, 5))
    assert gna_mask((8, 8), [[3, 3], [5, 5]]).shape == (2, 64, 64)


@pytest.mark.parametrize("method", [dit_accel.SLA(), dit_accel.Dense(), dit_accel.PerHead((dit_accel.SLA(),
                                                                                          dit_accel.Dense()))],
                         ids=["SLA", "Dense", "PerHead"])
@pytest.mark.parametrize("grid", ["abc", (0, 8, 8), (4, 8, 8, 2), (16, -16)], ids=["str", "zero", "4-D", "neg"])
def test_plans_refuse_a_grid_no_attention_call_has(method, grid):
    """``SLA().plan("abc")`` and ``Dense().plan((0, 8, 8))`` made plans (refused at their first call, the first
    with a raw "can't multiply sequence" TypeError); Tile's, GNA's, Radial's and VSA's plans refused them."""
    with pytest.raises(ValueError, match=rf"{type(method).__name__}\.plan\(grid\): grid=.* is invalid: expected 1 "
                                         r"to 3 positive ints"):
        method.plan(grid)


def test_plans_take_the_grids_they_took():
    assert dit_accel.SLA().plan([16, 16]).grid == (16, 16)
    assert dit_accel.Dense().plan(256).grid == (256,)
    assert dit_accel.Tile(tile=(2, 4, 4), window=1).plan((4, 8, 8)).grid == (4, 8, 8)


def test_published_settings_answers_are_copies():
    """Editing an answer of ``published_settings`` (its config or apply dict) changed the presets' own entry, so
    every later ``recommended`` and ``published_settings`` call returned the edit."""
    model = "WanTransformer3DModel"
    before = dit_accel.recommended(model, "radial")
    first = dit_accel.published_settings(model, "radial")[0]
    first.apply["dense_steps"] = 777
    first.config["decay"] = 0.5
    again = dit_accel.published_settings(model, "radial")[0]
    assert again.apply["dense_steps"] != 777 and again.config["decay"] != 0.5
    assert dit_accel.recommended(model, "radial") == before


@pytest.mark.parametrize("build, layout", [
    pytest.param(lambda: __import__("dit_accel.patterns", fromlist=["x"]).tile_mask((8, 16, 16), (2, 4, 4), 1),
                 "tile_layout", id="tile_mask"),
    pytest.param(lambda: gna_mask((8, 16, 16), 3), "gna_layout", id="gna_mask"),
    pytest.param(lambda: gna_mask((8, 16, 16), ((3, 3, 3), (5, 5, 5))), "gna_layout", id="gna_mask-per-head"),
    pytest.param(lambda: __import__("dit_accel.patterns", fromlist=["x"]).radial_mask((8, 16, 16), 64),
                 "radial_layout", id="radial_mask"),
    pytest.param(lambda: __import__("dit_accel.patterns", fromlist=["x"]).radial_window_mask((8, 16, 16), 64),
                 "radial_window_layout", id="radial_window_mask"),
])
def test_a_token_mask_the_machine_cannot_hold_is_refused_before_it_is_built(monkeypatch, build, layout):
    """The N x N masks were allocated whatever their size: ``tile_mask((30, 48, 80), ...)`` (its docstring's grid)
    is 13 GiB, and the out-of-memory killer ended the process without a word. Here: a machine with 1 MiB
    available and a 2048-token grid (4 MiB)."""
    from dit_accel.patterns import checks

    monkeypatch.setattr(checks, "available_memory", lambda: 2**20, raising=False)  # (raising=False: fails unfixed)
    with pytest.raises(MemoryError, match=rf"2048 x 2048 bools .* 0\.0 GiB available: .* use {layout} \(the block"):
        build()
    monkeypatch.setattr(checks, "available_memory", lambda: None, raising=False)  # (unknown: built as before)
    assert build().shape[-1] == 2048


def test_a_phase_is_hashable_like_the_configs_it_holds():
    """``Phase`` is a frozen dataclass (and its configs are hashable), but ``hash(phase)`` raised "unhashable type:
    'dict'" (its generated hash took the layers dict), so phases could not go in a set or key a cache."""
    from dit_accel import Phase, SparsePlan

    tile = dit_accel.Tile(tile=(4, 4, 4), window=(1, 1, 3))
    phase = Phase(2, None, {1: tile}, default=dit_accel.PerHead((tile, dit_accel.Dense())))
    again = SparsePlan.from_json(SparsePlan([phase]).to_json()).phases[0]  # (read back: equal, so one hash)
    assert again == phase and hash(again) == hash(phase)
    assert len({phase, again, Phase(2, None, {0: tile})}) == 2


@pytest.mark.parametrize("asked", ["WanTransformer3D", "wantransformer3dmodel", "WanTransformer3DModle"])
def test_a_misspelt_model_class_is_answered_with_the_nearest_ones(asked):
    """``recommended("WanTransformer3D", ...)``, ``published_settings`` and ``dit-accel info --model`` answered a
    misspelt or mis-cased class name with the list of 60 classes only, for the reader to search."""
    from dit_accel.pipelines.presets import resolve_model_family

    near = r" \(did you mean WanTransformer3DModel( or \w+)?\?\)"
    with pytest.raises(ValueError, match=rf"no preset for {asked}{near}; supported: "):
        dit_accel.recommended(asked, "tile")
    with pytest.raises(ValueError, match=rf"'{asked}' is not a model class dit_accel knows{near}; supported: "):
        dit_accel.published_settings(asked)
    with pytest.raises(ValueError, match=rf"cannot tell which model '{asked}' is{near}: pass a transformer class"):
        resolve_model_family(asked)


def test_a_name_near_no_model_class_gets_no_guess():
    with pytest.raises(ValueError, match=r"no preset for Zzz; supported: "):
        dit_accel.recommended("Zzz", "tile")
