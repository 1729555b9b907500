"""SparsePlan: JSON round trip with provenance, FastVideo STA strategy import/export, apply(model, plan).

``apply`` is checked against an oracle independent of dit_accel's path: every self-attention SDPA
call of the unmodified model replaced by the fp32 dense reference under the per-head token masks
the plan gives that layer at that step.
"""

import json

import pytest
import torch

import dit_accel
from dit_accel import PerHead, Phase, SparsePlan
from dit_accel.models import tiny as T
from dit_accel.plans.per_head import _raster_mask
from dit_accel.plans.sparse_plan import method_from_json, method_to_json
from tests.utils import PerCallReference

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
GNA = dit_accel.GNA(kernel_size=(2, 5, 5))


def _plan():
    return SparsePlan((Phase(0, 1), Phase(1, None, {0: PerHead((TILE, GNA)), 1: TILE})), num_layers=2, num_heads=2,
                      provenance=SparsePlan.provenance_now(model_class="WanTransformer3DModel", budget={"min_psnr": 30}))


def test_json_round_trip_keeps_every_entry_and_the_provenance(tmp_path):
    plan = SparsePlan((Phase(0, 2), Phase(2, 5, {0: PerHead((TILE, dit_accel.SLA(topk=0.2), dit_accel.Dense())),
                                                 3: dit_accel.Radial(decay=0.5, sink_frames=())},
                                             default=GNA)),
                      num_layers=4, num_heads=3, provenance=SparsePlan.provenance_now(model_id="m", grids=[(4, 8, 8)]))
    path = plan.save(tmp_path / "plan.json")
    assert not [p for p in tmp_path.iterdir() if p.name != "plan.json"]  # no temporary file left
    back = SparsePlan.load(path)
    assert back.to_json() == plan.to_json()
    assert back.phases == plan.phases and back.provenance["model_id"] == "m"
    assert {"versions", "date"} <= set(back.provenance)
    assert back.for_layer_step(3, 2) == dit_accel.Radial(decay=0.5, sink_frames=())
    assert back.for_layer_step(1, 4) == GNA and back.for_layer_step(1, 5) is None and back.for_layer_step(3, 0) is None
    for m in plan.methods():
        assert method_from_json(json.loads(json.dumps(method_to_json(m)))) == m
    # the content hash (what fine-tuned weights record) ignores provenance, not the entries
    assert back.content_hash() == plan.content_hash() == SparsePlan(plan.phases, 4, 3, {"x": 1}).content_hash()
    assert SparsePlan(plan.phases[:1], 4, 3).content_hash() != plan.content_hash()
    assert SparsePlan(plan.phases, 5, 3).content_hash() != plan.content_hash()


def test_bad_plans_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        SparsePlan((Phase(0, 3), Phase(2, None)))
    with pytest.raises(ValueError, match="head methods"):
        SparsePlan((Phase(0, None, {0: PerHead((TILE,) * 3)}),), num_heads=2)
    (tmp_path / "x.json").write_text('{"format": "dit_accel.sparse_plan", "phases": [')
    with pytest.raises(ValueError, match="x.json: is truncated"):
        SparsePlan.load(tmp_path / "x.json")


def test_fastvideo_strategy_imports_and_exports_unchanged(tmp_path):
    strategy = {f"{s}_{l}_{h}": ([3, 6, 10] if s < 2 else [1, 2 + h, 3]) for s in range(4) for l in range(3)
                for h in range(2) if not (s == 3 and l == 1)}
    path = tmp_path / "mask_strategy.json"
    path.write_text(json.dumps(strategy))
    plan = SparsePlan.load(path)  # recognised as a FastVideo file
    assert [(p.start, p.stop) for p in plan.phases] == [(0, 2), (2, 3), (3, 4)]
    table = dit_accel.Tile.from_strategy(str(path)) if hasattr(dit_accel.Tile, "from_strategy") else None
    for step in range(5):
        for layer in range(3):
            expected = table.for_layer_step(layer, step) if table is not None else None
            assert plan.for_layer_step(layer, step) == expected
    assert plan.to_tile_strategy(tmp_path / "out.json") == strategy
    assert json.loads((tmp_path / "out.json").read_text()) == strategy
    back = SparsePlan.load(plan.save(tmp_path / "plan.json"))
    assert back.to_tile_strategy() == strategy


def test_a_plan_of_tile_windows_with_a_dense_head_exports_with_the_grid():
    plan = SparsePlan((Phase(0, 2, {1: PerHead((TILE, dit_accel.Dense()))}),), num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match="grid"):
        plan.to_tile_strategy()
    out = plan.to_tile_strategy(grid=(4, 8, 8))
    assert out == {"0_1_0": [1, 1, 1], "0_1_1": [4, 2, 2], "1_1_0": [1, 1, 1], "1_1_1": [4, 2, 2]}
    with pytest.raises(ValueError, match="Tile"):
        SparsePlan((Phase(0, 1, {0: GNA}),)).to_tile_strategy()


def _mask(method, grid):
    plan = method.plan(grid)
    n = plan.num_tokens
    return torch.ones(n, n, dtype=torch.bool) if plan.is_dense else _raster_mask(plan)


def test_apply_runs_the_plan_per_step_layer_and_head():
    model = T.build_tiny_transformer("wan")
    grid = T.TRANSFORMER_GRIDS["wan"]
    kwargs = T.tiny_transformer_inputs("wan", model, grid=grid)
    plan = _plan()
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with PerCallReference([torch.stack([_mask(TILE, grid), _mask(GNA, grid)]), _mask(TILE, grid)]) as mode:
            ref = model(**kwargs)[0]
        assert mode.calls == 2
        handle = dit_accel.apply(model, plan, backend="torch")
        try:
            handle.set_step(0, 4)
            warm = model(**kwargs)[0]
            handle.set_step(1, 4)
            out = model(**kwargs)[0]
            rows = handle.stats()
            summary = handle.summary()  # read while applied: a removed handle has no stats
        finally:
            handle.remove()
    torch.testing.assert_close(warm, dense, atol=1e-5, rtol=1e-5)  # step 0: the dense warm-up phase
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert all(r["sparse_calls"] == 1 for r in rows)
    assert summary["config"]["plan"]["num_layers"] == 2


def test_apply_refuses_a_plan_for_another_layer_count():
    model = T.build_tiny_transformer("wan")
    with pytest.raises(ValueError, match="3 attention layers"):
        dit_accel.apply(model, SparsePlan((Phase(0, None, {0: TILE}),), num_layers=3))


def test_the_file_format_name_outlives_the_module_layout():
    """Plan files in the wild say "dit_accel.sparse_plan": a module move must not rename the format they carry."""
    import json
    from pathlib import Path

    from dit_accel.plans.plan_json import FORMAT

    assert FORMAT == "dit_accel.sparse_plan"
    shipped = Path(__file__).resolve().parents[2] / "dit_accel" / "models" / "plans" / "tiny-shapes-63.json"
    assert json.loads(shipped.read_text())["format"] == FORMAT
    assert SparsePlan.load(shipped).num_layers >= 1
