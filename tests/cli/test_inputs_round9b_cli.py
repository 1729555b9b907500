"""Round-9b input audit of ``dit-accel convert`` and ``dit-accel info``: the faults found, each with the test that
failed before (a traceback, or a message that did not say what was wrong, where one line belongs)."""

from __future__ import annotations

import pytest
import torch

from dit_accel.cli.main import main


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"dit-accel {command}: "), err
    return lines[0]


def test_convert_out_under_a_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    """``--out afile/sub`` where ``afile`` is a file: NotADirectoryError's traceback from pathlib's mkdir before."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "sla.safetensors"
    save_file({f"blocks.0.self_attn.attn_op.local_attn.proj_l.{p}": torch.zeros((8, 8) if p == "weight" else (8,))
               for p in ("weight", "bias")}, str(checkpoint))
    (tmp_path / "afile").write_text("x")
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "afile" / "sub")]) == 2
    line = _one_line(capsys, "convert")
    assert "afile/sub' lies under" in line and "which is a file; give a folder path" in line
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("path", [".", "/"])
def test_info_plan_of_a_folder_says_it_is_a_folder(path, capsys):
    """``info --plan .``: "PosixPath('.') has an empty name" before (the plan's commit-journal lookup)."""
    assert main(["info", "--plan", path]) == 2
    assert f"{path}: cannot read it: it is a folder; expected a dit_accel sparse plan" in _one_line(capsys, "info")
