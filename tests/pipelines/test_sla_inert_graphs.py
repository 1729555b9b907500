"""Training-free SLA (every projection still zero) under torch.compile and CUDA-graph capture (issue 72, item 7):
the traced or captured call does not compute the zero projection's linear branch, as eager calls do not; a
projection that stops being zero (written, then read by an eager call or by ``load_weights``) is computed again."""

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_transformer, tiny_transformer_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _graphs_reading_projections(compiled, model):
    """Run ``compiled`` once (no grad); whether any graph Dynamo made since the last call reads an SLA projection."""
    with torch.no_grad():
        out = compiled(**tiny_transformer_inputs("wan", model))[0]
    reads = any("sla_proj" in str(n.target) for g in _GRAPHS for n in g.graph.nodes if n.op == "placeholder")
    _GRAPHS.clear()
    return out, reads


_GRAPHS = []


def _backend(gm, example_inputs):
    _GRAPHS.append(gm)
    return gm.forward


def test_a_compiled_training_free_sla_call_does_not_compute_the_zero_projection():
    torch._dynamo.reset()
    _GRAPHS.clear()
    torch.manual_seed(0)
    model = build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.SLA(topk=0.3), backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend=_backend)
    out, reads = _graphs_reading_projections(compiled, model)  # the first call is compiled: no eager read before
    assert not reads
    with torch.no_grad():
        eager = model(**tiny_transformer_inputs("wan", model))[0]
    torch.testing.assert_close(out, eager)
    # A projection that is no longer zero: the next eager call reads it, and the compiled call computes it again.
    proj = next(iter(handle.sla_projections().values()))
    with torch.no_grad():
        proj.weight.normal_(0, 0.02)
        eager = model(**tiny_transformer_inputs("wan", model))[0]
    out, reads = _graphs_reading_projections(compiled, model)
    assert reads
    torch.testing.assert_close(out, eager)
    handle.remove()


def test_a_captured_call_keeps_the_eager_verdict_while_the_projection_is_unchanged(monkeypatch):
    model = build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.SLA(topk=0.3), backend="torch")
    hook = handle._hooks[0]
    sla = [layer for layer in hook.layers if layer.sla_proj is not None]
    assert sla and all(layer.inert for layer in sla)  # read at apply
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    import dit_accel.pipelines.transformer_hook as th

    monkeypatch.setattr(th, "inert_projections", lambda projs: pytest.fail("read a projection inside a capture"))
    with torch.no_grad():  # a captured inference call
        assert hook._inert_now(sla) == [True] * len(sla)
        sla[0].sla_proj.weight.add_(1.0)  # a write in between (an optimizer step, say): its version moves
        assert hook._inert_now(sla) == [False] + [True] * (len(sla) - 1)
    assert hook._inert_now(sla) == [False] * len(sla)  # a captured training step computes the branch
    monkeypatch.undo()
    handle.remove()
