"""``dit-accel bench fidelity``'s reading of a capture folder: every bad file is refused naming it (never a raw
error, nan rows or a wrong average), files load with ``weights_only=True`` (a shared file cannot run code), and the
per-head files of a context-parallel capture are one capture of their (layer, step), not extra steps."""
import math

import pytest
import torch

import dit_accel
from dit_accel.cli.main import main
from dit_accel.eval.fidelity import bench_fidelity

GRID = (2, 4, 8)
METHODS = {"dense": dit_accel.Dense(), "tile": dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))}


def _capture(grid=GRID, heads=2, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, math.prod(grid), 8, generator=g) for _ in range(3))
    return {"q": q, "k": k, "v": v, "grid": grid, "layer": 0, "layer_name": "blocks.0.attn1", "step": 0, **extra}


def _folder(tmp_path, files):
    folder = tmp_path / "cap"
    folder.mkdir(parents=True)
    for name, data in files.items():
        torch.save(data, folder / name)
    return folder


def _refused(folder, capsys) -> str:
    assert main(["bench", "fidelity", "--capture", str(folder), "--methods", "tile"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1].rpartition("\r")[2]  # (after tqdm's progress bar)
    assert line.startswith("dit-accel bench fidelity: ")
    return line


def _with(**changes):
    data = _capture()
    data.update(changes)
    return data


def _nan_q():
    data = _capture()
    data["q"][0, 0, 3, 1] = float("nan")
    return data


class _Payload:  # what a shared pickle could do when loaded with weights_only=False
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("make, says", [
    (lambda: _with(grid=(2, 4, 9)), "has grid (2, 4, 9) (72 tokens) but its q, k, v hold 64 tokens"),
    (lambda: _with(grid=("a", 4, 8)), "has grid ('a', 4, 8), not a tuple of positive ints"),
    (lambda: _with(grid=(2.0, 4, 8)), "has grid (2.0, 4, 8), not a tuple of positive ints"),
    (lambda: _with(step="0"), "has step '0', not an int"),
    (_nan_q, "its q holds NaN or inf values"),
], ids=["grid-vs-tokens", "grid-str", "grid-float", "step-str", "nan-q"])
def test_a_bad_file_is_refused_naming_it(tmp_path, capsys, make, says):
    folder = _folder(tmp_path, {"layer000_step000.pt": _capture(), "layer000_step001.pt": make()})
    err = _refused(folder, capsys)
    assert f"{folder / 'layer000_step001.pt'}: {says}" in err


def test_a_pickle_of_other_objects_is_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = _folder(tmp_path, {"layer000_step000.pt": _with(note=_Payload(str(marker)))})
    err = _refused(folder, capsys)
    assert "layer000_step000.pt: holds objects other than tensors and plain types" in err
    assert not marker.exists()
    torch.load(folder / "layer000_step000.pt", weights_only=False)  # (the payload is real: it runs when trusted)
    assert marker.exists()


def test_two_grids_in_one_layer_are_refused(tmp_path, capsys):
    folder = _folder(tmp_path, {"layer000_step000.pt": _capture(), "layer000_step001.pt": _capture(grid=(3, 4, 8))})
    assert ("layer 0 was captured on grid (2, 4, 8) in layer000_step000.pt and on grid (3, 4, 8) in "
            "layer000_step001.pt: two runs in one folder" in _refused(folder, capsys))


def _split(data, bounds):
    return {f"layer000_step000_heads{a}-{b}.pt": {**data, "q": data["q"][:, a:b].clone(),
                                                  "k": data["k"][:, a:b].clone(), "v": data["v"][:, a:b].clone(),
                                                  "heads": (a, b)} for a, b in bounds}


def test_head_files_are_one_capture_of_their_step(tmp_path):
    whole = _capture(heads=4)
    one = bench_fidelity(_folder(tmp_path / "one", {"layer000_step000.pt": whole}), METHODS, log=lambda _: None)
    cp = bench_fidelity(_folder(tmp_path / "cp", _split(whole, [(0, 2), (2, 4)])), METHODS, log=lambda _: None)
    assert cp["files"] == 2 and [s["steps"] for s in cp["per_layer"]] == [1, 1]
    assert [r["heads"] for r in cp["rows"]] == [4, 4]
    for a, b in zip(one["per_layer"], cp["per_layer"]):
        assert a["rel_l2"] == pytest.approx(b["rel_l2"], rel=1e-6) and a["density"] == b["density"]


@pytest.mark.parametrize("files, says", [
    (lambda w: {**_split(w, [(0, 2), (2, 4)]), "layer000_step000.pt": w},
     "layer000_step000.pt and layer000_step000_heads0-2.pt both hold that layer and step"),
    (lambda w: _split(w, [(0, 1), (2, 4)]), "layer000_step000_heads2-4.pt: holds heads 2-4 (2 in q) after heads 0-1"),
    (lambda w: {**_split(w, [(0, 2)]), **_split(_capture(grid=(4, 4, 4), heads=4), [(2, 4)])},
     "layer000_step000_heads2-4.pt: has grid (4, 4, 4)"),
], ids=["whole-and-heads", "gap", "other-run"])
def test_head_files_that_do_not_join_are_refused(tmp_path, capsys, files, says):
    assert says in _refused(_folder(tmp_path, files(_capture(heads=4))), capsys)


def test_plain_captures_still_read(tmp_path):
    folder = _folder(tmp_path, {f"layer000_step00{s}.pt": _capture(seed=s, step=s) for s in range(2)})
    res = bench_fidelity(folder, METHODS, log=lambda _: None)
    assert res["files"] == 2 and [s["steps"] for s in res["per_layer"]] == [2, 2]
