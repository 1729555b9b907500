"""The triton release floor (issue 46, item 6): an older triton is refused at run time with the reason, and
``dit-accel info`` reports the release, fp32, compile and capture status."""

import pytest
import torch

from dit_accel.kernels import backends


@pytest.fixture
def version(monkeypatch):
    def set_to(v):
        monkeypatch.setattr(backends, "triton_version", lambda: v)
        backends._triton_too_old.cache_clear()

    yield set_to
    backends._triton_too_old.cache_clear()


@pytest.mark.parametrize("v,refused", [("3.5.1", True), ("3.2.0", True), ("3.6.0", False), ("3.9.0", False),
                                       ("3.10.0+git1234", False), ("4.0.0", False), (None, False)])
def test_triton_older_than_the_floor_is_refused_with_the_reason(version, v, refused):
    version(v)
    why = backends.triton_version_reason()
    assert (why is not None) == refused, why
    if refused:
        assert f"triton {v}" in why and "3.6" in why and "backend='torch'" in why
        assert backends.triton_reason(torch.device("cpu")) == why  # before any device question


def test_the_floor_matches_pyproject():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'"triton>=(\d+)\.(\d+); platform_system', text)
    assert floor and tuple(map(int, floor.groups())) == backends.TRITON_FLOOR


def test_info_reports_fp32_compile_and_capture_status(version):
    from dit_accel.cli.info import collect_info

    version("3.5.0")
    status = collect_info("cpu")["kernel_status"]
    assert "older than 3.6" in status["triton"]
    assert "tf32" in status["fp32"] and "3.9e-03" in status["fp32"]
    assert "off by default" in status["warp-specialized forward"]
    assert "eager call" in status["torch.compile"] and "no host sync" in status["CUDA graphs"]


@pytest.mark.parametrize("value, on", [("1", True), ("TRUE", True), ("on", True), ("Yes", True), ("0", False),
                                       ("false", False), ("off", False), ("treu", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """``TRITON_INTERPRET=false`` read as on here (anything but "" and "0") and off by triton: the package then ran
    kernels on the CPU that triton compiled for a GPU ("0 active drivers"), failing the first-use check. Now the two
    agree, and the CPU's reason names the value read as off."""
    from dit_accel.kernels.request import interpreting

    monkeypatch.setattr(backends, "_triton_too_old", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is on
    reason = backends.triton_reason("cpu")
    assert (reason is None) is on
    if not on:
        assert reason.startswith("triton needs a CUDA device")
        assert (f"TRITON_INTERPRET={value!r} is off: triton reads only 1, true, on or yes as on" in reason) is bool(value)
