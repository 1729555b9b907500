"""Plans you can trust (issue 37): every field of a plan file validated on load with one line naming the file
and the field; ``apply`` / ``--plan`` refuse a plan made for another model class, layer count, head count,
token grid or step count, with both values; the one-line summary and ``info --plan``'s table."""

import copy
import json
import math
import warnings

import pytest
import torch

import dit_accel
from dit_accel import PerHead, Phase, SparsePlan
from dit_accel.kernels import cost as kernel_cost
from dit_accel.models import tiny as T

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
SLA = dit_accel.SLA(topk=0.5)


# ------------------------------------------------------------------ every field validated on load
def _valid_json() -> dict:
    """A plan with every kind of field: phases, a default, layer entries, a per-head entry, provenance."""
    plan = SparsePlan((Phase(0, 2), Phase(2, None, {0: PerHead((TILE, SLA)), 1: TILE}, default=dit_accel.Dense())),
                      num_layers=2, num_heads=2,
                      provenance=dict(model_class="WanTransformer3DModel", model_id="tiny-wan", grids=[[4, 8, 8]],
                                      steps=4, timesteps=[1000.0, 750.0, 500.0, 250.0],
                                      call={"num_frames": 13, "height": 64, "width": 64}, budget={"min_psnr": 30}))
    return plan.to_json()


BAD = [None, "x", -1, 1.5, [], {}, True, "nan", float("nan")]
_DELETE = object()


