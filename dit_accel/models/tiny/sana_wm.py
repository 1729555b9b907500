"""SANA-WM and its stage-2 refiner: refused by their presets (see ``pipelines/presets/sana_wm.py``), so no tiny
model."""

from __future__ import annotations

__all__ = ["TRANSFORMERS"]

TRANSFORMERS = ()
