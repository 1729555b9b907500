"""dit_accel.apply(model, VSA(...)) on tiny transformers against a float64 VSA reference of the unmodified model.

The reference (tests/kernels/vsa_reference.py) replaces each self/joint SDPA call of the original model by
brute-force VSA, with text keys always attended and text queries dense (METHODS.md, "VSA" and "Text tokens").
"""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from tests.kernels.vsa_reference import VSAReference, count_for
from tests.utils import first_output as _run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wan():
    return T.build_tiny_transformer("wan")


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.VSA(topk=2), id="topk2-t444"),
    pytest.param(dit_accel.VSA(sparsity=0.5, tile=(2, 4, 8)), id="sp0.5-t248"),
])
def test_wan_matches_reference_on_partial_cubes(wan, method):
    grid = (5, 6, 7)  # partial cubes along every dimension
    kwargs = T.tiny_transformer_inputs("wan", wan, grid=grid, batch=2)
    dense = _run(wan, kwargs)
    count = count_for(grid, method.tile, method.topk, method.effective_sparsity)
    with VSAReference(grid, count, method.tile) as ref_mode:
        ref = _run(wan, kwargs)
    assert ref_mode.calls == 2
    with dit_accel.apply(wan, method, backend="torch") as handle:
        out = _run(wan, kwargs)
        rows = handle.stats()
        plan = handle.plan(method, grid)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert [r["method"] for r in rows] == ["vsa", "vsa"] and all(r["sparse_calls"] == 1 for r in rows)
    assert rows[0]["density"] == pytest.approx(plan.density) and plan.density < 1
    assert torch.equal(_run(wan, kwargs), dense)  # removed: the model is dense again


def test_dense_layers_and_dense_steps(wan):
    grid, method = (4, 8, 8), dit_accel.VSA(topk=1)
    kwargs = T.tiny_transformer_inputs("wan", wan, grid=grid)
    with VSAReference(grid, 1, method.tile, layers={1}, every=2):
        ref = _run(wan, kwargs)
    with dit_accel.apply(wan, method, dense_layers=1, backend="torch") as handle:
        out = _run(wan, kwargs)
        assert [r["dense_calls"] for r in handle.stats()] == [1, 0]
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    dense = _run(wan, kwargs)
    with dit_accel.apply(wan, method, dense_steps=1, backend="torch") as handle:
        handle.set_step(0, 2)
        torch.testing.assert_close(_run(wan, kwargs), dense, atol=1e-6, rtol=1e-6)
        handle.set_step(1, 2)
        with VSAReference(grid, 1, method.tile):
            ref = _run(wan, kwargs)
        torch.testing.assert_close(_run(wan, kwargs), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["hunyuan", "cogvideox"])
def test_joint_text_video_models(name):
    """Video queries: selected video cubes plus every valid text key (log-sum-exp merge); text queries dense."""
    model = T.build_tiny_transformer(name)
    grid, method = (4, 8, 8), dit_accel.VSA(topk=1)
    valid = [T.TRANSFORMER_TEXT[name], 3] if name == "hunyuan" else None  # a padded text mask
    kwargs = T.tiny_transformer_inputs(name, model, grid=grid, batch=2, text_valid=valid)
    from dit_accel.pipelines.presets import PRESETS

    position = PRESETS[type(model).__name__].text_position
    with VSAReference(grid, 1, method.tile, text_position=position) as ref_mode:
        ref = _run(model, kwargs)
    assert ref_mode.calls >= 1
    dense = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        assert all(r["sparse_calls"] >= 1 for r in handle.stats())
    torch.testing.assert_close(out, ref, atol=3e-4, rtol=3e-4)
    assert (out - dense).abs().max() > 1e-3


def test_image_model_is_refused_clearly():
    """At apply (the preset's grid rank); a plan on a 2-D grid refuses it too (a preset registered with the wrong
    rank)."""
    model = T.build_tiny_transformer("flux")
    with pytest.raises(ValueError, match=r"'vsa' needs a video's \(T, H, W\) token grid, but the sparse calls of "
                                         "FluxTransformer2DModel"):
        dit_accel.apply(model, dit_accel.VSA(topk=1), backend="torch")
    with pytest.raises(ValueError, match=r"VSA needs a video token grid \(T, H, W\).*on an image model use Tile"):
        dit_accel.VSA(topk=1).plan((10, 13))


def test_ring_attention_is_refused():
    plan = dit_accel.VSA(topk=1).plan((4, 8, 8))
    with pytest.raises(ValueError, match="ring attention"):
        plan.check_part((0, 128))


def test_config_is_validated_and_round_trips():
    assert dit_accel.VSA().effective_sparsity == 0.8 and dit_accel.VSA().topk is None
    assert dit_accel.VSA().plan((4, 8, 12)).count == 2  # 10 cubes: ceil(0.2 * 10)
    assert dit_accel.VSA(topk=3).sparsity is None
    assert dit_accel.VSA(tile=4).tile == (4, 4, 4)
    with pytest.raises(ValueError, match="VSA.topk"):
        dit_accel.VSA(topk=3, sparsity=0.5)
    with pytest.raises(ValueError, match="VSA.sparsity"):
        dit_accel.VSA(sparsity=1.5)
    with pytest.raises(ValueError, match="VSA.tile"):
        dit_accel.VSA(topk=1, tile=(4, 4))
    method = dit_accel.VSA(topk=3, tile=(4, 8, 8))
    from dit_accel.checkpoints.finetuned import method_from_dict

    assert method_from_dict(method.to_dict()) == method
    assert dit_accel.method_from_name("vsa", sparsity=0.9) == dit_accel.VSA(sparsity=0.9)
    assert "vsa" in dit_accel.registered_methods()


def test_apply_with_a_tile_larger_than_the_grid_runs_its_one_cube(wan):
    """Issue 74, item 1: apply(VSA(tile=(50, 50, 50))) on a small grid ran for minutes (cubes sized by the tile's
    volume). Clamped to the (4, 12, 12) grid it is one cube of 576 tokens: the model's dense output, at once."""
    grid = (4, 12, 12)
    kwargs = T.tiny_transformer_inputs("wan", wan, grid=grid)
    dense = _run(wan, kwargs)
    with dit_accel.apply(wan, dit_accel.VSA(tile=(50, 50, 50)), backend="torch") as handle:
        out = _run(wan, kwargs)
        plan = handle.plan(dit_accel.VSA(tile=(50, 50, 50)), grid)
        assert plan.cubes.count == 1 and plan.cubes.volume == 1024 and plan.density == 1.0
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)
