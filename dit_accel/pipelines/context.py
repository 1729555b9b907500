"""The per-call context: what a transformer call's attention layers need to know.

The transformer's forward pre-hook builds one :class:`CallContext` per call (the
token grid and text length read from the inputs, the denoising step, and the plan
each attention layer runs at this step) and pushes it on a per-thread stack that
the post-hook pops. Two threads calling one applied transformer at two resolutions
therefore never see each other's grid, and nothing is shared between calls
except immutable plans.

One exception: gradient checkpointing recomputes attention layers during the
backward pass, after the forward has returned and, on CUDA, in autograd's own
thread. A layer that finds no context of its own thread then uses the context of
the most recent call (the forward being differentiated).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["CallContext", "ContextStack"]


@dataclass(frozen=True)
class CallContext:
    """One transformer call.

    Attributes:
        grid: video/image token grid after patchify.
        num_text: text tokens the transformer received (upper bound per attention call).
        step, total: denoising step and number of steps (total None when unknown).
        plans: per attention-layer index, the plan it runs (None: dense by the schedule).
    """

    grid: Tuple[int, ...]
    num_text: int
    step: int
    total: Optional[int]
    plans: tuple

    @property
    def num_video(self) -> int:
        return math.prod(self.grid)


class ContextStack:
    """Per-thread stack of :class:`CallContext` (a transformer may call another one inside its forward);
    each attention layer keeps one of its plans the same way."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._last: Optional[CallContext] = None  # for recomputation in the backward pass

    def push(self, context: CallContext) -> None:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(context)
        self._last = context

    def pop(self) -> None:
        stack = getattr(self._local, "stack", None)
        if stack:
            stack.pop()

    def current(self) -> Optional[CallContext]:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else self._last
