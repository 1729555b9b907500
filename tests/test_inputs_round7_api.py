"""Public Python API inputs, round 7: each test pins one fault found by calling the API with odd values (a raw
traceback from deep inside, or a silently wrong answer, before the fix)."""

import dataclasses

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel import Phase, SparsePlan
from dit_accel.kernels import BlockLayout, block_sparse_attention
from dit_accel.kernels.sla import sla_attention
from dit_accel.models.tiny import build_tiny_transformer, tiny_transformer_inputs
from dit_accel.pipelines.presets import PRESETS

TILE = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))


def _strided_d(x: torch.Tensor) -> torch.Tensor:
    """The same values with a head dim that is not contiguous (a (B, H, D, N) tensor transposed)."""
    return x.transpose(2, 3).contiguous().transpose(2, 3)


def _qkv(n=128, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g) for _ in range(3)]


@pytest.fixture
def model():
    return build_tiny_transformer("wan")


# ------------------------------------------------------------ kernels called directly
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_block_sparse_attention_reads_a_strided_head_dim_right(which):
    qkv = _qkv()
    mask = (torch.arange(128)[:, None] - torch.arange(128)[None, :]).abs() <= 40
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    want = block_sparse_attention(*qkv, layout, backend="torch")
    qkv[which] = _strided_d(qkv[which])
    got = block_sparse_attention(*qkv, layout, backend="torch")  # ATen's CPU flash op misread it: off by ~1
    torch.testing.assert_close(got, want)


def test_sla_attention_reads_a_strided_head_dim_right():
    q, k, v = _qkv()
    proj = torch.nn.Linear(16, 16)
    want = sla_attention(q, k, v, dit_accel.SLA(topk=0.5), proj, backend="torch")
    got = sla_attention(_strided_d(q), k, v, dit_accel.SLA(topk=0.5), proj, backend="torch")  # was off by 1e37
    torch.testing.assert_close(got, want)


def test_sla_attention_refuses_a_projection_on_another_device():
    meta = torch.nn.Linear(16, 16, device="meta")  # its output was added to the CPU output as garbage (1e16)
    with pytest.raises(ValueError, match="proj's weight is on meta but q on cpu"):
        sla_attention(*_qkv(), dit_accel.SLA(topk=0.5), meta, backend="torch")


# ------------------------------------------------------------ SparsePlan and Phase
def test_a_plan_built_with_numpy_ints_saves_and_hashes(tmp_path):
    plan = SparsePlan((Phase(np.int64(0), np.int64(2), default=TILE),), num_layers=np.int64(2),
                      num_heads=np.int64(2))
    plan.content_hash()  # was: TypeError: Object of type int64 is not JSON serializable
    loaded = SparsePlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.phases[0].stop == 2 and loaded.num_layers == 2 and loaded.content_hash() == plan.content_hash()


@pytest.mark.parametrize("layers", [None, [TILE]], ids=["none", "list"])
def test_phase_layers_that_are_not_a_dict_are_refused_naming_the_field(layers):
    with pytest.raises(TypeError, match=r"Phase.layers=.* is invalid: expected a dict"):  # was AttributeError
        Phase(0, None, layers=layers)


@pytest.mark.parametrize("phases", [Phase(0, None, default=TILE), None], ids=["one-phase", "none"])
def test_plan_phases_that_are_not_a_list_are_refused_naming_the_field(phases):
    with pytest.raises(TypeError, match=r"SparsePlan.phases=.* is invalid: expected a list or tuple"):
        SparsePlan(phases)  # was: 'Phase' object is not iterable


@pytest.mark.parametrize("provenance, field", [({"grids": "x"}, "provenance.grids"),
                                               ({"steps": "x"}, "provenance.steps"),
                                               ({"model_class": 3}, "provenance.model_class")],
                         ids=["grids", "steps", "model_class"])
def test_plan_provenance_is_checked_when_the_plan_is_built(provenance, field):
    # was accepted, then apply raised int() errors or said "calibrated for x denoising steps"
    with pytest.raises(ValueError, match=field):
        SparsePlan((Phase(0, None, default=TILE),), provenance=provenance)
    SparsePlan((Phase(0, None, default=TILE),), provenance={"grids": [(4, 8, 8)], "steps": np.int64(2)})


@pytest.mark.parametrize("path, error", [(None, TypeError), (123, TypeError), ("", ValueError)],
                         ids=["none", "int", "empty"])
