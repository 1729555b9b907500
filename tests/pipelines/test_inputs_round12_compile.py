"""Trust round 12 (second wave), torch.compile and threads on the Diffusers path.

``torch.compiler.is_compiling()`` is one flag for the whole process while Dynamo compiles: eager calls that other
threads made meanwhile took the traced paths (an SLA projection written since the last read was taken as still
zero, calls went uncounted, capture was skipped). And the note a compiled layer leaves for the post-hook was one
per layer, shared by the threads: two threads running the compiled model at once counted one call twice, or lost
it. Each output is checked against the same call made alone, eagerly.
"""

import threading

import pytest
import torch
from torch._dynamo.utils import counters

import dit_accel
from dit_accel.models.tiny import build_tiny_transformer, tiny_transformer_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (2, 8, 8)
TILE = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1))


def _while_another_thread_compiles(work):
    """Run ``work()`` here while another thread's torch.compile is in its backend (the process-wide flag is set)."""
    started, release = threading.Event(), threading.Event()

    def blocking_backend(gm, example_inputs):
        started.set()
        release.wait(60)
        return gm.forward

    compiler = threading.Thread(target=lambda: torch.compile(lambda x: x + 1, backend=blocking_backend)(
        torch.ones(2)))
    torch._dynamo.reset()
    compiler.start()
    try:
        assert started.wait(60)
        assert torch.compiler.is_compiling()  # (what this thread reads: the other thread's compile)
        return work()
    finally:
        release.set()
        compiler.join()


def test_an_eager_call_while_another_thread_compiles_reads_the_written_sla_projection(tmp_path):
    """Before: the projection was taken as still zero (the last eager verdict, as a traced call keeps it): the
    linear branch was skipped, a silent wrong answer; the call was not counted and capture saved nothing."""
    torch.manual_seed(0)
    model = build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.SLA(topk=0.3), backend="torch", capture=tmp_path)
    kwargs = tiny_transformer_inputs("wan", model, grid=GRID)
    with torch.no_grad():
        zero = model(**kwargs)[0]  # read: every projection zero
        for proj in handle.sla_projections().values():
            proj.weight.normal_(0, 0.05)
    handle.reset_stats()
    captured = set(tmp_path.iterdir())
    handle.set_step(1)  # (capture saves each layer and step once)
    with torch.no_grad():
        got = _while_another_thread_compiles(lambda: model(**kwargs)[0])
    summary = handle.summary()
    with torch.no_grad():
        want = model(**kwargs)[0]  # the same call alone
    assert (want - zero).abs().max() > 1e-3  # (the written projections change the output)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (summary["sparse_calls"], summary["dense_calls"]) == (summary["layers"], 0)
    assert not any("torch.compile" in w for w in handle.warnings)
    assert sorted(path.name for path in set(tmp_path.iterdir()) - captured) == ["layer000_step001.pt",
                                                                              "layer001_step001.pt"]
    handle.remove()


def test_a_training_call_while_another_thread_compiles_can_save_its_plans():
    """Plans built under inference_mode are built outside it (so a later training call can save them): the eager
    call of another thread read the flag and built them as inference tensors."""
    model = build_tiny_transformer("wan")
    handle = dit_accel.apply(model, TILE, backend="torch")
    kwargs = tiny_transformer_inputs("wan", model, grid=GRID)

    def first_call():
        with torch.inference_mode():
            return model(**kwargs)[0].clone()

    _while_another_thread_compiles(first_call)
    queries = kwargs["hidden_states"].clone().requires_grad_()
    model(**{**kwargs, "hidden_states": queries})[0].square().sum().backward()
    assert queries.grad is not None and torch.isfinite(queries.grad).all()
    handle.remove()


@pytest.mark.filterwarnings("ignore:dit_accel. attention time is not measured")
def test_two_threads_running_the_compiled_model_at_once_each_count_their_call():
    """Thread A's compiled call stores its note; before A's post-hook hands it on, thread B makes a whole compiled
    call at another step. Before: one note per layer for both threads: B handed on its own note, A found none
    (A's sparse calls went uncounted, or were counted as B's)."""
    model = build_tiny_transformer("wan")
    pause, resume = threading.Event(), threading.Event()

    @torch.compiler.disable
    def hold_thread_a(*_):  # runs before dit_accel's post-hook (registered before apply)
        if threading.current_thread().name == "A":
            pause.set()
            resume.wait(60)

    model.register_forward_hook(hold_thread_a)
    # (timing: the compiled layers leave a warning note too, which a thread's first trace must not guard on)
    handle = dit_accel.apply(model, TILE, backend="torch", dense_steps=1, timing=True)
    kwargs = tiny_transformer_inputs("wan", model, grid=GRID)
    want = {}
    with torch.no_grad():
        for step in (0, 1):
            handle.set_step(step, 3)
            want[step] = model(**kwargs)[0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():  # both phases compiled first (no thread compiles while the others run)
        for step in (0, 1):
            handle.set_step(step, 3)
            compiled(**kwargs)
    handle.reset_stats()
    out, errors = {}, []

    def call(step):
        try:
            handle.set_step(step, 3)
            with torch.no_grad():
                out[step] = compiled(**kwargs)[0]
        except Exception as error:  # surfaced below
            errors.append(error)

    a = threading.Thread(target=call, args=(1,), name="A")
    a.start()
    assert pause.wait(60)
    b = threading.Thread(target=call, args=(0,), name="B")
    b.start()
    b.join()
    resume.set()
    a.join()
    assert not errors, errors
    for step in (0, 1):
        torch.testing.assert_close(out[step], want[step], atol=0, rtol=0)
    summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (summary["layers"], summary["layers"])
    assert counters["stats"]["unique_graphs"] == 2  # one per phase, none for the threads
    assert sum("not measured inside torch.compile" in w for w in handle.warnings) == 1
    handle.remove()
