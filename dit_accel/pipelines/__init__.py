"""Where dit_accel plugs into Diffusers: :func:`apply`, per-model presets, tiny pipelines.

``apply(pipe, method)`` wraps the attention processors of the supported
transformer classes (:data:`SUPPORTED`) and returns an :class:`AccelHandle`
whose ``remove()`` restores the pipeline exactly. See ``apply.py`` for the API,
``processor.py`` for the mechanism and ``presets.py`` for per-model data.
"""

from .apply import AccelHandle, apply
from .presets import PRESETS, SUPPORTED, Preset, preset_for, recommended

__all__ = ["apply", "AccelHandle", "PRESETS", "SUPPORTED", "Preset", "preset_for", "recommended"]