def test_plan_load_refuses_a_path_that_is_not_one(path, error):
    with pytest.raises(error, match=r"path=.* is invalid: expected the plan's file name"):  # was pathlib's error
        SparsePlan.load(path)


@pytest.mark.parametrize("path", [None, 123, {"0_0_0": [1, 1, 1]}], ids=["none", "int", "dict"])
def test_tile_from_strategy_refuses_a_path_that_is_not_one(path):
    with pytest.raises(ValueError, match="TileStrategy.path=.* is invalid"):  # was os.fspath's TypeError
        dit_accel.Tile.from_strategy(path)
    with pytest.raises(ValueError, match="TileStrategy.path=.* is invalid"):
        SparsePlan.from_tile_strategy(path)


# ------------------------------------------------------------ apply and the handle
def test_numpy_bools_are_switches_as_documented(model):
    # numpy 2 names its bool type "bool": check_flag's "numpy's bool too" refused it
    with dit_accel.apply(model, TILE, timing=np.True_, allow_other_grid=np.False_) as handle:
        with torch.no_grad():
            model(**tiny_transformer_inputs("wan", model))
        assert handle.stats()[0]["time_ms"] is not None


def test_handle_plan_checks_its_method_and_grid(model):
    with dit_accel.apply(model, TILE) as handle:
        with pytest.raises(TypeError, match="method must be a dit_accel method config"):  # was AttributeError
            handle.plan("tile", (4, 8, 8))
        with pytest.raises(ValueError, match="grid='abc' is invalid"):  # was "invalid literal for int()"
            handle.plan(TILE, "abc")
        assert handle.plan(TILE, np.array([4, 8, 8])).grid == (4, 8, 8)


@pytest.mark.parametrize("call, folder", [("apply", ""), *((c, f) for c in ("load_weights", "load_method",
                                                                            "read_weights_info") for f in (None, ""))])
def test_a_weights_path_that_is_none_or_empty_is_refused(model, call, folder):
    """(apply's weights=None is its default, no weights: not a fault.)"""
    match = r"weights=(None|'') is invalid: expected the path of a weights folder"  # was pathlib's / read "."
    with pytest.raises((TypeError, ValueError), match=match):
        if call == "apply":
            dit_accel.apply(model, TILE, weights=folder)
        elif call == "load_weights":
            with dit_accel.apply(model, TILE) as handle:
                handle.load_weights(folder)
        else:
            getattr(dit_accel, call)(folder)


# ------------------------------------------------------------ registering methods and presets
def test_register_method_refuses_another_class_of_a_builtin_name():
    @dataclasses.dataclass(frozen=True)
    class Dense(dit_accel.Method):  # another module's class with the built-in's qualname replaced it silently
        def plan(self, grid):
            return dit_accel.Dense().plan(grid)

    Dense.__qualname__ = "Dense"  # as a user module's top-level class has

    with pytest.raises(ValueError, match="a method named 'dense' is already registered"):
        dit_accel.register_method("dense", summary="mine")(Dense)
    assert dit_accel.registered_methods()["dense"].cls is dit_accel.Dense


@pytest.mark.parametrize("kwargs, match", [({"summary": None}, "summary=None"),
                                           ({"summary": "x", "finetunable": "no"}, "finetunable='no'")],
                         ids=["summary", "finetunable"])
def test_register_method_checks_summary_and_finetunable(kwargs, match):
    with pytest.raises(TypeError, match=match):  # was accepted; "no" registered a finetunable method
        dit_accel.register_method("round7", **kwargs)
    assert "round7" not in dit_accel.registered_methods()


def test_a_mutable_method_config_is_refused_when_registered_and_applied(model):
    @dataclasses.dataclass
    class Mutable(dit_accel.Method):
        reach: list = dataclasses.field(default_factory=list)

        def plan(self, grid):
            return dit_accel.Dense().plan(grid)

    with pytest.raises(TypeError, match="frozen dataclass"):
        dit_accel.register_method("round7_mutable", summary="x")(Mutable)
    with pytest.raises(TypeError, match="is unhashable"):  # was: unhashable type at the first transformer call
        dit_accel.apply(model, Mutable())
    assert not model._forward_pre_hooks


