"""Triton's interpreter (``TRITON_INTERPRET=1``: kernels on the CPU) without its repatching on every helper call.

The interpreter patches ``triton.language`` at each launch, and again at every call of a ``@triton.jit`` helper
inside the kernel: an ``inspect.getmembers`` walk of four modules per call (about 0.3 ms), a fifth to two fifths
of a kernel's time on the CPU. Inside a launch the language is already patched (a helper's walk finds no builtin
left to wrap and sets the same wrappers again), so a helper called during a launch, from the launching thread,
whose modules the launch patched, skips the walk. A launch's own patch and restore are unchanged. Applied by
``dit-accel selftest`` on a CPU and by the test suite (importing :mod:`dit_accel.kernels` imports no triton).
"""

from __future__ import annotations

import threading

_applied = []


def patch_language_once_per_launch() -> bool:
    """Apply the change above once per process; False (nothing changed) when triton's interpreter lacks the two
    functions it wraps (another triton version)."""
    if _applied:
        return True
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or not callable(getattr(executor, "__call__", None)):
        return False
    tl, call, launch = interpreter.tl, executor.__call__, threading.local()

    class _Nothing:
        def restore(self) -> None:
            pass

    def langs_of(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_once(fn):
        patched = getattr(launch, "langs", None)
        if patched is None:  # not inside a launch of this thread
            return patch_lang(fn)
        here = langs_of(fn)
        if patched and here <= patched:
            return _Nothing()
        scope = patch_lang(fn)
        patched |= here
        return scope

    def launch_call(self, *args, **kwargs):
        outer, launch.langs = getattr(launch, "langs", None), set()
        try:
            return call(self, *args, **kwargs)
        finally:
            launch.langs = outer

    interpreter._patch_lang = patch_once
    executor.__call__ = launch_call
    _applied.append(True)
    return True
