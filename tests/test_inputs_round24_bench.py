"""Round 24 ("trust") of `dit-accel bench kernels`: a run stopped part-way (Ctrl-C, a lost GPU lease) kept nothing,
as the command wrote its --out once, at the end. Each shape's rows are written as they finish, marked
``"complete": false`` until the run ends."""

import json

from dit_accel.cli.main import main
from dit_accel.eval import bench


def _fake_shapes(monkeypatch, stop_at: int):
    """``_bench_shape`` giving one row per shape, and a KeyboardInterrupt at shape number ``stop_at`` (0-based)."""
    calls = []

    def fake(shape, *args, **kwargs):
        calls.append(shape.name)
        if len(calls) - 1 == stop_at:
            raise KeyboardInterrupt
        return [{"shape": shape.name}]

    monkeypatch.setattr(bench, "_bench_shape", fake)
    return calls


def test_an_interrupted_kernels_run_keeps_the_shapes_it_finished(monkeypatch, tmp_path, capsys):
    assert len(bench.CPU_SHAPES) >= 2
    _fake_shapes(monkeypatch, stop_at=1)
    out = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--device", "cpu", "--out", str(out)]) == 130
    record = json.loads(out.read_text())
    assert record["complete"] is False and [r["shape"] for r in record["rows"]] == [bench.CPU_SHAPES[0].name]
    assert f"{out} holds the 1 row timed so far" in capsys.readouterr().err


def test_a_run_interrupted_before_any_shape_finished_names_no_file(monkeypatch, tmp_path, capsys):
    _fake_shapes(monkeypatch, stop_at=0)
    out = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--device", "cpu", "--out", str(out)]) == 130
    assert not out.exists() and "holds" not in capsys.readouterr().err


def test_a_finished_run_is_complete_and_progress_sees_each_shape(monkeypatch):
    _fake_shapes(monkeypatch, stop_at=-1)
    seen = []
    result = bench.bench_kernels(bench.CPU_SHAPES[:2], [0.5], progress=False,
                                 on_progress=lambda partial: seen.append((partial["complete"], len(partial["rows"]))))
    assert seen == [(False, 1), (False, 2)] and result["complete"] is True and len(result["rows"]) == 2