def _paths(value, path=()):
    """Every (path, value) in a JSON tree, below the root."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path + (k,), v
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield path + (i,), v
            yield from _paths(v, path + (i,))


def _render(path) -> str:
    """A field path as the error messages spell it: ``phases[1].layers["0"].heads[1].topk``."""
    out = ""
    for i, part in enumerate(path):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 1 and path[i - 1] == "layers":
            out += f"[{json.dumps(part)}]"
        else:
            out += ("." if out else "") + part
    return out


def _valid_mutation(path, value) -> bool:
    """The mutations that leave a valid plan (everything else must be refused)."""
    text = _render(path)
    deleted = value is _DELETE
    if text.startswith("provenance.budget"):  # a record for people: any value JSON has (no NaN: read_json refuses it)
        return not (isinstance(value, float) and value != value)
    if text in ("provenance.timesteps", "provenance.call"):
        return deleted or value is None or value == ([] if text.endswith("timesteps") else {})
    if text.startswith("provenance.timesteps["):
        return value == 1.5  # (deleting one leaves fewer timesteps than steps: refused)
    if deleted:
        return text in ("num_layers", "num_heads", "provenance", "format_version", "phases[0]", "phases[1]",
                        "provenance.grids[0]") or text.startswith("provenance.") or \
            text.endswith((".default", ".layers", 'layers["0"]', 'layers["1"]')) or \
            (_in_entry(path) and len(path) == _in_entry(path) + 1 and path[-1] not in ("method", "heads"))  # an option: its default
    if text in ("provenance.model_class", "provenance.model_id"):
        return value is None or value in ("x", "nan")
    if text in ("num_layers", "num_heads", "provenance", "provenance.grids", "provenance.steps") or \
            text.startswith("provenance.call."):
        return value is None or (text == "provenance" and value == {}) or (text == "provenance.grids" and value == [])
    if text.endswith(".layers") or text == "phases":
        return value == {} if text.endswith(".layers") else value == []
    if text == "phases[1].steps[1]":  # the last phase's end: null (to the last step) is what it was
        return value is None
    return False


def _in_entry(path) -> int:
    """The length of the path of the method entry ``path`` goes through (0: none)."""
    data, found = _valid_json(), 0
    for i, part in enumerate(path):
        if isinstance(data, dict) and "method" in data:
            found = i
        data = data[part] if isinstance(data, (dict, list)) and (part in data if isinstance(data, dict)
                                                                  else part < len(data)) else None
    return found


def _mutations():
    base = _valid_json()
    for path, _ in _paths(base):
        for value in [*BAD, _DELETE]:
            yield path, value


@pytest.mark.parametrize("path,value", list(_mutations()),
                         ids=lambda x: _render(x) if isinstance(x, tuple) else "delete" if x is _DELETE else repr(x))
def test_every_field_of_a_damaged_plan_is_refused_in_one_line_naming_the_file_and_the_field(path, value, tmp_path):
    data = copy.deepcopy(_valid_json())
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    file = tmp_path / "plan.json"
    file.write_text(json.dumps(data))
    try:
        plan = SparsePlan.load(file)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(f"{file}: "), message
        # the field, or the list holding it, or the method entry whose check blames a sibling option
        named = [_render(path), _render(path[:-1]), _render(path[:_in_entry(path)])]
        assert any(f": {n}" in message or f"{n}:" in message or f" {n} " in message for n in named if n), \
            (named, message)
        assert not _valid_mutation(path, value), f"a valid value was refused: {message}"
        return
    # Anything else (TypeError, AttributeError, ...) fails the test above by escaping.
    assert _valid_mutation(path, value), f"{_render(path)} = {value!r} was accepted: {plan!r}"
    plan.summary_line()  # an accepted plan can be shown


@pytest.mark.parametrize("key", ["one", "-1", "1.5", "", " 1", "7"])
def test_a_layer_key_that_is_not_a_layer_of_the_plan_is_refused(key, tmp_path):
    data = _valid_json()
    data["phases"][1]["layers"][key] = data["phases"][1]["layers"].pop("1")
    file = tmp_path / "p.json"
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        SparsePlan.load(file)
    assert str(err.value).startswith(f"{file}: phases[1].layers[{json.dumps(key)}]: ")
    assert "past the plan's 2 layers" in str(err.value) if key == "7" else "not a layer index" in str(err.value)


@pytest.mark.parametrize("content,problem", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"), (b"\xff\xfe{}", "not UTF-8"), (b"", "empty"),
    (b'{"format": "dit_accel.sparse_plan", "phases": [', "truncated"), (b"[" * 100000 + b"]" * 100000, None),
    (b"null", "format"), (b'"x"', "format"), (b"[]", "format"), (b"{}", "format"),
    (b'{"format": "dit_accel.sparse_plan"}', "phases: missing"),
    (b'{"format": "dit_accel.sparse_plan", "phases": {"a": 1}}', "phases: must be a list"),
    (b'{"format": "dit_accel.sparse_plan", "phases": [], "num_layers": "4"}', "num_layers: must be a whole"),
    (b'{"format": "dit_accel.sparse_plan", "phases": [], "format_version": 9}', "upgrade"),
    (b'{"format": "dit_accel.sparse_plan", "phases": [], "phase": []}', "phase: not a field of a plan"),
    (b'{"format": "dit_accel.sparse_plan", "phases": [{"steps": [0, null], "layers": {"0": {"method": "tile_strategy"'
     b', "path": "x"}}}]}', "is a schedule"),
    (b'{"format": "dit_accel.sparse_plan", "phases": [{"steps": [0, null], "layers": {"0": {"method": "tile", '
     b'"tile": [1, 4, 4], "window": [1, 1, 1], "windw": 3}}}]}', 'phases[0].layers["0"].windw: not a field'),
])
def test_a_damaged_file_is_one_line_naming_it(content, problem, tmp_path):
    file = tmp_path / "bad.json"
    file.write_bytes(content)
    with pytest.raises(ValueError) as err:
        SparsePlan.load(file)
    message = str(err.value)
    assert message.startswith(f"{file}: ") and "\n" not in message
    assert problem is None or problem in message, message


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    for path in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(ValueError, match=f"^{path}: cannot read it"):
            SparsePlan.load(path)


def test_phases_past_the_recorded_steps_and_unrecorded_layers_are_errors(tmp_path):
    data = _valid_json()
    data["phases"][1]["steps"] = [2, 6]
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"p.json: phases\[1\].steps: steps 2..5 run past the last step: the plan "
                                         r"is for 4 steps"):
        SparsePlan.load(tmp_path / "p.json")
    with pytest.raises(ValueError, match="num_layers=.4.* is invalid"):
        SparsePlan((), num_layers="4")


# ------------------------------------------------------------------ a plan knows what it is for
STEPS = 2
CALL = dict(prompt="a fox", num_frames=5, height=32, width=32, num_inference_steps=STEPS, output_type="pt")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def pipe():
    return T.build_tiny_pipeline("tiny-wan")


@pytest.fixture(scope="module")
def grid(pipe):
    seen = []
    with dit_accel.apply(pipe, dit_accel.Dense(), capture=_GridProbe(seen)):
        _run(pipe)
    return seen[0]


class _GridProbe:
    """A capture observer that only records the token grid of the first call."""

    def __init__(self, seen):
        self.seen = seen

    def wants(self, layer, step):
        return not self.seen

    def save(self, layer, name, grid, step, q, k, v, heads=None):
        self.seen.append(tuple(grid))


def _run(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames


def _plan(grid, **provenance):
    prov = dict(model_class="WanTransformer3DModel", grids=[list(grid)], steps=STEPS)
    prov.update(provenance)
    return SparsePlan((Phase(0, 1), Phase(1, None, {0: TILE, 1: PerHead((TILE, dit_accel.Dense()))})),
                      num_layers=2, num_heads=2, provenance={k: v for k, v in prov.items() if v is not None},
                      source="p.json")


def _processors(pipe):
    return [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("case,expect", [
    ("class", "plan p.json was calibrated for FluxTransformer2DModel; this pipeline's transformer is "
              "WanTransformer3DModel"),
    ("layers", "plan p.json is for 3 attention layers .*; this model has 2"),
    ("layer-past", "plan p.json names layer 7 but this model has 2 attention layers"),
    ("heads", "plan p.json is for 3 heads per attention layer; this model's layers have 2"),
    ("per-head", "give layer 1 3 per-head methods; that layer of this model has 2 heads"),
])
def test_apply_refuses_a_plan_for_another_model_and_leaves_it_as_it_was(case, expect, pipe, grid):
    plan = _plan(grid)
    if case == "class":
        plan = _plan(grid, model_class="FluxTransformer2DModel")
    elif case == "layers":
        plan = SparsePlan(plan.phases, 3, 2, plan.provenance, source="p.json")
    elif case == "layer-past":
        plan = SparsePlan((Phase(0, None, {7: TILE}),), None, None, plan.provenance, source="p.json")
    elif case == "heads":
        plan = SparsePlan((Phase(0, None, {0: TILE}),), 2, 3, plan.provenance, source="p.json")
    elif case == "per-head":
        plan = SparsePlan((Phase(0, None, {1: PerHead((TILE,) * 3)}),), None, None, plan.provenance, source="p.json")
    before = _processors(pipe)
    with pytest.raises(ValueError, match=expect):
        dit_accel.apply(pipe, plan)
    assert _processors(pipe) == before


@pytest.mark.parametrize("case,expect", [
    ("grid", "plan p.json was calibrated for token grid 9x9x9; this call's token grid is {grid}: .*allow_other_grid"),
    ("steps", "plan p.json was calibrated for 4 denoising steps; this run has 2"),
    ("phase-past", r"plan p.json has a phase for steps 1..2; this run has 2 denoising steps \(0..1\)"),
])
def test_the_first_call_refuses_another_grid_or_step_count_before_any_attention(case, expect, pipe, grid):
    plan = _plan(grid)
    if case == "grid":
        plan = _plan((9, 9, 9))
    elif case == "steps":
        plan = _plan(grid, steps=4)
    elif case == "phase-past":
        plan = SparsePlan((Phase(0, 1), Phase(1, 3, {0: TILE})), 2, 2, {}, source="p.json")
    dense = _run(pipe)
    handle = dit_accel.apply(pipe, plan, backend="torch")
    try:
        with pytest.raises(ValueError, match=expect.format(grid="x".join(map(str, grid)))):
            _run(pipe)
        assert all(row["sparse_calls"] == 0 and row.get("dense_calls", 0) == 0 for row in handle.stats())
    finally:
        handle.remove()
    torch.testing.assert_close(_run(pipe), dense, rtol=0, atol=0)  # the model as it was


def test_allow_other_grid_runs_the_plan_and_warns_once(pipe, grid):
    plan = _plan((9, 9, 9))
    with pytest.raises(TypeError, match="allow_other_grid"):
        dit_accel.apply(pipe, plan, allow_other_grid="yes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dit_accel.apply(pipe, plan, backend="torch", allow_other_grid=True) as handle:
            _run(pipe)  # steps 0 and 1, both checked
            rows = handle.stats()
            said = [w for w in handle.warnings if "9x9x9" in w]
    assert len(said) == 1 and "running it anyway" in said[0]
    assert len([w for w in caught if "9x9x9" in str(w.message)]) == 1
    assert all(r["sparse_calls"] > 0 for r in rows)


def test_a_matching_plan_runs_with_no_warning(pipe, grid):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dit_accel.apply(pipe, _plan(grid), backend="torch") as handle:
            _run(pipe)
            assert all(r["sparse_calls"] > 0 for r in handle.stats())
    assert not [w for w in caught if "plan" in str(w.message)]


# ------------------------------------------------------------------ readable
def test_the_summary_weighs_methods_by_modelled_attention_time():
    grid = (4, 12, 12)
    n, d = math.prod(grid), 128
    dense_s = kernel_cost.dense_time(n, n, 1, head_dim=d) - kernel_cost.constants().dense_per_call_s
    layout = TILE.plan(grid).layout
    tile_s = kernel_cost.block_sparse_time(layout, heads=1, head_dim=d) - kernel_cost.constants().per_call_s
    # 4 steps x 1 layer x 1 head: steps 0 dense, 1..3 Tile
    plan = SparsePlan((Phase(0, 1), Phase(1, None, {0: TILE})), num_layers=1, num_heads=1,
                      provenance={"grids": [list(grid)], "steps": 4})
    prof = plan.profile()
    assert prof["share"]["tile"] == pytest.approx(3 * tile_s / (3 * tile_s + dense_s))
    assert prof["mean_density"] == pytest.approx((1 + 3 * TILE.plan(grid).density) / 4)
    line = plan.summary_line()
    assert line.startswith(f"plan {plan.content_hash()[:12]}: 4 steps x 1 layers x 1 heads at grid 4x12x12")
    assert f"tile {100 * prof['share']['tile']:.0f}%" in line and f"mean density {prof['mean_density']:.3f}" in line
    assert "\n" not in line and len(line) < 300


def test_info_plan_prints_the_table_and_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    from dit_accel.cli.main import main

    path = tmp_path / "plan.json"
    SparsePlan.from_json(_valid_json()).save(path)
    assert main(["info", "--plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "steps 2..end:" in out and 'layer 0: head 0 tile(tile=1x4x4, window=1x1x1); head 1 sla(topk=0.5)' in out
    assert "layer 1: all heads tile(tile=1x4x4, window=1x1x1)" in out and "steps 0..1:" in out
    path.write_text('{"format": "dit_accel.sparse_plan", "phases": {"a": 1}}')
    assert main(["info", "--plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dit-accel info: --plan: {path}: phases: must be a list of phases; got {{\"a\": 1}}"


def test_the_eval_report_shows_the_summary_not_the_json():
    from dit_accel.eval.report import _config_text

    plan = SparsePlan.from_json(_valid_json())
    text = _config_text({"label": "p", **plan.as_method().to_dict(), "allow_other_grid": True})
    assert text.startswith(plan.summary_line()) and "phases" not in text and text.endswith("allow_other_grid=True")


# ------------------------------------------------------------------ the CLI
def test_generate_refuses_plan_with_method_and_bad_files_before_loading(tmp_path, capsys):
    from dit_accel.cli.main import main

    path = tmp_path / "plan.json"
    SparsePlan.from_json(_valid_json()).save(path)
    out = ["--out", str(tmp_path / "v.gif")]
    for extra, expect in ((["--method", "tile"], "--plan and --method exclude each other"),
                          (["--topk", "0.2"], "--plan and --topk exclude each other"),
                          (["--dense-steps", "1"], "--dense-steps does not combine with --plan")):
        assert main(["generate", "--plan", str(path), *extra, *out]) == 2
        assert expect in capsys.readouterr().err
    assert main(["generate", "--plan-any-grid", *out]) == 2
    assert "--plan-any-grid applies to --plan" in capsys.readouterr().err
    path.write_bytes(b"\x00\x01binary")
    assert main(["generate", "--plan", str(path), *out]) == 2
    assert capsys.readouterr().err.strip() == f"dit-accel generate: error: --plan: {path}: is binary (holds NUL " \
                                               "bytes); expected a dit_accel sparse plan (the JSON that plan.save or " \
                                               "dit-accel calibrate writes)"
    assert not list(tmp_path.glob("v.gif*"))


def test_eval_plan_flags_are_checked(tmp_path, capsys):
    from dit_accel.cli.main import main

    assert main(["eval", "--model", "tiny-shapes", "--methods", "dense", "--plan-any-grid", "--out",
                 str(tmp_path / "e")]) == 2
    assert "--plan-any-grid applies to --plan" in capsys.readouterr().err
    bad = tmp_path / "p.json"
    bad.write_text('{"format": "dit_accel.sparse_plan", "num_layers": "4", "phases": []}')
    assert main(["eval", "--model", "tiny-shapes", "--methods", "dense", "--plan", str(bad), "--out",
                 str(tmp_path / "e")]) == 2
    assert f"--plan: {bad}: num_layers: must be a whole number >= 1 or null; got \"4\"" in capsys.readouterr().err


def test_generate_warms_up_under_the_handle_it_times(tmp_path, monkeypatch):
    """The timed run's plans are the warm-up's (built once), and its statistics count the timed run alone: a warm-up
    under a handle of its own left the timed run to build its plans, kernel layouts and choices again."""
    from dit_accel.cli.main import main
    from dit_accel.models.tiny_shapes import TINY_SHAPES_GRID

    from dit_accel.cli import generate

    builds, at_record = [], []  # Tile plans built; how many when the runs were done and recorded
    original, record = dit_accel.Tile.plan, generate._record
    monkeypatch.setattr(dit_accel.Tile, "plan", lambda self, grid: builds.append(tuple(grid)) or original(self, grid))
    monkeypatch.setattr(generate, "_record", lambda *a, **k: at_record.append(len(builds)) or record(*a, **k))
    plan = SparsePlan((Phase(0, 1), Phase(1, None, {i: TILE for i in range(4)})), num_layers=4, num_heads=4,
                      provenance={"model_class": "WanTransformer3DModel", "grids": [list(TINY_SHAPES_GRID)],
                                  "steps": 2, "call": {"num_frames": 7, "height": 48, "width": 48}})
    path = plan.save(tmp_path / "plan.json")
    assert main(["generate", "--model", "tiny-shapes", "--plan", str(path), "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "a.gif")]) == 0
    assert at_record == [1] and builds[0] == tuple(TINY_SHAPES_GRID)  # once, for the warm-up and the timed run
    meta = json.loads((tmp_path / "a.gif.json").read_text())
    calls = meta["timing"]["transformer_calls"]
    for row in meta["density"]["per_layer"]:  # step 0 dense, step 1 sparse: each of the timed run's calls once
        assert row["sparse_calls"] == row["dense_calls"] == calls // 2


def test_generate_plan_prints_the_summary_and_checks_the_grid(tmp_path, capsys):
    from dit_accel.cli.main import main
    from dit_accel.models.tiny_shapes import TINY_SHAPES_GRID

    plan = SparsePlan((Phase(0, 1), Phase(1, None, {i: TILE for i in range(4)})), num_layers=4, num_heads=4,
                      provenance={"model_class": "WanTransformer3DModel", "grids": [list(TINY_SHAPES_GRID)],
                                  "steps": 2, "call": {"num_frames": 7, "height": 48, "width": 48}})
    path = plan.save(tmp_path / "plan.json")
    base = ["generate", "--model", "tiny-shapes", "--plan", str(path), "--steps", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a.gif")]) == 0  # with the dense run and the warm-ups beside it
    printed = capsys.readouterr().out
    assert "vs dense" in printed
    base.append("--no-compare-dense")
    assert plan.summary_line() in printed and '"phases"' not in printed and max(map(len, printed.splitlines())) < 300
    meta = json.loads((tmp_path / "a.gif.json").read_text())
    assert meta["plan_summary"] == plan.summary_line() and meta["density"]["mean"] < 1
    assert main([*base, "--height", "96", "--width", "96", "--out", str(tmp_path / "b.gif")]) == 2
    err = capsys.readouterr().err
    assert "calibrated for token grid 4x12x12 (--frames 7 --height 48 --width 48); this call's token grid is 4x24x24" \
        in err and "--plan-any-grid" in err
    assert main([*base, "--steps", "3", "--out", str(tmp_path / "c.gif")]) == 2
    assert "calibrated for 2 denoising steps; this run has 3" in capsys.readouterr().err
    assert main([*base, "--height", "96", "--width", "96", "--plan-any-grid", "--out", str(tmp_path / "d.gif")]) == 0
    meta = json.loads((tmp_path / "d.gif.json").read_text())
    assert [w for w in meta["warnings"] if "running it anyway" in w]
