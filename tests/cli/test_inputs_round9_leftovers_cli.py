"""Round-9 input audit, leftovers in ``dit-accel bench layouts`` and ``dit-accel convert``: the faults found, each
with the test that failed before."""

from __future__ import annotations

import json

import pytest

from dit_accel.cli.main import main


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"dit-accel {command}: "), err
    return lines[0]


@pytest.mark.parametrize("given, method", [("TILE", "tile"), ("sta", "tile"), (" Tile , STA ", "tile")])
def test_bench_layouts_takes_method_names_as_the_other_commands_do(given, method, capsys):
    """``--methods TILE`` and ``--methods sta`` were refused; every other command takes any case and the alias."""
    assert main(["bench", "layouts", "--json", "--grids", "tiny", "--methods", given]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and {r["method"] for r in rows} == {method}


def test_bench_layouts_still_refuses_an_unknown_method(capsys):
    assert main(["bench", "layouts", "--grids", "tiny", "--methods", "tile,dense"]) == 2
    assert "--methods takes tile,gna,radial,sla,vsa" in _one_line(capsys, "bench layouts")


@pytest.mark.parametrize("content", [b"hello, this is text\n", bytes(range(256)) * 8], ids=["text", "bytes"])
def test_convert_of_a_non_pickle_pth_says_what_it_is_not_in_one_line(content, tmp_path, capsys):
    """A ``.pth`` torch.load cannot read quoted PyTorch's weights-only advice cut off mid-sentence ("Re-running
    `torch.") or a bare ``KeyError: 101``."""
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == 2
    line = _one_line(capsys, "convert")
    assert f"{path}: not a PyTorch checkpoint that torch.load can read with weights_only=True" in line
    assert "In PyTorch 2.6" not in line and "KeyError: 101" not in line
    assert "save its state dict with torch.save" in line and line.endswith("then convert that file")
    assert not (tmp_path / "out").exists()


def test_bench_gpu_takes_method_names_in_any_case_and_the_sta_alias(tmp_path, capsys):
    """``bench gpu --methods STA,Tile-Fit`` was refused as unknown methods; the names now reach the device check
    (which refuses this CPU), as ``tile,tile-fit`` do, and an unknown name is still refused by name."""
    argv = ["bench", "gpu", "--out", str(tmp_path), "--device", "cpu", "--methods"]
    assert main([*argv, "STA,Tile-Fit"]) == 2
    err = capsys.readouterr().err
    assert "--methods takes" not in err and "bench gpu times GPU kernels" in err
    assert main([*argv, "tile,magic"]) == 2
    assert "--methods takes tile, tile-fit" in capsys.readouterr().err
