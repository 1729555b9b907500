"""Round 18: method configs built from a name, and ``dit-accel generate``'s checks before the model loads."""

from __future__ import annotations

import json
import re

import pytest

import dit_accel
from dit_accel.cli.main import main

_SMALL = ["--steps", "2", "--frames", "5", "--height", "16", "--width", "16", "--quiet"]


def _folder(tmp_path, pipeline="FluxPipeline", transformer="FluxTransformer2DModel", vae="AutoencoderKL"):
    """A pipeline folder with no weights: only what is read before loading (loading it fails)."""
    folder = tmp_path / pipeline
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "transformer": ["diffusers", transformer], "vae": ["diffusers", vae]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    return folder


def _wan_folder(tmp_path):
    return _folder(tmp_path, "WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan")


# ----------------------------------------------------------------------------- method_from_name
def test_method_from_name_names_the_valid_options_of_an_unknown_one():
    """Before: ``method_from_name("tile", bogus=1)`` raised the dataclass's bare "Tile.__init__() got an unexpected
    keyword argument 'bogus'", naming neither the method's registered name nor the options it takes."""
    with pytest.raises(TypeError, match=r"method_from_name\('tile'\): Tile has no option 'bogus'; valid options: "
                                        r"tile, window, block_size, fit"):
        dit_accel.method_from_name("STA", bogus=1)
    with pytest.raises(TypeError, match=r"Dense has no option 'x'; valid options: none"):
        dit_accel.method_from_name("dense", x=1)
    assert dit_accel.method_from_name("tile", window=1) == dit_accel.Tile(window=1)


def test_replace_names_the_valid_options_of_an_unknown_one():
    """Before: ``Tile().replace(windw=1)`` raised dataclasses' bare "__init__() got an unexpected keyword argument"."""
    with pytest.raises(TypeError, match=r"Tile\.replace: Tile has no option 'windw'; valid options: tile, window, "
                                        r"block_size, fit"):
        dit_accel.Tile().replace(windw=1)
    assert dit_accel.SLA().replace(topk=0.5).topk == 0.5


