"""Triton's interpreter (``TRITON_INTERPRET=1``: kernels on the CPU) without three costs that change no result.

1. **Repatching at every helper call.** The interpreter patches ``triton.language`` at each launch, and again at
   every call of a ``@triton.jit`` helper inside the kernel: an ``inspect.getmembers`` walk of four modules per call
   (about 0.3 ms), a fifth to two fifths of a kernel's time on the CPU. Inside a launch the language is already
   patched (a helper's walk finds no builtin left to wrap and sets the same wrappers again), so a helper called
   during a launch, from the launching thread, whose modules the launch patched, skips the walk. A launch's own
   patch and restore are unchanged.
2. **Overflow checks thrown away.** Every integer ``+``, ``-`` and ``*`` of 32 bits or fewer is computed again in
   64 bits and compared with the type's bounds, and the result goes to ``device_assert``, which does nothing unless
   the builder's options have ``debug`` on (the interpreter's are built with it off): a fifth of a kernel test's
   time. With ``debug`` off the check is not built; with it on, it is, as before.
3. **The dtype table rebuilt per operation.** The numpy dtype of a Triton dtype is looked up in a table of twenty
   entries built afresh at every splat, cast and load (each entry hashed in Python). Triton dtypes are equal when
   their names are, so the answer is kept per name.

Applied (:func:`speed_up_interpreter`) by ``dit-accel selftest`` on a CPU, by the test suite and by the dry runs of
``docs/scripts``; importing :mod:`dit_accel.kernels` applies nothing and imports no triton.
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


def skip_discarded_overflow_checks() -> bool:
    """Part 2 above; False (nothing changed) when triton's interpreter has no such check."""
    from triton.runtime import interpreter

    semantic = getattr(interpreter, "interpreter_semantic", None)
    check = getattr(semantic, "binary_op_sanitize_overflow_impl", None)
    if check is None or getattr(check, "_skips_discarded", False):
        return check is not None
    builder = semantic.builder

    def checked_only_when_kept(lhs, rhs, binary_op):
        if getattr(builder.options, "debug", True):  # kept by device_assert: build it
            return check(lhs, rhs, binary_op)
        return None

    checked_only_when_kept._skips_discarded = True
    semantic.binary_op_sanitize_overflow_impl = checked_only_when_kept
    return True


def np_dtypes_by_name() -> bool:
    """Part 3 above; False (nothing changed) when triton's interpreter has no ``_get_np_dtype``."""
    from triton.runtime import interpreter

    table = getattr(interpreter, "_get_np_dtype", None)
    if table is None or getattr(table, "_by_name", False):
        return table is not None
    block_type, known = interpreter.tl.block_type, {}

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, block_type) else tt_dtype
        name = getattr(scalar, "name", None)
        if name is None:
            return table(tt_dtype)
        found = known.get(name)
        if found is None:  # (an unknown dtype raises as before, and is not kept)
            found = known[name] = table(scalar)
        return found

    np_dtype._by_name, np_dtype.__wrapped__ = True, table
    interpreter._get_np_dtype = np_dtype
    return True


def speed_up_interpreter() -> bool:
    """All three parts; True when each applied."""
    return all([patch_language_once_per_launch(), skip_discarded_overflow_checks(), np_dtypes_by_name()])
