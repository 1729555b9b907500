"""Plans and plan files, round 11: each test pins one fault found by handing SparsePlan hand-edited files and odd
plans (a silent wrong answer, a raw traceback, or a table that said something other than what runs, before the fix).
Expectations are written out by hand from the JSON, not read back from the plan."""

import json

import pytest

import dit_accel
from dit_accel import Phase, SparsePlan
from dit_accel.plans.per_head import PerHead

TILE = {"method": "tile", "tile": [1, 4, 4], "window": [1, 1, 3]}


def _plan(layers: str, num_layers: str = "4") -> str:
    """A plan file's text with ``layers`` written as given (so a key can appear twice)."""
    return ('{"format": "dit_accel.sparse_plan", "format_version": 1, "num_layers": ' + num_layers + ', '
            '"num_heads": 2, "phases": [{"steps": [0, null], "default": {"method": "dense"}, "layers": {' + layers +
            '}}]}')


# ------------------------------------------------------------------ a key given twice
@pytest.mark.parametrize("text, field", [
    (_plan(f'"1": {json.dumps(TILE)}, "1": {{"method": "dense"}}'), r'phases\[0\]\.layers\["1"\]'),
    (_plan(f'"1": {json.dumps(TILE)}', num_layers='4, "num_layers": 8'), "num_layers"),
    (_plan('"2": {"method": "sla", "topk": 0.2, "topk": 0.9}'), r'phases\[0\]\.layers\["2"\]\.topk'),
    (_plan('"3": {"method": "per_head", "heads": [{"method": "dense"}, {"method": "sla", "topk": 0.5, '
           '"topk": 1}]}'), r'phases\[0\]\.layers\["3"\]\.heads\[1\]\.topk'),
], ids=["layer", "num_layers", "option", "head-option"])
def test_a_key_given_twice_in_a_plan_file_is_refused_naming_it(text, field, tmp_path):
    """Before: JSON kept the last silently: layer 1's Tile entry followed by a dense one loaded as dense, a second
    num_layers replaced the first, a per-head SLA ran topk 1 (dense) where the file also said 0.5."""
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"plan.json: {field}: given twice in one object .*keep one of them$"):
        SparsePlan.load(path)
    # the same file with each key once loads, and runs what it says (written out by hand here)
    path.write_text(_plan(f'"1": {json.dumps(TILE)}, "3": {{"method": "sla", "topk": 0.2}}'))
    plan = SparsePlan.load(path)
    assert plan.for_layer_step(1, 0) == dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))
    assert plan.for_layer_step(3, 7) == dit_accel.SLA(topk=0.2)
    assert plan.for_layer_step(0, 0) is None and plan.for_layer_step(2, 3) is None


def test_a_strategy_file_giving_a_step_layer_head_twice_is_refused(tmp_path):
    """Before: FastVideo's ``"0_1_0"`` given twice loaded its last windows without a word."""
    path = tmp_path / "strategy.json"
    path.write_text('{"0_1_0": [1, 1, 3], "0_1_1": [1, 3, 3], "0_1_0": [1, 1, 1]}')
    with pytest.raises(ValueError, match=r'strategy.json: \["0_1_0"\]: given twice in one object'):
        SparsePlan.load(path)
    path.write_text('{"0_1_0": [1, 1, 3], "0_1_1": [1, 3, 3]}')
    assert SparsePlan.load(path).for_layer_step(1, 0).window == ((1, 1, 3), (1, 3, 3))


# ------------------------------------------------------------------ VSA in a plan's summary and table
def _vsa_plan() -> SparsePlan:
    return SparsePlan([Phase(0, 1), Phase(1, None, default=dit_accel.VSA(topk=2))], num_layers=2, num_heads=2,
                      provenance={"grids": [[4, 8, 8]], "steps": 4})


