"""Round 12, what the records say ran: a ``fit=True`` Tile (the hub presets' default) re-tiles to each call's grid,
and the sidecar and ``handle.summary()`` recorded only the tile as set (``fit: true``), the same for every grid."""

from __future__ import annotations

import json

import pytest
import torch

import dit_accel
from dit_accel.cli.main import main
from dit_accel.patterns.tile import fit_tile

pytestmark = pytest.mark.usefixtures("one_thread")

FIT = dit_accel.Tile(tile=(1, 4, 4), window=(1, 3, 3), fit=True)
SIZES = {(128, 128): (2, 8, 8), (128, 192): (2, 8, 12)}  # tiny-wan, 5 frames: (height, width) -> token grid


@pytest.fixture(scope="module")
def tiny_wan():
    from dit_accel.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, height, width):
    pipe("a cat", num_frames=5, height=height, width=width, max_sequence_length=16, num_inference_steps=1,
         output_type="np", generator=torch.Generator().manual_seed(0))


def test_summary_records_the_fitted_tile_on_each_grid(tiny_wan):
    """Before: ``summary()`` had only ``config`` = {tile: (1, 4, 4), window: (1, 3, 3), fit: True} after calls on
    (2, 8, 8) and (2, 8, 12), which ran tile (1, 8, 8) / window (1, 1, 1) and tile (2, 8, 4) / window (1, 1, 3)."""
    with dit_accel.apply(tiny_wan, FIT) as handle:
        for height, width in SIZES:
            _call(tiny_wan, height, width)
        summary = handle.summary()
        assert summary["config"] == FIT.ran_dict()  # the setting as given stays where other tools read it
        ran = summary["ran_on_grid"]
        assert sorted(ran) == ["2x8x12", "2x8x8"]
        for grid in SIZES.values():
            tile, window = fit_tile(grid, FIT.tile, FIT.window)
            assert tile != FIT.tile  # (the grids re-tile: the record must say so)
            entry = ran["x".join(map(str, grid))]
            assert entry == {"method": "tile", "tile": tile, "window": window}
            # the recorded Tile runs the very pattern that ran: same plan kind and density on that grid
            ran_plan, recorded = handle.plan(FIT, grid), dit_accel.Tile(tile=entry["tile"], window=entry["window"])
            again = recorded.plan(grid)
            assert (again.is_dense, again.density) == (ran_plan.is_dense, ran_plan.density)


@pytest.mark.parametrize("method", [dit_accel.Tile(tile=(1, 4, 4), window=(1, 3, 3)),
                                    dit_accel.GNA(kernel_size=(2, 5, 5))], ids=["tile", "gna"])
def test_a_method_without_fit_records_its_config_on_the_grid(tiny_wan, method):
    with dit_accel.apply(tiny_wan, method) as handle:
        _call(tiny_wan, 128, 128)
        summary = handle.summary()
    assert summary["ran_on_grid"] == {"2x8x8": method.ran_dict()} and summary["config"] == method.ran_dict()


def test_generate_sidecar_records_the_tile_that_ran(tmp_path, capsys):
    """Before: ``generate --fit-grid`` wrote ``"method": {"tile": [1, 4, 4], "window": [1, 3, 3], "fit": true}`` and
    printed ``method tile (tile=(1, 4, 4), window=(1, 3, 3), fit=True)``: nothing said tile (1, 8, 8) ran."""
    out = tmp_path / "a.mp4"
    assert main(["generate", "--model", "tiny-wan", "--method", "tile", "--tile", "1,4,4", "--window", "1,3,3",
                 "--fit-grid", "--height", "128", "--width", "128", "--frames", "5", "--steps", "1",
                 "--no-compare-dense", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    record = json.loads(out.with_name("a.mp4.json").read_text())
    tile, window = fit_tile((2, 8, 8), FIT.tile, FIT.window)
    assert record["method"] == {"method": "tile", "tile": [1, 4, 4], "window": [1, 3, 3], "fit": True}
    assert record["ran_on_grid"] == {"2x8x8": {"method": "tile", "tile": list(tile), "window": list(window)}}
    assert record["provenance"]["run"]["ran_on_grid"] == record["ran_on_grid"]
    assert f"on token grid (2, 8, 8) it ran tile (tile={tile}, window={window})" in printed


def test_summary_records_a_fit_gna_kernel_as_clamped_on_the_grid(tiny_wan):
    """Before (with the record above): a ``fit=True`` GNA (the presets' default) clamped kernel (3, 5, 12) to
    (2, 5, 8) on grid (2, 8, 8) with a note, and the record said (3, 5, 12) ran there."""
    method = dit_accel.GNA(kernel_size=(3, 5, 12), fit=True)
    with pytest.warns(dit_accel.DitAccelWarning, match=r"clamped to \(2, 5, 8\)"):
        with dit_accel.apply(tiny_wan, method) as handle:
            _call(tiny_wan, 128, 128)
            summary, ran_plan = handle.summary(), handle.plan(method, (2, 8, 8))
    entry = summary["ran_on_grid"]["2x8x8"]
    assert summary["config"]["kernel_size"] == (3, 5, 12)
    assert entry == {**method.ran_dict(), "kernel_size": (2, 5, 8)}  # (stride 1, dilation 1 as given)
    again = dit_accel.GNA(kernel_size=entry["kernel_size"], stride=entry["stride"]).plan((2, 8, 8))
    assert again.token_density == pytest.approx(ran_plan.token_density) and ran_plan.token_density < 1


def test_eval_report_names_the_tile_that_ran(tmp_path):
    """Before: the eval report's config column said ``tile=(1, 4, 4), window=(1, 3, 3), fit=True`` only, for a row
    whose summary recorded tile (1, 8, 8) / window (1, 1, 1) on its grid (a row read back from JSON: lists)."""
    from dit_accel.eval.report import write_report

    config = {"label": "tile", **FIT.ran_dict()}
    row = {"label": "tile", "config": config, "density": 0.5, "times": {},
           "summary": {"ran_on_grid": {"2x8x8": {"method": "tile", "tile": [1, 8, 8], "window": [1, 1, 1]}}}}
    same = {"label": "same", "config": {"label": "same", **FIT.ran_dict()}, "density": 0.5, "times": {},
            "summary": {"ran_on_grid": {"2x8x8": {"method": "tile", "tile": [1, 4, 4], "window": [1, 3, 3],
                                                  "fit": True}}}}
    settings = {"repeats": 1, "model": "tiny-wan", "device": "cpu", "dtype": "float32", "frames": 5, "height": 128,
                "width": 128, "steps": 1, "guidance_scale": 5.0, "seeds": [0], "prompts": ["a cat"]}
    write_report({"rows": [row, same], "settings": settings, "versions": {}, "dense_generated": 1,
                  "dense_cached": 0}, tmp_path / "report.md")
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert next(x for x in lines if x.startswith("| tile |")).split(" | ")[1] == (
        "tile=(1, 4, 4), window=(1, 3, 3), fit=True; ran on grid 2x8x8: tile=(1, 8, 8), window=(1, 1, 1)")
    same_line = next(x for x in lines if x.startswith("| same |"))
    assert same_line.split(" | ")[1] == "tile=(1, 4, 4), window=(1, 3, 3), fit=True"
