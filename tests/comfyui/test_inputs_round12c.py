"""Round 12 (second wave) of the nodes' grid-rank refusals: a per-dimension widget of the wrong length (GNA's
kernel_size=8,8 on Wan, Tile's tile=6,8,8 on FLUX) and a VSA or Radial node on an image model were told the Python
API's fix ("or take dit_accel.recommended(transformer, 'gna')", "Use one of gna, tile, tile_strategy, sla"), which no
node has; they are now told the widget's value to set (in the widget's own form, 8,8,8), the nodes to use, and a
preset of the node published for the model where there is one. A plan's or a fine-tuned folder's setting has no
widget: it is told what to do about the file. The Diffusers path keeps its Python words. And a Ulysses degree that
does not divide LTX-2's audio_num_attention_heads (its audio attention is split too) is refused as the video
heads' is, naming the field."""

from types import SimpleNamespace

import pytest

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.pipelines.parallel import check_ulysses_heads
from dit_accel.pipelines.presets import PRESETS, check_method_for
from dit_accel.plans.sparse_plan import Phase, SparsePlan

from tests.comfyui.models import COMMON_WIDGETS, run_node
from tests.comfyui.test_weights import _folder

PYTHON_WORDS = ("recommended(", "Use one of", "=(")


def _widgets(node: str, **changed) -> dict:
    """The node's widgets at their defaults (custom, no preset), with ``changed``."""
    spec = NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"]
    out = {k: v[1]["default"] for k, v in spec.items() if k != "model" and len(v) > 1}
    return {**out, **COMMON_WIDGETS, **changed}


def _node_words(err) -> str:
    text = str(err.value)
    assert "\n" not in text and not any(w in text for w in PYTHON_WORDS), text
    return text


@pytest.mark.parametrize("node, case, widgets, said", [
    ("DitAccelGNA", "wan21-t2v", dict(kernel_size="8,8"),
     r"GNA's kernel_size=8,8 is for a 2-D token grid, but the sparse calls of Wan \(WanTransformer3DModel\) see a "
     r"video's \(T, H, W\) token grid. Set the widget kernel_size to 3 values \(8,8,8, say\) or one$"),
    ("DitAccelGNA", "flux", dict(stride="1,1,1"),
     r"GNA's stride=1,1,1 is for a 3-D token grid, .* see a 2-D \(H, W\) token grid. Set the widget stride to 2 "
     r"values \(1,1, say\) or one$"),
    ("DitAccelTile", "flux", {},  # (the widget's default, 6,8,8: a video's)
     r"Tile's tile=6,8,8 is for a 3-D token grid, .* Set the widget tile to 2 values \(8,8, say\) or one$"),
    ("DitAccelTile", "hunyuan-video", dict(tile="8,8", window="3,3"),
     r"Tile's tile=8,8 is for a 2-D token grid, .* Set the widget tile to 3 values \(8,8,8, say\) or one, or choose "
     r"the node's preset for HunyuanVideo$"),
])
def test_a_widget_of_another_grid_rank_is_told_the_widget_to_set(models, node, case, widgets, said):
    """Before: "... Give 3 values per dimension setting (kernel_size=(8, 8, 8), say) or one int, or take
    dit_accel.recommended(transformer, 'gna')"."""
    model = models(case)
    patches = dict(model.patches)
    with pytest.raises(ValueError, match=rf"^dit_accel: {said}") as err:
        run_node(node, model, **_widgets(node, **widgets))
    _node_words(err)
    assert model.patches == patches and "dit_accel" not in str(model.model_options)


@pytest.mark.parametrize("node", ["DitAccelVSA", "DitAccelRadial"])
def test_a_video_method_node_on_an_image_model_names_the_nodes_to_use(models, node):
    """Before: "Use one of gna, tile, tile_strategy, sla (dit_accel.recommended(transformer, 'tile') gives a setting
    that fits)". Each node named is one the package has."""
    with pytest.raises(ValueError, match=r"needs a video's \(T, H, W\) token grid, but the sparse calls of FLUX .* "
                                         r"Use the dit_accel GNA, Tile, TileStrategy or SLA node instead$") as err:
        run_node(node, models("flux"), **_widgets(node))
    _node_words(err)
    for name in ("GNA", "Tile", "TileStrategy", "SLA"):
        assert f"DitAccel{name}" in NODE_CLASS_MAPPINGS


