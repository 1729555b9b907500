"""``apply(..., capture=DIR)`` writes one run per folder, as plain data: a folder that already holds capture files
is refused at ``apply`` (before the model changes or a file is written), so another run's grid or steps are never
mixed in; what is saved loads with ``torch.load(..., weights_only=True)``."""
import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.hooks import SparseAttnProcessor


@pytest.fixture(scope="module")
def wan():
    return T.build_tiny_transformer("wan")


def _capture(model, folder, grid):
    with dit_accel.apply(model, dit_accel.Dense(), capture=folder), torch.no_grad():
        model(**T.tiny_transformer_inputs("wan", model, grid=grid))


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_folder_holding_captures_is_refused_before_the_model_changes(wan, tmp_path):
    folder = tmp_path / "cap"
    _capture(wan, folder, (2, 8, 8))
    before, processors = _snapshot(folder), [getattr(m, "processor", None) for m in wan.modules()]
    assert len(before) == 2  # layer000_step000.pt, layer001_step000.pt
    with pytest.raises(ValueError) as err:
        dit_accel.apply(wan, dit_accel.Dense(), capture=folder)
    assert str(err.value) == (f"capture={str(folder)!r} already holds 2 capture files (layer000_step000.pt, "
                              "layer001_step000.pt); pass an empty folder or remove them")
    assert _snapshot(folder) == before  # nothing written, nothing removed
    assert all(a is b for a, b in zip((getattr(m, "processor", None) for m in wan.modules()), processors))
    assert not any(isinstance(getattr(m, "processor", None), SparseAttnProcessor) for m in wan.modules())


def test_a_head_file_counts_and_other_files_do_not(wan, tmp_path):
    folder = tmp_path / "cap"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    (folder / "layer000_step000.pt.part").write_text("not a capture name")
    _capture(wan, folder, (2, 8, 8))  # other files: accepted
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "layer003_step001_heads0-1.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds 1 capture file \(layer003_step001_heads0-1.pt\)"):
        dit_accel.apply(wan, dit_accel.Dense(), capture=heads)


def test_captures_are_plain_data_that_weights_only_loads(wan, tmp_path):
    _capture(wan, tmp_path / "cap", (2, 8, 8))
    data = torch.load(tmp_path / "cap" / "layer001_step000.pt", weights_only=True)
    assert set(data) == {"q", "k", "v", "grid", "layer", "layer_name", "step"}
    assert data["grid"] == (2, 8, 8) and all(type(g) is int for g in data["grid"])
    assert type(data["layer"]) is int and type(data["step"]) is int and isinstance(data["layer_name"], str)
    assert data["q"].shape[2] == 2 * 8 * 8


def test_capture_saves_ints_of_a_grid_given_as_tensors(tmp_path):
    """The writer casts what it is given (a grid of 0-d tensors, numpy ints) to plain ints."""
    from dit_accel.pipelines.capture import Capture

    cap = Capture(str(tmp_path))
    q = torch.randn(1, 2, 4, 8)
    cap.save(torch.tensor(0), "blocks.0.attn1", (torch.tensor(1), torch.tensor(2), torch.tensor(2)),
             torch.tensor(3), q, q, q, heads=(torch.tensor(0), torch.tensor(2)))
    data = torch.load(tmp_path / "layer000_step003_heads0-2.pt", weights_only=True)
    assert data["grid"] == (1, 2, 2) and data["heads"] == (0, 2) and data["step"] == 3
    assert all(type(x) is int for x in (*data["grid"], *data["heads"], data["layer"], data["step"]))
