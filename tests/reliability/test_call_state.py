"""State that belongs to a call: the step, the schedule and the scheduler come from the call or the calling
thread, never from the last caller; ``remove()`` never cuts a call in half; an exception inside a call leaves
nothing behind.

Every case ends in an exact result: a call's output is compared bit for bit with the same call made alone
(dense steps and ``remove()`` run the original processors, which the README promises are bit-identical to
the unwrapped model), or in one clear error.
"""

import threading
import time
import warnings

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline, build_tiny_transformer, tiny_transformer_inputs
from dit_accel.pipelines.hooks import SparseAttnProcessor

from tests.utils import first_output

from .threads import run_threads

pytestmark = pytest.mark.usefixtures("one_thread")

GNA = dit_accel.GNA(kernel_size=(2, 3, 3))
TIMEOUT = 60  # seconds a thread may take before the test calls it stuck (a deadlock would hang forever)


def _threads(*targets):
    """Run each target in its own thread; re-raise the first error; fail on a thread that does not finish."""
    errors = run_threads(*targets, timeout=TIMEOUT)
    if errors:
        raise errors[0]


def _state_is_clean(handle):
    """No per-call state left: context and plan stacks empty in this thread, no call in flight."""
    for hook in handle._hooks:
        assert not getattr(hook._calls, "list", None)
        assert not getattr(hook.stack._local, "stack", None)
        assert all(not getattr(layer.plans._local, "stack", None) for layer in hook.layers)
    assert not handle._gate._calls


class Pause:
    """A forward pre-hook on a block that holds the first call (of ``thread``, if given) until released."""

    def __init__(self, module, action=None):
        self.reached, self.go, self.used = threading.Event(), threading.Event(), False
        self.action = action
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.used:
            return
        self.used = True
        if self.action is not None:
            self.action()
            return
        self.reached.set()
        assert self.go.wait(TIMEOUT)


@pytest.fixture()
def wan():
    model = build_tiny_transformer("wan", seed=1)
    kwargs = tiny_transformer_inputs("wan", model, batch=1)
    dense = first_output(model, kwargs)
    with dit_accel.apply(model, GNA, backend="torch"):
        sparse = first_output(model, kwargs)
    assert not torch.equal(dense, sparse)
    return model, kwargs, dense, sparse


# ------------------------------------------------------------------ set_step
def test_set_step_belongs_to_the_calling_thread(wan):
    model, kwargs, dense, sparse = wan
    handle = dit_accel.apply(model, GNA, dense_steps=1, backend="torch")
    out = {}
    ready = threading.Barrier(2)

    def caller(name, step):
        handle.set_step(step, 2)
        ready.wait()  # both threads have set their step before either calls
        ready.wait()
        out[name] = first_output(model, kwargs)

    _threads(lambda: caller("a", 0), lambda: caller("b", 1))
    assert torch.equal(out["a"], dense) and torch.equal(out["b"], sparse)
    with pytest.raises(ValueError, match="set_step"):  # this thread never set a step: no other thread's
        first_output(model, kwargs)
    _state_is_clean(handle)
    handle.set_step(1, 2)
    assert torch.equal(first_output(model, kwargs), sparse)
    handle.set_step(None)  # back to "no step known"
    with pytest.raises(ValueError, match="set_step"):
        first_output(model, kwargs)
    with pytest.raises(ValueError, match="step=3 is invalid for total=2"):
        handle.set_step(3, 2)
    handle.remove()
    with pytest.raises(RuntimeError, match=r"handle.set_step\(\).*removed"):
        handle.set_step(0, 2)


# ------------------------------------------------------------------ two pipelines, one transformer
CALL = dict(prompt="a cat", num_frames=9, height=64, width=64, max_sequence_length=16, guidance_scale=5.0,
            output_type="latent")


