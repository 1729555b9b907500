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
