"""The per-call context: what a transformer call's attention layers need to know.

The transformer's forward pre-hook builds one :class:`CallContext` per call (the
token grid and text length read from the inputs, the denoising step, and the plan
each attention layer runs at this step) and pushes it on a per-thread stack that
the post-hook pops. Two threads calling one applied transformer at two resolutions
therefore never see each other's grid, and nothing is shared between calls
except immutable plans.

One exception: gradient checkpointing recomputes attention layers during the
backward pass, after the forward has returned and, on CUDA, in autograd's own
thread. A layer that finds no context of its own thread during a backward pass
then uses the context of the most recent call (the forward being differentiated);
outside a backward pass it finds none and runs dense, with a warning.

:class:`CallGate` and :class:`CallRecord` track the calls in flight so that
``remove()`` waits for them (see there).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch._dynamo  # noqa: F401  (loaded with the pipelines, as before: mark_static_address is looked up on it)

from ..kernels.request import tracing  # (re-exported: the one thread-local check, below the pipelines)

__all__ = ["transformers_of", "CallContext", "ContextStack", "CallRecord", "CallGate", "call_is_running", "calling_pipeline",
           "lasting_tensors", "tracing", "run_eagerly"]


def run_eagerly(fn, reason: str):
    """``fn`` under ``torch.compiler.disable``: a graph break in compiled code, whose ``reason`` the error of
    ``fullgraph=True`` shows (torch before 2.8 takes no reason)."""
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:
        return torch.compiler.disable(fn)


@dataclass(frozen=True)
class CallContext:
    """One transformer call.

    Attributes:
        grid: video/image token grid after patchify.
        num_text: text tokens the transformer received (upper bound per attention call).
        step, total: denoising step and number of steps (total None when unknown).
        plans: per attention-layer index, the plan it runs (None: dense by the schedule).
        additive_ok: the call's float square masks may run sparse (``Preset.additive_mask`` said so).
        num_after: of ``num_text``, the tokens after the grid in a text-first sequence ([text, grid, after]:
            reference images in mid-sequence); they are moved into the text slot around the sparse call.
    """

    grid: Tuple[int, ...]
    num_text: int
    step: int
    total: Optional[int]
    plans: tuple
    additive_ok: bool = False
    num_after: int = 0

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
        if stack:
            return stack[-1]
        # Only a backward pass recomputing layers may borrow the last call's context: a layer of a call
        # that began before apply() (or after remove() in another thread) must not run another call's grid.
        if tracing() or torch._C._current_graph_task_id() != -1:
            return self._last
        return None


_MAX_FRAMES = 64  # pipelines call their transformer about 10 frames up (more under offload hooks)

#: The pipeline attributes that hold a transformer apply() wraps: Wan 2.2 A14B's second (low-noise) expert, MiniMax-H3's
#: ref2va model, Ideogram 4's unconditional pass. A pipeline making a call through any of them gives its step.
TRANSFORMER_ATTRS = ("transformer", "transformer_2", "transformer_ref", "unconditional_transformer")


def transformers_of(pipe, attrs: Tuple[str, ...] = TRANSFORMER_ATTRS) -> List[Tuple[str, torch.nn.Module]]:
    """``[(attribute, transformer)]`` of the pipeline attributes ``attrs`` that hold a module, in that order; one
    module under two names (``transformer_2 = transformer``, sharing the weights) once, under its first name."""
    found: List[Tuple[str, torch.nn.Module]] = []
    for attr in attrs:
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module) and not any(module is m for _, m in found):
            found.append((attr, module))
    return found


def calling_pipeline(transformer) -> Tuple[Optional[object], Optional[object]]:
    """``(frame, pipeline)`` of the innermost pipeline ``__call__`` on this thread's stack that uses
    ``transformer`` (under one of :data:`TRANSFORMER_ATTRS`, possibly wrapped by ``torch.compile``) and has
    a ``scheduler``; ``(None, None)`` for a call no pipeline makes.

    The pipeline making a call is on the calling thread's stack for exactly as long as its call runs,
    whatever other pipelines sharing the transformer and other threads do (see :class:`~.schedule.StepSource`
    and :class:`CallGate`). Only frames whose first argument is ``self`` are looked at, and of those one
    attribute dict each (microseconds per transformer call).
    """
    from torch import nn

    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            attrs = None if owner is None or isinstance(owner, nn.Module) else getattr(owner, "__dict__", None)
            if attrs is not None and attrs.get("scheduler") is not None:
                for name in TRANSFORMER_ATTRS:  # (Ideogram 4's unconditional pass too: its own step, not 0)
                    module = attrs.get(name)
                    if module is not None and (module is transformer
                                               or getattr(module, "_orig_mod", None) is transformer):
                        return frame, owner
        frame = frame.f_back
    return None, None


class CallRecord:
    """One transformer call in flight: the thread that makes it, the frame of the call (to tell a call that
    is still running from one an interrupt cut short), the pipeline call it belongs to and what its
    pre-hook pushed."""

    __slots__ = ("thread", "frame", "pipeline", "owner", "owner_name", "pushed", "admitted", "delegated")

    def __init__(self, frame, pipeline_frame=None, pipeline=None) -> None:
        self.thread = threading.get_ident()
        self.frame = frame
        self.pipeline = None if pipeline_frame is None else id(pipeline_frame)
        self.owner = None if pipeline is None else id(pipeline)  # the pipeline object making the call
        self.owner_name = type(pipeline).__name__
        self.pushed = False  # the context and every layer's plan are on this thread's stacks
        self.admitted = False  # counted by the CallGate
        self.delegated = False  # begun by the handle this one replaced (see TransformerHook._pre_forward)


def _on_stack(frame, top) -> bool:
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


def _frame_id_on_stack(frame_id: int, top) -> bool:
    while top is not None:
        if id(top) == frame_id:
            return True
        top = top.f_back
    return False


def call_is_running(record: CallRecord) -> bool:
    """Whether ``record``'s call is still on its thread's stack (False once the thread ended, or when an
    exception that skips forward hooks, such as KeyboardInterrupt, cut the call short)."""
    mine = record.thread == threading.get_ident()
    top = sys._getframe() if mine else sys._current_frames().get(record.thread)
    if record.frame is None:  # the call's frame was not found: running while its thread runs (and not in this one)
        return top is not None and not mine
    return _on_stack(record.frame, top)


class CallGate:
    """The calls in flight of one ``apply`` handle, so ``remove()`` never changes a call halfway.

    A transformer's pre-hook :meth:`enter` s each call and its post-hook :meth:`leave` s it. :meth:`close`
    (``remove()``) first stops new calls (they wait until the removal ends, then run the original
    model), then waits for the calls in flight, then lets the caller take the hooks away, so every call
    runs wholly with or wholly without dit_accel.

    A call is a transformer call, and a pipeline call is one too: a pipeline call that has made a
    transformer call of this handle is in flight until its ``__call__`` returns (its frame leaves its
    thread's stack, which :meth:`close` checks every 50 ms), and its later transformer calls are admitted
    while ``remove()`` waits, so a whole denoising run is sparse or a whole run is not. A thread already
    inside a call of this handle is never made to wait (a nested call would deadlock); ``remove()`` from
    inside one of this handle's transformer calls is refused, and from inside the thread's own pipeline
    call (a ``callback_on_step_end``) it does not wait for that pipeline call: its remaining steps run
    the original model, as asked.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: dict = {}  # id(record) -> record
        self._pipelines: dict = {}  # thread ident -> id of the frame of its last pipeline call of this handle
        self._owners: dict = {}  # id of a pipeline object -> (thread, frame id) of its call in flight
        self._clashed: set = set()  # (thread, frame id) of pipeline calls another thread's call of the object broke
        self._closing = False
        self.closed = False

    def enter(self, record: CallRecord) -> bool:
        """Admit a call (True), or say that the handle was removed meanwhile (False: run the original model)."""
        with self._cond:
            mine = any(r.thread == record.thread for r in self._calls.values()) or (
                record.pipeline is not None and self._pipelines.get(record.thread) == record.pipeline)
            while self._closing and not self.closed and not mine:
                self._cond.wait()
            if self.closed:
                return False
            if record.owner is not None:
                self._one_thread_per_pipeline(record)
            self._calls[id(record)] = record
            if record.pipeline is not None:
                self._pipelines[record.thread] = record.pipeline
            record.admitted = True
            return True

    def _one_thread_per_pipeline(self, record: CallRecord) -> None:
        """RuntimeError when the pipeline object making ``record``'s call is inside a call in another thread
        (its scheduler's per-call state is shared: both runs would be wrong, or end in an IndexError); the
        other call gets the same error at its next transformer call."""
        mine = (record.thread, record.pipeline)
        held = self._owners.get(record.owner)
        clash = mine in self._clashed
        if not clash and held is not None and held[0] != record.thread:
            clash = _frame_id_on_stack(held[1], sys._current_frames().get(held[0]))
            if clash:
                self._clashed.add(held)
        if clash:
            self._clashed.discard(mine)
            raise RuntimeError(f"dit_accel: one {record.owner_name} object is being called from two threads at once; "
                               "its scheduler keeps the state of one call, so both runs would be wrong. Give each "
                               "thread its own pipeline (the same components with its own scheduler, e.g. "
                               f"{record.owner_name}(**{{**pipe.components, 'scheduler': type(pipe.scheduler)"
                               ".from_config(pipe.scheduler.config)})), or call it from one thread at a time")
        self._owners[record.owner] = mine

    def leave(self, record: CallRecord) -> None:
        with self._cond:
            if self._calls.pop(id(record), None) is not None:
                self._cond.notify_all()

    def close(self, what: str) -> bool:
        """Wait for the calls in flight and keep new ones out; False when the handle was removed already.

        The caller removes the hooks, then calls :meth:`finish`. RuntimeError when this thread is inside a
        call of the handle (``what`` names the operation).
        """
        with self._cond:
            while self._closing and not self.closed:  # another thread is removing: wait for it to finish
                self._cond.wait()
            if self.closed:
                return False
            self._closing = True
            try:
                while True:
                    for key, record in list(self._calls.items()):
                        if not call_is_running(record):  # cut short (KeyboardInterrupt, a dead thread)
                            del self._calls[key]
                        elif record.thread == threading.get_ident():
                            raise RuntimeError(f"dit_accel: {what} was called inside a transformer call of this "
                                               "handle (e.g. from an attention processor or a forward hook); call "
                                               "it between transformer calls")
                    frames = sys._current_frames()
                    for thread, frame_id in list(self._pipelines.items()):
                        if thread == threading.get_ident() or not _frame_id_on_stack(frame_id, frames.get(thread)):
                            del self._pipelines[thread]  # returned (or this thread's own, which it removes from)
                    del frames
                    if not self._calls and not self._pipelines:
                        return True
                    # woken by leave(); the timeout re-checks pipeline calls and calls cut short
                    self._cond.wait(0.05 if self._pipelines else 0.5)
            except BaseException:
                self._closing = False
                self._cond.notify_all()
                raise

    def finish(self) -> None:
        """The hooks are gone: calls waiting in :meth:`enter` run the original model."""
        with self._cond:
            self._pipelines.clear()
            self.closed = True
            self._closing = False
            self._cond.notify_all()

    def reopen(self) -> None:
        """Undo :meth:`close` (apply() restoring a handle it had begun to replace)."""
        with self._cond:
            self.closed = self._closing = False
            self._cond.notify_all()


_NO_SCOPE = contextlib.nullcontext()


@contextlib.contextmanager
def _normal_mode():
    with torch.inference_mode(False), torch.no_grad():
        yield


def lasting_tensors():
    """Where dit_accel builds what outlives the call (plans, their device layouts, permutations and masks, made on
    first use): outside ``torch.inference_mode``, under ``no_grad`` (nothing is recorded either way). Built inside,
    they would be inference tensors, which a later call that records a backward cannot save ("Inference tensors
    cannot be saved for backward": fine-tuning after a preview generated under inference_mode)."""
    if tracing() or not torch.is_inference_mode_enabled():
        return _NO_SCOPE
    return _normal_mode()
