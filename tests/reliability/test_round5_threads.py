"""Issue 47, threads: what a thread may do with an applied model (docs/reliability.md, "Threads").

- One live handle per model. ``apply()`` from a second thread while another thread's handle is live is a
  RuntimeError naming the fix; it never takes the model from under the other thread's calls.
- Calls from any number of threads go through the live handle; a call that waited while its handle was
  replaced runs wholly under the new one, never half under each.
- One pipeline object called from two threads at once (Diffusers' scheduler keeps per-call state) is a
  RuntimeError from dit_accel while it is applied, not an IndexError from the scheduler.
"""

import threading
import time

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline, build_tiny_transformer, tiny_transformer_inputs

from tests.utils import first_output

from .threads import run_threads

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = (dit_accel.GNA(kernel_size=(2, 3, 3)), dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)))
TIMEOUT = 120


def test_two_threads_each_applying_their_own_method_get_their_own_output_or_a_clear_error():
    model = build_tiny_transformer("wan", seed=1)
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = first_output(model, kwargs)
    alone = []
    for method in METHODS:
        with dit_accel.apply(model, method, backend="torch"):
            alone.append(first_output(model, kwargs))
    assert not torch.equal(alone[0], alone[1]) and not any(torch.equal(a, dense) for a in alone)
    results = {0: [], 1: []}
    refused = {0: [], 1: []}
    start = threading.Barrier(2)

    def worker(i):
        start.wait()
        # Until this thread held a handle 3 times (a fixed number of tries starved one thread on a loaded machine)
        wins, deadline = 0, time.monotonic() + TIMEOUT / 2
        while wins < 3 and time.monotonic() < deadline:
            try:
                handle = dit_accel.apply(model, METHODS[i], backend="torch")
            except RuntimeError as err:
                refused[i].append(str(err))
                time.sleep(0.002)
                continue
            with handle:
                for _ in range(3):
                    results[i].append(first_output(model, kwargs))
            wins += 1
            time.sleep(0.01)  # the other thread's turn

    assert not run_threads(lambda: worker(0), lambda: worker(1), timeout=TIMEOUT)
    for i in (0, 1):
        for k, out in enumerate(results[i]):
            assert torch.equal(out, alone[i]), f"thread {i}, call {k}: not its own method's output"
        for message in refused[i]:
            assert "one live handle" in message and "remove()" in message and "\n" not in message, message
    assert len(results[0]) == len(results[1]) == 9
    assert torch.equal(first_output(model, kwargs), dense)  # both removed: the original model


def test_apply_from_a_second_thread_while_a_handle_is_live_is_refused_and_changes_nothing():
    model = build_tiny_transformer("wan", seed=1)
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    handle = dit_accel.apply(model, METHODS[0], backend="torch")
    first = first_output(model, kwargs)
    errors = run_threads(lambda: dit_accel.apply(model, METHODS[1], backend="torch"), timeout=TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "one live handle" in str(errors[0]) and repr(handle) in str(errors[0])
    assert not handle.removed and torch.equal(first_output(model, kwargs), first)
    # the same thread replacing its own handle stays allowed (with the warning it always had)
    with pytest.warns(dit_accel.DitAccelWarning, match="was removed first"):
        second = dit_accel.apply(model, METHODS[1], backend="torch")
    assert handle.removed
    # another thread may apply once the handle is removed
    second.remove()
    out = {}
    assert not run_threads(lambda: out.setdefault("h", dit_accel.apply(model, METHODS[1], backend="torch")), timeout=TIMEOUT)
    out["h"].remove()


def test_a_call_held_while_its_thread_replaces_the_handle_runs_wholly_under_the_new_one():
    """Thread B calls through the handle while the applying thread replaces it: B's call runs the new
    handle's method from its first layer to its last (not the original processors' half-replaced state)."""
    import warnings

    model = build_tiny_transformer("wan", seed=1)
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    alone = []
    for method in METHODS:
        with dit_accel.apply(model, method, backend="torch"):
            alone.append(first_output(model, kwargs))
    outs, stop, ready, failed, last = [], threading.Event(), threading.Event(), [], []

    def caller():
        try:
            assert ready.wait(TIMEOUT)
            while not stop.is_set():
                outs.append(first_output(model, kwargs))
        except BaseException:
            failed.append(True)
            raise

    def replacer():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                h = dit_accel.apply(model, METHODS[0], backend="torch")  # this thread replaces its own handle
                ready.set()
                for i in range(12):
                    while len(outs) < i + 1 and not failed:  # interleave with the caller's calls
                        time.sleep(0.001)
                    h = dit_accel.apply(model, METHODS[(i + 1) % 2], backend="torch")
            last.append(h)
        finally:
            ready.set()
            stop.set()

    errors = run_threads(caller, replacer, timeout=TIMEOUT)
    assert not errors, errors
    last[0].remove()
    assert len(outs) > 3
    for k, out in enumerate(outs):  # a handle was live throughout: every call is one method's, wholly
        assert any(torch.equal(out, ref) for ref in alone), f"call {k} of {len(outs)}: not a method's output"


CALL = dict(prompt="a cat", num_frames=9, height=64, width=64, max_sequence_length=16, guidance_scale=5.0,
            output_type="latent")


def test_one_pipeline_called_from_two_threads_at_once_is_a_clear_error():
    pipe = build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    reached, go = threading.Event(), threading.Event()

    def pause(p, i, t, kw):
        if i == 0 and threading.current_thread().name == "first":
            reached.set()
            assert go.wait(TIMEOUT)
        return {}

    outs = {}

    def call(name):
        with torch.no_grad():
            outs[name] = pipe(**CALL, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                              callback_on_step_end=pause).frames

    with dit_accel.apply(pipe, METHODS[0], backend="torch"):
        errors = []
        first = threading.Thread(target=lambda: _catch(errors, call, "first"), name="first", daemon=True)
        first.start()
        assert reached.wait(TIMEOUT)
        second = threading.Thread(target=lambda: _catch(errors, call, "second"), name="second", daemon=True)
        second.start()
        second.join(TIMEOUT)
        go.set()
        first.join(TIMEOUT)
        assert not first.is_alive() and not second.is_alive()
    assert errors, "two threads ran one pipeline object at once without an error"
    for err in errors:
        assert isinstance(err, RuntimeError) and "two threads" in str(err) and "\n" not in str(err), repr(err)


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as err:  # surfaced by the test
        errors.append(err)
