"""HunyuanVideo FramePack has no tiny transformer: its preset refuses the class (no single token grid)."""

__all__ = ["TRANSFORMERS"]

TRANSFORMERS = ()