def test_a_plan_running_vsa_prints_its_summary_and_table():
    """Before: ``summary_line()`` / ``table()`` (what ``generate --plan`` and ``info --plan`` print) raised
    ``AttributeError: 'VSAPlan' object has no attribute 'layout'``."""
    plan = _vsa_plan()
    prof = plan.profile()
    # grid 4x8x8 in 4x4x4 cubes: 1 x 2 x 2 = 4 cubes, 2 kept per query cube: density 1/2; step 0 dense (1)
    assert prof["mean_density"] == pytest.approx((1 * 1.0 + 3 * 0.5) / 4)
    assert set(prof["share"]) == {"vsa", "dense"} and prof["seconds"]["vsa"] > 0
    # at a video's size a VSA head keeping a fifth of its cubes costs less than a dense head (3 VSA steps, 1 dense)
    big = SparsePlan(plan.phases[:1] + (Phase(1, None, default=dit_accel.VSA(sparsity=0.8)),), num_layers=2,
                     num_heads=2, provenance={"grids": [[16, 48, 48]], "steps": 4}).profile()["seconds"]
    assert 0 < big["vsa"] / 3 < big["dense"] / 1
    lines = plan.table()
    assert lines[-2:] == ["steps 1..end:", "  layers 0-1: all heads vsa(topk=2)"]
    assert "vsa" in plan.summary_line()


def test_info_plan_prints_a_vsa_plan(tmp_path, capsys):
    from dit_accel.cli.main import main

    path = _vsa_plan().save(tmp_path / "plan.json")
    assert main(["info", "--plan", str(path)]) == 0
    assert "layers 0-1: all heads vsa(topk=2)" in capsys.readouterr().out


# ------------------------------------------------------------------ per-head windows in the table
@pytest.mark.parametrize("method, same, heads", [
    (dit_accel.Tile(tile=(1, 4, 4), window=((1, 1, 3), (1, 3, 3))),
     PerHead((dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3)), dit_accel.Tile(tile=(1, 4, 4), window=(1, 3, 3)))),
     "head 0 tile(tile=1x4x4, window=1x1x3); head 1 tile(tile=1x4x4, window=1x3x3)"),
    (dit_accel.GNA(kernel_size=((2, 3, 3), (2, 3, 3), (3, 3, 3))),
     PerHead((dit_accel.GNA(kernel_size=(2, 3, 3)),) * 2 + (dit_accel.GNA(kernel_size=(3, 3, 3)),)),
     "heads 0-1 gna(kernel_size=2x3x3); head 2 gna(kernel_size=3x3x3)"),
], ids=["tile", "gna"])
def test_the_table_names_each_heads_own_window(method, same, heads):
    """Before: ``layer 1: all heads tile(tile=1x4x4, window=((1, 1, 3), (1, 3, 3)))``: read as every head running
    one window; head 0 runs 1x1x3, head 1 runs 1x3x3."""
    for entry in (method, same):  # per-head windows, and the same heads as a PerHead entry, read the same
        plan = SparsePlan([Phase(0, None, {1: entry})], num_layers=3, num_heads=method.heads)
        assert plan.table()[-3:] == ["  layer 0: all heads dense", f"  layer 1: {heads}",
                                     "  layer 2: all heads dense"]


# ------------------------------------------------------------------ a plan that saves loads back
def test_a_plan_whose_phases_run_past_its_recorded_steps_is_refused_when_built():
    """Before: ``SparsePlan([Phase(0, 10, ...)], provenance={"steps": 5}).save(p)`` wrote a file that
    ``SparsePlan.load(p)`` refused ("phases[0].steps: steps 0..9 run past the last step")."""
    sla = dit_accel.SLA(topk=0.2)
    for phases in ([Phase(0, 10, default=sla)], [Phase(0, 2), Phase(7, None, default=sla)], [Phase(5, 6)]):
        with pytest.raises(ValueError, match=r"SparsePlan phase steps .* run past the last step: provenance "
                                             r"steps=5 \(steps 0..4\)"):
            SparsePlan(phases, provenance={"steps": 5})


@pytest.mark.parametrize("phases", [[Phase(0, 5)], [Phase(0, 2), Phase(4, None, default=dit_accel.SLA(topk=0.2))]])
def test_a_plan_within_its_steps_saves_and_loads_back_the_same(phases, tmp_path):
    plan = SparsePlan(phases, num_layers=2, provenance={"steps": 5})
    back = SparsePlan.load(plan.save(tmp_path / "plan.json"))
    assert back.phases == plan.phases and back.content_hash() == plan.content_hash()


