"""Trust round 24: torch.compile as Diffusers users compile, before and after dit_accel.apply.

Audited and found right (no change): apply -> compile -> remove (the compiled model runs dense, exactly), a second
method applied to a compiled model, ``dense_steps`` through a pipeline call (each step against eager), TileStrategy
and a replaced method per step, ``dynamic=True`` over four grids, the recompile limit (Dynamo's eager fallback gives
eager's output), in-place ``transformer.compile()`` and ``compile_repeated_blocks`` before apply.

Found wrong, fixed here:
- gradient checkpointing under torch.compile: the block Dynamo handed on to the eager call was not wrapped in its
  call's context, so with two forwards before one backward the first call's blocks were recomputed under the
  second call's plans (gradients off by 0.0065, unsaid); fullgraph=True failed with Dynamo's "Unsupported HOP:
  side effect", naming nothing of dit_accel's. The same path was taken by eager calls while another thread compiled.
- blocks wrapped in torch.compile (``blocks[i] = torch.compile(blocks[i])``) before apply: their layers were not
  found ("found no attention modules"; with some blocks wrapped, those layers ran dense, unsaid).
- Mochi's padded text under fullgraph=True: Dynamo's raw "Could not guard on data-dependent expression" from inside
  dit_accel's interceptor (the dense model compiles fullgraph).

Compiled runs use the ``eager``/``aot_eager`` backends (graph breaks and guards are Dynamo's) on tiny models, each
compared with the same model and method run eagerly.
"""

import re

import pytest
import torch

import dit_accel
from dit_accel.models.tiny import TRANSFORMER_TEXT, build_tiny_transformer, tiny_transformer_inputs
from tests.pipelines.test_inputs_round12_compile import _while_another_thread_compiles

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

TILE = dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1))
SMALL_TILE = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))
GRIDS = [(3, 4, 6), (3, 6, 4)]  # (same tokens, another grid: another plan)


# ----------------------------------------------------------------- gradient checkpointing
def _checkpointed_wan():
    model = build_tiny_transformer("wan").train()
    model.enable_gradient_checkpointing()
    calls = [tiny_transformer_inputs("wan", model, grid=GRIDS[0], batch=1),
             tiny_transformer_inputs("wan", model, grid=GRIDS[1], batch=1, seed=3)]
    return model, calls


def _grads(model, run):
    model.zero_grad()
    run()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _loss(model, kwargs):
    return model(**kwargs)[0].square().mean()


def _both_then_backward(model, calls):
    return lambda: sum(_loss(model, kwargs) for kwargs in calls).backward()


def test_checkpointed_blocks_under_compile_recompute_under_their_own_calls_plans():
    """Two compiled forwards, one backward: the first call's blocks are recomputed on its own grid (before: on the
    second call's, 0.0065 off)."""
    model, calls = _checkpointed_wan()
    with dit_accel.apply(model, SMALL_TILE, backend="torch"):
        want = _grads(model, lambda: [_loss(model, kwargs).backward() for kwargs in calls])  # eager, apart
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        got = _grads(model, _both_then_backward(compiled, calls))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert want.abs().max() > 0.1


