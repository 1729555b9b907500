"""The toolchain outputs kept on disk (dit_accel.kernels.tool_runs): a second run of the same tool, flags and input
reads the stored output; anything else runs the tool; failures and damaged entries are never served."""
import os
import shutil
import stat

import pytest

from dit_accel.kernels import tool_runs


@pytest.fixture
def tool(tmp_path, monkeypatch):
    """A stand-in binary that counts its runs, echoes its flags and input, and fails on input "fail"."""
    monkeypatch.setenv("DIT_ACCEL_TOOL_CACHE", str(tmp_path / "cache"))
    counter = tmp_path / "runs"
    counter.write_text("")
    script = tmp_path / "fake-ptxas"
    script.write_text(f"#!/bin/sh\necho run >> {counter}\nlast=$(eval echo \\${{$#}})\n"
                      'if [ "$(cat "$last")" = fail ]; then echo broken >&2; exit 3; fi\n'
                      'echo "flags: $*" | sed "s| /[^ ]*||g"; echo "log: $(cat "$last")" >&2\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), lambda: len(counter.read_text().split())


def test_a_second_run_reads_the_stored_output(tool):
    binary, runs = tool
    first = tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")
    assert first == (0, "flags: -v\n", "log: kernel A\n") and runs() == 1
    assert tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx") == first and runs() == 1


@pytest.mark.parametrize("flags, data, suffix", [(["-v"], b"kernel B", ".ptx"), (["-v", "-O2"], b"kernel A", ".ptx"),
                                                 (["-v"], b"kernel A", ".cubin")])
def test_another_input_flag_or_suffix_runs_the_tool(tool, flags, data, suffix):
    binary, runs = tool
    tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")
    tool_runs.run_tool(binary, flags, data, suffix)
    assert runs() == 2


def test_a_changed_binary_is_another_tool(tool):
    binary, runs = tool
    tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")
    with open(binary, "a") as f:  # an upgraded toolchain: same path, other bytes
        f.write("# another release\n")
    tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")
    assert runs() == 2


def test_the_same_binary_in_another_environment_reads_the_stored_output(tool, tmp_path):
    """A fresh clone's virtual environment holds the same toolchain at another path, written at another time."""
    binary, runs = tool
    first = tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")
    elsewhere = tmp_path / "venv" / "bin" / "ptxas"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(binary, elsewhere)  # a copy: its own modification time
    os.utime(elsewhere, ns=(2, 2))
    assert tool_runs.run_tool(str(elsewhere), ["-v"], b"kernel A", ".ptx") == first and runs() == 1


def test_a_failure_is_reported_and_not_stored(tool):
    binary, runs = tool
    assert tool_runs.run_tool(binary, [], b"fail", ".ptx", check=False) == (3, "", "broken\n")
    with pytest.raises(Exception, match="returned non-zero exit status 3"):
        tool_runs.run_tool(binary, [], b"fail", ".ptx")
    assert runs() == 2 and not list(tool_runs.cache_dir().rglob("*.json"))


def test_a_damaged_entry_is_run_again(tool):
    binary, runs = tool
    tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")
    (entry,) = tool_runs.cache_dir().rglob("*.json")
    entry.write_bytes(b"\xff{not json")
    assert tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")[2] == "log: kernel A\n" and runs() == 2


def test_an_unwritable_cache_only_costs_the_saving(tool, tmp_path, monkeypatch):
    binary, runs = tool
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DIT_ACCEL_TOOL_CACHE", str(blocker / "cache"))  # a folder under a file: cannot be made
    assert tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")[0] == 0
    assert tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx")[0] == 0 and runs() == 2


def test_where_the_outputs_go(monkeypatch, tmp_path):
    monkeypatch.delenv("DIT_ACCEL_TOOL_CACHE", raising=False)
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    assert tool_runs.cache_dir() == tmp_path / "tools"
    monkeypatch.setenv("DIT_ACCEL_TOOL_CACHE", str(tmp_path / "elsewhere"))
    assert tool_runs.cache_dir() == tmp_path / "elsewhere"


def test_an_unwritable_cache_is_said_once_and_the_output_still_comes_back(tool, tmp_path, monkeypatch):
    """``DIT_ACCEL_TOOL_CACHE`` naming a file (or a read-only home): the outputs were dropped without a word, so every
    process ran ptxas and nvdisasm again. One warning names the folder and what to set; the output comes back."""
    import warnings

    from dit_accel import atomic_files

    binary, runs = tool
    not_a_folder = tmp_path / "cache_file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("DIT_ACCEL_TOOL_CACHE", str(not_a_folder))
    monkeypatch.setattr(atomic_files, "_UNWRITABLE", set())
    with pytest.warns(UserWarning, match=f"cannot write its cache in {not_a_folder} \\(a file, not a folder\\): "
                                         "ptxas, nvdisasm and cuobjdump outputs are not kept.*DIT_ACCEL_TOOL_CACHE"):
        assert tool_runs.run_tool(binary, ["-v"], b"kernel A", ".ptx") == (0, "flags: -v\n", "log: kernel A\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per cache folder, whichever key's subfolder failed
        tool_runs.run_tool(binary, ["-v"], b"kernel B", ".ptx")
    assert runs() == 2 and not_a_folder.read_text() == "x"
