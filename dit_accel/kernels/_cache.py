"""An explicit cache of values derived from a layout (device copies, backend plans, block masks).

Each owner (a backend module, a plan) holds its own :class:`LayoutCache`. Entries
are keyed by the layout object and a key of the owner's choosing, and they go
when the layout goes (weak reference), so nothing is written onto the layout.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable, TypeVar

__all__ = ["LayoutCache"]

T = TypeVar("T")


class LayoutCache:
    """``get(layout, key, build)``: ``build()`` once per (layout, key), then the stored value."""

    def __init__(self) -> None:
        self._entries: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, layout: object, key: Hashable, build: Callable[[], T]) -> T:
        slot = self._entries.get(layout)
        if slot is not None and key in slot:
            return slot[key]
        value = build()  # outside the lock: builds may be slow; a racing duplicate build is harmless
        with self._lock:
            return self._entries.setdefault(layout, {}).setdefault(key, value)

    def entries(self, layout: object) -> dict:
        """``{key: value}`` held for ``layout`` (a copy; for inspection and tests)."""
        return dict(self._entries.get(layout, {}))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
