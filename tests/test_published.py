"""Published settings: the presets carry them as data with their source, ``recommended`` returns them,
``dit-accel info --model`` prints them with their density, and the radial reference settings run
through ``dit_accel.apply`` with the reference's blocks."""

import json
import types

import pytest
import torch

import dit_accel
from dit_accel.cli.main import main
from dit_accel.models import tiny as T
from dit_accel.patterns import radial_layout, radial_mask
from dit_accel.pipelines.presets import (PRESETS, Published, family_of, published_settings, recommended,
                                         resolve_model_family)
from tests.utils import ReferenceAttention

WAN, HUNYUAN = "WanTransformer3DModel", "HunyuanVideoTransformer3DModel"


def test_every_published_setting_names_its_source_and_builds():
    entries = [p for preset in PRESETS.values() for p in preset.published]
    assert {(p.family, p.method) for p in entries} >= {("Wan 2.1", "radial"), ("Wan 2.2", "radial"),
                                                      ("HunyuanVideo", "radial"), ("HunyuanVideo", "tile"),
                                                      ("Wan 2.1", "sla")}
    for p in entries:
        assert isinstance(p, Published) and p.source and p.shape and len(p.grid) == 3
        method, kwargs = p.build()
        assert method.name == p.method and set(kwargs) <= {"dense_steps", "dense_last_steps", "dense_layers"}
        if p.method == "radial":  # presets that quote the reference's numbers use its block rule
            assert method.rule == "reference" and "radial-attention" in p.source


@pytest.mark.parametrize("family, decay, block, sinks, steps, layers", [
    ("Wan 2.1", 0.2, 128, (0,), 12, 1), ("Wan 2.2", 0.8, 64, (0,), 11, 1),
], ids=["wan21", "wan22"])
def test_radial_reference_scripts_per_wan_family(family, decay, block, sinks, steps, layers):
    method, kwargs = recommended(WAN, "radial", family=family)
    assert (method.decay, method.block_size, method.sink_frames, method.rule) == (decay, block, sinks, "reference")
    assert kwargs == {"dense_steps": steps, "dense_layers": layers}


def test_hunyuan_and_defaults_elsewhere():
    method, kwargs = recommended(HUNYUAN, "radial")
    assert (method.decay, method.block_size, method.sink_frames, method.rule) == (0.95, 128, (), "reference")
    assert kwargs == {"dense_steps": 12}
    # The published STA tile, fitted to each call's grid (issue 72): at its own grid it divides, so it runs as is.
    tile = recommended(HUNYUAN, "tile")[0]
    assert tile == dit_accel.Tile(tile=(6, 8, 8), window=(3, 3, 3), fit=True)
    assert tile.plan((30, 48, 80)).method.tile == (6, 8, 8)
    cog, _ = recommended("CogVideoXTransformer3DModel", "radial")  # no published setting: dit_accel's rule
    assert cog.rule == "union" and not published_settings("CogVideoXTransformer3DModel")
    assert [p.config["linear_tokens"] for p in published_settings(WAN, "sla") if "linear_tokens" in p.config] == ["all"]


def test_a_method_or_family_spelled_otherwise_finds_the_setting_and_an_unknown_one_is_refused():
    """A capitalised method name or a family in other case found nothing before and fell back to the defaults
    (Radial(decay=1.0, rule='union'), no dense steps), silently; an alias finds its method's settings."""
    reference = recommended(WAN, "radial", family="Wan 2.1")
    assert reference[0].rule == "reference"
    assert recommended(WAN, "Radial") == reference == recommended(WAN, " RADIAL ", family="wan 2.1")
    assert published_settings(HUNYUAN, "STA") == published_settings(HUNYUAN, "tile") != ()
    assert recommended(WAN, "radial", family="wan2.1") == reference  # (any separator, as --model reads it)
    with pytest.raises(ValueError, match=r"family='wan 2.3' is not a published family of WanTransformer3DModel: "
                                         r"choose one of 'Wan 2.1', 'Wan 2.2'"):
        recommended(WAN, "radial", family="wan 2.3")
    with pytest.raises(ValueError, match="family='Wan 2.1' is not a published family of CogVideoX.*it has none"):
        published_settings("CogVideoXTransformer3DModel", family="Wan 2.1")
    with pytest.raises(ValueError, match=r"method='bogus' is not a registered method; choose one of \["):
        published_settings(WAN, "bogus")
    with pytest.raises(ValueError, match="method='radiall'"):
        recommended(WAN, "radiall")


def test_family_of_pipelines_and_names():
    wan = T.build_tiny_transformer("wan")
    assert family_of(wan) == "Wan 2.1"
    assert family_of(types.SimpleNamespace(transformer=wan, transformer_2=wan)) == "Wan 2.2"
    assert recommended(types.SimpleNamespace(transformer=wan, transformer_2=wan).transformer, "radial",
                       family="Wan 2.2")[0].block_size == 64
    assert resolve_model_family("Wan-AI/Wan2.2-T2V-A14B-Diffusers") == (WAN, "Wan 2.2")
    assert resolve_model_family("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == (WAN, "Wan 2.1")
    assert resolve_model_family("hunyuanvideo-community/HunyuanVideo") == (HUNYUAN, "HunyuanVideo")
    assert resolve_model_family("Wan 2.2") == (WAN, "Wan 2.2")
    with pytest.raises(ValueError, match="cannot tell which model"):
        resolve_model_family("someone/else")


def test_folder_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", WAN], "transformer_2": ["diffusers", WAN]}))
    assert resolve_model_family(str(tmp_path)) == (WAN, "Wan 2.2")


def test_info_prints_published_settings_density_and_source(capsys):
    assert main(["info", "--model", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"]) == 0
    out = capsys.readouterr().out
    assert "settings for Wan-AI/Wan2.2-T2V-A14B-Diffusers (Wan 2.2" in out
    assert "radial: decay=0.8, block_size=64, sink_frames=(0,), spatial=band, rule=reference" in out
    expected = radial_layout((20, 48, 80), 64, 0.8, (0,), rule="reference").density()
    assert f"density {expected:.4f} (visited blocks) on grid 20x48x80" in out  # radial: no token density
    assert "source: mit-han-lab/radial-attention@72788d4 scripts/wan_22_t2v_inference.sh" in out
    assert main(["info", "--model", "hunyuan", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["model_settings"]
    assert settings["family"] == "HunyuanVideo"
    assert settings["methods"]["radial"][0]["density"] == pytest.approx(
        radial_layout((30, 48, 80), 128, 0.95, (), rule="reference").density(), abs=1e-4)
    assert "dit_accel preset default" in settings["methods"]["gna"][0]["source"]
    assert main(["info", "--model", "nobody/knows"]) == 2


def test_reference_radial_runs_through_apply():
    """Frames of 60 tokens, block 64: the reference's per-pair blocks and its drop of adjacent frames."""
    model = T.build_tiny_transformer("wan")
    grid = (6, 6, 10)
    method = dit_accel.Radial(decay=1.0, block_size=64, sink_frames=(0,), rule="reference")
    pattern = radial_mask(grid, 64, 1.0, (0,), rule="reference")
    assert not torch.equal(pattern, radial_mask(grid, 64, 1.0, (0,)))
    kwargs = T.tiny_transformer_inputs("wan", model, grid=grid)
    with ReferenceAttention(pattern, "none"), torch.no_grad():
        ref = model(**kwargs)[0]
    with dit_accel.apply(model, method, backend="torch") as handle, torch.no_grad():
        out = model(**kwargs)[0]
        rows = handle.stats()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert all(row["sparse_calls"] == 1 for row in rows)