# ----------------------------------------------------------------------------- a method the model cannot run
@pytest.mark.parametrize("flags, message", [
    (["--method", "radial"], r"--method radial: method 'radial' needs a video's \(T, H, W\) token grid, but the "
                             r"sparse calls of FluxTransformer2DModel see a 2-D \(H, W\) token grid\. Pass --method "
                             r"tile, gna or sla"),
    (["--method", "vsa"], r"--method vsa: method 'vsa' needs a video's"),
    (["--method", "tile", "--tile", "6,8,8"], r"--tile 6,8,8 has 3 values, but the sparse calls of "
                                              r"FluxTransformer2DModel see a 2-D token grid: give --tile 2 values"),
    (["--method", "gna", "--kernel-size", "3,3,3"], r"--kernel-size 3,3,3 has 3 values"),
], ids=["radial", "vsa", "tile-rank", "gna-rank"])
def test_a_method_the_models_class_cannot_run_is_refused_before_loading(tmp_path, capsys, flags, message):
    """Before: the FLUX folder's transformer class (in its model_index.json) refuses Radial, VSA and 3-D windows,
    but generate loaded the whole model first (minutes for FLUX.1-dev) and only then had apply refuse them."""
    folder = _folder(tmp_path)
    assert main(["generate", "--model", str(folder), *flags, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "lacks the component folder" not in err  # (the load was never tried)
    assert re.search(message, err), err


def test_a_method_the_model_can_run_goes_on_to_load_it(tmp_path, capsys):
    assert main(["generate", "--model", str(_wan_folder(tmp_path)), "--method", "radial", "--out",
                 str(tmp_path / "x.mp4")]) == 2
    assert "lacks the component folder vae" in capsys.readouterr().err  # (past the checks: the load was tried)


@pytest.mark.parametrize("flags, message", [
    (["--method", "sla", "--topk", "2"], r"--topk: SLA\.topk=2\.0 is invalid: must be a number in \(0, 1\]"),
    (["--method", "radial", "--decay", "0"], r"--decay: Radial\.decay=0\.0 is invalid"),
    (["--no-model-defaults", "--method", "gna", "--kernel-size", "1"], r"--kernel-size: GNA\.kernel_size=1 is invalid"),
], ids=["sla-topk", "radial-decay", "no-model-defaults"])
def test_a_method_option_out_of_range_is_refused_before_loading(tmp_path, capsys, flags, message):
    """Before: a real model's method options were checked only against the preset's defaults once the model had
    loaded (the preset is read from the loaded transformer), so ``--topk 2`` on a Wan folder loaded the model first.
    Now they are checked over the defaults the folder's class gives, before loading."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(_wan_folder(tmp_path)), *flags, "--out", str(tmp_path / "x.mp4")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "lacks the component folder" not in err and re.search(message, err), err


# ----------------------------------------------------------------------------- --dense-layers
@pytest.mark.parametrize("value", ["-1", "0,-3"])
def test_a_negative_dense_layer_is_a_usage_error_before_loading(tmp_path, capsys, value):
    """Before: ``--dense-layers -1`` parsed, and apply refused ``dense_layers=-1`` (the Python keyword, not the flag)
    once the model had loaded."""
    assert main(["generate", "--model", str(_wan_folder(tmp_path)), "--method", "tile", "--dense-layers", value,
                 "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert f"--dense-layers {value}: layer counts and indices are >= 0" in err and "lacks the component" not in err


# ----------------------------------------------------------------------------- schedule flags with dense
@pytest.mark.parametrize("argv, said", [
    (["--method", "dense", "--dense-steps", "1"], "--dense-steps: --method dense runs every step and layer dense "
                                                  "already; drop it"),
    (["--dense-layers", "1", "--dense-last-steps", "1"], "--dense-last-steps, --dense-layers: dense attention (the "
                                                         "default for this model) runs every step and layer dense "
                                                         "already; drop them"),
], ids=["method-dense", "default-dense"])
def test_schedule_flags_with_dense_attention_are_refused(tmp_path, capsys, argv, said):
    """Before: ``--method dense --dense-steps 1`` ran dense (as it must) and the sidecar recorded dense_steps=1 as the
    schedule that ran."""
    out = tmp_path / "d.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, *argv, "--out", str(out)]) == 2
    assert said in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "d.mp4.json").exists()


# ----------------------------------------------------------------------------- recommended
def test_recommended_for_a_method_with_no_default_setting_says_so():
    """Before: ``recommended(Wan, "tile_strategy")`` raised "TileStrategy.path='' is invalid", as if the caller had
    passed an empty path."""
    with pytest.raises(ValueError, match=r"no recommended 'tile_strategy' setting for WanTransformer3DModel: .*"
                                         r"build the config yourself"):
        dit_accel.recommended("WanTransformer3DModel", "tile_strategy")


def test_compare_dense_with_dense_attention_is_refused(tmp_path, capsys):
    """Before: ``--method dense --compare-dense`` ran no comparison and said nothing (the sidecar's compare_dense was
    null), as ``--side-by-side --method dense`` is refused."""
    out = tmp_path / "d.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--method", "dense", "--compare-dense", "--out",
                 str(out)]) == 2
    assert "--compare-dense compares a sparse method with dense, and --method dense is dense already" \
        in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- at_density
@pytest.mark.parametrize("method", [dit_accel.VSA(), dit_accel.Radial()], ids=["vsa", "radial"])
def test_at_density_refuses_a_grid_the_method_cannot_run(method):
    """Before: ``VSA().at_density((16, 16), 0.3)`` returned a VSA for an image grid (and Radial itself), which failed
    only when planned, later (``bench fidelity`` on an image capture)."""
    with pytest.raises(ValueError, match=rf"{type(method).__name__}\.at_density: grid=\(16, 16\) has 2 dimensions; "
                                         rf"{method.name} runs on 3-D \(video\) token grids"):
        method.at_density((16, 16), 0.3)
    assert type(method.at_density((4, 16, 16), 0.3)) is type(method)


# ----------------------------------------------------------------------------- the summary's density
def test_the_summary_counts_the_dense_steps_beside_the_sparse_calls_density(tmp_path, capsys):
    """Before: with ``--dense-steps 1`` of 2, half the attention calls ran dense, and the summary still said "visited
    density 0.500 of the video attention blocks" (the sparse calls' mean) for the run; a plan's line said both."""
    out = tmp_path / "t.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--method", "tile", "--tile", "1,8,8", "--window",
                 "1,1,1", "--dense-steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("visited density 0.500 of the video attention blocks in its sparse calls; 0.750 with its 4 dense calls "
            "counted as 1") in printed, printed


# ----------------------------------------------------------------------------- a plan for another model class
def test_a_plan_for_another_transformer_class_is_refused_before_loading(tmp_path, capsys):
    """Before: tiny-shapes-63's plan (calibrated for WanTransformer3DModel) given with a FLUX folder printed "it runs"
    and loaded the model; apply then refused the class."""
    from dit_accel.models.tiny_shapes import shapes_model

    plan = shapes_model("tiny-shapes-63").plan
    assert main(["generate", "--model", str(_folder(tmp_path)), "--plan", str(plan), "--out",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert (f"--plan {plan} was calibrated for WanTransformer3DModel (tiny-shapes-63); the transformer of "
            f"{tmp_path / 'FluxPipeline'} is FluxTransformer2DModel") in err, err
    assert "lacks the component folder" not in err and "it runs" not in err
