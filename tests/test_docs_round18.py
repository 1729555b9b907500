"""The user documents against the code, round 18: the calls, names and lists the pages give are the ones that work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import dit_accel

REPO = Path(__file__).resolve().parents[1]


def _text(name: str) -> str:
    """A document with its lines joined (a phrase the page wraps reads as one)."""
    return " ".join((REPO / name).read_text().split())


def test_api_md_feeds_a_strategy_record_back_the_way_that_works(tmp_path):
    """api.md's call that turns a tile_strategy record back into a config runs, and refuses a rewritten file."""
    call = re.search(r"`(method_from_name\([^`]*\))`", _text("docs/api.md")).group(1)
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({"0_0_0": [1, 1, 1], "0_0_1": [1, 1, 1]}))
    ran = dit_accel.Tile.from_strategy(str(path), tile=(1, 4, 4)).ran_dict()

    again = eval(call, {"method_from_name": dit_accel.method_from_name, "record": dict(ran)})
    assert isinstance(again, dit_accel.TileStrategy) and again.path == str(path)
    path.write_text(json.dumps({"0_0_0": [3, 1, 1], "0_0_1": [1, 1, 1]}))
    with pytest.raises(ValueError, match="windows_sha256"):
        eval(call, {"method_from_name": dit_accel.method_from_name, "record": dict(ran)})


def test_api_md_names_every_backend_the_environment_variable_takes(monkeypatch):
    from dit_accel.kernels.backends import BACKENDS, env_backend

    named = re.search(r"`DIT_ACCEL_BACKEND=([\w|]+)`", _text("docs/api.md")).group(1).split("|")
    assert sorted(named) == sorted(BACKENDS)
    for name in named:
        monkeypatch.setenv("DIT_ACCEL_BACKEND", name)
        assert env_backend() == name


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_config_errors_the_docs_name_are_the_ones_raised(doc):
    """A value of the wrong type is a TypeError, as the pages say beside the ValueError of an out-of-range one."""
    sentence = re.search(r"validated dataclasses[:;] a bad value raises [^.]*\.", _text(doc)).group(0)
    with pytest.raises(ValueError, match="Radial.decay"):
        dit_accel.Radial(decay=2.0)
    with pytest.raises(TypeError, match="Radial.decay"):
        dit_accel.Radial(decay="0.5")
    assert "`ValueError`" in sentence and "`TypeError`" in sentence, sentence


def test_cli_md_lists_every_embedded_model():
    from dit_accel.models.tiny import EMBEDDED_MODELS

    listed = re.search(r"`MODEL` is a hub id, a local folder, or an embedded model: (.*?)\. ", _text("docs/cli.md"))
    missing = [name for name in EMBEDDED_MODELS if f"`{name}`" not in listed.group(1)]
    assert not missing, f"docs/cli.md leaves out embedded models: {missing}"


def test_cli_md_says_which_settings_info_gives_a_token_density():
    """`info --model` prints a token density for GNA and Tile only; cli.md said both densities for every setting."""
    from dit_accel.cli.info import _densities

    configs = {"GNA": dit_accel.GNA(kernel_size=(3, 4, 4)), "Tile": dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)),
               "Radial": dit_accel.Radial(block_size=64), "SLA": dit_accel.SLA(topk=0.5), "VSA": dit_accel.VSA()}
    with_tokens = sorted(name for name, method in configs.items() if _densities(method, (8, 8, 8))[1] is not None)
    sentence = re.search(r"`info --model M` prints [^.]*\.", _text("docs/cli.md")).group(0)
    assert f"({' and '.join(with_tokens)};" in sentence, sentence
    assert all(name in sentence for name in configs if name not in with_tokens), sentence


@pytest.fixture
def quick_densities(monkeypatch):
    """model_settings without the layouts of the published (big) grids: the settings are under test, not densities."""
    from dit_accel.cli import info

    monkeypatch.setattr(info, "_densities", lambda method, grid: (0.5, None))
    return info.model_settings


def test_info_gives_a_shapes_model_its_dense_warm_up_steps(quick_densities):
    """`info --model tiny-shapes-63` printed its Tile without the 6 dense steps that generate and eval run first."""
    from dit_accel.models.tiny_shapes import SHAPES_MODELS

    for name in ("tiny-shapes-long", "tiny-shapes-63"):
        first = quick_densities(name)["methods"]["tile"][0]
        assert "generate and eval use it" in first["source"]
        assert first["apply"] == SHAPES_MODELS[name].schedule and first["apply"]["dense_steps"] > 0


def test_info_gives_a_random_weight_tiny_model_the_settings_generate_runs(quick_densities):
    """`info --model tiny-wan` listed Wan 2.1's settings for 768x1280 alone; generate runs its grid-sized ones."""
    from dit_accel.models.tiny import TINY_METHOD_DEFAULTS

    for name in ("tiny-wan", "tiny-sd3"):
        methods = quick_densities(name)["methods"]
        for method, options in TINY_METHOD_DEFAULTS[name].items():
            first = methods[method][0]
            assert "generate and eval use it" in first["source"] and first["apply"] == {}
            assert dit_accel.method_from_name(method, **options).to_dict() == first["config"]


def test_an_unknown_hub_id_counts_the_supported_classes_alone():
    """The refusal of a hub id with no local snapshot said "(63 are supported; ...)": every preset, the refused
    classes (which dit_accel names only to refuse) counted too."""
    from dit_accel.pipelines.presets import PRESETS, SUPPORTED, model_family

    assert len(SUPPORTED) < len(PRESETS)
    with pytest.raises(ValueError, match=rf"\({len(SUPPORTED)} are supported; `dit-accel info` lists them\)"):
        model_family("nobody/no-such-model-here")
