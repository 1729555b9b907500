"""apply() beside what users do (round 12): Diffusers' own ``enable_parallelism`` with a Ulysses degree that does not
divide the heads (before or after apply), a plan's steps under ``set_step`` without a total, a ring share that cuts
a layout's tiles, a preview under ``torch.inference_mode`` before training. Tiny models on the CPU, one process;
each test names what was wrong before its fix."""


import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.hooks import SparseAttnProcessor
from tests.utils import ReferenceAttention, first_output, method_mask, resolved_here

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))  # on tiny-wan's (4, 8, 8) grid: one 4x4 tile per row


def _wan(heads: int = 2):
    import diffusers

    entry = T.TRANSFORMERS["wan"]
    return getattr(diffusers, entry.class_name)(**{**entry.config, "num_attention_heads": heads})


# ------------------------------------------------------------------ Diffusers' own enable_parallelism


def _parallel_configs(model):
    return [processor.__dict__.get("_parallel_config") if not isinstance(processor, SparseAttnProcessor)
            else processor.parallel for processor in model.attn_processors.values()]


_HEADS_SAID = (r"ulysses_degree=4 \(--cp ulysses=4\) splits the attention heads into 4 equal groups, but "
               r"WanTransformer3DModel has num_attention_heads=2: use a Ulysses degree that divides it \(2\), or ring")


def test_enable_parallelism_after_apply_refuses_a_ulysses_degree_that_does_not_divide_the_heads():
    """Before: ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4))`` on an applied
    2-head model was taken; the head count failed only at the first attention call, deep in the sampler, after
    the model loaded and the prompt was encoded. Now enable_parallelism itself says so in one line (as --cp does),
    and the model is left without the config (a second enable_parallelism with a good degree is not refused as
    "already applied")."""
    from diffusers import ContextParallelConfig

    model = _wan(2)
    handle = dit_accel.apply(model, TILE)
    resolved_here(model)
    with pytest.raises(ValueError, match=_HEADS_SAID):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4))
    assert model._parallel_config is None and not any(_parallel_configs(model))
    handle.remove()


def test_apply_after_enable_parallelism_refuses_a_ulysses_degree_that_does_not_divide_the_heads():
    """Before: apply() on a 2-head model already under Diffusers' Ulysses over 4 ranks installed; the call failed at
    its first attention layer. Now apply() refuses in one line and leaves the model's processors as they were."""
    from diffusers import ContextParallelConfig

    model = _wan(2)
    resolved_here(model)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4))
    before = {name: id(p) for name, p in model.attn_processors.items()}
    configs = _parallel_configs(model)
    with pytest.raises(ValueError, match=_HEADS_SAID):
        dit_accel.apply(model, TILE)
    assert {name: id(p) for name, p in model.attn_processors.items()} == before
    assert _parallel_configs(model) == configs and all(c is model._parallel_config for c in configs)