# ------------------------------------------------------------------ a plan with no layer count
def test_the_table_of_a_plan_without_a_layer_count_says_what_the_later_layers_run():
    """Before: a plan with ``num_layers`` null listed layers 0..1 only; every later layer of the model runs the
    phase's default (SLA here), which the table did not show."""
    sla, tile = dit_accel.SLA(topk=0.2), dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))
    plan = SparsePlan([Phase(0, 2, {1: tile}, default=sla), Phase(2, None, default=sla)])
    assert plan.table()[-7:] == [
        "steps 0..1:", "  layer 0: all heads sla(topk=0.2)", "  layer 1: all heads tile(tile=1x4x4, window=1x1x3)",
        "  layers 2 and up (num_layers not recorded): all heads sla(topk=0.2)",
        "steps 2..end:", "  layers 0-1: all heads sla(topk=0.2)",
        "  layers 2 and up (num_layers not recorded): all heads sla(topk=0.2)"]
    bare = SparsePlan([Phase(0, None, default=sla)])  # no layer named at all
    assert bare.table()[-2:] == ["steps 0..end:", "  every layer (num_layers not recorded): all heads sla(topk=0.2)"]
    assert plan.for_layer_step(40, 1) == sla and plan.for_layer_step(40, 3) == sla  # what runs there



# ------------------------------------------------------------------ each head's config
def test_head_methods_gives_each_head_its_own_window(tmp_path):
    """Before: ``head_methods(1, 0, 2)`` of a per-head Tile entry was the whole two-window Tile for each head, and
    a per-head entry of 2 heads asked for 4 heads gave back 2 configs without a word."""
    path = tmp_path / "plan.json"
    path.write_text(_plan('"1": {"method": "tile", "tile": [1, 4, 4], "window": [[1, 1, 3], [1, 3, 3]]}, '
                          '"2": {"method": "per_head", "heads": [{"method": "dense"}, {"method": "sla", "topk": 0.2}]}'))
    plan = SparsePlan.load(path)
    tile = dit_accel.Tile
    assert plan.head_methods(1, 0, 2) == (tile(tile=(1, 4, 4), window=(1, 1, 3)), tile(tile=(1, 4, 4), window=(1, 3, 3)))
    assert plan.head_methods(2, 5, 2) == (dit_accel.Dense(), dit_accel.SLA(topk=0.2))
    assert plan.head_methods(0, 0, 3) == (dit_accel.Dense(),) * 3
    for layer in (1, 2):
        with pytest.raises(ValueError, match=rf"plan.json: layer {layer} at step 0 runs 2 per-head methods; heads=4"):
            plan.head_methods(layer, 0, 4)


# ------------------------------------------------------------------ a write that fails
@pytest.mark.parametrize("where", ["fsync", "mkstemp"])
def test_a_failed_save_names_the_plan_and_leaves_the_old_file(where, tmp_path, monkeypatch):
    """Before: a full disk said ``OSError: [Errno 28] No space left on device: '.../.plan.json.k2j4_x.tmp'``: a
    temporary file the user never asked for, and that no longer exists."""
    import errno

    from dit_accel.plans import plan_json

    path = tmp_path / "plan.json"
    path.write_text("old plan")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".plan.json.k2j4_x.tmp"))

    monkeypatch.setattr(plan_json.os if where == "fsync" else plan_json.tempfile, where, full)
    with pytest.raises(OSError, match=r"No space left on device; nothing written.*: '.*plan.json'$") as err:
        SparsePlan([Phase(0, None)]).save(path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path) and ".tmp" not in str(err.value)
    assert path.read_text() == "old plan" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_plan_with_fewer_timesteps_than_steps_is_refused(tmp_path):
    """Before: accepted; ``finetune --plan`` maps a training noise level to the plan's step by its place in
    ``provenance.timesteps``, so with 3 timesteps for 4 steps step 3 was never trained and the last noise level
    trained as step 2."""
    plan = SparsePlan([Phase(0, 2), Phase(2, None, default=dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)))],
                      provenance={"steps": 4, "timesteps": [999.0, 750.0, 500.0, 250.0]})
    path = plan.save(tmp_path / "plan.json")
    assert SparsePlan.load(path).provenance["timesteps"] == [999.0, 750.0, 500.0, 250.0]
    data = json.loads(path.read_text())
    data["provenance"]["timesteps"] = [999.0, 750.0, 500.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"provenance\.timesteps: has 3 entries; the plan is for 4 steps"):
        SparsePlan.load(path)
