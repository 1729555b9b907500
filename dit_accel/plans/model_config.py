"""Which model a plan was calibrated on, beyond its class, layers and heads: the transformer's config.

Wan 2.1's T2V and I2V 14B transformers are one class (``WanTransformer3DModel``) with the same 40 layers of 40 heads:
a plan calibrated on one ran on the other without a word, though its quality was measured on another model. Their
configs differ (``in_channels`` 16 against 36, ``image_dim``, ``added_kv_proj_dim``). A plan calibrated now records
the config (:func:`model_config`, in ``provenance.model_config``); applying it to a transformer whose config differs
warns, naming the differing entries (:func:`config_differences`). Plans without the record (older ones, FastVideo
strategies) are not compared; a host without a Diffusers config passes the entries it can name as Diffusers names
them, as a mapping (ComfyUI's node: :attr:`dit_accel.comfyui.families.Family.config_keys`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["model_config", "config_differences", "check_model_config"]

_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Optional[Any]:
    """``value`` as JSON writes and reads it back (tuples as lists), or None when it is not plain data (an object,
    a non-finite float): left out of the record."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        if any(isinstance(v, float) and not math.isfinite(v) for v in value):
            return None
        return json.loads(json.dumps(list(value)))
    return None


def model_config(transformer) -> Optional[Dict[str, Any]]:
    """The public entries of ``transformer.config`` (a Diffusers model's; ``_name_or_path``, ``_class_name`` and
    the other ``_``-named ones left out) that are plain data, sorted by name; None for a model without a config.
    ``transformer`` may be such a config itself, a mapping (a host's own entries under Diffusers' names)."""
    config = transformer if isinstance(transformer, Mapping) else getattr(transformer, "config", None)
    if not isinstance(config, Mapping):
        return None
    out = {}
    for key in sorted(config):
        if isinstance(key, str) and not key.startswith("_"):
            value = config[key]
            if value is None or _plain(value) is not None:
                out[key] = value if value is None else _plain(value)
    return out


def config_differences(recorded: Mapping[str, Any], transformer) -> List[str]:
    """``"key: plan's value, this model's value"`` for each entry of ``recorded`` (a plan's
    ``provenance.model_config``) that ``transformer``'s config holds with another value; [] when they agree or the
    transformer has no config. An entry only one side has (a Diffusers version that added a config key) is no
    difference."""
    now = model_config(transformer)
    if now is None:
        return []
    return [f"{key}={recorded[key]!r} in the plan, {now[key]!r} here" for key in sorted(recorded)
            if key in now and now[key] != recorded[key]]


def check_model_config(method, transformer) -> Optional[str]:
    """The warning to give when ``method`` (a SparsePlan, or the method ``SparsePlan.as_method`` makes of one) was
    calibrated on a transformer whose config differs from ``transformer``'s (a model, or the host's entries as a
    mapping: :func:`model_config`), or None; None for any other method."""
    plan = getattr(method, "sparse_plan", method)
    provenance = getattr(plan, "provenance", None)
    if not isinstance(provenance, Mapping) or not hasattr(plan, "_name"):
        return None
    name = plan._name()
    recorded = provenance.get("model_config")
    if not isinstance(recorded, Mapping):
        return None
    differences = config_differences(recorded, transformer)
    if not differences:
        return None
    made_on = provenance.get("model_id")
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
    return (f"{name} was calibrated on another model{f' ({made_on})' if made_on else ''} of this class, layers and "
            f"heads: its transformer's config differs ({shown}). The plan runs, but its quality was measured on that "
            "model: calibrate a plan for this one (dit-accel calibrate)")
