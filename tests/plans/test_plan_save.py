"""``SparsePlan.save`` / ``to_tile_strategy(path)`` onto a folder: one ValueError naming the path and the way out,
raised before anything is written (not ``IsADirectoryError`` of a temporary file's name)."""
import os

import pytest

from dit_accel import Phase, SparsePlan, Tile

TILE = Tile(tile=(2, 4, 4), window=(1, 1, 1))


def _plan():
    return SparsePlan((Phase(0, 2, {0: TILE}),), num_layers=1, num_heads=2)


@pytest.mark.parametrize("write, example", [
    (lambda plan, path: plan.save(path), "plan.json"),
    (lambda plan, path: plan.to_tile_strategy(path), "strategy.json"),
], ids=["save", "to_tile_strategy"])
def test_writing_onto_a_folder_names_it_and_writes_nothing(tmp_path, write, example):
    folder = tmp_path / "somefolder"
    folder.mkdir()
    with pytest.raises(ValueError) as err:
        write(_plan(), str(folder))
    noun = "plan's" if example == "plan.json" else "strategy's"
    assert str(err.value) == f"path={str(folder)!r} is a folder; pass the {noun} file name, e.g. {folder / example}"
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["somefolder"]  # no temporary file left


def test_a_name_ending_in_a_separator_or_under_a_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder; pass the plan's file name, e.g. .*new/plan.json"):
        _plan().save(f"{tmp_path}/new/")
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        _plan().save(tmp_path / "afile" / "plan.json")
    assert (tmp_path / "afile").read_text() == "x"


def test_a_file_name_still_saves_and_loads(tmp_path):
    path = _plan().save(tmp_path / "sub" / "plan.json")
    assert SparsePlan.load(path).phases == _plan().phases