def test_checkpointed_blocks_recompute_under_their_calls_plans_while_another_thread_compiles():
    """An eager call read torch.compiler.is_compiling() (one flag for the process) and took the traced path."""
    model, calls = _checkpointed_wan()
    with dit_accel.apply(model, SMALL_TILE, backend="torch"):
        want = _grads(model, lambda: [_loss(model, kwargs).backward() for kwargs in calls])
        got = _while_another_thread_compiles(lambda: _grads(model, _both_then_backward(model, calls)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fullgraph_with_checkpointing_says_why_and_compiling_the_blocks_works():
    """fullgraph=True on a checkpointing model: one line naming dit_accel and what to do (before: Dynamo's
    "Unsupported HOP: Unsafe side effect"); what it advises (regional compilation) gives eager's gradients."""
    model, calls = _checkpointed_wan()
    with dit_accel.apply(model, SMALL_TILE, backend="torch"):
        want = _grads(model, _both_then_backward(model, calls))
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"(?s)dit_accel: with gradient checkpointing.*compile_repeated_blocks"):
            torch.compile(model, fullgraph=True, backend="eager")(**calls[0])
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        got = _grads(model, _both_then_backward(model, calls))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------- blocks wrapped in torch.compile before apply
@pytest.mark.parametrize("wrapped", [(0, 1), (0,)], ids=["all-blocks", "first-block"])
def test_blocks_wrapped_in_torch_compile_before_apply_run_the_method(wrapped):
    """Before: all blocks wrapped -> "found no attention modules"; the first only -> its layer ran dense, unsaid."""
    grid = (4, 8, 8)
    eager = build_tiny_transformer("wan")
    kwargs = tiny_transformer_inputs("wan", eager, grid=grid)
    with torch.no_grad():
        dense = eager(**kwargs)[0]
        with dit_accel.apply(eager, TILE, backend="torch"):
            sparse = eager(**kwargs)[0]
    model = build_tiny_transformer("wan")
    torch._dynamo.reset()
    for i in wrapped:
        model.blocks[i] = torch.compile(model.blocks[i], fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs)[0], dense, atol=1e-6, rtol=1e-5)  # compiled, dense
        handle = dit_accel.apply(model, TILE, backend="torch")
        assert handle.layers == ["blocks.0.attn1", "blocks.1.attn1"]
        torch.testing.assert_close(model(**kwargs)[0], sparse, atol=1e-6, rtol=1e-5)
        summary = handle.summary()
        assert (summary["sparse_calls"], summary["dense_calls"]) == (2, 0)
        handle.remove()
        torch.testing.assert_close(model(**kwargs)[0], dense, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------- data-dependent token counts (Mochi)
def test_mochi_padded_text_compiles_and_fullgraph_says_why():
    """Mochi selects each sample's valid text tokens by the mask (nonzero): the attention's length is known only
    at run time. Without fullgraph that call runs eagerly and the output is eager's; with fullgraph=True the error
    names dit_accel and what to do (before: Dynamo's "Could not guard on data-dependent expression")."""
    model = build_tiny_transformer("mochi")
    kwargs = tiny_transformer_inputs("mochi", model, batch=2, text_valid=[TRANSFORMER_TEXT["mochi"], 3])
    handle = dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 5, 5)), backend="torch")
    with torch.no_grad():
        want = model(**kwargs)[0]
        handle.reset_stats()
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(**kwargs)[0]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        summary = handle.summary()
        assert summary["sparse_calls"] == 2 * summary["layers"]  # (one call per sample)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=re.escape("dit_accel: an attention call whose token count depends on "
                                                      "the data")) as err:
            torch.compile(model, fullgraph=True, backend="eager")(**kwargs)
        assert "without fullgraph=True" in str(err.value)
    handle.remove()


# ----------------------------------------------------------------- more plans than Dynamo keeps graphs
def test_a_schedule_with_more_phases_than_the_recompile_limit_is_said(tmp_path):
    """A per-step strategy compiles one graph per step that runs other windows: past Dynamo's recompile limit the
    later steps ran eagerly, unsaid (fullgraph=True: FailOnRecompileLimitHit mid-run). Said at the first compiled
    call, with the setting to raise; the eager model, and a schedule within the limit, say nothing."""
    import json

    windows = [(1, 1, 1), (2, 1, 1), (1, 2, 1)]
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({f"{step}_{layer}_{head}": list(windows[step])
                                for step in range(3) for layer in range(2) for head in range(2)}))
    strategy = dit_accel.Tile.from_strategy(path, tile=(2, 4, 4))
    model = build_tiny_transformer("wan")
    kwargs = tiny_transformer_inputs("wan", model, grid=(4, 8, 8))
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for method, said in ((strategy, True), (TILE, False)):
            handle = dit_accel.apply(model, method, backend="torch", dense_steps=0)
            handle.set_step(0, 3)
            model(**kwargs)
            assert not any("recompile_limit" in w for w in handle.warnings)  # (eager)
            torch._dynamo.reset()
            torch.compile(model, fullgraph=True, backend="eager")(**kwargs)
            found = [w for w in handle.warnings if "recompile_limit" in w]
            if said:
                assert len(found) == 1 and "up to 3 different plans over its 3 steps" in found[0]
                assert "torch._dynamo.config.recompile_limit = 6" in found[0]
            else:
                assert not found
            handle.remove()
