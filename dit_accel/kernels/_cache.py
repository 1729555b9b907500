"""An explicit cache of values derived from a layout (device copies, backend plans, block masks).

Each owner (a backend module) holds its own named :class:`LayoutCache`. Entries live in
the layout's ``derived`` dict under the owner's name, so they go when the layout goes.
Plain dicts with constant keys, so ``torch.compile`` traces the read of a filled entry
(it could not trace a weak-keyed dictionary that garbage collection shrinks).
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Hashable, TypeVar

import torch

from .request import tracing

__all__ = ["LayoutCache", "layout_on", "bounded_get"]

T = TypeVar("T")


class LayoutCache:
    """``get(layout, key, build)``: ``build()`` once per (layout, key), then the stored value."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()

    def get(self, layout, key: Hashable, build: Callable[[], T]) -> T:
        slot = (self.name, key)
        value = layout.derived.get(slot)
        if value is not None:
            return value
        if torch.is_inference_mode_enabled() and not tracing():
            # (kept tensors built as inference tensors: a later call that records a backward could not save them,
            # torch's "Inference tensors cannot be saved for backward" from inside the twin, after one call under
            # torch.inference_mode, a preview or a validation step, on the same layout)
            with torch.inference_mode(False), torch.no_grad():
                value = build()
        else:
            value = build()  # outside the lock: builds may be slow; a racing duplicate build is harmless
        with self._lock:
            return layout.derived.setdefault(slot, value)

    def peek(self, layout, key: Hashable):
        """The stored value for ``(layout, key)``, or None; builds nothing (a traced call's read)."""
        return layout.derived.get((self.name, key))

    def entries(self, layout) -> dict:
        """``{key: value}`` this cache holds for ``layout`` (a copy; for inspection and tests)."""
        return {key[1]: value for key, value in layout.derived.items() if key[0] == self.name}


def bounded_get(table: Dict[Hashable, T], key: Hashable, build: Callable[[], T], limit: int = 1024) -> T:
    """``table[key]``, built by ``build()`` on a miss; the table is emptied first when it holds ``limit``
    entries (the launchers' per-signature argument caches: plain values, cheap to rebuild)."""
    value = table.get(key)
    if value is None:
        if len(table) >= limit:
            table.clear()
        value = table[key] = build()
    return value


# Per-device copies of layouts, so a CPU-built layout moves to the GPU once, not per call.
_ON_DEVICE = LayoutCache("block_sparse.device")


def layout_on(layout, device):
    """``layout`` (a :class:`~dit_accel.kernels.layout.BlockLayout`) on ``device``; the copy is made once per
    (layout, device) and kept while the layout lives."""
    if layout.device == device:
        return layout
    return _ON_DEVICE.get(layout, device, lambda: layout.to(device))
