"""docs/scripts/long_clip_checks.py's per-head oracle (BENCHMARKS.md section 8 cites it): the attention mass that the
best key tiles per query tile keep, against a brute-force reading of that definition."""
import importlib.util
from pathlib import Path

import torch

from dit_accel.patterns.tile import tile_mask

_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "scripts" / "long_clip_checks.py"


def _script():
    spec = importlib.util.spec_from_file_location("long_clip_checks", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tile_ids_group_tokens_as_the_tile_pattern_does():
    grid = (6, 8, 12)  # a ragged last tile on the first axis
    ids = _script()._tile_ids(grid, (4, 4, 4))
    assert torch.equal(ids[:, None] == ids[None, :], tile_mask(grid, (4, 4, 4), (1, 1, 1)))


def test_oracle_mass_is_the_mass_in_each_query_tiles_best_key_tiles():
    checks = _script()
    grid, keep = (4, 8, 8), 2
    ids = checks._tile_ids(grid, (4, 4, 4))
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(2, len(ids), len(ids), generator=g), -1)
    expected = []
    for h in range(2):
        total = 0.0
        for query_tile in ids.unique():
            rows = p[h][ids == query_tile]
            mass = torch.stack([rows[:, ids == key_tile].sum(-1).mean() for key_tile in ids.unique()])
            best = ids.unique()[mass.topk(keep).indices]
            total += float(rows[:, torch.isin(ids, best)].sum())
        expected.append(total / len(ids))
    torch.testing.assert_close(checks._oracle_mass(p, ids, keep), torch.tensor(expected))
    uniform = torch.full((1, len(ids), len(ids)), 1.0 / len(ids))  # a head that averages: keeps keep / tiles
    torch.testing.assert_close(checks._oracle_mass(uniform, ids, keep), torch.tensor([keep / 4]))


def test_steps_plan_runs_the_method_exactly_on_the_steps_not_listed_dense():
    """`sweep --dense-steps 0,1,2,4,6`: the plan covers each step outside the list with the method, no step inside."""
    import dit_accel

    checks = _script()
    method = dit_accel.Tile(tile=(1, 12, 12), window=(1, 1, 1), block_size=144)
    for dense in [(0, 1, 2, 4, 6), (0, 2, 4, 6), (1,), (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]:
        plan = checks._steps_plan(method, dense, 12)
        covered = {s for p in plan.phases for s in range(p.start, p.stop) if p.default == method}
        assert covered == set(range(12)) - set(dense)
        assert all(not p.layers for p in plan.phases)
    assert checks._dense_steps("3") == 3 and checks._dense_steps("0,1,2,4") == (0, 1, 2, 4)


def test_the_hand_written_head_plans_are_what_benchmarks_says():
    """docs/calibrate_evidence/tiny-shapes-63-heads (BENCHMARKS.md section 8.7): 3 dense steps, then
    Tile over 3 of 32 frames on every head except the named ones, which stay dense until step 6."""
    import dit_accel
    from dit_accel import Dense

    folder = _SCRIPT.parents[1] / "calibrate_evidence" / "tiny-shapes-63-heads"
    tile = dit_accel.Tile(tile=(1, 12, 12), window=(3, 1, 1), block_size=144)
    kept = {"uniform-after-3.json": set(), "layer3-dense-to-6.json": {(3, h) for h in range(4)},
            "l3h0-dense-to-6.json": {(3, 0)}, "l3h1-dense-to-6.json": {(3, 1)}, "l2h3-dense-to-6.json": {(2, 3)}}
    assert {p.name for p in folder.glob("*.json")} == set(kept)
    for name, heads in kept.items():
        plan = dit_accel.SparsePlan.load(folder / name)
        assert (plan.num_layers, plan.num_heads) == (4, 4)
        for step in range(12):
            for layer in range(4):
                expected = tuple(Dense() if step < 3 or (3 <= step < 6 and (layer, h) in heads) else tile
                                 for h in range(4))
                assert plan.head_methods(layer, step, 4) == expected, (name, step, layer)


def test_sweep_asks_for_a_method_or_plans_before_it_loads_anything(capsys):
    import pytest

    with pytest.raises(SystemExit, match="--method JSON .* or --plans"):
        _script().main(["sweep", "--weights", "/nonexistent"])
    with pytest.raises(SystemExit, match="drop --ft and --layer-methods"):
        _script().main(["sweep", "--weights", "/nonexistent", "--plans", "p.json", "--ft", "ft"])


def test_the_lora_evidence_runs_the_head_plans_it_names():
    """docs/calibrate_evidence/tiny-shapes-63-lora (BENCHMARKS.md section 8.7): p3 and p3h run what
    the seventeenth stage's uniform-after-3 and l3h0-dense-to-6 run, at the shipped plan's call and timesteps, and
    each `finetune --plan` folder's LoRA belongs to its plan (the content hash `apply(..., weights=)` checks). ft-p3
    shipped in the package until the twenty-first stage's bridged plan replaced the calibrated plan of its content."""
    import json

    import dit_accel
    from dit_accel.checkpoints.finetuned import load_method

    evidence = _SCRIPT.parents[1] / "calibrate_evidence"
    folder = evidence / "tiny-shapes-63-lora"
    shipped = dit_accel.SparsePlan.load(_SCRIPT.parents[2] / "dit_accel" / "models" / "plans" / "tiny-shapes-63.json")
    for name, source in (("p3", "uniform-after-3"), ("p3h", "l3h0-dense-to-6")):
        plan = dit_accel.SparsePlan.load(folder / f"{name}.json")
        assert plan.content_hash() == dit_accel.SparsePlan.load(evidence / "tiny-shapes-63-heads" /
                                                                f"{source}.json").content_hash()
        for key in ("model_class", "grids", "call", "timesteps"):
            assert plan.provenance[key] == shipped.provenance[key], (name, key)
        assert "not calibrate's output" in plan.provenance["note"]
        lora = folder / f"ft-{name}"
        assert load_method(lora).content_hash() == plan.content_hash()
        run = json.loads((lora / "finetune_run.json").read_text())
        assert (run["model"], run["frames"], run["mode"], run["plan"]) == ("tiny-shapes-63", 63, "distill",
                                                                          plan.content_hash())


def test_the_held_out_prompts_are_outside_the_calibration_file():
    from dit_accel.models.clips import PROMPTS

    script = _script()
    held, calibration = script.held_out_prompts(), script._calibration_prompts()
    assert len(held) == len(set(held)) == 8 and set(held) <= set(PROMPTS) and not set(held) & set(calibration)
    # The file `dit-accel eval --prompts` read for the eighteenth stage's held-out eval holds exactly these.
    from dit_accel.training.data import read_prompts

    assert read_prompts(_SCRIPT.parents[1] / "calibrate_evidence" / "tiny-shapes-63-lora" / "held-out.prompts.txt") \
        == held
