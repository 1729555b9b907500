"""Sana (``SanaTransformer2DModel``): refused by its preset (see ``pipelines/presets/sana.py``), so no tiny model."""

from __future__ import annotations

__all__ = ["TRANSFORMERS"]

TRANSFORMERS = ()