# ------------------------------------------------------------------ a plan's steps on a bare transformer
def test_set_step_past_a_plans_last_step_without_total_is_refused_not_run_dense():
    """Before: a plan calibrated for 3 steps on a bare transformer driven by ``handle.set_step(i)`` (no total, as a
    user's own loop does) ran step 5 dense on every layer, unsaid (0 sparse calls, no warning): the plan's step check
    needed the total. Now the call is refused before any attention, naming the step and the plan's steps; a step
    within the plan still runs its method (the masked-dense reference)."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    with ReferenceAttention(method_mask(TILE, T.TRANSFORMER_GRIDS["wan"]), "none"):
        want = first_output(model, inputs)
    handle = dit_accel.apply(model, SparsePlan([Phase(0, 3, default=TILE)], provenance={"steps": 3}))
    handle.set_step(5)
    with pytest.raises(ValueError, match=r"the plan was calibrated for 3 denoising steps \(0..2\); this call is step "
                                         r"5, past its last: run 3 steps, or calibrate a plan for this many"):
        first_output(model, inputs)
    assert handle.summary()["dense_calls"] == 0
    handle.set_step(2)
    torch.testing.assert_close(first_output(model, inputs), want, atol=2e-4, rtol=2e-4)
    assert [row["sparse_calls"] for row in handle.stats()] == [1, 1]
    handle.remove()


# ------------------------------------------------------------------ ring shares of a tiled layout
def test_a_ring_share_that_splits_the_layouts_tiles_names_those_tiles():
    """Tile(tile=(2, 4, 4)) holds 32 tokens, under one 64-token block, so its layout orders the tokens by (4, 4, 4)
    tiles; ring context parallelism over 2 ranks on 4 latent frames gives each rank 2 frames, half a tile. Before:
    the refusal said "a frame count that is a multiple of the ring degree times the tile depth", which 4 frames
    already are (2 x the tile depth 2 the user gave). Now it names the layout's tiles and the depth to use."""
    plan = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)).plan((4, 8, 8))
    with pytest.raises(ValueError, match=r"tokens 0..127 of grid \(4, 8, 8\) do not fill whole 64-token blocks of "
                                         r".*'s layout \(tiled order\): split the sequence so every rank holds whole "
                                         r"slabs of its \(4, 4, 4\) tiles along the first axis, e.g. a latent frame "
                                         r"count that is a multiple of the ring degree x 4$"):
        plan.check_part((0, 128))
    plan.check_part((0, 256))  # (one rank holding every frame: whole tiles)


# ------------------------------------------------------------------ a preview under inference_mode, then training
# (configs no other test here runs: plans share cached patterns, which a call outside inference_mode would have built)
@pytest.mark.parametrize("method", [dit_accel.Tile(tile=(1, 8, 4), window=(1, 1, 1)),
                                    dit_accel.GNA(kernel_size=(3, 5, 3))], ids=["tile", "gna"])
def test_a_call_under_inference_mode_leaves_plans_a_training_call_can_use(method):
    """Before: one call under ``torch.inference_mode()`` (a preview generation) built the plans' cached tensors
    (permutations, layouts, masks) as inference tensors, and every later call that records a backward on that
    handle (fine-tuning, distillation) failed with "RuntimeError: Inference tensors cannot be saved for backward".
    Now the preview matches the masked-dense reference and the training call's gradients equal those of a handle
    that never ran under inference_mode."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    with ReferenceAttention(method_mask(method, T.TRANSFORMER_GRIDS["wan"]), "none"):
        want = first_output(model, inputs)

    def grads():
        model.zero_grad()
        model(**inputs)[0].pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    with dit_accel.apply(model, method) as handle:
        with torch.inference_mode():
            preview = model(**inputs)[0]
        torch.testing.assert_close(preview, want, atol=2e-4, rtol=2e-4)
        got = grads()
        assert handle.summary()["sparse_calls"] == 4  # (2 layers x the preview and the training call)
    with dit_accel.apply(model, method):
        expected = grads()
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", [dit_accel.Tile(tile=(2, 8, 4), window=(1, 1, 1)),
                                    dit_accel.GNA(kernel_size=(3, 3, 5))], ids=["tile", "gna"])
def test_a_plan_asked_for_under_inference_mode_serves_a_training_call(method):
    """Before: ``handle.plan(method, grid)`` under inference_mode cached that plan's tensors as inference tensors,
    and the next training call, which runs the cached plan, failed with "Inference tensors cannot be saved for
    backward". Now its gradients equal those of a handle that never ran under inference_mode."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)

    def grads():
        model.zero_grad()
        model(**inputs)[0].pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    with dit_accel.apply(model, method) as handle:
        with torch.inference_mode():
            handle.plan(method, T.TRANSFORMER_GRIDS["wan"])
        got = grads()
    with dit_accel.apply(model, method):
        expected = grads()
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
