"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fresh_vsa(monkeypatch):
    """VSA's per-process state as a fresh process has it, for one test: no first-use self-check launches (the tests
    prove the checks apart), no fine-branch templates and no raster-order choices kept from another test."""
    from dit_accel.kernels.vsa import api, fine

    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")
    monkeypatch.setattr(fine, "_TEMPLATES", {})
    monkeypatch.setattr(api, "_RASTER_CHOICES", {})


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """Backend choices as a fresh machine makes them, for one test: an empty cache folder, no autotune or backend
    setting from the environment, and no autotune results kept in memory before or after."""
    from dit_accel.kernels import autotune, backends

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    autotune._MEMORY.clear()
    autotune._LOADED.clear()
    yield
    autotune._MEMORY.clear()
    autotune._LOADED.clear()
