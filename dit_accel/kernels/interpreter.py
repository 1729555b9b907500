"""Triton's interpreter (``TRITON_INTERPRET=1``: kernels on the CPU) without four costs that change no result.

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
4. **Shapes rebuilt per operation.** Every operation makes a result tensor, and most a block type, whose shape
   Triton turns into a language tuple of constants (a tuple type of constant types per element, each element
   unwrapped and checked to be a power of two): a third of a kernel test's time. The checked parts are kept per
   shape (a tuple of Python ints) and each type or tensor gets its own tuple over them; a shape not seen before,
   or one given in another form, takes Triton's own path, with its checks and errors. Parts 1 to 3 change the
   interpreter alone; this one changes two language classes, which a process compiling for a GPU does not apply
   (compiling refuses to run under the interpreter), and which build the same code where they are (13 shipped
   configurations compiled for sm_90 with and without it, 2026-12-01: the same PTX and cubins).

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


def shapes_kept() -> bool:
    """Part 4 above; False (nothing changed) when this Triton's block type or tensor is not the one it was
    written for (their attributes checked on one of each)."""
    from triton.language import core

    block_type, tensor = core.block_type, core.tensor
    if getattr(block_type.__init__, "_kept", False):
        return True
    probe = block_type(core.float32, [2, 4])
    if (sorted(vars(probe)) != ["element_ty", "name", "numel", "shape"] or type(probe.shape) is not core.tuple
            or sorted(vars(probe.shape)) != ["type", "values"]
            or sorted(vars(tensor(None, probe))) != ["dtype", "handle", "numel", "shape", "type"]):
        return False
    block_init, tensor_init, lang_tuple, constant = block_type.__init__, tensor.__init__, core.tuple, core.constexpr
    blocks, tensors = {}, {}

    def int_shape(shape):
        """``shape`` (a list or a language tuple of ints or constants of ints) as a tuple of Python ints, or None
        where it is anything else (then Triton's own path checks it)."""
        if type(shape) is list:
            items = shape
        elif type(shape) is lang_tuple:
            items = shape.values
        else:
            return None
        ints = []
        for item in items:
            if type(item) is constant:
                item = item.value
            if type(item) is not int:
                return None
            ints.append(item)
        return tuple(ints)

    def copy(kept):  # a language tuple of its own over kept values and their (kept) tuple type
        values, ty = kept
        out = object.__new__(lang_tuple)
        out.values, out.type = list(values), ty
        return out

    def block_init_kept(self, element_ty, shape):
        key = int_shape(shape)
        kept = blocks.get(key) if key is not None else None
        if kept is None:
            block_init(self, element_ty, shape)  # (Triton's checks and errors)
            if key is not None:
                blocks[key] = ((list(self.shape.values), self.shape.type), self.numel, str(self.shape))
            return
        values, self.numel, text = kept
        self.element_ty, self.shape = element_ty, copy(values)
        self.name = f"<{text}, {element_ty}>"

    def tensor_init_kept(self, handle, type):
        key = int_shape(type.shape) if type.is_block() else ()
        kept = tensors.get(key) if key is not None else None
        if kept is None:
            tensor_init(self, handle, type)
            if key is not None:
                tensors[key] = ((list(self.shape.values), self.shape.type), self.numel)
            return
        values, self.numel = kept
        self.handle, self.type, self.dtype, self.shape = handle, type, type.scalar, copy(values)

    block_init_kept._kept = tensor_init_kept._kept = True
    block_init_kept.__wrapped__, tensor_init_kept.__wrapped__ = block_init, tensor_init
    block_type.__init__, tensor.__init__ = block_init_kept, tensor_init_kept
    return True


def speed_up_interpreter() -> bool:
    """All four parts; True when each applied."""
    return all([patch_language_once_per_launch(), skip_discarded_overflow_checks(), np_dtypes_by_name(),
                shapes_kept()])
