"""dit_accel.kernels.interpreter: Triton's interpreter patches the language once per launch, not again at every
call of a @triton.jit helper inside it, and leaves the language as it found it; it builds no overflow check that
device_assert would throw away, keeps numpy's dtype per Triton dtype name, and keeps the checked parts of a shape,
with the same answers and the same errors."""
import dataclasses
import inspect
import threading

import pytest
import torch
import triton
import triton.language as tl

from dit_accel.kernels.interpreter import np_dtypes_by_name, patch_language_once_per_launch, speed_up_interpreter
from dit_accel.kernels.interpreter import shapes_kept, skip_discarded_overflow_checks
from dit_accel.kernels.request import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="Triton's interpreter only (TRITON_INTERPRET=1)")


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _doubling_kernel(x_ptr, out_ptr, CALLS: tl.constexpr):
    offs = tl.arange(0, 16)
    x = tl.load(x_ptr + offs)
    for _ in tl.static_range(CALLS):
        x = _twice(x)
    tl.store(out_ptr + offs, x)


def _kernels():
    return _doubling_kernel


def _walks(monkeypatch, run) -> int:
    """How many inspect.getmembers walks ``run`` makes."""
    count, real = [0], inspect.getmembers

    def counting(obj, *a, **k):
        count[0] += 1
        return real(obj, *a, **k)

    monkeypatch.setattr(inspect, "getmembers", counting)
    run()
    monkeypatch.setattr(inspect, "getmembers", real)
    return count[0]


def test_helpers_called_inside_a_launch_walk_the_language_no_more_and_compute_the_same(monkeypatch):
    assert patch_language_once_per_launch()  # (tests/conftest.py applied it already: once per process)

    kernel, x = _kernels(), torch.arange(16, dtype=torch.float32)
    outs, walks = {}, {}
    for calls in (1, 6):
        out = torch.empty_like(x)
        walks[calls] = _walks(monkeypatch, lambda: kernel[(3,)](x, out, CALLS=calls))
        outs[calls] = out
    assert walks[1] == walks[6] > 0  # the launch's own walks alone (before: 4 more per helper call)
    assert torch.equal(outs[1], x * 2) and torch.equal(outs[6], x * 64)
    assert getattr(tl.load, "__triton_builtin__", False)  # the language restored after the launch


def test_a_launch_in_another_thread_during_one_patches_for_itself(monkeypatch):
    """The skip is per thread: a launch started in another thread walks the language itself."""
    patch_language_once_per_launch()

    kernel, x = _kernels(), torch.arange(16, dtype=torch.float32)
    out = torch.empty_like(x)
    result = {}

    def other():
        other_out = torch.empty_like(x)
        kernel[(1,)](x, other_out, CALLS=2)
        result["out"] = other_out

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    kernel[(1,)](x, out, CALLS=3)
    assert torch.equal(result["out"], x * 4) and torch.equal(out, x * 8)


@triton.jit
def _int_kernel(x_ptr, out_ptr, ADD: tl.constexpr):
    offs = tl.arange(0, 8)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, (x + ADD) * 3 - offs)


def _casts_to_int64(monkeypatch, run) -> int:
    """How many casts to int64 ``run`` builds (the overflow check's first step; the kernel has none of its own)."""
    from triton.language.semantic import TritonSemantic

    count, real = [0], TritonSemantic.cast

    def counting(self, value, dst_ty, *a, **k):
        count[0] += dst_ty == tl.int64
        return real(self, value, dst_ty, *a, **k)

    monkeypatch.setattr(TritonSemantic, "cast", counting)
    run()
    monkeypatch.setattr(TritonSemantic, "cast", real)
    return count[0]


def test_overflow_checks_are_built_only_when_device_assert_keeps_them(monkeypatch):
    """With the options' debug off (the interpreter's own) the int32 + - * build no 64-bit check, and an overflowing
    sum wraps as before; with debug on the check is built and an overflow raises, as triton's own check does."""
    from triton.runtime import interpreter

    assert speed_up_interpreter() and skip_discarded_overflow_checks()  # applied once; again changes nothing
    builder = interpreter.interpreter_builder
    assert not builder.options.debug
    x = torch.arange(8, dtype=torch.int32)
    out = torch.empty_like(x)
    assert _casts_to_int64(monkeypatch, lambda: _int_kernel[(1,)](x, out, ADD=5)) == 0
    assert torch.equal(out, (x + 5) * 3 - torch.arange(8, dtype=torch.int32))
    big = torch.full((8,), 2**31 - 2, dtype=torch.int32)
    _int_kernel[(1,)](big, out, ADD=5)  # wraps, unchecked, as it did before
    want = ((big.long() + 5 + 2**31) % 2**32 - 2**31) * 3 - torch.arange(8)
    assert torch.equal(out.long(), (want + 2**31) % 2**32 - 2**31)

    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    assert _casts_to_int64(monkeypatch, lambda: _int_kernel[(1,)](x, out, ADD=5)) > 0
    assert torch.equal(out, (x + 5) * 3 - torch.arange(8, dtype=torch.int32))
    with pytest.raises(Exception, match="int32 overflow detected"):
        _int_kernel[(1,)](big, out, ADD=5)