def test_a_plans_setting_of_another_rank_is_told_about_the_plan_not_a_widget(models, tmp_path):
    """The plan node has no tile widget: before, it was told to give 3 values or take dit_accel.recommended."""
    plan = SparsePlan([Phase(0, 1), Phase(1, None, {1: dit_accel.Tile(tile=(4, 4), window=(1, 1))})], num_layers=2)
    path = plan.save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match=r"Tile's tile=4,4 is for a 2-D token grid, .* token grid. \(plan .*plan.json "
                                         r"runs it: calibrate a plan for this model\)$") as err:
        run_node("DitAccelPlan", models("wan21-t2v"), plan_path=str(path), allow_other_grid=False, backend="auto")
    assert "widget" not in _node_words(err)


def test_a_folders_setting_of_another_rank_says_the_weights_are_for_another_model(models, tmp_path):
    folder = _folder(tmp_path / "ft", dit_accel.Tile(tile=(4, 4), window=(1, 1)))
    with pytest.raises(ValueError, match=r"Tile's tile=4,4 is for a 2-D token grid, .* token grid. \(.*ft was trained "
                                         r"with it: the weights are for another model\)$") as err:
        run_node("DitAccelFinetuned", models("wan21-t2v"), weights_path=str(folder), lora_strength=1.0,
                 allow_other_grid=False, backend="auto", expert="transformer")
    assert "widget" not in _node_words(err)


def test_patch_model_says_the_same_and_the_diffusers_path_keeps_its_python_words(models):
    with pytest.raises(ValueError, match=r"Set the widget tile to 3 values \(4,4,4, say\) or one$"):
        patch_model(models("wan21-t2v"), dit_accel.Tile(tile=(4, 4), window=(1, 1)))
    with pytest.raises(ValueError, match=r"Give 3 values per dimension setting \(tile=\(8, 8, 8\), say\) or one int, "
                                         r"or take dit_accel.recommended\(transformer, 'tile'\)$"):
        check_method_for("WanTransformer3DModel", PRESETS["WanTransformer3DModel"], dit_accel.Tile(tile=(4, 4), window=1))


def _transformer(config):
    return type("LTX2VideoTransformer3DModel", (), {"config": config})()


@pytest.mark.parametrize("config", [
    dict(num_attention_heads=4, audio_num_attention_heads=3),  # (a FrozenDict is a dict)
    SimpleNamespace(num_attention_heads=4, audio_num_attention_heads=3),
])
def test_a_ulysses_degree_that_does_not_divide_the_audio_heads_is_refused_naming_them(config):
    """Only num_attention_heads was read: the audio attention's heads failed at its first split call."""
    cp = SimpleNamespace(ulysses_degree=2)
    with pytest.raises(ValueError, match=r"ulysses_degree=2 .* but LTX2VideoTransformer3DModel has "
                                         r"audio_num_attention_heads=3: use a Ulysses degree that divides it \(3\), "
                                         r"or ring$"):
        check_ulysses_heads(_transformer(config), cp)
    check_ulysses_heads(_transformer(config), SimpleNamespace(ulysses_degree=1))


def test_the_video_heads_are_named_first_and_dividing_heads_pass():
    config = dict(audio_num_attention_heads=3, num_attention_heads=6, in_channels=7)
    with pytest.raises(ValueError, match=r"has num_attention_heads=6: .*\(2, 3, 6\)"):
        check_ulysses_heads(_transformer(config), SimpleNamespace(ulysses_degree=4))
    check_ulysses_heads(_transformer(dict(config, audio_num_attention_heads=6)), SimpleNamespace(ulysses_degree=3))
    check_ulysses_heads(_transformer(dict(num_attention_heads=4, use_audio=True)), SimpleNamespace(ulysses_degree=2))
