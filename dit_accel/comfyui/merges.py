"""ComfyUI's model merge nodes and a dit_accel node on their second model.

A merge node (ModelMergeSimple, ModelMergeAdd, ModelMergeSubtract, ModelMergeBlocks and its per-architecture forms)
clones its first MODEL and adds the second's weights: the second's patches and options, dit_accel's among them, are
not carried, so a dit_accel node on ``model2`` alone is dropped and the merged model runs dense attention. ComfyUI
says nothing; :func:`watch_merges` makes each such merge say it in ComfyUI's log, with what to do.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Callable, Optional

LOG = logging.getLogger("dit_accel.comfyui")
_WATCHED = "__dit_accel_watched__"
_NAMES: dict = {}  # node class -> its name in ComfyUI's registry (ModelAdd is "ModelMergeAdd" in a workflow)
_PATCHED_BY: list = []  # patch.patched_by (passed in: this module is below patch.py)
_SEEN: set = set()  # the registry's classes already looked at


def _takes_two_models(function) -> bool:
    """Whether ``function`` has ``model1`` and ``model2`` parameters: read from its signature, so that only such a
    node's ``INPUT_TYPES`` is called (a loader's lists model folders on disk)."""
    try:
        names = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "model1" in names and "model2" in names


def _reads_a_second_model(cls) -> bool:
    try:
        required = cls.INPUT_TYPES().get("required", {})
    except Exception:  # (a node whose inputs cannot be listed here: not a merge this module knows)
        return False
    return tuple(required.get("model1", ())[:1]) == ("MODEL",) == tuple(required.get("model2", ())[:1])


def _dropped_message(node: str, what: str) -> str:
    return (f"dit_accel: {node} merges in the weights of a second model that comes out of a dit_accel node{what}; "
            "ComfyUI keeps the patches and options of the first model alone, so the merged model runs dense "
            "attention. Put the dit_accel node after the merge node (or on model1)")


def _watched(merge):
    @functools.wraps(merge)
    def merge_and_say(self, model1, model2, *args, **kwargs):
        try:
            patched_by = _PATCHED_BY[0]
            what = patched_by(model2)
            dropped = what is not None and patched_by(model1) is None
        except Exception:  # (never in the way of the merge: a MODEL this check cannot read is not said)
            dropped = False
        if dropped:
            LOG.warning(_dropped_message(_NAMES.get(type(self), type(self).__name__), what))
        return merge(self, model1, model2, *args, **kwargs)

    setattr(merge_and_say, _WATCHED, True)
    return merge_and_say


def _watch(name: str, cls) -> None:
    """Wrap ``cls``'s function (where it is defined: the per-architecture merges inherit ModelMergeBlocks') when
    the node takes ``model1`` and ``model2`` MODEL inputs."""
    function = getattr(cls, "FUNCTION", None)
    if not isinstance(function, str):
        return
    owner = next((c for c in getattr(cls, "__mro__", ()) if function in vars(c)), None)
    merge = None if owner is None else vars(owner)[function]
    if not callable(merge) or not _takes_two_models(merge) or not _reads_a_second_model(cls):
        return
    _NAMES[cls] = name
    if not getattr(merge, _WATCHED, False):
        setattr(owner, function, _watched(merge))


def watch_merges(patched_by: Callable[[object], Optional[str]]) -> int:
    """Wrap the function of every node in ComfyUI's registry (``nodes.NODE_CLASS_MAPPINGS``, read only when
    ComfyUI has imported it) that takes ``model1`` and ``model2`` MODEL inputs, once; each class is looked at once
    per process. Returns how many of the registry's nodes are watched. ``patched_by(model)``: what dit_accel node a
    MODEL comes out of (None: none). The merge itself is unchanged."""
    _PATCHED_BY[:] = [patched_by]
    registry = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", None)
    if not isinstance(registry, dict):
        return 0
    for name, cls in list(registry.items()):
        if cls not in _SEEN:
            _SEEN.add(cls)
            _watch(name, cls)
    return sum(1 for cls in registry.values() if cls in _NAMES)