def test_numpy_dtypes_by_name_answer_as_the_table_does():
    """Every Triton dtype, alone, in a block and behind a pointer: the same numpy dtype as triton's own table; an
    unknown one raises as it did, and is not kept."""
    from triton.runtime import interpreter

    assert np_dtypes_by_name()
    fast = interpreter._get_np_dtype
    table = fast.__wrapped__
    dtypes = [v for v in vars(tl).values() if isinstance(v, tl.dtype) and not isinstance(v, tl.pointer_type)]
    assert len(dtypes) >= 15
    for dt in dtypes:
        forms = [dt, tl.pointer_type(dt), tl.block_type(dt, [4, 2]), tl.block_type(tl.pointer_type(dt), [4])]
        for form in forms:
            try:
                want = table(form)
            except KeyError:
                with pytest.raises(KeyError):
                    fast(form)
                with pytest.raises(KeyError):  # (again: not kept)
                    fast(form)
                continue
            assert fast(form) == want and fast(form) == want, form


def _state(value) -> dict:
    """Every attribute of a block type or tensor, the shape's language tuple as (its values, its type)."""
    from triton.language import core

    out = {}
    for name, item in vars(value).items():
        if type(item) is core.tuple:
            item = ([(type(v), getattr(v, "value", v)) for v in item.values], item.type)
        elif type(item) is core.constexpr:
            item = (core.constexpr, item.value)
        out[name] = item
    return out


@pytest.mark.parametrize("shape", [[4, 2], [tl.constexpr(16)], (tl.constexpr(8), 2), [1, 64, 32]],
                         ids=["list", "constexpr", "language-tuple", "three"])
def test_kept_shapes_build_the_types_and_tensors_triton_builds(shape):
    """A block type and a tensor made through the kept shapes, first and second time, equal Triton's own in every
    attribute (its shape a language tuple of its own, not one shared by two types)."""
    from triton.language import core

    assert shapes_kept() and shapes_kept()  # applied once; again changes nothing
    shape = core.tuple(list(shape)) if type(shape) is tuple else shape
    for dt in (tl.float32, tl.pointer_type(tl.float16), tl.int1):
        want = object.__new__(tl.block_type)
        tl.block_type.__init__.__wrapped__(want, dt, shape)
        for _ in range(2):
            got = tl.block_type(dt, shape)
            assert _state(got) == _state(want) and got == want and str(got) == str(want)
            assert got.shape is not tl.block_type(dt, shape).shape
            want_t = object.__new__(tl.tensor)
            tl.tensor.__init__.__wrapped__(want_t, "handle", want)
            got_t = tl.tensor("handle", got)
            assert _state(got_t) == _state(want_t) and got_t.shape is not tl.tensor("handle", got).shape
    scalar = object.__new__(tl.tensor)
    tl.tensor.__init__.__wrapped__(scalar, None, tl.float32)
    assert _state(tl.tensor(None, tl.float32)) == _state(scalar) and tl.tensor(None, tl.float32).shape == ()


@pytest.mark.parametrize("shape, error", [([3, 4], ValueError), ([True, 4], None), ([2.0, 4], TypeError),
                                          ((4, 2), AssertionError), ([1 << 21], ValueError)])
def test_shapes_triton_refuses_or_reads_otherwise_take_its_own_path(shape, error):
    """Not a power of two, past the element limit, a float, a Python tuple (Triton asserts a list or language
    tuple): the same error as before, twice (nothing kept); a bool, which Triton reads as 1, kept apart from 1."""
    assert shapes_kept()
    for _ in range(2):
        if error is None:
            want = object.__new__(tl.block_type)
            tl.block_type.__init__.__wrapped__(want, tl.float32, shape)
            assert _state(tl.block_type(tl.float32, shape)) == _state(want)
            assert str(tl.block_type(tl.float32, [1, 4])) != str(want)
        else:
            with pytest.raises(error):
                tl.block_type(tl.float32, shape)
