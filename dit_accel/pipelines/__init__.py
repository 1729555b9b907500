"""Where dit_accel plugs into Diffusers: :func:`apply`, per-model presets, hooks.

``apply(pipe, method)`` wraps the attention processors of the supported
transformer classes and returns an :class:`AccelHandle` whose ``remove()``
restores the pipeline exactly. Layout: :mod:`.apply` (install / uninstall),
:mod:`.hooks` (the transformer hook, the processor wrapper, SDPA interception),
:mod:`.context` (the per-call context), :mod:`.schedule` (which method, which
step), :mod:`.stats` and :mod:`.capture` (observers), :mod:`.presets` (per-model data).
"""

from .apply import AccelHandle, apply
from .presets import PRESETS, SUPPORTED, GridInfo, Preset, preset_for, recommended, register_preset, unregister_preset

__all__ = ["apply", "AccelHandle", "PRESETS", "SUPPORTED", "Preset", "GridInfo", "preset_for", "recommended",
           "register_preset", "unregister_preset"]
