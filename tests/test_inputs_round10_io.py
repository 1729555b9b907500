"""Round 10, files: text and JSON a Windows editor saved (a UTF-8 byte-order mark first)."""

import pytest

import dit_accel
from dit_accel.atomic_files import read_json, read_text

BOM = b"\xef\xbb\xbf"


def test_read_text_drops_a_byte_order_mark(tmp_path):
    """Before: the mark stayed on the first line ("\\ufeffa cat"), an invisible character a text encoder sees."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(BOM + "a cat\na dog\n".encode())
    assert read_text(path).splitlines() == ["a cat", "a dog"]


def test_a_json_file_with_a_byte_order_mark_reads(tmp_path):
    """Before: BadFileError ("Unexpected UTF-8 BOM") for a file whose JSON is fine."""
    path = tmp_path / "x.json"
    path.write_bytes(BOM + b'{"a": 1}')
    assert read_json(path) == {"a": 1}


def test_a_plan_saved_by_a_windows_editor_loads_as_the_same_plan(tmp_path):
    plan = dit_accel.SparsePlan((dit_accel.Phase(1, None, default=dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))),))
    path = plan.save(tmp_path / "plan.json")
    path.write_bytes(BOM + path.read_bytes())
    assert dit_accel.SparsePlan.load(path).to_json()["phases"] == plan.to_json()["phases"]


def test_a_mark_inside_the_text_is_kept(tmp_path):
    """Only a leading mark is dropped: one in the middle is the file's own text."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"a" + BOM + b"b")
    assert read_text(path) == "a\ufeffb"


@pytest.mark.parametrize("data", [BOM, BOM + b"  \n"])
def test_a_file_holding_only_the_mark_is_empty_json(tmp_path, data):
    path = tmp_path / "e.json"
    path.write_bytes(data)
    with pytest.raises(dit_accel.atomic_files.BadFileError, match="is empty"):
        read_json(path)
