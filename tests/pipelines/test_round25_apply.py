"""``dit_accel.apply`` on pipelines as Diffusers users set them up before or after applying (round 25, trust).

Audited and found right (no change): ``pipe.to(torch.bfloat16)`` after apply, ``fuse_qkv_projections()`` after apply
(Wan, FLUX: the fused projections still reach the interception, exactly), a LoRA adapter added after apply,
``set_attention_backend`` after apply (said, dense) and a global ``attention_backend(...)`` (the wrapped layers stay
sparse), ``enable_layerwise_casting`` and ``enable_cache`` in either order, deepcopy/pickle of an applied model
(refused in one line), ``state_dict()`` under SLA (no extra keys), ``remove()`` twice, after ``del pipe`` or after
``pipe.transformer = other``, and an exception or Ctrl-C inside a pipeline call (the next call is exact).

Found wrong, fixed here (each test names what was wrong before):
- a transformer compiled before apply (``pipe.transformer = torch.compile(pipe.transformer)``) was refused; Dynamo's
  guards recompile a graph built before apply (checked: no stale graph runs), so apply now takes it;
- a ``DistributedDataParallel`` transformer was "not supported" (by class name), a ``DataParallel`` one likewise.

Compiled runs use Dynamo's ``eager`` backend (the guards and recompiles are Dynamo's, whatever the backend) on tiny
models, each compared with the same model and method run eagerly.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import dit_accel
from dit_accel.models import tiny as T

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

TILE = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1))
PIPE_TILE = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))  # (sparse on the small pipeline run below)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# ----------------------------------------------------------------- torch.compile before apply
def test_apply_to_a_compiled_transformer_after_a_compiled_call_runs_the_method_at_every_step():
    """Before: ``apply(torch.compile(transformer), ...)`` was refused ("apply dit_accel to the uncompiled module
    (transformer._orig_mod) instead"), though Diffusers users compile first all the time. Now dit_accel goes on the
    module the wrapper compiles: Dynamo's guards on the processors and hooks recompile the graph built by a call
    before apply (it is never run stale), every step of a ``dense_steps`` schedule equals the eager model's, and after
    ``remove()`` the first graph gives the dense output again."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    dense = _run(model, inputs)
    handle = dit_accel.apply(model, TILE, backend="torch", dense_steps=1)
    want = []
    for step in range(3):
        handle.set_step(step, 3)
        want.append(_run(model, inputs))
    handle.remove()
    assert not torch.equal(want[1], dense) and torch.equal(want[0], dense)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(_run(compiled, inputs), dense)  # a graph built before apply
    handle = dit_accel.apply(compiled, TILE, backend="torch", dense_steps=1)
    assert handle.transformer is model
    for step in (0, 1, 2, 0, 1):
        handle.set_step(step, 3)
        assert torch.equal(_run(compiled, inputs), want[step]), step
    assert counters["stats"]["unique_graphs"] == 3  # the one before apply, then one per schedule phase
    assert handle.summary()["sparse_calls"] == 3 * 2
    handle.remove()
    assert torch.equal(_run(compiled, inputs), dense)
    assert counters["stats"]["unique_graphs"] == 3  # (the first graph again: nothing new compiled)


def _generate(pipe):
    return pipe("a cat", num_frames=5, height=32, width=32, num_inference_steps=3, max_sequence_length=8,
                output_type="pt", generator=torch.Generator().manual_seed(0)).frames


def test_apply_to_a_pipeline_whose_transformer_is_compiled_keeps_the_compiled_transformer():
    """Before: ``pipe.transformer = torch.compile(pipe.transformer)`` then ``apply(pipe, ...)`` was refused. Now the
    pipeline keeps its compiled transformer, the pipeline call reads its steps (``dense_steps``) through it, the output
    is the eager run's, and ``remove()`` gives the dense output back."""
    pipe = T.build_tiny_pipeline("tiny-wan")
    dense = _generate(pipe)
    with dit_accel.apply(pipe, PIPE_TILE, backend="torch", dense_steps=1):
        want = _generate(pipe)
    assert not torch.equal(want, dense)

    torch._dynamo.reset()
    compiled = pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    handle = dit_accel.apply(pipe, PIPE_TILE, backend="torch", dense_steps=1)
    assert pipe.transformer is compiled and handle.transformer is compiled._orig_mod
    assert torch.equal(_generate(pipe), want)
    summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (2 * 2 * 2, 2 * 2)  # 2 layers, 2 branches per step
    handle.remove()
    assert pipe.transformer is compiled and torch.equal(_generate(pipe), dense)


def test_apply_to_the_compiled_wrapper_of_an_applied_model_replaces_its_handle():
    """The wrapper and the module it compiles are one model: a second apply() through the wrapper replaces the first
    handle (said, as on the module itself), and one model under two pipeline names (the wrapper and the module) is
    wrapped once. Nothing here is called compiled."""
    model = T.build_tiny_transformer("wan")
    first = dit_accel.apply(model, TILE, backend="torch")
    with pytest.warns(dit_accel.DitAccelWarning, match=r"was applied to: that handle was removed first"):
        second = dit_accel.apply(torch.compile(model), dit_accel.Dense())
    assert first.removed and second.transformers == [model]
    second.remove()

    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = SimpleNamespace(transformer=torch.compile(model), transformer_2=model,
                           scheduler=FlowMatchEulerDiscreteScheduler())
    with dit_accel.apply(pipe, TILE, backend="torch") as handle:
        assert handle.transformers == [model] and len(handle.stats()) == 2


# ----------------------------------------------------------------- other wrappers of the transformer
def test_apply_to_a_distributed_data_parallel_transformer_runs_the_method(tmp_path):
    """Before: ``apply(DistributedDataParallel(transformer), ...)`` (``accelerator.prepare``'s model) said "dit_accel
    does not support transformer class DistributedDataParallel; supported: ..." of a Wan model. DDP calls the
    module it wraps: dit_accel goes on that one, and the wrapped model runs the method exactly."""
    import torch.distributed as dist

    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    dense = _run(model, inputs)
    with dit_accel.apply(model, TILE, backend="torch"):
        sparse = _run(model, inputs)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        with dit_accel.apply(wrapped, TILE, backend="torch") as handle:
            assert handle.transformer is model
            assert torch.equal(_run(wrapped, inputs), sparse)
        assert torch.equal(_run(wrapped, inputs), dense)
    finally:
        dist.destroy_process_group()


def test_apply_to_a_data_parallel_transformer_is_refused_in_one_line():
    """Before: "dit_accel does not support transformer class DataParallel; supported: <every class>", of a Wan model."""
    model = T.build_tiny_transformer("wan")
    with pytest.raises(ValueError, match=r"apply\(\) got a DataParallel around WanTransformer3DModel: dit_accel does "
                                         r"not run under its per-call replicas\. Apply it to the module "
                                         r"\(model\.module\) .* or use DistributedDataParallel"):
        dit_accel.apply(torch.nn.DataParallel(model), TILE)
    assert not model._forward_pre_hooks
