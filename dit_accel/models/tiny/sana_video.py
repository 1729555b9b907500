"""Sana-Video: no tiny transformer (its preset refuses the class: linear self-attention)."""

from __future__ import annotations

__all__ = ["TRANSFORMERS"]

TRANSFORMERS = ()
