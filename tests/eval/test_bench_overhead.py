"""python -m dit_accel.eval.bench_overhead: the tiny Wan transformer unwrapped vs through apply()."""
import pytest

import dit_accel
from dit_accel.eval import bench_overhead


def test_rows_and_a_method_config(tmp_path, capsys):
    config = tmp_path / "methods.yaml"
    config.write_text("tile:\n  - {label: tile-small, tile: [1, 4, 4], window: [1, 1, 1]}\n")
    assert bench_overhead.main(["--grid", "3,8,8", "--rounds", "1", "--calls", "1", "--copies", "1",
                                "--method-config", str(config)]) is None
    out = capsys.readouterr().out
    expected = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)).plan((3, 8, 8)).density
    assert f"density {expected:.3f}" in out and "Dense()" in out and "tile-small" in out
    result = bench_overhead.run((3, 8, 8), rounds=2, calls_per_round=1, copies=2)
    rows = {r["name"]: r for r in result["rows"]}
    defaults = {f"{name} (tiny-wan default)" for name in ("tile", "gna", "radial", "sla")}
    assert set(rows) == {"unwrapped", "Dense()", "Tile(1x4x4, window 1)", "GNA(3, 5, 5)"} | defaults
    assert rows["unwrapped"]["vs_unwrapped"] == 1.0 and rows["unwrapped"]["density"] is None
    assert rows["Dense()"]["vs_dense"] == 1.0
    assert result["tokens"] == 192 and all(r["ms"] > 0 for r in rows.values())
    assert result["model"] == "tiny-wan" and result["copies"] == 2
    assert result["backends"]["Tile(1x4x4, window 1)"] == ["one-pass"]  # 1 of 3 key blocks, 192 tokens
    with pytest.raises(ValueError, match="copies"):
        bench_overhead.run((3, 8, 8), rounds=1, copies=0)


def test_the_shipped_model_with_its_defaults():
    result = bench_overhead.run(rounds=1, calls_per_round=1, model="tiny-shapes", copies=1)
    assert result["model"] == "tiny-shapes" and result["grid"] == [4, 12, 12]
    names = {r["name"] for r in result["rows"]}
    assert names == {"unwrapped", "Dense()"} | {f"{m} (tiny-shapes default)" for m in ("tile", "gna", "radial", "sla")}
    assert result["backends"]["sla (tiny-shapes default)"] == ["torch"]


def test_rounds_rotate_or_shuffle_the_contender_order():
    from dit_accel.eval.bench_cpu import run_rounds

    seen = []
    calls = {name: (lambda name=name: seen.append(name)) for name in "abcd"}
    times = run_rounds(calls, 6, warmup=0)
    assert seen[:8] == list("abcd") + list("bcda") and all(len(t) == 6 for t in times.values())
    seen.clear()
    run_rounds(calls, 6, warmup=0, shuffle=True)
    rounds = [seen[i:i + 4] for i in range(0, 24, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every contender once per round
    assert len({tuple(r) for r in rounds}) > 2  # in orders that change
    again = list(seen)
    seen.clear()
    run_rounds(calls, 6, warmup=0, shuffle=True)
    assert seen == again  # seeded: the same orders on every run