def test_a_method_whose_plan_is_not_a_plan_is_named(model):
    @dit_accel.register_method("round7_noplan", summary="x")
    @dataclasses.dataclass(frozen=True)
    class NoPlan(dit_accel.Method):
        def plan(self, grid):
            return None

    try:
        with dit_accel.apply(model, NoPlan()):
            with pytest.raises(TypeError, match=r"NoPlan.plan\(grid\) returned NoneType"):  # was AttributeError
                with torch.no_grad():
                    model(**tiny_transformer_inputs("wan", model))
    finally:
        dit_accel.unregister_method("round7_noplan")


@pytest.fixture
def my_wan(model):
    class MyWan(type(model)):
        pass

    model.__class__ = MyWan
    yield model
    dit_accel.unregister_preset("MyWan")


@pytest.mark.parametrize("attention", [r"blocks\.\d+\.attn1", ("[bad",)], ids=["one-string", "bad-regex"])
def test_a_preset_with_bad_attention_patterns_is_refused_naming_it(my_wan, attention):
    with pytest.raises(ValueError, match=r"Preset 'MyWan': attention=.* is invalid"):  # was re.error at apply
        dit_accel.register_preset(dataclasses.replace(PRESETS["WanTransformer3DModel"], class_name="MyWan",
                                                      attention=attention))
    assert "MyWan" not in PRESETS


def test_a_preset_whose_read_grid_returns_no_grid_info_is_named(my_wan):
    dit_accel.register_preset(dataclasses.replace(PRESETS["WanTransformer3DModel"], class_name="MyWan",
                                                  read_grid=lambda model, args: (4, 8, 8)))
    with dit_accel.apply(my_wan, TILE):
        with pytest.raises(TypeError, match="read_grid of MyWan's preset returned tuple"):  # was AttributeError
            with torch.no_grad():
                my_wan(**tiny_transformer_inputs("wan", my_wan))


# ------------------------------------------------------------ presets and layouts (the maintainer's review)
def test_register_preset_refuses_a_min_diffusers_that_is_no_version():
    """Before: min_diffusers=3 was registered, and apply failed with an AttributeError on int.split."""
    with pytest.raises(ValueError, match=r"Preset.min_diffusers=3 is invalid: .* a version string such as '0.35.0'"):
        dit_accel.register_preset(dataclasses.replace(PRESETS["WanTransformer3DModel"], class_name="MyWan",
                                                      min_diffusers=3))
    assert "MyWan" not in PRESETS


def test_published_settings_of_an_unknown_class_is_an_error_not_nothing():
    """Before: () for a class dit_accel does not know, which reads as "nothing published for it"."""
    from dit_accel.pipelines.presets import published_settings

    with pytest.raises(ValueError, match="'NoSuchTransformer' is not a model class dit_accel knows; supported: .*WanTransformer3DModel"):
        published_settings("NoSuchTransformer")
    assert published_settings("WanTransformer3DModel", "radial")  # a known class answers as before


def test_recommended_given_a_config_says_to_pass_its_name():
    """Before: "Tile(...) is not a registered method", which it is."""
    with pytest.raises(TypeError, match=r"is a method config; pass its method's name, 'tile'"):
        dit_accel.recommended("WanTransformer3DModel", TILE)
    assert dit_accel.recommended("WanTransformer3DModel", "tile")[0] == dit_accel.recommended(
        "WanTransformer3DModel", "tile")[0]


def test_block_layout_takes_numpy_block_sizes_as_the_configs_do():
    """Before: block_q=np.int64(64) was "expected a positive int"."""
    mask = torch.ones(128, 128, dtype=torch.bool)
    layout = BlockLayout.from_dense_mask(mask, block_q=np.int64(64), block_k=np.int64(64))
    assert (layout.block_q, layout.block_k) == (64, 64) and type(layout.block_q) is int


@pytest.mark.parametrize("layers", [{0: 1}, "01"], ids=["dict", "str"])
def test_dense_layers_of_another_kind_than_a_list_is_refused(model, layers):
    """Before: a dict was read as its keys, without a word (a str was refused already, and still is)."""
    with pytest.raises(TypeError, match=r"dense_layers=.* is invalid: expected a list of non-negative ints"):
        dit_accel.apply(model, TILE, dense_layers=layers)
    assert not model._forward_pre_hooks


def test_stats_all_ranks_is_a_switch(model):
    """Before: all_ranks="no" was truthy and asked every rank for a collective."""
    with dit_accel.apply(model, TILE) as handle:
        with pytest.raises(TypeError, match="all_ranks='no' is invalid: expected True or False"):
            handle.stats(all_ranks="no")
        assert handle.stats(all_ranks=False) == handle.stats()
