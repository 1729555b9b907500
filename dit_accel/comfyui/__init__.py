"""dit_accel inside ComfyUI: every method and calibrated plan as a node on ComfyUI's own video models.

- :func:`patch_model` (``dit_accel.comfyui.patch_model(model, method, **options)``): a clone of a ComfyUI
  ``ModelPatcher`` whose video self-attention runs a dit_accel method or :class:`~dit_accel.SparsePlan`.
- ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``: the nodes (one per method, a plan node).
- ``python -m dit_accel.comfyui install /path/to/ComfyUI``: writes the ``custom_nodes`` folder that loads them.

Nothing here imports ComfyUI at import time (the nodes only receive its objects); attributes load lazily,
so ``python -m dit_accel.comfyui install`` runs without torch being imported first. See docs/comfyui.md.
"""

from __future__ import annotations

__all__ = ["patch_model", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name):
    if name == "patch_model":
        from .patch import patch_model

        return patch_model
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module 'dit_accel.comfyui' has no attribute {name!r}")