def _generate(pipe, steps):
    with torch.no_grad():
        return pipe(**CALL, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def pipes():
    """Pipeline A and pipeline B built from A's components, with its own scheduler (Diffusers' from_pipe idiom)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    a = build_tiny_pipeline("tiny-wan")
    a.set_progress_bar_config(disable=True)
    b = WanPipeline(**{**a.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(a.scheduler.config)})
    b.set_progress_bar_config(disable=True)
    assert b.transformer is a.transformer and b.scheduler is not a.scheduler
    return a, b


def _counts(handle):
    return [(r["sparse_calls"], r["dense_calls"]) for r in handle.stats()]


def test_a_second_pipeline_sharing_the_transformer_follows_its_own_scheduler(pipes):
    a, b = pipes
    with dit_accel.apply(a, GNA, dense_steps=2, dense_last_steps=1, backend="torch") as handle:
        alone = {4: _generate(a, 4), 5: _generate(a, 5)}
        assert _counts(handle) == [(2 * 1 + 2 * 2, 2 * 3 + 2 * 3)] * 2  # (4 - 3) + (5 - 3) sparse steps, CFG x2
        # A's scheduler now stands at its last step; B's call must not read it.
        before = _counts(handle)
        got = _generate(b, 4)
        after = _counts(handle)
        assert [(s1 - s0, d1 - d0) for (s0, d0), (s1, d1) in zip(before, after)] == [(2, 6)] * 2
        assert torch.equal(got, alone[4])


def test_two_pipelines_in_two_threads_each_read_their_own_scheduler(pipes):
    a, b = pipes
    with dit_accel.apply(a, GNA, dense_steps=2, dense_last_steps=1, backend="torch") as handle:
        alone = {4: _generate(a, 4), 5: _generate(b, 5)}
        out = {}
        _threads(lambda: out.setdefault("a", [_generate(a, 4) for _ in range(2)]),
                 lambda: out.setdefault("b", [_generate(b, 5) for _ in range(2)]))
        assert all(torch.equal(x, alone[4]) for x in out["a"]) and all(torch.equal(x, alone[5]) for x in out["b"])
        # 3 runs of A (4 steps: 1 sparse) and 3 of B (5 steps: 2 sparse), two calls per step
        assert _counts(handle) == [(3 * 2 * 1 + 3 * 2 * 2, 3 * 2 * 3 + 3 * 2 * 3)] * 2
        _state_is_clean(handle)


def test_apply_through_the_second_pipeline_replaces_the_first_handle(pipes):
    a, b = pipes
    first = dit_accel.apply(a, GNA, backend="torch")
    with pytest.warns(dit_accel.DitAccelWarning, match="was removed first"):
        second = dit_accel.apply(b, GNA, dense_steps=4, backend="torch")  # the same transformer
    assert first.removed
    try:
        plain = _generate(a, 4)  # A's call: every step dense under B's handle, read from A's scheduler
        assert _counts(second) == [(0, 8)] * 2
    finally:
        second.remove()
    assert torch.equal(_generate(a, 4), plain)  # dense steps run the original model


def test_remove_during_a_pipeline_call_waits_for_the_whole_denoising_run(pipes):
    """remove() from another thread while a pipeline call is between two denoising steps: the run finishes
    wholly sparse (remove() waits for the pipeline call to return), then the model is the original."""
    a, _ = pipes
    plain = _generate(a, 4)
    with dit_accel.apply(a, GNA, backend="torch"):
        sparse = _generate(a, 4)
    assert not torch.equal(sparse, plain)
    handle = dit_accel.apply(a, GNA, backend="torch")
    reached, go = threading.Event(), threading.Event()

    def pause(pipe, i, t, kwargs):
        if i == 1:
            reached.set()
            assert go.wait(TIMEOUT)
        return {}

    out = {}

    def run():
        with torch.no_grad():
            out["run"] = a(**CALL, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                           callback_on_step_end=pause).frames

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    try:
        assert reached.wait(TIMEOUT)
        remover = threading.Thread(target=handle.remove, daemon=True)
        remover.start()
        time.sleep(0.3)
        assert remover.is_alive() and not handle.removed  # waiting for the pipeline call
    finally:
        go.set()
    for t in (caller, remover):
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert handle.removed and torch.equal(out["run"], sparse)
    assert torch.equal(_generate(a, 4), plain)


def test_remove_from_a_step_callback_makes_the_remaining_steps_dense(pipes):
    """remove() from the pipeline's own callback (its thread, between transformer calls) is the caller's
    choice: the steps after it run the original model, exactly as dense_last_steps would."""
    a, _ = pipes
    with dit_accel.apply(a, GNA, dense_last_steps=2, backend="torch"):
        want = _generate(a, 4)
    handle = dit_accel.apply(a, GNA, backend="torch")

    def remove_after_step_1(pipe, i, t, kwargs):
        if i == 1:
            handle.remove()
        return {}

    with torch.no_grad():
        got = a(**CALL, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                callback_on_step_end=remove_after_step_1).frames
    assert handle.removed and torch.equal(got, want)


# ------------------------------------------------------------------ remove() during a call
def test_remove_waits_for_a_call_in_flight_and_later_calls_run_the_original_model(wan):
    model, kwargs, dense, sparse = wan
    handle = dit_accel.apply(model, GNA, backend="torch")
    pause = Pause(model.blocks[1])  # the call is between its two attention layers
    out = {}
    try:
        caller = threading.Thread(target=lambda: out.setdefault("call", first_output(model, kwargs)), daemon=True)
        caller.start()
        assert pause.reached.wait(TIMEOUT)
        remover = threading.Thread(target=handle.remove, daemon=True)
        remover.start()
        late = threading.Thread(target=lambda: out.setdefault("late", first_output(model, kwargs)), daemon=True)
        time.sleep(0.3)
        late.start()  # starts while remove() waits: runs the original model once the removal is done
        time.sleep(0.3)
        assert remover.is_alive() and late.is_alive() and not handle.removed
        assert isinstance(model.blocks[1].attn1.processor, SparseAttnProcessor)
        pause.go.set()
        for t in (caller, remover, late):
            t.join(TIMEOUT)
            assert not t.is_alive()
    finally:
        pause.go.set()
        pause.handle.remove()
    assert torch.equal(out["call"], sparse)  # wholly sparse: not half sparse, half dense
    assert torch.equal(out["late"], dense)
    assert handle.removed and not model._forward_pre_hooks
    assert torch.equal(first_output(model, kwargs), dense)


def test_remove_inside_a_call_is_refused_and_the_call_finishes_sparse(wan):
    model, kwargs, dense, sparse = wan
    handle = dit_accel.apply(model, GNA, backend="torch")
    errors = []

    def remove_inside():
        try:
            handle.remove()
        except RuntimeError as error:
            errors.append(error)

    pause = Pause(model.blocks[1], action=remove_inside)
    try:
        assert torch.equal(first_output(model, kwargs), sparse)
    finally:
        pause.handle.remove()
    assert len(errors) == 1 and "inside a transformer call" in str(errors[0]) and "\n" not in str(errors[0])
    assert not handle.removed
    _state_is_clean(handle)
    handle.remove()
    handle.remove()  # twice: a no-op
    assert torch.equal(first_output(model, kwargs), dense)


def test_two_threads_removing_at_once_remove_once(wan):
    model, kwargs, dense, _ = wan
    handle = dit_accel.apply(model, GNA, backend="torch")
    _threads(handle.remove, handle.remove)
    assert handle.removed and torch.equal(first_output(model, kwargs), dense)


def test_a_call_that_began_before_apply_runs_dense_throughout(wan):
    model, kwargs, dense, sparse = wan
    pause = Pause(model.blocks[1])
    out = {}
    try:
        caller = threading.Thread(target=lambda: out.setdefault("call", first_output(model, kwargs)), daemon=True)
        caller.start()
        assert pause.reached.wait(TIMEOUT)
        handle = dit_accel.apply(model, GNA, backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pause.go.set()
            caller.join(TIMEOUT)
    finally:
        pause.go.set()
        pause.handle.remove()
    assert torch.equal(out["call"], dense)  # its second layer did not borrow another call's context
    assert torch.equal(first_output(model, kwargs), sparse)
    _state_is_clean(handle)
    handle.remove()


# ------------------------------------------------------------------ exceptions inside a call
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_exception_inside_a_call_leaves_no_per_call_state(wan, error):
    """KeyboardInterrupt skips PyTorch's always-call forward hooks: the next call, and remove(), clean up."""
    model, kwargs, dense, sparse = wan
    handle = dit_accel.apply(model, GNA, backend="torch")

    def fail():
        raise error("raised inside the call")

    pause = Pause(model.blocks[1], action=fail)
    try:
        with pytest.raises(error):
            first_output(model, kwargs)
    finally:
        pause.handle.remove()
    if error is ValueError:
        _state_is_clean(handle)
    assert torch.equal(first_output(model, kwargs), sparse)
    _state_is_clean(handle)
    with pytest.raises(error):  # once more, then remove() right away (it must not wait for the dead call)
        Pause(model.blocks[1], action=fail)
        first_output(model, kwargs)
    for hook in list(model.blocks[1]._forward_pre_hooks):
        del model.blocks[1]._forward_pre_hooks[hook]
    _threads(handle.remove)
    assert torch.equal(first_output(model, kwargs), dense)


def test_a_thread_killed_inside_a_call_does_not_block_remove(wan):
    model, kwargs, dense, _ = wan
    handle = dit_accel.apply(model, GNA, backend="torch")

    def interrupted():
        raise KeyboardInterrupt  # skips the post-hook: the call's record stays behind, its thread ends

    def call_then_end():
        try:
            first_output(model, kwargs)
        except KeyboardInterrupt:  # the thread ends here (caught only to keep pytest's output quiet)
            pass

    pause = Pause(model.blocks[1], action=interrupted)
    try:
        thread = threading.Thread(target=call_then_end, daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        pause.handle.remove()
    assert handle._gate._calls  # the dead call is still recorded ...
    _threads(handle.remove)  # ... and remove() does not wait for it
    assert torch.equal(first_output(model, kwargs), dense)


def test_a_failing_pre_hook_leaves_no_state(wan):
    model, kwargs, _, sparse = wan
    handle = dit_accel.apply(model, GNA, dense_steps=1, backend="torch")  # bare: the step must be set
    with pytest.raises(ValueError, match="set_step"):
        first_output(model, kwargs)
    _state_is_clean(handle)
    handle.set_step(1, 2)
    assert torch.equal(first_output(model, kwargs), sparse)
    handle.remove()


def test_gradient_checkpointing_recomputes_with_the_calls_context():
    """Recomputation in the backward pass runs after the call's post-hook: it borrows the call's context
    (and only there: a layer called outside a call and outside backward runs dense, as above)."""
    grads = {}
    for checkpointing in (False, True):
        model = build_tiny_transformer("wan", seed=1)
        kwargs = tiny_transformer_inputs("wan", model, batch=1)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        with dit_accel.apply(model, GNA, backend="torch") as handle, warnings.catch_warnings():
            warnings.simplefilter("error", dit_accel.DitAccelWarning)  # no "outside the forward" fallback
            model(**kwargs)[0].square().mean().backward()
            assert all(r["sparse_calls"] == (2 if checkpointing else 1) for r in handle.stats())
        grads[checkpointing] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_two_calls_before_one_backward_recompute_each_on_its_own_grid():
    """Two forwards, then one backward ((loss_a + loss_b).backward(), a teacher pass after the student's): the
    blocks of the first call were recomputed under the second call's grid and plans, and their gradients were
    wrong without a word (up to 0.0065 of the largest, 0.27). Each block now carries its call's context; remove()
    puts Diffusers' checkpointing function back."""
    model = build_tiny_transformer("wan").train()
    model.enable_gradient_checkpointing()
    original = model._gradient_checkpointing_func
    calls = [tiny_transformer_inputs("wan", model, grid=(3, 4, 6), batch=1),
             tiny_transformer_inputs("wan", model, grid=(3, 6, 4), batch=1, seed=3)]  # (same tokens, other grid)

    def grads(losses_then_backward):
        model.zero_grad()
        losses_then_backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def loss(kwargs):
        return model(**kwargs)[0].square().mean()

    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), backend="torch"):
        apart = grads(lambda: [loss(kwargs).backward() for kwargs in calls])
        together = grads(lambda: sum(loss(kwargs) for kwargs in calls).backward())
    torch.testing.assert_close(together, apart, atol=1e-6, rtol=1e-5)
    assert apart.abs().max() > 0.1
    assert model._gradient_checkpointing_func is original
